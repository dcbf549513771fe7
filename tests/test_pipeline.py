"""Pipelined exchanges (many in flight on one stream) between real libp2p hosts on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import numpy as np
import pytest
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from p2p_node import ErrorCode, JobError, _serve
from p2p_node._batching import COMPANY_EXPECTED
from p2p_node._channel import SEND_TIMEOUT_S, MessageLimits, SendTimedOut
from p2p_node._codec import decode_reply, encode
from p2p_node._errors import leaves
from p2p_node._framing import Kind, Tagged, TaggedBuffer
from p2p_node._host import new_libp2p_host, run_host
from p2p_node._messages import ErrorReply, ModelsReply, Reply, RunRequest
from p2p_node._pipeline import PIPELINED, CallerPipe, FrameWriter
from p2p_node._rpc import INFER_PROTOCOL, Rpc, open_rpc
from p2p_node._serve import Server
from scheduler import InferenceResult

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
PIPELINED_INFER = PIPELINED[INFER_PROTOCOL]

Handler = Callable[[RunRequest, str], Awaitable[Reply]]


@asynccontextmanager
async def pipe_pair(
    handler: Handler,
    *,
    max_request_bytes: int = 4096,
    max_reply_bytes: int = 4096,
    max_concurrent_inbound: int = 64,
) -> AsyncIterator[tuple[Rpc, Server]]:
    """(caller, server): the server answers INFER_PROTOCOL (pipelined) with `handler`."""
    limits = MessageLimits(max_request_bytes, max_reply_bytes)
    server = Server(
        new_libp2p_host(create_new_key_pair()),
        limits,
        max_concurrent_inbound=max_concurrent_inbound,
    )
    server.serve(INFER_PROTOCOL, RunRequest, handler)
    host = new_libp2p_host(create_new_key_pair())
    async with run_host(server.host, [LOOPBACK]), run_host(host, []), open_rpc(host, limits) as rpc:
        await rpc.connect(server.host.get_addrs()[0], timeout=5)
        yield rpc, server


def job(name: str, size: int = 4) -> RunRequest:
    return RunRequest(name, "model", {"x": np.zeros(size, np.uint8)}, 10_000)


def echo(request: RunRequest) -> Reply:
    return ModelsReply(request.job_id, ())


def _streams(rpc: Rpc, server: Server, *, servers_side: bool = False) -> list[Any]:
    """The pipelined infer streams between the two: the caller's ends, or the server's."""
    host, other = (server.host, rpc.peer_id) if servers_side else (rpc.host, server.peer_id)
    (conn,) = host.get_network().connections[ID.from_base58(other)]
    return [s for s in conn.get_streams() if s.get_protocol() == PIPELINED_INFER]


def _count_messages(rpc: Rpc, server: Server, *, callers: bool = True) -> list[int]:
    """Counts, in [0], the Noise messages both ends (or the server alone) write on
    their connection from now on."""
    counted = [0]
    ends = [(server.host, rpc.peer_id)]
    if callers:
        ends.append((rpc.host, server.peer_id))
    for host, other in ends:
        (conn,) = host.get_network().connections[ID.from_base58(other)]
        secured = conn.muxed_conn.secured_conn
        write = secured.write

        async def counting(data: bytes, write: Any = write) -> None:
            counted[0] += 1
            await write(data)

        secured.write = counting
    return counted


async def test_concurrent_exchanges_share_one_stream_and_few_messages_in_any_order() -> None:
    arrived: list[str] = []
    everyone = trio.Event()
    order: list[str] = []

    async def last_in_first_out(request: RunRequest, sender: str) -> Reply:
        if request.job_id == "warm":
            return echo(request)
        arrived.append(request.job_id)
        if len(arrived) == 32:
            everyone.set()
        await everyone.wait()
        # Answer in the reverse order of arrival.
        for _ in range(32 - arrived.index(request.job_id)):
            await trio.lowlevel.checkpoint()
        order.append(request.job_id)
        return echo(request)

    replies: dict[str, Reply] = {}
    with trio.fail_after(30):
        async with pipe_pair(last_in_first_out) as (caller, server):
            await caller.call(server.peer_id, INFER_PROTOCOL, job("warm"), 5)
            messages = _count_messages(caller, server)

            async def one(i: int) -> None:
                reply = await caller.call(server.peer_id, INFER_PROTOCOL, job(f"job-{i}"), 10)
                assert f"job-{i}" not in replies
                replies[f"job-{i}"] = reply

            async with trio.open_nursery() as nursery:
                for i in range(32):
                    nursery.start_soon(one, i)
            assert len(_streams(caller, server)) == 1
    assert replies == {f"job-{i}": ModelsReply(f"job-{i}", ()) for i in range(32)}
    assert order != arrived  # answered out of order, each to its own caller
    # 32 requests and 32 replies, a message each, were 64; batched they are a few
    # (plus window updates). The bound leaves room for a loaded machine's scheduling.
    assert messages[0] <= 16


async def _send_in_one_write(caller: Rpc, server: Server, names: list[str]) -> dict[str, Reply]:
    """Call `names` at once (the caller writes them together) and gather the replies."""
    replies: dict[str, Reply] = {}

    async def one(name: str) -> None:
        replies[name] = await caller.call(server.peer_id, INFER_PROTOCOL, job(name), 10)

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(one, name)
    return replies


async def test_requests_that_come_together_are_answered_in_groups_not_all_at_the_end() -> None:
    # What the server had written when each request began: a group's answers go
    # out before the next group starts, so the caller can take them meanwhile.
    written_when_started: list[int] = []
    messages = [0]

    async def quick(request: RunRequest, sender: str) -> Reply:
        written_when_started.append(messages[0])
        await trio.lowlevel.checkpoint()
        return echo(request)

    group = _serve.GROUP_REQUESTS
    names = [f"job-{i}" for i in range(2 * group)]
    with trio.fail_after(30):
        async with pipe_pair(quick) as (caller, server):
            await caller.call(server.peer_id, INFER_PROTOCOL, job("warm"), 5)
            written_when_started.clear()
            messages = _count_messages(caller, server, callers=False)
            replies = await _send_in_one_write(caller, server, names)
    assert replies == {name: ModelsReply(name, ()) for name in names}
    assert written_when_started[:group] == [0] * group  # the first group starts at once
    assert written_when_started[group] >= 1  # the next once its answers are written


async def test_a_group_that_is_slow_to_answer_holds_up_the_next_a_few_rounds_only() -> None:
    group = _serve.GROUP_REQUESTS
    started = [0]
    last_started = trio.Event()

    async def first_group_waits_for_the_last(request: RunRequest, sender: str) -> Reply:
        started[0] += 1
        if started[0] > group:
            last_started.set()
        else:
            await last_started.wait()
        return echo(request)

    names = [f"job-{i}" for i in range(group + 1)]
    with trio.fail_after(30):
        async with pipe_pair(first_group_waits_for_the_last) as (caller, server):
            replies = await _send_in_one_write(caller, server, names)
    assert replies == {name: ModelsReply(name, ()) for name in names}


def _count_reads(stream: Any) -> list[int]:
    """Counts, in [0], the reads of `stream` that return data, from now on."""
    counted = [0]
    read = stream.read

    async def counting(n: int | None = None) -> bytes:
        data: bytes = await read(n)
        counted[0] += bool(data)
        return data

    stream.read = counting
    return counted


async def test_messages_taken_as_they_arrive_still_credit_the_senders_receive_window() -> None:
    # One exchange at a time, each request and reply about 1 KiB: both readers wait
    # for their next read whenever a message comes, so both take every message as
    # it arrives (_libp2p.tap) and neither reads one from its stream's buffer.
    # Three windows' worth each way only flows if the bytes taken count as read.
    reply = ErrorReply(ErrorCode.INTERNAL, "x" * 1024, "server")

    async def big(request: RunRequest, sender: str) -> Reply:
        return reply

    count = 3 * 256 * 1024 // 1024
    with trio.fail_after(60):
        async with pipe_pair(big, max_request_bytes=4096) as (caller, server):
            await caller.call(server.peer_id, INFER_PROTOCOL, job("warm"), 5)
            (caller_side,) = _streams(caller, server)
            (server_side,) = _streams(caller, server, servers_side=True)
            reads = [_count_reads(caller_side), _count_reads(server_side)]
            for i in range(count):
                got = await caller.call(server.peer_id, INFER_PROTOCOL, job(f"{i}", 1024), 10)
                assert got == reply
    assert reads[0][0] + reads[1][0] <= count // 10  # taken as they came, nearly all


async def test_the_middle_of_a_large_message_is_taken_as_it_arrives_not_read() -> None:
    # A 2 MiB request and its 2 MiB reply come in 64 KiB Noise messages: each
    # reader waits for its next read while the body comes, so the yamux reader
    # hands it every piece but the last, which completes the frame in its read.
    size = 2 * 1024 * 1024

    async def big(request: RunRequest, sender: str) -> Reply:
        return InferenceResult(request.job_id, "model", dict(request.inputs), "server", 0, 0)

    limit = size + 4096
    with trio.fail_after(60):
        async with pipe_pair(big, max_request_bytes=limit, max_reply_bytes=limit) as (
            caller,
            server,
        ):
            await caller.call(server.peer_id, INFER_PROTOCOL, job("warm"), 5)
            (caller_side,) = _streams(caller, server)
            (server_side,) = _streams(caller, server, servers_side=True)
            reads = [_count_reads(caller_side), _count_reads(server_side)]
            for i in range(3):
                got = await caller.call(server.peer_id, INFER_PROTOCOL, job(f"{i}", size), 30)
                assert isinstance(got, InferenceResult) and got.outputs["x"].nbytes == size
    # At most one read per message each side (its last piece), of 32 pieces each:
    # read from yamux's buffer, they took 20 to 25 reads.
    assert reads[0][0] + reads[1][0] <= 3 * 2


@pytest.mark.parametrize("side", ["server", "caller"])
async def test_a_bug_taking_a_message_as_it_arrives_ends_that_stream_alone(
    side: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def answer(request: RunRequest, sender: str) -> Reply:
        return echo(request)

    with trio.fail_after(30):
        async with pipe_pair(answer) as (caller, server):
            await caller.call(server.peer_id, INFER_PROTOCOL, job("warm"), 5)
            broken = [True]
            if side == "server":
                patched, name = Server, "_admit"
            else:
                patched, name = CallerPipe, "_reply"
            original = getattr(patched, name)

            def once_broken(self: Any, *args: Any) -> Any:
                if broken.pop() if broken else False:
                    raise RuntimeError("a bug")
                return original(self, *args)

            monkeypatch.setattr(patched, name, once_broken)
            with pytest.raises(JobError) as failed:
                await caller.call(server.peer_id, INFER_PROTOCOL, job("first"), 10)
            after = await caller.call(server.peer_id, INFER_PROTOCOL, job("after"), 10)
    # At once, not at the deadline, and a new stream serves the next.
    assert failed.value.code is ErrorCode.PEER_UNREACHABLE
    assert after == ModelsReply("after", ())
    # Logged as the bug it is, with its traceback, not as a stream that ended.
    bugs = [
        record
        for record in caplog.records
        if record.exc_info and any(str(leaf) == "a bug" for leaf in leaves(record.exc_info[1]))
    ]
    assert bugs and all(record.levelname == "ERROR" for record in bugs)


async def test_a_cancelled_exchange_is_cancelled_on_the_server_and_the_others_go_on() -> None:
    started: set[str] = set()
    all_started, one_cancelled, release = trio.Event(), trio.Event(), trio.Event()
    cancelled: list[str] = []

    async def held(request: RunRequest, sender: str) -> Reply:
        started.add(request.job_id)
        if len(started) == 4:
            all_started.set()
        try:
            await release.wait()
        except trio.Cancelled:
            cancelled.append(request.job_id)
            one_cancelled.set()
            raise
        return echo(request)

    replies: list[Reply] = []
    leaving = trio.CancelScope()
    with trio.fail_after(30):
        async with pipe_pair(held) as (caller, server):

            async def call(name: str) -> None:
                replies.append(await caller.call(server.peer_id, INFER_PROTOCOL, job(name), 10))

            async def leave_early() -> None:
                with leaving:
                    await call("gone")

            async with trio.open_nursery() as nursery:
                for name in ("a", "b", "c"):
                    nursery.start_soon(call, name)
                nursery.start_soon(leave_early)
                await all_started.wait()
                leaving.cancel()
                await one_cancelled.wait()
                release.set()
            assert len(_streams(caller, server)) == 1  # the stream was not reset for it
    assert cancelled == ["gone"]
    assert sorted(r.peer_id for r in replies if isinstance(r, ModelsReply)) == ["a", "b", "c"]


async def test_a_hang_up_cancels_every_exchange_in_flight_and_the_next_opens_a_stream() -> None:
    started: set[str] = set()
    cancelled: set[str] = set()
    all_started, all_cancelled = trio.Event(), trio.Event()

    async def held(request: RunRequest, sender: str) -> Reply:
        if request.job_id == "again":
            return echo(request)
        started.add(request.job_id)
        if len(started) == 3:
            all_started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.add(request.job_id)
            if len(cancelled) == 3:
                all_cancelled.set()
        raise AssertionError

    with trio.fail_after(30):
        async with pipe_pair(held) as (caller, server):
            async with trio.open_nursery() as nursery:
                for name in ("a", "b", "c"):
                    nursery.start_soon(_call_failing, caller, server, name)
                await all_started.wait()
                (stream,) = _streams(caller, server)
                caller.abandon(server.peer_id, "the peer froze")  # resets the stream
            await all_cancelled.wait()
            again = await caller.call(server.peer_id, INFER_PROTOCOL, job("again"), 5)
            (other,) = _streams(caller, server)
    assert cancelled == {"a", "b", "c"}
    assert again == ModelsReply("again", ())
    assert other is not stream


async def _call_failing(caller: Rpc, server: Server, name: str) -> None:
    with pytest.raises(JobError) as caught:
        await caller.call(server.peer_id, INFER_PROTOCOL, job(name), 60)
    assert caught.value.code is ErrorCode.PEER_UNREACHABLE


async def test_abandon_fails_the_exchanges_in_flight_at_once() -> None:
    arrived: list[str] = []
    both = trio.Event()

    async def frozen(request: RunRequest, sender: str) -> Reply:
        arrived.append(request.job_id)
        if len(arrived) == 2:
            both.set()
        await trio.sleep_forever()
        raise AssertionError

    with trio.fail_after(30):
        async with pipe_pair(frozen) as (caller, server):
            errors: list[JobError] = []

            async def call() -> None:
                with pytest.raises(JobError) as caught:
                    await caller.call(server.peer_id, INFER_PROTOCOL, job("x"), 60)
                errors.append(caught.value)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                nursery.start_soon(call)
                await both.wait()
                caller.abandon(server.peer_id, "reported departed")
    assert [(e.code, e.message) for e in errors] == [
        (ErrorCode.PEER_UNREACHABLE, "reported departed")
    ] * 2


async def _raw_pipe(caller: Rpc, server: Server) -> Any:
    return await caller.host.new_stream(ID.from_base58(server.peer_id), [PIPELINED_INFER])


async def _replies(stream: Any, count: int) -> dict[int, Reply]:
    frames = TaggedBuffer(1 << 20)
    replies: dict[int, Reply] = {}
    while len(replies) < count:
        frames.feed(await stream.read(65536))
        while (frame := frames.next_frame()) is not None:
            assert frame.exchange not in replies
            replies[frame.exchange] = decode_reply(frame.body)
    return replies


async def test_an_oversize_or_malformed_request_is_refused_alone() -> None:
    async def answer(request: RunRequest, sender: str) -> Reply:
        await trio.sleep(0.05)  # still in flight when the bad ones arrive
        return echo(request)

    with trio.fail_after(30):
        async with pipe_pair(answer, max_request_bytes=4096) as (caller, server):
            stream = await _raw_pipe(caller, server)
            await stream.write(
                Tagged(Kind.REQUEST, 1, encode(job("first"))).encode()
                + Tagged(Kind.REQUEST, 2, b"\x00" * 5000).encode()  # over the limit
                + Tagged(Kind.REQUEST, 3, b"\xc1 not msgpack").encode()
                + Tagged(Kind.REQUEST, 4, encode(job("last"))).encode()
            )
            replies = await _replies(stream, 4)
            held = sum(
                len(b)
                for cs in server.host.get_network().connections.values()
                for c in cs
                for b in c.muxed_conn.stream_buffers.values()
            )
    assert replies[1] == ModelsReply("first", ())
    assert replies[4] == ModelsReply("last", ())
    too_large, malformed = replies[2], replies[3]
    assert isinstance(too_large, ErrorReply) and too_large.code is ErrorCode.MESSAGE_TOO_LARGE
    assert "5000 bytes" in too_large.message and "4096" in too_large.message
    assert isinstance(malformed, ErrorReply) and malformed.code is ErrorCode.MALFORMED_MESSAGE
    assert held < 5000


async def test_a_request_reusing_an_exchange_in_flight_is_refused_and_the_first_goes_on() -> None:
    release = trio.Event()

    async def held(request: RunRequest, sender: str) -> Reply:
        await release.wait()
        return echo(request)

    with trio.fail_after(30):
        async with pipe_pair(held) as (caller, server):
            stream = await _raw_pipe(caller, server)
            await stream.write(Tagged(Kind.REQUEST, 5, encode(job("first"))).encode())
            await stream.write(Tagged(Kind.REQUEST, 5, encode(job("again"))).encode())
            frames = TaggedBuffer(1 << 20)
            got: list[Reply] = []
            while len(got) < 2:
                frames.feed(await stream.read(65536))
                while (frame := frames.next_frame()) is not None:
                    assert frame.exchange == 5
                    got.append(decode_reply(frame.body))
                    release.set()  # the refusal came first: now let the first answer
    refused, answered = got
    assert isinstance(refused, ErrorReply) and refused.code is ErrorCode.MALFORMED_MESSAGE
    assert "exchange 5 is already in flight" in refused.message
    assert answered == ModelsReply("first", ())


async def test_unsplittable_bytes_end_the_stream_after_what_is_in_flight() -> None:
    async def answer(request: RunRequest, sender: str) -> Reply:
        await trio.sleep(0.05)
        return echo(request)

    with trio.fail_after(30):
        async with pipe_pair(answer) as (caller, server):
            stream = await _raw_pipe(caller, server)
            await stream.write(Tagged(Kind.REQUEST, 7, encode(job("kept"))).encode() + b"\x09junk")
            frames = TaggedBuffer(1 << 20)
            got: list[Tagged] = []
            while len(got) < 2:
                frames.feed(await stream.read(65536))
                while (frame := frames.next_frame()) is not None:
                    got.append(frame)
            # The caller's own calls are untouched: they are on a stream of their own.
            reply = await caller.call(server.peer_id, INFER_PROTOCOL, job("other"), 5)
    (answered, goaway) = got
    assert (answered.kind, answered.exchange) == (Kind.REPLY, 7)
    assert decode_reply(answered.body) == ModelsReply("kept", ())
    assert goaway.kind is Kind.GOAWAY
    why = decode_reply(goaway.body)
    assert isinstance(why, ErrorReply) and why.code is ErrorCode.MALFORMED_MESSAGE
    assert "unknown frame kind 9" in why.message
    assert reply == ModelsReply("other", ())


async def test_past_the_inbound_limit_a_request_is_told_overloaded_and_the_others_run() -> None:
    entered, release = trio.Event(), trio.Event()

    async def held(request: RunRequest, sender: str) -> Reply:
        entered.set()
        await release.wait()
        return echo(request)

    with trio.fail_after(30):
        # One slot for the stream, one for a request in flight.
        async with pipe_pair(held, max_concurrent_inbound=2) as (caller, server):
            async with trio.open_nursery() as nursery:
                first: list[Reply] = []

                async def call_first() -> None:
                    first.append(await caller.call(server.peer_id, INFER_PROTOCOL, job("a"), 10))

                nursery.start_soon(call_first)
                await entered.wait()
                refused = await caller.call(server.peer_id, INFER_PROTOCOL, job("b"), 10)
                release.set()
            after = await caller.call(server.peer_id, INFER_PROTOCOL, job("c"), 10)
    assert first == [ModelsReply("a", ())]
    assert isinstance(refused, ErrorReply) and refused.code is ErrorCode.OVERLOADED
    assert "at most 2 streams and requests" in refused.message
    assert after == ModelsReply("c", ())


async def test_a_peer_without_the_pipelined_protocol_is_called_one_exchange_per_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_serve, "PIPELINED", {})  # a node of the version before

    async def answer(request: RunRequest, sender: str) -> Reply:
        return echo(request)

    with trio.fail_after(30):
        async with pipe_pair(answer) as (caller, server):
            replies = [
                await caller.call(server.peer_id, INFER_PROTOCOL, job(f"j{i}"), 5) for i in range(3)
            ]
            (conn,) = caller.host.get_network().connections[ID.from_base58(server.peer_id)]
            protocols = {s.get_protocol() for s in conn.get_streams()}
    assert replies == [ModelsReply(f"j{i}", ()) for i in range(3)]
    assert INFER_PROTOCOL in protocols and PIPELINED_INFER not in protocols


class _RecordingStream:
    """What FrameWriter needs of a stream: writes, recorded (pure logic, no I/O)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.writes.append(data)


async def test_frames_sent_in_one_scheduling_round_share_one_write() -> None:
    stream = _RecordingStream()
    writer = FrameWriter(stream)  # type: ignore[arg-type]
    frames = [Tagged(Kind.REPLY, i, b"x" * i).encode() for i in range(1, 33)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            async with trio.open_nursery() as senders:
                for frame in frames:
                    senders.start_soon(writer.write, frame)
            nursery.cancel_scope.cancel()
    assert len(stream.writes) == 1  # not the first frame alone, then the 31 others
    assert sorted(stream.writes[0]) == sorted(b"".join(frames))


class _BreakingStream:
    """A stream whose first write waits until `broken` is set, then fails (a reset)."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.broken = trio.Event()

    async def write(self, data: bytes) -> None:
        self.started.set()
        await self.broken.wait()
        raise trio.BrokenResourceError("reset")


async def test_a_sent_frames_hook_runs_once_it_is_written_and_not_before() -> None:
    stream = _RecordingStream()
    writer = FrameWriter(stream)  # type: ignore[arg-type]
    done: list[int] = []
    with trio.fail_after(10):
        writer.send(b"one", lambda: done.append(1))
        writer.send(b"two", lambda: done.append(2))
        assert done == []  # queued, not written: the request still holds its slot
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await writer.flush()
            nursery.cancel_scope.cancel()
    assert stream.writes == [b"onetwo"] and done == [1, 2]


async def test_a_failed_write_runs_the_hooks_of_every_frame_it_will_never_write() -> None:
    stream = _BreakingStream()
    writer = FrameWriter(stream)  # type: ignore[arg-type]
    done: list[str] = []
    failed = False
    with trio.fail_after(10):
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                writer.send(b"being-written", lambda: done.append("first"))
                await stream.started.wait()
                writer.send(b"queued", lambda: done.append("queued"))
                assert done == []
                stream.broken.set()
        except* trio.BrokenResourceError:
            failed = True  # `run` raises the writer's failure
    assert failed and done == ["first", "queued"]
    writer.send(b"late", lambda: done.append("late"))  # never to be written: freed at once
    assert done == ["first", "queued", "late"]


class _StuckStream:
    """A stream whose writes never finish unless cancelled (a peer that stopped reading)."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.cut = False

    async def write(self, data: bytes) -> None:
        self.started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cut = True
            raise


async def test_a_write_is_shielded_from_its_caller_and_cut_only_by_the_send_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = _StuckStream()
    writer = FrameWriter(stream)  # type: ignore[arg-type]
    timed_out = False
    with trio.fail_after(SEND_TIMEOUT_S + 10):
        started = trio.current_time()
        with trio.move_on_after(1):  # the caller's deadline does not cut the write...
            await writer.send_now(b"frame")
        assert stream.cut  # ...its own timeout does
        assert trio.current_time() - started == pytest.approx(SEND_TIMEOUT_S)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
        except* SendTimedOut:
            timed_out = True  # `run` raises the failure, whichever task wrote
    assert timed_out


def test_dropping_a_writer_runs_the_hooks_of_frames_it_never_wrote() -> None:
    """The server drops its writer when a stream ends: each reply still queued frees
    its request's slot then."""
    writer = FrameWriter(_RecordingStream())  # type: ignore[arg-type]
    done: list[str] = []
    writer.send(b"queued", lambda: done.append("queued"))
    assert done == []
    writer.drop()
    assert done == ["queued"]


async def test_send_now_writes_in_the_callers_task_only_when_the_writer_is_idle() -> None:
    stream = _RecordingStream()
    writer = FrameWriter(stream)  # type: ignore[arg-type]
    done: list[str] = []
    with trio.fail_after(10):
        await writer.send_now(b"alone", lambda: done.append("alone"))  # no writer task runs
        assert stream.writes == [b"alone"] and done == ["alone"]
        writer.send(b"queued")
        await writer.send_now(b"behind", lambda: done.append("behind"))
        assert stream.writes == [b"alone"] and done == ["alone"]  # queued behind the first
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await writer.flush()
            nursery.cancel_scope.cancel()
    assert stream.writes == [b"alone", b"queuedbehind"] and done == ["alone", "behind"]


async def _start_exchanges(pipe: CallerPipe, n: int, nursery: trio.Nursery) -> None:
    for i in range(n):
        nursery.start_soon(pipe.exchange, [b"job%d" % i])
    await trio.testing.wait_all_tasks_blocked()


@pytest.mark.parametrize("company_expected", [True, False])
async def test_a_callers_lone_request_is_written_in_its_task_only_when_known_alone(
    company_expected: bool,
) -> None:
    """Known alone (the request it forwards came alone), it is written at once, with
    no writer task running; otherwise it waits for the writer, and for company."""
    stream = _RecordingStream()
    pipe = CallerPipe(stream, 1 << 20, "peer")  # type: ignore[arg-type]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            COMPANY_EXPECTED.set(company_expected)  # copied into the tasks started here
            await _start_exchanges(pipe, 1, nursery)
            assert len(stream.writes) == (0 if company_expected else 1)
            nursery.cancel_scope.cancel()


async def test_requests_a_caller_sends_in_one_round_share_one_write() -> None:
    """The first of eight requests made in one round is not written alone: its peer
    would take it alone, answer it alone, and the jobs went on in two groups
    (forwarded jobs at concurrency 8 lost 10 to 25% of their rate)."""
    stream = _RecordingStream()
    pipe = CallerPipe(stream, 1 << 20, "peer")  # type: ignore[arg-type]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe._writer.run)
            await _start_exchanges(pipe, 8, nursery)
            nursery.cancel_scope.cancel()
    assert len(stream.writes) == 1
    frames = TaggedBuffer(1 << 20)
    frames.feed(stream.writes[0])
    assert [f.exchange for f in iter(frames.next_frame, None)] == list(range(1, 9))
