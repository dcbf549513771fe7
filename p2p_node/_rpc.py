"""The libp2p edge: host construction, and request/reply exchanges on kept streams.

This module only moves bytes. Everything libp2p can raise is translated here,
once, into `JobError`s with an `ErrorCode`; nothing above it sees a libp2p
exception.

Each exchange is one varint-framed request and one framed reply on a libp2p
stream, as with libp2p's request_response; but a stream is not closed after its
reply. It goes back to a per-peer pool and carries the next request, which
saves the stream open and multistream negotiation that dominate a small job
(see bench/overhead.py). A stream carries one exchange at a time, so
concurrency is the number of streams; nothing is multiplexed by request id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.protocol_muxer.exceptions import MultiselectClientError
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH as NOISE_MAX_PLAINTEXT
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux import yamux
from libp2p.transport.exceptions import SecurityUpgradeFailure

from scheduler import ErrorCode, InferenceRequest, InferenceResult, JobError

from . import _codec as _wire
from ._errors import leaves
from ._framing import FrameBuffer, FrameError, encode_frame
from ._messages import ErrorReply, Reply, Request, RunRequest, WireError
from ._psk import PreSharedKey

# py-libp2p cuts stream data into yamux frames of 64 KiB, header included, and a
# Noise message carries at most 65,519 bytes: every full frame went out as two
# Noise messages, the second of 29 bytes, each paying the whole per-message cost
# of both ends (bench: about a tenth of the CPU a client and a node spend moving
# a float32 batch). This only shapes what we send; any yamux peer takes frames of
# any size up to its window.
yamux.MAX_MESSAGE_SIZE = min(yamux.MAX_MESSAGE_SIZE, NOISE_MAX_PLAINTEXT)


async def _window_update_when_half_read(self: yamux.YamuxStream, *, bytes_read: int = 0) -> None:
    """Credit the sender only once half of the receive window has been read.

    py-libp2p's own policy sends a WINDOW_UPDATE after nearly every read, and a
    GossipSub RPC takes two or three reads (its varint length is read a byte at
    a time): a node sent five to ten updates, each a Noise message the peer
    must read, for every record it received. This is go-yamux's rule, which
    py-libp2p's docstring claims: a sender blocks only at an empty window, and
    by then everything it sent was read, which is at least half, so an update
    always comes.
    """
    delta = 0
    async with self.window_lock:
        self._pending_recv_release += max(0, bytes_read)
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        threshold = self._grow_threshold()
        if self.target_recv_window - (self.recv_window + buffered) >= max(threshold, 1):
            delta = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
    if delta > 0:
        await self.send_window_update(delta, skip_lock=True)


yamux.YamuxStream._auto_tune_and_send_window_update = _window_update_when_half_read  # type: ignore[method-assign]

logger = logging.getLogger(__name__)

INFER_PROTOCOL = TProtocol("/p2p-node/infer/1.0.0")
JOB_PROTOCOL = TProtocol("/p2p-node/job/1.0.0")
MODELS_PROTOCOL = TProtocol("/p2p-node/models/1.0.0")
PEERS_PROTOCOL = TProtocol("/p2p-node/peers/1.0.0")
PLACE_PROTOCOL = TProtocol("/p2p-node/place/1.0.0")
SELECT_PROTOCOL = TProtocol("/p2p-node/select/1.0.0")  # select? and feedback
LOAD_PROTOCOL = TProtocol("/p2p-node/load/1.0.0")  # load?: a coordinator's probe
SYNC_PROTOCOL = TProtocol("/p2p-node/sync/1.0.0")  # sync?: records swapped on connecting

MAX_WARNED_ADDRESSES = 4096  # refused addresses remembered, to warn once for each

# Multistream negotiation of a new stream; libp2p's default is 30 s.
NEGOTIATE_TIMEOUT_S = 5
# How long past a request's own deadline we wait for the peer's DEADLINE_EXCEEDED.
REPLY_GRACE_S = 2.0
# A caller drops a pooled stream idle this long; a server closes one idle longer,
# so a caller never reuses a stream the server is closing.
CLIENT_IDLE_S = 30.0
SERVER_IDLE_S = 60.0
MAX_IDLE_STREAMS_PER_PEER = 64
READ_CHUNK = 64 * 1024
# After refusing an oversize request, how long we read and drop the rest of it so
# that the caller, still writing, gets to read the refusal (then the stream is reset).
SKIP_OVERSIZE_S = 10.0

ADDRS_TTL_S = 5.0  # how long a host's addresses are reused (see _cache_addrs)

# What a broken or vanished peer looks like from a stream.
SEND_TIMEOUT_S = 30.0
OPEN_TIMEOUT_S = 10.0
_TRANSPORT_ERRORS = (
    StreamError,
    StreamFailure,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
    EOFError,
)

Handler = Callable[[Request, str], Awaitable[Reply]]


def new_libp2p_host(
    key_pair: KeyPair, *, mdns: bool = False, psk: PreSharedKey | None = None
) -> IHost:
    """A host that speaks TCP + Noise + Yamux and nothing weaker; mDNS on a LAN if asked.

    With a `psk` every connection is encrypted with it first (a libp2p private
    network): peers without the same key never complete a handshake.
    """
    security = {
        NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    }
    connections = ConnectionConfig(
        min_connections=0,
        # One connection per peer; with more allowed, a successful dial still waits
        # out the 250 ms happy-eyeballs delay before returning.
        max_connections_per_peer=1,
        low_watermark=0,
        outbound_stream_protocol_negotiation_timeout=NEGOTIATE_TIMEOUT_S,
        inbound_stream_protocol_negotiation_timeout=NEGOTIATE_TIMEOUT_S,
    )
    host = new_host(
        key_pair=key_pair,
        sec_opt=security,
        muxer_preference="YAMUX",
        negotiate_timeout=NEGOTIATE_TIMEOUT_S,
        connection_config=connections,
        enable_mDNS=mdns,
        psk=psk.hex if psk else None,
    )
    if psk is not None:
        _log_refused_handshakes(host, psk)
    _cache_addrs(host)
    return host


def _cache_addrs(host: IHost) -> None:
    """Reuse the host's addresses for ADDRS_TTL_S instead of rebuilding them per call.

    py-libp2p rebuilds them from the listening sockets on every call, about a
    millisecond, and calls it for each pubsub message it publishes or forwards
    (to attach its signed peer record), as do we for each record we make.
    Kept, an idle 3-node network of processes used about a tenth less CPU.
    Listen addresses change only when a listener starts or stops, and observed
    ones seldom; an empty list (before listening) is never kept.
    """
    build = host.get_addrs
    kept: list[multiaddr.Multiaddr] = []
    built_at = -float("inf")

    def get_addrs() -> list[multiaddr.Multiaddr]:
        nonlocal kept, built_at
        now = time.monotonic()
        if not kept or now - built_at > ADDRS_TTL_S:
            kept, built_at = build(), now
        return list(kept)

    host.get_addrs = get_addrs  # type: ignore[method-assign]


def _log_refused_handshakes(host: IHost, psk: PreSharedKey) -> None:
    """Log each inbound connection whose handshake fails: in a private network, most
    likely a peer without our key. libp2p itself only says so at debug level. The
    first refusal from each address is a warning, later ones (a peer that keeps
    redialling, a port scanner) are at debug."""
    network: Any = host.get_network()
    upgrade = network.upgrade_inbound_raw_conn
    warned: set[str] = set()

    async def logged_upgrade(raw_conn: Any, maddr: multiaddr.Multiaddr) -> Any:
        remote = raw_conn.get_remote_address()
        try:
            return await upgrade(raw_conn, maddr)
        except Exception as error:
            # Mostly a SwarmException; but a stranger's bytes decrypted with our key
            # are garbage, and not every way that fails comes wrapped in one (a CI run
            # refused a stranger and logged nothing).
            host_ip = remote[0] if remote else "?"
            first = host_ip not in warned and len(warned) < MAX_WARNED_ADDRESSES
            if first:
                warned.add(host_ip)
            logger.log(
                logging.WARNING if first else logging.DEBUG,
                "refused a connection from %s: %s: %s (a peer outside private network %s?)",
                f"{remote[0]}:{remote[1]}" if remote else "an unknown address",
                type(error).__name__,
                error,
                psk.fingerprint,
            )
            raise

    network.upgrade_inbound_raw_conn = logged_upgrade


def _only_transport_errors(error: BaseException) -> bool:
    """Whether `error`, or every error in its group, says the stream or connection
    ended (the reader and the writer of one stream may both see its reset)."""
    return all(isinstance(leaf, _TRANSPORT_ERRORS) for leaf in leaves(error))


_PSK_HINT = "; is it in the same private network (--psk)?"


def _handshake_failed(error: BaseException) -> bool:
    """Whether a dial error comes from a failed security handshake.

    libp2p reports a dial as one SwarmDialAllFailedError, caused by a MultiError of
    the per-address errors, each caused by what went wrong in its upgrade; trio
    may wrap any of them in exception groups.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, SecurityUpgradeFailure):
            return True
        if isinstance(current, BaseExceptionGroup):
            pending.extend(leaves(current))
        errors = getattr(current, "errors", ())  # libp2p's MultiError
        if isinstance(errors, list | tuple):
            pending.extend(e for e in errors if isinstance(e, BaseException))
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False


@asynccontextmanager
async def run_host(host: IHost, listen: Sequence[multiaddr.Multiaddr]) -> AsyncIterator[None]:
    """`host.run(listen)` without libp2p's auto-connector.

    The auto-connector dials peerstore entries until the host holds ~150
    connections; which peers a node talks to is ours to decide.
    """
    async with host.run(listen):
        network: Any = host.get_network()  # the Swarm; its interface lacks the connector
        await network.auto_connector.stop()
        yield


class _Channel:
    """One libp2p stream carrying frames, with what has been read but not consumed."""

    def __init__(self, stream: INetStream, max_frame: int) -> None:
        self.stream = stream
        self.frames = FrameBuffer(max_frame)
        self.idle_since = trio.current_time()

    @property
    def connection_closing(self) -> bool:
        closing = getattr(getattr(self.stream, "muxed_conn", None), "event_shutting_down", None)
        return closing is not None and closing.is_set()

    async def send(self, payload: bytes) -> None:
        """Write one frame, shielded from cancellation.

        py-libp2p writes each muxer frame to the Noise channel in the caller's
        task: a write cancelled halfway leaves a partial Noise message on the TCP
        connection, the peer fails to decrypt it ("Failed authentication of
        message") and the whole connection dies. So a frame, once started, is
        finished; a cancellation takes effect right after. Bounded by the caller's
        deadline (and SEND_TIMEOUT_S), so that a peer that stops reading cannot hold
        us past it: then the frame is cut, and the stream is done for.
        """
        limit = min(trio.current_effective_deadline(), trio.current_time() + SEND_TIMEOUT_S)
        with trio.CancelScope(shield=True):
            with trio.move_on_at(limit) as stuck:
                await self.stream.write(encode_frame(payload))
        if stuck.cancelled_caught:
            raise SendTimedOut("the peer did not take the message in time")

    async def receive(self) -> bytes:
        """The next frame. Raises EOFError-like transport errors when the peer hangs up."""
        while (frame := self.frames.next_frame()) is None:
            await self.fill()
        return frame

    async def skip(self, count: int, within: float) -> bool:
        """Read and drop `count` bytes (the rest of a refused frame), in constant
        memory; False if the peer hung up or took longer than `within` s."""
        with trio.move_on_after(within):
            while count > 0:
                try:
                    data = await self.stream.read(min(READ_CHUNK, count))
                except _TRANSPORT_ERRORS:
                    return False
                if not data:
                    return False
                count -= len(data)
            return True
        return False

    async def fill(self) -> None:
        data = await self.stream.read(READ_CHUNK)
        if not data:
            raise EOFError("stream closed by the peer")
        self.frames.feed(data)

    async def close(self) -> None:
        """Close our side gracefully, so that what we wrote is still read."""
        with trio.CancelScope(shield=True), trio.move_on_after(1), suppress(*_TRANSPORT_ERRORS):
            await self.stream.close()

    async def discard(self) -> None:
        """Reset the stream; it is never used again. Safe to call while cancelled."""
        with trio.CancelScope(shield=True), trio.move_on_after(1), suppress(*_TRANSPORT_ERRORS):
            await self.stream.reset()


class _InboundSession:
    """What the reader of an inbound stream tells the task answering it."""

    def __init__(self) -> None:
        self.work = trio.CancelScope()
        self.hung_up = False

    def hang_up(self) -> None:
        self.hung_up = True
        self.work.cancel()


class SendTimedOut(trio.BrokenResourceError):
    """A frame could not be written by the deadline: the peer is not reading."""


class _Stale(Exception):
    """A pooled stream died before the request got an answer: try a fresh one."""


class Rpc:
    """Sends our requests to peers and serves theirs, on one libp2p host.

    Requests may be at most `max_request_bytes`, or `request_limits[protocol]`
    for the protocols it names, both ways: we send none larger, and refuse a
    larger one as soon as its length prefix arrives. Replies may be at most
    `max_reply_bytes`. At most `max_concurrent_inbound` streams opened by peers
    are served at once (idle kept streams included); past it a new stream is
    answered OVERLOADED.
    """

    def __init__(
        self,
        host: IHost,
        *,
        max_request_bytes: int,
        max_reply_bytes: int,
        max_concurrent_inbound: int,
        request_limits: Mapping[TProtocol, int] | None = None,
    ) -> None:
        self.host = host
        self.peer_id = str(host.get_id())
        self._max_request_bytes = max_request_bytes
        self._request_limits = dict(request_limits or {})
        self._max_reply_bytes = max_reply_bytes
        self._max_inbound = max_concurrent_inbound
        self._inbound_slots = trio.Semaphore(max_concurrent_inbound)
        self._idle: dict[tuple[str, TProtocol], list[_Channel]] = {}
        self._answering = 0
        self._closing = False
        self._all_answered = trio.Event()
        self._calls: dict[str, set[trio.CancelScope]] = {}  # in-flight exchanges by peer
        self._watcher: trio.Nursery | None = None
        self._watched: set[object] = set()  # connections whose closing we wait for

    def request_limit(self, protocol: TProtocol) -> int:
        """The largest request, in bytes, sent or taken on `protocol`."""
        return self._request_limits.get(protocol, self._max_request_bytes)

    @property
    def in_flight(self) -> int:
        """Requests being answered: from their arrival until their reply is sent."""
        return self._answering

    async def drain(self, grace: float) -> int:
        """Answer new requests SHUTTING_DOWN; wait up to `grace` s for the others.

        Returns how many were still unanswered.
        """
        self._closing = True
        if self._answering == 0:
            self._all_answered.set()
        with trio.move_on_after(grace):
            await self._all_answered.wait()
        return self._answering

    async def connect(self, addr: multiaddr.Multiaddr, timeout: float) -> str:
        """Dial a peer by its full multiaddr; returns its peer id."""
        info = info_from_p2p_addr(addr)
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

    # --- calling ----------------------------------------------------------------

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
        )
        reply = await self.call(peer_id, INFER_PROTOCOL, message, timeout + REPLY_GRACE_S)
        result: InferenceResult = expect_reply(reply, InferenceResult, peer_id)
        return result

    async def call(
        self, peer_id: str, protocol: TProtocol, request: Request, timeout: float
    ) -> Reply:
        """One exchange with `peer_id`. Every failure raises `JobError`."""
        payload = _wire.encode(request)
        limit = self.request_limit(protocol)
        if len(payload) > limit:
            raise JobError(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"a {protocol} request of {len(payload)} bytes exceeds the limit of {limit} "
                "bytes for that protocol",
            )
        lost = trio.CancelScope()  # cancelled by peer_gone
        calls = self._calls.setdefault(peer_id, set())
        calls.add(lost)
        try:
            with trio.fail_after(timeout), lost:
                reply = await self._exchange(peer_id, protocol, payload)
        except trio.TooSlowError:
            raise JobError(
                ErrorCode.DEADLINE_EXCEEDED, f"no reply within {timeout:g} s", peer=peer_id
            ) from None
        finally:
            calls.discard(lost)
            if not calls:
                self._calls.pop(peer_id, None)
        if lost.cancelled_caught:
            raise JobError(
                ErrorCode.PEER_UNREACHABLE, "the connection to the peer was lost", peer=peer_id
            )
        try:
            return _wire.decode_reply(reply)
        except WireError as error:
            raise JobError(error.code, f"bad reply: {error.message}", peer=peer_id) from None

    async def open_stream(self, peer_id: str, protocol: TProtocol, timeout: float) -> INetStream:
        """A stream to `peer_id` for a protocol that is not request and reply (beats).
        Raises JobError."""
        with trio.fail_after(timeout):  # _open raises its own error at the deadline
            channel = await self._open(peer_id, protocol)
        return channel.stream

    async def _exchange(self, peer_id: str, protocol: TProtocol, payload: bytes) -> bytes:
        key = (peer_id, protocol)
        pooled = await self._take_idle(key)
        if pooled is not None:
            try:
                return await self._round_trip(key, pooled, payload, reused=True)
            except _Stale:
                logger.debug("pooled stream to %s was dead; opening a new one", peer_id)
        channel = await self._open(peer_id, protocol)
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except trio.Cancelled:  # opened for nothing: keep it for the next exchange
            await self._keep_idle(key, channel)
            raise
        return await self._round_trip(key, channel, payload, reused=False)

    async def _round_trip(
        self, key: tuple[str, TProtocol], channel: _Channel, payload: bytes, *, reused: bool
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
        except _TRANSPORT_ERRORS as error:
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

    async def _keep_idle(self, key: tuple[str, TProtocol], channel: _Channel) -> None:
        channel.idle_since = trio.current_time()
        idle = self._idle.setdefault(key, [])
        if len(idle) < MAX_IDLE_STREAMS_PER_PEER:
            idle.append(channel)
        else:
            await channel.discard()

    async def _take_idle(self, key: tuple[str, TProtocol]) -> _Channel | None:
        idle = self._idle.get(key)
        now = trio.current_time()
        while idle:
            channel = idle.pop()
            if now - channel.idle_since < CLIENT_IDLE_S and not channel.connection_closing:
                return channel
            await channel.discard()  # too old to trust: the server may be closing it
        return None

    async def _open(self, peer_id: str, protocol: TProtocol) -> _Channel:
        """A new stream speaking `protocol`, by the caller's deadline.

        Opening writes frames (yamux's SYN, multistream-select's lines), and a
        frame cut halfway breaks the connection's framing: every stream on it
        dies. So the caller's deadline never cuts it: the opening runs in a task
        of its own, bounded only by OPEN_TIMEOUT_S, and a caller whose deadline
        (a load probe's is a fraction of a second) comes first leaves it there; a
        stream opened for no one is then reset.
        """
        deadline = trio.current_effective_deadline()
        opened: list[_Channel | JobError] = []
        done = trio.Event()

        async def open_in_full() -> None:
            result = await self._open_in_full(peer_id, protocol)
            if done.is_set():  # the caller left
                if isinstance(result, _Channel):
                    await result.discard()
                return
            opened.append(result)
            done.set()

        if self._watcher is None:  # not running yet: nothing to leave it to
            with trio.CancelScope(shield=True):
                await open_in_full()
        else:
            self._watcher.start_soon(open_in_full)
            try:
                with trio.move_on_at(deadline):
                    await done.wait()
            except BaseException:  # cancelled from outside: no one takes the stream
                done.set()
                if opened and isinstance(opened[0], _Channel):
                    await opened[0].discard()
                raise
        if not opened:
            done.set()  # tells the opening task it opens for no one
            raise JobError(ErrorCode.DEADLINE_EXCEEDED, "no stream opened in time", peer=peer_id)
        if isinstance(opened[0], JobError):
            raise opened[0]
        return opened[0]

    async def _open_in_full(self, peer_id: str, protocol: TProtocol) -> _Channel | JobError:
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
            if isinstance(error.__cause__, MultiselectClientError):
                message = f"peer does not speak {protocol}"
            else:
                message = f"cannot open a stream: {error}"
            return JobError(ErrorCode.PEER_UNREACHABLE, message, peer=peer_id)
        except Exception as error:  # dialing raises many unrelated libp2p types
            return JobError(
                ErrorCode.PEER_UNREACHABLE, f"cannot reach the peer: {error}", peer=peer_id
            )
        self._watch(stream, peer_id)
        return _Channel(stream, self._max_reply_bytes)

    def watch_connections(self, nursery: trio.Nursery) -> None:
        """Call `peer_gone` as soon as a connection we exchange on starts to close.

        A stream of a closed connection does not always see the close (a read can
        wait on), and the disconnect notification can come late or not at all, so
        one task per connection waits on the connection's own shutdown event.
        """
        self._watcher = nursery

    def _watch(self, stream: INetStream, peer_id: str) -> None:
        conn = getattr(stream, "muxed_conn", None)
        closing = getattr(conn, "event_shutting_down", None)
        if self._watcher is None or closing is None or conn in self._watched:
            return
        self._watched.add(conn)

        async def wait_for_close() -> None:
            try:
                await closing.wait()
                self.peer_gone(peer_id)
            finally:
                self._watched.discard(conn)

        self._watcher.start_soon(wait_for_close)

    def peer_gone(self, peer_id: str) -> None:
        """The connection to `peer_id` closed: fail its exchanges now, forget its streams.

        A stream of a closed connection does not always see the close (a read can
        wait on), so the caller would otherwise wait out its whole timeout.
        """
        for scope in self._calls.get(peer_id, ()):
            scope.cancel()
        for key in [k for k in self._idle if k[0] == peer_id]:
            del self._idle[key]

    # --- serving ----------------------------------------------------------------

    def serve(self, protocol: TProtocol, handler: Handler) -> None:
        """Answer `protocol` with `handler`; every failure becomes an ErrorReply."""

        async def on_stream(stream: INetStream) -> None:
            channel = _Channel(stream, self.request_limit(protocol))
            peer = str(stream.muxed_conn.peer_id)
            try:
                self._inbound_slots.acquire_nowait()
            except trio.WouldBlock:
                logger.info("refused a %s stream from %s: inbound streams full", protocol, peer)
                why = (
                    "too many open streams to this node: it serves at most "
                    f"{self._max_inbound} streams from peers at once (max_concurrent_inbound); "
                    "try again shortly"
                )
                await self._refuse(channel, why)
                return
            try:
                await self._serve_channel(channel, peer, protocol, handler)
            except Exception as error:
                if _only_transport_errors(error):  # the caller left: reset, closed, gone
                    logger.debug("stream from %s for %s ended: %r", peer, protocol, error)
                else:
                    # A node never crashes on what a peer sends: log the bug, drop the stream.
                    logger.exception("serving %s to %s failed", protocol, peer)
                await channel.discard()
            else:
                await channel.close()
            finally:
                self._inbound_slots.release()

        self.host.set_stream_handler(protocol, on_stream)

    async def _serve_channel(
        self, channel: _Channel, peer: str, protocol: TProtocol, handler: Handler
    ) -> None:
        """Answer the requests on one stream in order, until the caller leaves or idles.

        A reader task reads the stream all along: it is waiting for the next
        request anyway, so it also sees a hang-up (reset, close, a cancelled
        caller) while a request is being answered, and cancels that work.
        """
        session = _InboundSession()
        send, receive = trio.open_memory_channel[bytes | FrameError](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_requests, channel, send, session)
            while True:
                with trio.move_on_after(SERVER_IDLE_S):
                    try:
                        payload = await receive.receive()
                    except trio.EndOfChannel:
                        break
                    if isinstance(payload, FrameError):
                        # The stream cannot be resynchronised: answer once, then drop it.
                        await self._refuse_frame(channel, payload, peer, protocol)
                        break
                    if not await self._answer(channel, payload, peer, protocol, handler, session):
                        break
                    continue
                break  # idle too long
            nursery.cancel_scope.cancel()

    async def _refuse_frame(
        self, channel: _Channel, error: FrameError, peer: str, protocol: TProtocol
    ) -> None:
        """Answer a request we cannot read. An oversize one gets MESSAGE_TOO_LARGE as
        soon as its length is known; its body is then read and dropped, never held,
        so that a caller still writing it finishes and reads the answer."""
        if not error.too_large:
            reply = ErrorReply(ErrorCode.MALFORMED_MESSAGE, str(error), self.peer_id)
            await self._send_reply(channel, reply)
            return
        limit = self.request_limit(protocol)
        logger.info(
            "refused a %s request of %d bytes from %s (limit %d)",
            protocol,
            error.length,
            peer,
            limit,
        )
        message = (
            f"a {protocol} request of {error.length} bytes exceeds this node's limit of "
            f"{limit} bytes for that protocol"
        )
        await self._send_reply(
            channel, ErrorReply(ErrorCode.MESSAGE_TOO_LARGE, message, self.peer_id)
        )
        if not await channel.skip(error.remaining, SKIP_OVERSIZE_S):
            await channel.discard()

    async def _answer(
        self,
        channel: _Channel,
        payload: bytes,
        peer: str,
        protocol: TProtocol,
        handler: Handler,
        session: _InboundSession,
    ) -> bool:
        """Answer one request; False if the caller hung up before its reply."""
        self._answering += 1
        try:
            reply: Reply
            if self._closing:
                reply = ErrorReply(
                    ErrorCode.SHUTTING_DOWN, "this node is shutting down", self.peer_id
                )
            else:
                with trio.CancelScope() as session.work:
                    reply = await self._dispatch(payload, peer, protocol, handler)
                if session.hung_up:
                    return False
            await self._send_reply(channel, reply)
            return True
        finally:
            self._answering -= 1
            if self._closing and self._answering == 0:
                self._all_answered.set()

    async def _read_requests(
        self,
        channel: _Channel,
        requests: trio.MemorySendChannel[bytes | FrameError],
        session: _InboundSession,
    ) -> None:
        async with requests:
            try:
                while True:
                    await requests.send(await channel.receive())
            except FrameError as error:
                await requests.send(error)
            except _TRANSPORT_ERRORS:
                session.hang_up()

    async def _dispatch(
        self, payload: bytes, peer: str, protocol: TProtocol, handler: Handler
    ) -> Reply:
        try:
            request = _wire.decode_request(payload)
        except WireError as error:
            logger.info("malformed %s request from %s: %s", protocol, peer, error.message)
            return ErrorReply.from_error(error, self.peer_id)
        try:
            return await handler(request, peer)
        except JobError as error:
            return ErrorReply.from_error(error, self.peer_id)
        except Exception:
            logger.exception("handler for %s failed on a request from %s", protocol, peer)
            return ErrorReply(
                ErrorCode.INTERNAL, "internal error; see the node's log", self.peer_id
            )

    async def _send_reply(self, channel: _Channel, reply: Reply) -> None:
        payload = _wire.encode(reply)
        if len(payload) > self._max_reply_bytes:
            message = f"reply of {len(payload)} bytes exceeds the limit of {self._max_reply_bytes}"
            payload = _wire.encode(ErrorReply(ErrorCode.MESSAGE_TOO_LARGE, message, self.peer_id))
        await channel.send(payload)

    async def _refuse(self, channel: _Channel, why: str) -> None:
        with suppress(*_TRANSPORT_ERRORS):
            await self._send_reply(channel, ErrorReply(ErrorCode.OVERLOADED, why, self.peer_id))
        await channel.close()


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
