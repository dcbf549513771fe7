"""Exchanges on kept streams between two real libp2p hosts on loopback."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import MultiError
from libp2p.io.msgio import VarIntLengthMsgReadWriter
from libp2p.network.exceptions import SwarmDialAllFailedError, SwarmException
from libp2p.network.stream.exceptions import StreamReset
from libp2p.peer.id import ID
from libp2p.transport.exceptions import SecurityUpgradeFailure

from p2p_node import ErrorCode, JobError
from p2p_node._channel import MessageLimits, only_transport_errors
from p2p_node._codec import decode_reply
from p2p_node._host import new_libp2p_host, run_host
from p2p_node._messages import (
    ErrorReply,
    ModelsReply,
    ModelsRequest,
    PeersRequest,
    Reply,
    RunRequest,
)
from p2p_node._rpc import (
    INFER_PROTOCOL,
    MODELS_PROTOCOL,
    Rpc,
    _handshake_failed,
    open_rpc,
)
from p2p_node._serve import Server

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")

Handler = Callable[[ModelsRequest, str], Awaitable[Reply]]


@asynccontextmanager
async def rpc_pair(
    handler: Handler,
    *,
    max_request_bytes: int = 4096,
    max_concurrent_inbound: int = 8,
    request_limits: dict[TProtocol, int] | None = None,
) -> AsyncIterator[tuple[Rpc, Server]]:
    """(caller, server): the server answers MODELS_PROTOCOL with `handler`."""
    limits = MessageLimits(max_request_bytes, 4096, request_limits or {})
    server = Server(
        new_libp2p_host(create_new_key_pair()),
        limits,
        max_concurrent_inbound=max_concurrent_inbound,
    )
    server.serve(MODELS_PROTOCOL, ModelsRequest, handler)
    host = new_libp2p_host(create_new_key_pair())
    async with run_host(server.host, [LOOPBACK]), run_host(host, []), open_rpc(host, limits) as rpc:
        await rpc.connect(server.host.get_addrs()[0], timeout=5)
        yield rpc, server


def answering(peer_id: str = "answer") -> Handler:
    async def handler(request: ModelsRequest, sender: str) -> Reply:
        return ModelsReply(peer_id, ())

    return handler


async def test_sequential_calls_reuse_one_stream() -> None:
    with trio.fail_after(20):
        async with rpc_pair(answering()) as (caller, server):
            for _ in range(5):
                reply = await caller.call(server.peer_id, MODELS_PROTOCOL, ModelsRequest(), 5)
                assert reply == ModelsReply("answer", ())
            assert len(_our_streams(caller, server)) == 1


async def test_a_pooled_stream_that_died_is_replaced_transparently() -> None:
    with trio.fail_after(20):
        async with rpc_pair(answering()) as (caller, server):
            await caller.call(server.peer_id, MODELS_PROTOCOL, ModelsRequest(), 5)
            (stream,) = _our_streams(caller, server)
            await stream.reset()
            reply = await caller.call(server.peer_id, MODELS_PROTOCOL, ModelsRequest(), 5)
    assert reply == ModelsReply("answer", ())


async def test_a_caller_that_hangs_up_cancels_the_work() -> None:
    started, cancelled = trio.Event(), trio.Event()

    async def slow(request: ModelsRequest, sender: str) -> Reply:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    with trio.fail_after(20):
        async with rpc_pair(slow) as (caller, server), trio.open_nursery() as nursery:
            nursery.start_soon(caller.call, server.peer_id, MODELS_PROTOCOL, ModelsRequest(), 60)
            await started.wait()
            nursery.cancel_scope.cancel()
        await cancelled.wait()


async def test_an_oversize_request_is_refused_before_sending() -> None:
    with trio.fail_after(20):
        async with rpc_pair(answering(), max_request_bytes=1024) as (caller, server):
            with pytest.raises(JobError) as caught:
                await caller.call(server.peer_id, MODELS_PROTOCOL, _padded_request(2048), 5)
            assert (await caller.call(server.peer_id, MODELS_PROTOCOL, ModelsRequest(), 5)) == (
                ModelsReply("answer", ())
            )
    assert caught.value.code == ErrorCode.MESSAGE_TOO_LARGE
    assert "limit of 1024" in caught.value.message


async def test_a_peer_announcing_an_oversize_frame_gets_a_typed_error() -> None:
    with trio.fail_after(20):
        async with rpc_pair(answering(), max_request_bytes=1024) as (caller, server):
            stream = await caller.host.new_stream(ID.from_base58(server.peer_id), [MODELS_PROTOCOL])
            await stream.write(b"\xff\xff\x7f")  # a 2 MiB frame follows, supposedly
            reply = decode_reply(await VarIntLengthMsgReadWriter(stream, 1 << 20).read_msg())
    assert isinstance(reply, ErrorReply)
    assert reply.code == ErrorCode.MESSAGE_TOO_LARGE


async def test_past_the_inbound_stream_limit_a_caller_is_told_overloaded() -> None:
    entered, release = trio.Event(), trio.Event()

    async def held(request: ModelsRequest, sender: str) -> Reply:
        entered.set()
        await release.wait()
        return ModelsReply("held", ())

    with trio.fail_after(20):
        async with rpc_pair(held, max_concurrent_inbound=1) as (caller, server):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    caller.call, server.peer_id, MODELS_PROTOCOL, ModelsRequest(), 10
                )
                await entered.wait()
                refused = await caller.call(server.peer_id, MODELS_PROTOCOL, ModelsRequest(), 10)
                release.set()
    assert isinstance(refused, ErrorReply)
    assert refused.code == ErrorCode.OVERLOADED
    assert "too many open streams" in refused.message
    assert "at most 1 streams" in refused.message and "max_concurrent_inbound" in refused.message


async def test_request_limits_are_per_protocol_and_an_oversize_body_is_never_held() -> None:
    """The server takes 4 KiB on the models protocol, 4 MiB on infer; the caller would
    send up to 16 MiB on either. A 2 MiB request is refused on one, run on the other."""
    big = _padded_request(2 << 20)
    server = Server(
        new_libp2p_host(create_new_key_pair()),
        MessageLimits(4 << 20, 4096, {MODELS_PROTOCOL: 4096}),
        max_concurrent_inbound=8,
    )
    host = new_libp2p_host(create_new_key_pair())
    server.serve(MODELS_PROTOCOL, ModelsRequest, answering("models"))
    server.serve(INFER_PROTOCOL, RunRequest, running("infer"))
    with trio.fail_after(30):
        async with (
            run_host(server.host, [LOOPBACK]),
            run_host(host, []),
            open_rpc(host, MessageLimits(16 << 20, 4096)) as caller,
        ):
            await caller.connect(server.host.get_addrs()[0], timeout=5)
            refused = await caller.call(server.peer_id, MODELS_PROTOCOL, big, 20)
            held = _buffered(server)
            answered = await caller.call(server.peer_id, INFER_PROTOCOL, big, 20)
            again = await caller.call(server.peer_id, MODELS_PROTOCOL, ModelsRequest(), 5)
    assert isinstance(refused, ErrorReply)
    assert refused.code == ErrorCode.MESSAGE_TOO_LARGE
    assert str(MODELS_PROTOCOL) in refused.message
    assert "limit of 4096 bytes" in refused.message
    assert held < 1 << 20  # the refused body was read and dropped, not buffered
    assert answered == ModelsReply("infer", ())
    assert again == ModelsReply("models", ())


async def test_a_caller_does_not_send_past_its_own_limit_for_the_protocol() -> None:
    with trio.fail_after(20):
        async with rpc_pair(answering(), request_limits={MODELS_PROTOCOL: 1024}) as (caller, s):
            with pytest.raises(JobError) as caught:
                await caller.call(s.peer_id, MODELS_PROTOCOL, _padded_request(2048), 5)
            answered = await caller.call(s.peer_id, MODELS_PROTOCOL, ModelsRequest(), 5)
    assert caught.value.code == ErrorCode.MESSAGE_TOO_LARGE
    assert str(MODELS_PROTOCOL) in caught.value.message and "1024" in caught.value.message
    assert answered == ModelsReply("answer", ())


async def test_a_request_of_a_type_the_protocol_does_not_take_is_malformed() -> None:
    answered: list[str] = []

    async def models(request: ModelsRequest, sender: str) -> Reply:
        answered.append("models")
        return ModelsReply("models", ())

    async def peers(request: PeersRequest, sender: str) -> Reply:
        answered.append("peers")
        return ModelsReply("peers", ())

    with trio.fail_after(20):
        async with rpc_pair(models) as (caller, server):
            server.serve(MODELS_PROTOCOL, PeersRequest, peers)  # a second kind, on its own
            as_peers = await caller.call(server.peer_id, MODELS_PROTOCOL, PeersRequest(), 5)
            as_models = await caller.call(server.peer_id, MODELS_PROTOCOL, ModelsRequest(), 5)
            refused = await caller.call(server.peer_id, MODELS_PROTOCOL, _padded_request(8), 5)
            again = await caller.call(server.peer_id, MODELS_PROTOCOL, ModelsRequest(), 5)
    assert (as_peers, as_models, again) == (
        ModelsReply("peers", ()),
        ModelsReply("models", ()),
        ModelsReply("models", ()),
    )
    assert answered == ["peers", "models", "models"]  # no handler saw the run request
    assert isinstance(refused, ErrorReply)
    assert refused.code is ErrorCode.MALFORMED_MESSAGE
    assert refused.peer == server.peer_id
    assert refused.message == (
        f"{MODELS_PROTOCOL} takes ModelsRequest and PeersRequest requests, not RunRequest"
    )


def test_a_request_type_is_served_once_per_protocol() -> None:
    limits = MessageLimits(4096, 4096)
    server = Server(new_libp2p_host(create_new_key_pair()), limits, max_concurrent_inbound=1)
    server.serve(MODELS_PROTOCOL, ModelsRequest, answering())
    with pytest.raises(ValueError, match="already has a handler for ModelsRequest"):
        server.serve(MODELS_PROTOCOL, ModelsRequest, answering())


def running(peer_id: str) -> Callable[[RunRequest, str], Awaitable[Reply]]:
    async def handler(request: RunRequest, sender: str) -> Reply:
        return ModelsReply(peer_id, ())

    return handler


def _buffered(server: Server) -> int:
    """Bytes received by yamux for streams of `server`'s connections and not read yet."""
    conns = server.host.get_network().connections.values()
    return sum(len(b) for cs in conns for c in cs for b in c.muxed_conn.stream_buffers.values())


def _padded_request(size: int) -> RunRequest:
    import numpy as np

    return RunRequest("job", "model", {"x": np.zeros(size, np.uint8)}, 1000)


def _our_streams(caller: Rpc, server: Server) -> list:
    """The caller's open streams to `server` on our protocol (identify has its own)."""
    (conn,) = caller.host.get_network().connections[ID.from_base58(server.peer_id)]
    return [s for s in conn.get_streams() if s.get_protocol() == MODELS_PROTOCOL]


# --- telling a peer's departure from a bug ----------------------------------------------


def _caused(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(StreamReset(), True, id="reset"),
        pytest.param(ExceptionGroup("g", [StreamReset()]), True, id="one-in-a-group"),
        pytest.param(
            ExceptionGroup("g", [StreamReset(), ExceptionGroup("h", [trio.ClosedResourceError()])]),
            True,
            id="reader-and-writer-both-saw-it",
        ),
        pytest.param(ExceptionGroup("g", [StreamReset(), KeyError("x")]), False, id="and-a-bug"),
        pytest.param(KeyError("x"), False, id="a-bug"),
    ],
)
def test_only_transport_errors(error: BaseException, expected: bool) -> None:
    assert only_transport_errors(error) is expected


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(
            _caused(
                SwarmDialAllFailedError("all failed"),
                MultiError([_caused(SwarmException("upgrade"), SecurityUpgradeFailure("noise"))]),
            ),
            True,
            id="libp2p-dial-chain",
        ),
        pytest.param(
            ExceptionGroup("g", [_caused(SwarmException("x"), SecurityUpgradeFailure("y"))]),
            True,
            id="in-a-group",
        ),
        pytest.param(
            _caused(SwarmDialAllFailedError("all failed"), MultiError([OSError("refused")])),
            False,
            id="connection-refused",
        ),
        pytest.param(OSError("refused"), False, id="plain"),
    ],
)
def test_handshake_failed(error: BaseException, expected: bool) -> None:
    assert _handshake_failed(error) is expected


def test_a_yamux_frame_fits_one_noise_message() -> None:
    """Else every full frame goes out as two Noise messages (see p2p_node._libp2p)."""
    from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH
    from libp2p.stream_muxer.yamux import yamux

    new_libp2p_host(create_new_key_pair())  # building a host sets the frame size

    assert yamux.MAX_MESSAGE_SIZE <= MAX_PLAINTEXT_LENGTH


async def test_gossip_reads_do_not_each_send_a_window_update(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """py-libp2p's own policy sent a WINDOW_UPDATE after nearly every read; ours
    credits the sender only once half the window is read. Records are a few KiB,
    so a node reading a few dozen of them owes no credit at all."""
    from libp2p.stream_muxer.yamux import yamux

    from p2p_node._config import GossipConfig
    from p2p_node.testing import open_swarm

    sent = 0
    send_window_update = yamux.YamuxStream.send_window_update

    @functools.wraps(send_window_update)  # keeps the shape the patch checks for
    async def counted(self: yamux.YamuxStream, *args: Any, **kwargs: Any) -> None:
        nonlocal sent
        sent += 1
        await send_window_update(self, *args, **kwargs)

    monkeypatch.setattr(yamux.YamuxStream, "send_window_update", counted)
    every_second = GossipConfig(refresh=1.0)
    with trio.fail_after(60):
        async with open_swarm(3, topology="full", gossip=every_second) as swarm:
            await swarm.wait_converged()
            sent = 0
            first = {p: k.record.seq for p, k in swarm[0].view.snapshot().peers.items()}
            # five more records from every peer, each read off a yamux stream
            await swarm[0].view.wait_until(
                lambda v: all(v.peers[p].record.seq >= seq + 5 for p, seq in first.items())
            )
            updates = sent
    assert updates < 5  # in the whole process: three nodes, each reading 10+ records


async def test_a_hosts_addresses_are_built_once_per_ttl_and_never_kept_empty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from p2p_node import _libp2p

    host = new_libp2p_host(create_new_key_pair())
    builds = 0
    transport_addrs = host.get_transport_addrs

    def counted() -> list[multiaddr.Multiaddr]:
        nonlocal builds
        builds += 1
        return transport_addrs()

    host.get_transport_addrs = counted  # type: ignore[method-assign]
    assert host.get_addrs() == []  # not listening yet: nothing to keep
    with trio.fail_after(10):
        async with run_host(host, [LOOPBACK]):
            first = [str(a) for a in host.get_addrs()]
            for _ in range(10):
                assert [str(a) for a in host.get_addrs()] == first
            kept_builds = builds
            monkeypatch.setattr(_libp2p, "ADDRS_TTL_S", 0.0)  # every call is past the ttl
            host.get_addrs()
    assert first[0].startswith("/ip4/127.0.0.1/tcp/") and first[0].endswith(str(host.get_id()))
    assert kept_builds == 2  # once before listening (empty), once after
    assert builds == 3


async def test_calls_cut_short_by_their_deadline_leave_the_connection_whole() -> None:
    # Opening a stream writes frames, and a frame cut part way (its Noise nonce
    # spent, its bytes never sent) breaks the connection for every stream on it.
    # A caller's deadline, a load probe's say, must never cut one.
    with trio.fail_after(30):
        async with (
            rpc_pair(answering(), max_concurrent_inbound=512) as (caller, server),
        ):
            peer = ID.from_base58(server.peer_id)
            connections = list(caller.host.get_network().connections[peer])

            async def hasty(seconds: float) -> None:
                with trio.move_on_after(seconds), suppress(JobError):
                    await caller.call(server.peer_id, MODELS_PROTOCOL, ModelsRequest(), 5)

            async with trio.open_nursery() as calls:
                for i in range(300):
                    calls.start_soon(hasty, (i % 100) * 0.003)
            reply = await caller.call(server.peer_id, MODELS_PROTOCOL, ModelsRequest(), 5)
            assert reply == ModelsReply("answer", ())
            assert list(caller.host.get_network().connections[peer]) == connections
