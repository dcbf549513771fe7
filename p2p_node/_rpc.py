"""Calling peers: request/reply exchanges on kept streams, the node's protocols, and the
translation of everything libp2p can raise on the calling side into `JobError`s.

Each exchange is one varint-framed request and one framed reply on a libp2p
stream, as with libp2p's request_response; but a stream is not closed after its
reply. It goes back to a per-peer pool and carries the next request, which
saves the stream open and multistream negotiation that dominate a small job
(see bench/overhead.py). On most protocols a stream carries one exchange at a
time, so concurrency is the number of streams. The job and infer protocols,
which carry small jobs by the thousand, are pipelined (`_pipeline`): one stream
per peer and protocol carries every exchange at once, tagged by id, and frames
sent meanwhile share a write. A peer that does not speak the pipelined version
is called one exchange per stream, as before. The other end is `_serve.Server`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.protocol_muxer.exceptions import MultiselectClientError
from libp2p.transport.exceptions import SecurityUpgradeFailure

from scheduler import ErrorCode, InferenceRequest, InferenceResult, JobError

from . import _codec
from ._channel import CLIENT_IDLE_S, TRANSPORT_ERRORS, Channel, MessageLimits, SendTimedOut, Traffic
from ._framing import FrameError
from ._host import new_libp2p_host as new_libp2p_host  # where callers have found it
from ._host import run_host as run_host
from ._large import Buffer, joined, size_of
from ._libp2p import PeerRefused, caused_by
from ._messages import ErrorReply, Reply, Request, RunRequest, WireError
from ._pipeline import INFER_PROTOCOL as INFER_PROTOCOL
from ._pipeline import JOB_PROTOCOL as JOB_PROTOCOL
from ._pipeline import PIPELINED, CallerPipe, KeptPipes

logger = logging.getLogger(__name__)

MODELS_PROTOCOL = TProtocol("/p2p-node/models/1.0.0")
PEERS_PROTOCOL = TProtocol("/p2p-node/peers/1.0.0")
PLACE_PROTOCOL = TProtocol("/p2p-node/place/1.0.0")
SELECT_PROTOCOL = TProtocol("/p2p-node/select/1.0.0")  # select? and feedback
LOAD_PROTOCOL = TProtocol("/p2p-node/load/1.0.0")  # load?: a coordinator's probe
SYNC_PROTOCOL = TProtocol("/p2p-node/sync/1.0.0")  # sync?: records swapped on connecting

# How long past a request's own deadline we wait for the peer's DEADLINE_EXCEEDED.
REPLY_GRACE_S = 2.0
MAX_IDLE_STREAMS_PER_PEER = 64
OPEN_TIMEOUT_S = 10.0

_PSK_HINT = "; is it in the same private network (--psk)?"


def _handshake_failed(error: BaseException) -> bool:
    """Whether a dial error comes from a failed security handshake (not our own gate)."""
    return caused_by(error, SecurityUpgradeFailure) and not caused_by(error, PeerRefused)


class _Stale(Exception):
    """A pooled stream died before the request got an answer: try a fresh one."""


class ConnectionWatcher:
    """Calls `on_closing(peer_id)` as soon as a watched connection starts to close.

    A stream of a closed connection does not always see the close (a read can
    wait on), and the disconnect notification can come late or not at all, so
    one task per connection waits on the connection's own shutdown event.
    """

    def __init__(self, nursery: trio.Nursery, on_closing: Callable[[str], None]) -> None:
        self._nursery = nursery
        self._on_closing = on_closing
        self._watched: set[object] = set()  # connections whose closing we wait for

    def watch(self, stream: INetStream, peer_id: str) -> None:
        """Watch the connection `stream` runs on (once per connection)."""
        conn = getattr(stream, "muxed_conn", None)
        closing = getattr(conn, "event_shutting_down", None)
        if closing is None or conn in self._watched:
            return
        self._watched.add(conn)

        async def wait_for_close() -> None:
            try:
                await closing.wait()
                self._on_closing(peer_id)
            finally:
                self._watched.discard(conn)

        self._nursery.start_soon(wait_for_close)


@asynccontextmanager
async def open_rpc(host: IHost, limits: MessageLimits) -> AsyncIterator[Rpc]:
    """Call peers from `host` until exit: its stream openings and watchers end with it."""
    async with trio.open_nursery() as nursery:
        try:
            yield Rpc(host, limits, nursery)
        finally:
            nursery.cancel_scope.cancel()


class Rpc:
    """Sends our requests to peers, each on a kept stream of its protocol.

    Requests larger than `limits` allow for their protocol are refused before
    sending; replies larger than its `max_reply_bytes` are refused as they
    arrive. Background work (openings that outlive a caller's deadline, the
    connection watcher) runs in `nursery`. Get one from `open_rpc`.
    """

    def __init__(self, host: IHost, limits: MessageLimits, nursery: trio.Nursery) -> None:
        self.host = host
        self.peer_id = str(host.get_id())
        self.limits = limits
        self._tasks = nursery
        self._watcher = ConnectionWatcher(nursery, self.peer_gone)
        self._idle: dict[tuple[str, TProtocol], list[Channel]] = {}
        # In-flight exchanges by peer: the scope that fails each at once, and why it
        # was failed (empty until then).
        self._calls: dict[str, dict[trio.CancelScope, str]] = {}
        self.traffic = Traffic()  # bytes of our requests and their replies, per protocol
        # Pipelined streams by (peer, pipelined protocol), and those a peer does not speak.
        self.pipes = KeptPipes(self.start_soon)
        self._unspoken: set[tuple[str, TProtocol]] = set()

    async def connect(self, addr: multiaddr.Multiaddr, timeout: float) -> str:
        """Dial a peer by its full multiaddr; returns its peer id."""
        info = info_from_p2p_addr(addr)
        # py-libp2p refuses for 60 s to dial a peer all of whose addresses failed
        # once (its negative cache), so a peer back from a cut link or a restart
        # stayed apart for a minute. Whoever calls this backs off by its own rule
        # (membership: 0.25 s doubling to 10 s): a dial asked for is a dial made.
        network = self.host.get_network()
        if isinstance(network, Swarm):
            network.unblock_peer(info.peer_id)
        try:
            with trio.fail_after(timeout):
                await self.host.connect(info)
        except trio.TooSlowError:
            # A peer with another private network key (or none) mostly never answers
            # the handshake: each side reads the other's bytes as garbage and waits.
            raise JobError(
                ErrorCode.PEER_UNREACHABLE,
                f"no answer from {addr} within {timeout:g} s{_PSK_HINT}",
            ) from None
        except Exception as error:  # libp2p's dial errors share no base class
            # ...and sometimes the garbage fails the handshake at once.
            hint = _PSK_HINT if _handshake_failed(error) else ""
            raise JobError(
                ErrorCode.PEER_UNREACHABLE, f"cannot reach {addr}: {error}{hint}"
            ) from None
        return str(info.peer_id)

    async def infer(
        self, peer_id: str, request: InferenceRequest, timeout: float
    ) -> InferenceResult:
        """Have `peer_id` run `request` itself (the infer protocol: no forwarding)."""
        message = RunRequest(
            request.job_id,
            request.model_id,
            request.inputs,
            timeout_ms=max(1, round(timeout * 1000)),
            outputs=request.outputs,
            texts=request.texts,
            truncate=request.truncate or None,
        )
        # Its result goes back to the job's client as it came, unless changed on the way.
        reply = await self.call(
            peer_id, INFER_PROTOCOL, message, timeout + REPLY_GRACE_S, pass_on=True
        )
        result: InferenceResult = expect_reply(reply, InferenceResult, peer_id)
        return result

    async def call(
        self,
        peer_id: str,
        protocol: TProtocol,
        request: Request,
        timeout: float,
        *,
        pass_on: bool = False,
    ) -> Reply:
        """One exchange with `peer_id`. Every failure raises `JobError`. `pass_on`: the
        reply will be sent on as it is (`_codec.decode_reply`)."""
        payload = _codec.encode_parts(request)  # a large tensor's bytes are not copied
        size, limit = size_of(payload), self.limits.request_limit(protocol)
        if size > limit:
            raise JobError(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"a {protocol} request of {size} bytes exceeds the limit of {limit} "
                "bytes for that protocol",
            )
        # One scope for both ends of the call: its deadline, and peer_gone or abandon
        # (which say why in `calls`).
        scope = trio.CancelScope(deadline=trio.current_time() + timeout)
        calls = self._calls.setdefault(peer_id, {})
        calls[scope] = ""
        try:
            with scope:
                reply = await self._exchange(peer_id, protocol, payload)
        finally:
            why = calls.pop(scope)
            if not calls:
                self._calls.pop(peer_id, None)
        if scope.cancelled_caught:
            if why:
                raise JobError(ErrorCode.PEER_UNREACHABLE, why, peer=peer_id)
            raise JobError(
                ErrorCode.DEADLINE_EXCEEDED, f"no reply within {timeout:g} s", peer=peer_id
            )
        try:
            return _codec.decode_reply(reply, pass_on=pass_on)
        except WireError as error:
            raise JobError(error.code, f"bad reply: {error.message}", peer=peer_id) from None

    async def open_stream(self, peer_id: str, protocol: TProtocol, timeout: float) -> INetStream:
        """A stream to `peer_id` for a protocol that is not request and reply (beats).
        Raises JobError."""
        try:
            with trio.fail_after(timeout):  # _open raises its own error at the deadline
                channel = await self._open(peer_id, protocol)
        except trio.TooSlowError:  # ... unless the deadline lands outside it
            raise JobError(
                ErrorCode.DEADLINE_EXCEEDED, f"no stream within {timeout:g} s", peer=peer_id
            ) from None
        return channel.stream

    def start_soon(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` in the background until the Rpc closes (a kept stream's reader)."""
        self._tasks.start_soon(fn)

    def speaks(self, peer_id: str, protocol: TProtocol) -> bool:
        """False once `peer_id` refused to open a stream of `protocol` (a refusal,
        not a negotiation that timed out; until its connection closes)."""
        return (peer_id, protocol) not in self._unspoken

    async def _exchange(
        self, peer_id: str, protocol: TProtocol, payload: Sequence[Buffer]
    ) -> bytes:
        pipelined = PIPELINED.get(protocol)
        if pipelined is not None and (peer_id, pipelined) not in self._unspoken:
            kept = self.pipes.usable((peer_id, pipelined))
            if kept is not None:
                return await cast(CallerPipe, kept).exchange(payload)
            try:
                pipe = await self._pipe(peer_id, pipelined)
            except JobError:
                if (peer_id, pipelined) not in self._unspoken:
                    raise
                logger.info("%s does not speak %s; calling it on %s", peer_id, pipelined, protocol)
            else:
                return await pipe.exchange(payload)
        data = joined(payload)  # one exchange on a stream of its own
        key = (peer_id, protocol)
        pooled = await self._take_idle(key)
        if pooled is not None:
            try:
                return await self._round_trip(key, pooled, data, reused=True)
            except _Stale:
                logger.debug("pooled stream to %s was dead; opening a new one", peer_id)
        channel = await self._open(peer_id, protocol)
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except trio.Cancelled:  # opened for nothing: keep it for the next exchange
            await self._keep_idle(key, channel)
            raise
        return await self._round_trip(key, channel, data, reused=False)

    async def _round_trip(
        self, key: tuple[str, TProtocol], channel: Channel, payload: bytes, *, reused: bool
    ) -> bytes:
        try:
            await channel.send(payload)
            reply = await channel.receive()
        except FrameError as error:
            await channel.discard()
            code = ErrorCode.MESSAGE_TOO_LARGE if error.too_large else ErrorCode.MALFORMED_MESSAGE
            raise JobError(code, f"bad reply: {error}", peer=key[0]) from None
        except SendTimedOut as error:  # a live peer that is slow: not "gone"
            await channel.discard()
            raise JobError(ErrorCode.DEADLINE_EXCEEDED, str(error), peer=key[0]) from None
        except TRANSPORT_ERRORS as error:
            await channel.discard()
            if reused and not len(channel.frames):
                raise _Stale from None
            raise JobError(
                ErrorCode.PEER_UNREACHABLE,
                f"stream broke: {error or type(error).__name__}",
                peer=key[0],
            ) from None
        except BaseException:  # cancelled: the stream's state is unknown
            await channel.discard()
            raise
        await self._keep_idle(key, channel)
        return reply

    async def _pipe(self, peer_id: str, protocol: TProtocol) -> CallerPipe:
        """The pipelined stream to `peer_id` for `protocol`, opened if there is none
        (or the one there failed, or idled past CLIENT_IDLE_S). Raises JobError."""

        async def open_pipe() -> CallerPipe:
            channel = await self._open(peer_id, protocol)
            counts = self.traffic.of(protocol)
            return CallerPipe(channel.stream, self.limits.max_reply_bytes, peer_id, counts)

        pipe = await self.pipes.get((peer_id, protocol), open_pipe)
        assert pipe is not None
        return pipe

    async def _keep_idle(self, key: tuple[str, TProtocol], channel: Channel) -> None:
        channel.idle_since = trio.current_time()
        idle = self._idle.setdefault(key, [])
        if len(idle) < MAX_IDLE_STREAMS_PER_PEER:
            idle.append(channel)
        else:
            await channel.discard()

    async def _take_idle(self, key: tuple[str, TProtocol]) -> Channel | None:
        idle = self._idle.get(key)
        now = trio.current_time()
        while idle:
            channel = idle.pop()
            if now - channel.idle_since < CLIENT_IDLE_S and not channel.connection_closing:
                return channel
            await channel.discard()  # too old to trust: the server may be closing it
        return None

    async def _open(self, peer_id: str, protocol: TProtocol) -> Channel:
        """A new stream speaking `protocol`, by the caller's deadline.

        Opening writes frames (yamux's SYN, multistream-select's lines), and a
        frame cut halfway breaks the connection's framing: every stream on it
        dies. So the caller's deadline never cuts it: the opening runs in a task
        of its own, bounded only by OPEN_TIMEOUT_S, and a caller whose deadline
        (a load probe's is a fraction of a second) comes first leaves it there; a
        stream opened for no one is then reset.
        """
        deadline = trio.current_effective_deadline()
        opened: list[Channel | JobError] = []
        done = trio.Event()

        async def open_in_full() -> None:
            result = await self._open_in_full(peer_id, protocol)
            if done.is_set():  # the caller left
                if isinstance(result, Channel):
                    await result.discard()
                return
            opened.append(result)
            done.set()

        self._tasks.start_soon(open_in_full)
        try:
            with trio.move_on_at(deadline):
                await done.wait()
        except BaseException:  # cancelled from outside: no one takes the stream
            done.set()
            if opened and isinstance(opened[0], Channel):
                await opened[0].discard()
            raise
        if not opened:
            done.set()  # tells the opening task it opens for no one
            raise JobError(ErrorCode.DEADLINE_EXCEEDED, "no stream opened in time", peer=peer_id)
        if isinstance(opened[0], JobError):
            raise opened[0]
        return opened[0]

    async def _open_in_full(self, peer_id: str, protocol: TProtocol) -> Channel | JobError:
        try:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(OPEN_TIMEOUT_S) as stuck:
                    stream = await self.host.new_stream(ID.from_base58(peer_id), [protocol])
            if stuck.cancelled_caught:
                return JobError(
                    ErrorCode.PEER_UNREACHABLE,
                    f"no stream opened in {OPEN_TIMEOUT_S:g} s",
                    peer=peer_id,
                )
        except StreamFailure as error:
            cause = error.__cause__
            # Only a refusal says the peer does not speak it; a negotiation that
            # timed out or broke off (a peer's loop busy in a start-up burst) does not.
            if isinstance(cause, MultiselectClientError) and str(cause).startswith(
                "protocols not supported"
            ):
                message = f"peer does not speak {protocol}"
                self._unspoken.add((peer_id, protocol))
            else:
                message = f"cannot open a stream: {cause or error}"
            return JobError(ErrorCode.PEER_UNREACHABLE, message, peer=peer_id)
        except Exception as error:  # dialing raises many unrelated libp2p types
            return JobError(
                ErrorCode.PEER_UNREACHABLE, f"cannot reach the peer: {error}", peer=peer_id
            )
        self._watcher.watch(stream, peer_id)
        return Channel(stream, self.limits.max_reply_bytes, self.traffic.of(protocol))

    def peer_gone(self, peer_id: str) -> None:
        """The connection to `peer_id` closed: fail its exchanges now, forget its streams.

        A stream of a closed connection does not always see the close (a read can
        wait on), so the caller would otherwise wait out its whole timeout.
        """
        self._fail_calls(peer_id, "the connection to the peer was lost")
        for key in [k for k in self._idle if k[0] == peer_id]:
            del self._idle[key]
        self.pipes.forget_peer(peer_id)
        # It may come back upgraded.
        self._unspoken = {k for k in self._unspoken if k[0] != peer_id}

    def abandon(self, peer_id: str, why: str) -> None:
        """Give up on `peer_id` though its connection stays: every exchange in flight
        with it raises a retryable PEER_UNREACHABLE saying `why` now, and its idle
        streams are reset, never reused.

        For a peer the failure detector reported departed: a frozen process
        (SIGSTOP, a VM paused) keeps its connections open, since its kernel still
        answers, so nothing else would fail a call to it before the call's own
        timeout. Its streams in use are reset as their exchanges end, its
        pipelined streams at once; if it comes back, the next exchange opens a
        new stream.
        """
        self._fail_calls(peer_id, why)
        self.pipes.drop_peer(peer_id)
        for key in [k for k in self._idle if k[0] == peer_id]:
            for channel in self._idle.pop(key):
                self._tasks.start_soon(channel.discard)

    def _fail_calls(self, peer_id: str, why: str) -> None:
        calls = self._calls.get(peer_id, {})
        for scope, earlier in calls.items():
            calls[scope] = earlier or why  # the first reason is the one that failed it
            scope.cancel()


def expect_reply(reply: Reply, kind: type[Any], peer_id: str) -> Any:
    """`reply` if it is a `kind`; an ErrorReply is raised as its JobError."""
    if isinstance(reply, ErrorReply):
        raise reply.to_error()
    if not isinstance(reply, kind):
        raise JobError(
            ErrorCode.MALFORMED_MESSAGE,
            f"expected a {kind.__name__}, got a {type(reply).__name__}",
            peer=peer_id,
        )
    return reply
