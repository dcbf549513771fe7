"""Pipelined exchanges: many requests in flight at once on one kept stream.

On the pipelined protocols (`PIPELINED`: job and infer, the ones that carry
small jobs by the thousand) a caller keeps one stream per peer and protocol and
tags each request with an exchange id; the server answers each as it is done,
in any order (`_framing.Tagged`). Every frame a side sends goes through its
`FrameWriter`, which writes whatever has queued up meanwhile in one
`stream.write`: one yamux frame and one Noise message for many small frames,
where each message costs about a millisecond of CPU per side in py-libp2p.

A caller that leaves an exchange (its deadline, a cancellation) sends CANCEL
for it, and the server cancels that work alone; a reset stream cancels all of
it, as on the one-exchange-per-stream protocols. A write is never cut part way
by a caller: it runs in the writer's task, bounded only by SEND_TIMEOUT_S.

The versions before (`/1.0.0`, one exchange per stream at a time) are still
served and still spoken to a peer that does not speak `/2.0.0`, so that a
network can be upgraded a node at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from typing import Any, Generic, TypeVar, cast

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from scheduler import ErrorCode, JobError

from . import _libp2p
from ._batching import COMPANY_EXPECTED
from ._channel import (
    CLIENT_IDLE_S,
    READ_CHUNK,
    SEND_TIMEOUT_S,
    TRANSPORT_ERRORS,
    Bytes,
    SendTimedOut,
    only_transport_errors,
)
from ._errors import leaves
from ._framing import Frame, FrameError, Kind, Tagged, TaggedBuffer, frame_writes, tagged_parts
from ._large import Buffer

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Scheduling rounds a pipelined stream's writer waits, once woken, for more frames
# to share its write (see FrameWriter). Its wake-up is already a round: every
# task of the round that queued the first frame adds its own. Measured at c=32
# forwarded, 0 rounds gather 18 frames per write and 1 or 2 gather 21 to 23,
# but each round is a pass of trio's loop for every message at c=1.
GATHER_ROUNDS = 0
# Scheduling rounds the writer waits after each write before the next: frames
# that come one a round (answers finishing one after another) then share a write.
# py-libp2p's write path used to take about seven rounds (a checkpoint per lock
# it took), which did the same; with its locks no longer yielding when free
# (`_libp2p.QuickLock`) a write takes two, and 32 staggered answers went out
# in 16 messages instead of 7; with these rounds, 10 or 11 (tests/test_pipeline.py).
# Four since a write the socket takes whole spends no round (`_libp2p._tcp_write`):
# with three, that test's 32 exchanges took 13 messages, with four 11 or 12, as before.
LINGER_ROUNDS = 4

INFER_PROTOCOL = TProtocol("/p2p-node/infer/1.0.0")
JOB_PROTOCOL = TProtocol("/p2p-node/job/1.0.0")
# The protocols that also come pipelined, and the id each is pipelined under.
PIPELINED = {
    INFER_PROTOCOL: TProtocol("/p2p-node/infer/2.0.0"),
    JOB_PROTOCOL: TProtocol("/p2p-node/job/2.0.0"),
}


class FrameWriter:
    """Writes the frames several tasks send on one stream, as many to a write as
    have queued up meanwhile.

    `send` queues a frame for the writer task (`run`); `write` queues it and
    returns once it is written. The writer task wakes in the scheduling round
    after the first frame of a write is queued (and waits GATHER_ROUNDS more),
    so that every task of that round that answers or sends adds its frame to
    the same write: one yamux
    frame, one Noise message and one socket write for all of them. Writing each
    task's first frame at once, in its own task, made two writes of every
    round's frames, and each write costs a send and a receive system call and a
    Noise message per side; and it broke the rhythm: the peer took the lone frame
    alone, and answered it alone (bench.overhead, c=32 forwarded: 4 frames per
    write, 20 to 23 gathered). Writing a frame at once when it is the stream's
    only exchange in flight (to save the round at low load) also fell back to 9
    per write at c=32, with no gain measurable at c=1.

    Every write is shielded from cancellation, so that none stops part way
    through a Noise message, and bounded by SEND_TIMEOUT_S. A failed write, in
    whichever task, is raised by `run`: a peer that stops reading raises
    SendTimedOut there.
    """

    def __init__(self, stream: INetStream, counts: Bytes | None = None) -> None:
        self._stream = stream
        self._counts = counts or Bytes()  # where the bytes it writes are counted
        self._queued: list[Frame] = []
        # (frame number, what to call once that frame is written or never will be)
        self._hooks: list[tuple[int, Callable[[], None]]] = []
        self._sent = 0  # frames handed to send or write
        self._written = 0  # of those, frames written
        self._writing = False
        self._failed: BaseException | None = None
        self._more = trio.Event()
        self._progress = trio.Event()

    def send(self, frame: Frame, done: Callable[[], None] | None = None) -> int:
        """Queue `frame`; returns its number, for `written`. `done` is called once the
        frame is written, or once it never will be (the writer failed or was
        dropped): a task that answers a request can then end at once, where
        waiting in `written` cost it another pass of trio's loop, and let the
        hook release what the request holds."""
        self._queued.append(frame)
        self._sent += 1
        if done is not None:
            if self._failed is not None:
                done()
            else:
                self._hooks.append((self._sent, done))
        self._more.set()
        return self._sent

    def drop(self) -> None:
        """The writer is done with (its task ended): frames not written never will be,
        and their hooks are called now."""
        if self._failed is None:
            self._failed = trio.ClosedResourceError("the stream's writer was dropped")
        self._call_hooks()

    def _call_hooks(self) -> None:
        hooks = self._hooks
        if not hooks:
            return
        if self._failed is not None:
            self._hooks = []
            for _, hook in hooks:
                hook()
            return
        written = self._written
        n = 0
        for number, hook in hooks:
            if number > written:
                break
            hook()
            n += 1
        del hooks[:n]

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing being written."""
        return not self._queued and not self._writing

    async def write(self, frame: Frame) -> None:
        """Send `frame` and wait until it is written (or the writer failed: `run`
        raises that)."""
        await self.written(self.send(frame))

    async def written(self, number: int) -> None:
        """Wait until frame `number` (and every one before it) is written."""
        while self._written < number and self._failed is None:
            await self._progress.wait()

    async def flush(self) -> None:
        await self.written(self._sent)

    async def send_now(self, frame: Frame, done: Callable[[], None] | None = None) -> None:
        """`send`, but written in this task at once when the writer is idle (nothing
        queued, no write in progress), which saves the round the writer's task
        takes to wake. Shielded and bounded as every write is; a failure is the
        writer's, raised by `run`."""
        if self._writing or self._queued or self._failed is not None:
            self.send(frame, done)
            return
        self._sent += 1
        if done is not None:
            self._hooks.append((self._sent, done))
        await self._write([frame])

    async def run(self) -> None:
        while True:
            await self._more.wait()
            for _ in range(GATHER_ROUNDS):
                await trio.lowlevel.checkpoint()
            self._more = trio.Event()
            if self._failed is not None:
                raise self._failed
            if self._writing or not self._queued:  # a write() in progress wakes us after
                continue
            frames, self._queued = self._queued, []
            await self._write(frames)
            for _ in range(LINGER_ROUNDS):
                await trio.lowlevel.checkpoint()

    async def _write(self, frames: list[Frame]) -> None:
        self._writing = True
        try:
            writes = frame_writes(frames)
            # One scope, shielded from the callers' cancellations and cut only by its
            # own deadline: the same as a shield around a move_on_after, a scope less.
            deadline = trio.current_time() + SEND_TIMEOUT_S
            with trio.CancelScope(shield=True, deadline=deadline) as stuck:
                for data in writes:  # a memoryview too: yamux's write takes any buffer
                    await self._stream.write(data)  # type: ignore[arg-type]
            if stuck.cancelled_caught:
                raise SendTimedOut("the peer did not take the message in time")
            self._counts.sent += sum(len(data) for data in writes)
        except Exception as error:
            self._failed = error
        else:
            self._written += len(frames)
        finally:
            self._writing = False
            self._call_hooks()
            self._progress.set()
            self._progress = trio.Event()
            if self._queued or self._failed is not None:
                self._more.set()


class KeptPipe(Generic[T]):
    """A caller's end of one kept stream of tagged exchanges, each an entry of
    `_open` (what its frames go to) while it is in flight.

    Run `run` in a task for as long as the stream is used. Once the stream fails,
    every exchange on it raises the failure, and so does every later one
    (`failure`). Subclasses say what a reply does to an exchange (`_reply`,
    `_refuse`) and how a failure ends them all (`_end_all`).
    """

    FRAME = "reply"  # what a frame is called in errors
    STREAM = "stream"  # and the stream

    def __init__(
        self, stream: INetStream, max_reply: int, peer_id: str, counts: Bytes | None = None
    ) -> None:
        self.stream = stream
        self._counts = counts or Bytes()
        self.peer_id = peer_id
        self.failure: JobError | None = None
        self.last_used = trio.current_time()
        self._frames = TaggedBuffer(max_reply)
        self.waiting = False  # its read waits, nothing buffered (set by _libp2p)
        self._writer = FrameWriter(stream, self._counts)
        self._open: dict[int, T] = {}
        self._next = 1
        self._scope = trio.CancelScope()
        conn = getattr(stream, "muxed_conn", None)
        self._closing: trio.Event | None = getattr(conn, "event_shutting_down", None)

    @property
    def in_flight(self) -> int:
        return len(self._open)

    @property
    def usable(self) -> bool:
        if self.failure is not None:
            return False
        closing = self._closing
        if closing is not None and closing.is_set():
            return False
        # The server closes a stream idle for SERVER_IDLE_S; we never reuse one near that.
        return bool(self._open) or trio.current_time() - self.last_used < CLIENT_IDLE_S

    def close(self) -> None:
        """Reset the stream: every exchange on it fails now."""
        self._scope.cancel()

    async def run(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer.run)
                    await self._read()
        except Exception as error:
            self.failure = self.failure or self._failure(error)
        finally:
            self.failure = self.failure or JobError(
                ErrorCode.PEER_UNREACHABLE, f"the {self.STREAM} was closed", peer=self.peer_id
            )
            self._end_all()
            with trio.CancelScope(shield=True), trio.move_on_after(1), suppress(*TRANSPORT_ERRORS):
                await self.stream.reset()

    def _failure(self, error: Exception) -> JobError:
        """What the exchanges on a stream that failed with `error` raise."""
        found = list(leaves(error))
        for leaf in found:
            if isinstance(leaf, FrameError):
                return JobError(
                    ErrorCode.MALFORMED_MESSAGE, f"bad {self.FRAME}: {leaf}", peer=self.peer_id
                )
        for leaf in found:
            if isinstance(leaf, SendTimedOut):  # a live peer that is slow: not "gone"
                return JobError(ErrorCode.DEADLINE_EXCEEDED, str(leaf), peer=self.peer_id)
        if not only_transport_errors(error):
            logger.error("%s to %s failed", self.STREAM, self.peer_id, exc_info=error)
        why = f"{self.STREAM} broke: {found[0] or type(found[0]).__name__}"
        return JobError(ErrorCode.PEER_UNREACHABLE, why, peer=self.peer_id)

    async def _read(self) -> None:
        """Read the replies until the stream ends. While this waits for its next read,
        the replies that arrive are taken at once in the connection's reader task
        (`_libp2p.tap`, `on_data`), which saves the round a read takes to wake."""
        tapped = _libp2p.tap(self.stream, self)
        try:
            while True:
                data = await self.stream.read(READ_CHUNK)
                if not data:
                    raise EOFError("stream closed by the peer")
                self._counts.received += len(data)
                self._frames.feed(data)
                self._take()
        finally:
            if tapped:
                _libp2p.untap(self.stream)

    def on_data(self, data: bytes) -> bytes | None:
        """Replies that came while the reader waits for them; anything else (a GOAWAY,
        a frame it cannot read) is given back for the reader's read."""
        frames = self._frames
        if not frames.idle:  # a frame in part, a body skipped or collected: the reader's,
            if not frames.feed_body(data):  # but for more of a large body, short of its end
                return data
            self._counts.received += len(data)
            return None
        frames.feed(data)
        try:
            if not self._take(tapped=True):
                self._counts.received += len(data)
                return None
        except Exception as error:  # a bug: the stream fails, as if its reader had raised
            self.failure = self.failure or self._failure(error)
            self.close()
            return None
        left = frames.take_back()
        self._counts.received += len(data) - len(left)
        return left

    def _take(self, *, tapped: bool = False) -> bool:
        """Answer the exchanges whose replies are buffered: False once none is left.
        `tapped`: True, before anything but a reply, which the reader handles.
        Raises FrameError for a stream that cannot be read further."""
        frames = self._frames
        while True:
            try:
                frame = frames.next_frame_of(_REPLIES) if tapped else frames.next_frame()
            except FrameError as error:
                if not error.too_large:
                    raise
                why = f"bad {self.FRAME}: {error}"
                refusal = JobError(ErrorCode.MESSAGE_TOO_LARGE, why, peer=self.peer_id)
                self._refuse(error.exchange, refusal)
                continue
            if frame is None:
                return False
            if frame is False:
                return True
            if frame.kind is Kind.REPLY:
                self._reply(frame.exchange, frame.body)
            elif frame.kind is Kind.GOAWAY:  # its body answers whatever is unanswered
                self.failure = JobError(
                    ErrorCode.PEER_UNREACHABLE, "the peer closed the stream", peer=self.peer_id
                )
                for exchange in list(self._open):
                    self._reply(exchange, frame.body)
            else:
                raise FrameError(f"a server sent a {frame.kind.name} frame")

    def _reply(self, exchange: int, body: bytes) -> None:
        raise NotImplementedError

    def _refuse(self, exchange: int, error: JobError) -> None:
        raise NotImplementedError

    def _end_all(self) -> None:
        raise NotImplementedError


_REPLIES = (Kind.REPLY,)  # what a caller's tap takes (see KeptPipe.on_data)


class _Waiter:
    """One exchange's answer, and the task waiting for it. The task parks itself
    (`wait`) and the reader reschedules it (`answer`): a trio.Event and its
    parking lot per exchange cost about 2 us more per job, on a client and on a
    node forwarding jobs alike."""

    __slots__ = ("done", "error", "reply", "task")

    def __init__(self) -> None:
        self.done = False
        self.reply = b""
        self.error: JobError | None = None
        self.task: trio.lowlevel.Task | None = None  # parked in `wait`

    async def wait(self) -> None:
        """Until `answer` (a checkpoint, as trio.Event.wait is, if it came already)."""
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        self.task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self.task = None  # cancelled: `answer` must not wake it
        return trio.lowlevel.Abort.SUCCEEDED

    def answer(self, reply: bytes, error: JobError | None) -> None:
        self.reply, self.error, self.done = reply, error, True
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)


class CallerPipe(KeptPipe[_Waiter]):
    """A kept stream of pipelined jobs: one reply per exchange; `exchange` from
    any number of tasks."""

    async def exchange(self, payload: Sequence[Buffer]) -> bytes:
        """The reply to `payload` (an encoded request's pieces: see
        `_codec.encode_parts`). Raises JobError."""
        if self.failure is not None:
            raise self.failure
        exchange, self._next = self._next, self._next + 1
        waiter = self._open[exchange] = _Waiter()
        try:
            # Not waited for: its reply cannot come before it is written, and a writer
            # that fails ends every exchange on the stream (`_end_all`). Waiting for the
            # write cost each exchange another wake-up. Alone on the stream and known
            # to come alone (the job it forwards came alone: `COMPANY_EXPECTED`
            # cleared), it is written at once, in this task. Not merely alone: the
            # first of a round's several requests is alone too when it is sent, and
            # written at once it split each round in two (its peer ran and answered
            # it alone, the others in a second write and run), forwarded jobs at
            # concurrency 8 losing 10 to 25% of their rate.
            frame = tagged_parts(Kind.REQUEST, exchange, payload)
            if len(self._open) == 1 and not COMPANY_EXPECTED.get():
                await self._writer.send_now(frame)
            else:
                self._writer.send(frame)
            await waiter.wait()
        except BaseException:  # the caller left: so does the server, for this one
            if self._open.pop(exchange, None) is not None and self.failure is None:
                self._writer.send(Tagged(Kind.CANCEL, exchange, b"").encode())
            raise
        self.last_used = trio.current_time()
        if waiter.error is not None:
            raise waiter.error
        return waiter.reply

    def _reply(self, exchange: int, body: bytes) -> None:
        self._answer(exchange, reply=body)

    def _refuse(self, exchange: int, error: JobError) -> None:
        self._answer(exchange, error=error)

    def _end_all(self) -> None:
        for waiter in self._open.values():
            waiter.answer(b"", self.failure)
        self._open.clear()

    def _answer(self, exchange: int, *, reply: bytes = b"", error: JobError | None = None) -> None:
        waiter = self._open.pop(exchange, None)
        if waiter is None:  # cancelled by its caller meanwhile
            return
        waiter.answer(reply, error)


P = TypeVar("P", bound=KeptPipe[Any])


class KeptPipes:
    """A caller's kept pipes, one per (peer, protocol), opened when first needed
    and dropped when they fail, idle past CLIENT_IDLE_S, or their peer goes.

    `start_soon` runs each pipe's `run` (in the caller's nursery)."""

    def __init__(self, start_soon: Callable[[Callable[[], Awaitable[None]]], None]) -> None:
        self._start_soon = start_soon
        self._pipes: dict[tuple[str, TProtocol], KeptPipe[Any]] = {}
        self._opening: dict[tuple[str, TProtocol], trio.Lock] = {}

    def __getitem__(self, key: tuple[str, TProtocol]) -> KeptPipe[Any]:
        return self._pipes[key]

    def usable(self, key: tuple[str, TProtocol]) -> KeptPipe[Any] | None:
        """The usable pipe for `key` if there is one now (`get` without awaiting)."""
        pipe = self._pipes.get(key)
        return pipe if pipe is not None and pipe.usable else None

    async def get(
        self, key: tuple[str, TProtocol], open_pipe: Callable[[], Awaitable[P | None]]
    ) -> P | None:
        """The usable pipe for `key`, else the one `open_pipe` opens (None: none)."""
        pipe = self._pipes.get(key)
        if pipe is not None and pipe.usable:
            return cast(P, pipe)
        async with self._opening.setdefault(key, trio.Lock()):  # the others wait and share it
            pipe = self._pipes.get(key)
            if pipe is not None and pipe.usable:
                return cast(P, pipe)
            if pipe is not None:
                self._drop(key)
            opened = await open_pipe()
            if opened is not None:
                self._pipes[key] = opened
                self._start_soon(lambda: self._run(key, opened))
            return opened

    def drop_peer(self, peer_id: str) -> None:
        """Reset `peer_id`'s pipes: every exchange on them fails now."""
        for key in [k for k in self._pipes if k[0] == peer_id]:
            self._drop(key)

    def forget_peer(self, peer_id: str) -> None:
        self.drop_peer(peer_id)
        for key in [k for k in self._opening if k[0] == peer_id]:
            if not self._opening[key].locked():
                del self._opening[key]

    async def _run(self, key: tuple[str, TProtocol], pipe: KeptPipe[Any]) -> None:
        try:
            await pipe.run()
        finally:
            if self._pipes.get(key) is pipe:
                del self._pipes[key]

    def _drop(self, key: tuple[str, TProtocol]) -> None:
        pipe = self._pipes.pop(key, None)
        if pipe is not None:
            pipe.close()
