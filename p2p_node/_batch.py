"""A batch job's chunks, pulled by the peers that run them.

The client learns from its node which peers serve the model and how to reach
them, and gives each peer a few slots. A slot takes the next chunk, sends it
straight to its peer (the infer protocol: run here, no forwarding), and takes
another when the answer is in. So faster peers take more chunks, and no chunk
crosses the network twice, as it does when a coordinator receives it and then
forwards it.

Failures, by what they say:
- about the request (bad input, say): the batch fails with that error at once;
- about the peer (gone, timed out, refusing this client or model, answering
  nonsense): its chunk is put back for the other slots and the peer leaves the
  batch;
- OVERLOADED: the slot waits as asked (5 s at most, or briefly when not told, and
  no longer than the batch lasts) and tries again, a few times in a row at most,
  then the peer leaves the batch.

Chunks left when every peer has left go through `fallback` (the client's node,
as ordinary jobs that fail over on their own); its errors end the batch.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping

import trio

from scheduler import ErrorCode, InferenceResult, JobError

logger = logging.getLogger(__name__)

# What a peer says when it will not run this batch's chunks, whatever we send it;
# or a reply that makes no sense (a request the peers all call malformed fails the
# batch anyway, in the fallback).
PEER_FAULTS = frozenset(
    {
        ErrorCode.UNAUTHORIZED,
        ErrorCode.UNKNOWN_MODEL,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.MESSAGE_TOO_LARGE,
        ErrorCode.MALFORMED_MESSAGE,
    }
)
MAX_OVERLOADED_WAITS = 3  # in a row, per slot; then the peer leaves the batch
OVERLOADED_WAIT_S = 0.1  # when the peer does not say how long
MAX_OVERLOADED_WAIT_S = 5.0  # whatever it says

RunOn = Callable[[str, int], Awaitable[InferenceResult]]  # (peer id, chunk) -> answer
RunChunk = Callable[[int], Awaitable[InferenceResult]]
Answered = Callable[[int, InferenceResult], None]


class ChunkQueue:
    """The chunks of a batch not answered yet: those waiting for a slot, and those in
    flight (which may come back)."""

    def __init__(self, count: int) -> None:
        self._waiting = deque(range(count))
        self.unanswered = count
        self._changed = trio.Event()
        self.all_answered = trio.Event()
        if count == 0:
            self.all_answered.set()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def take(self) -> int | None:
        """The next waiting chunk; None once every chunk is answered. While chunks
        are in flight and none waits, waits: a failed one may be put back."""
        while not self._waiting:
            if self.unanswered == 0:
                return None
            await self._changed.wait()
        return self._waiting.popleft()

    def answered(self) -> None:
        self.unanswered -= 1
        if self.unanswered == 0:
            self.all_answered.set()
        self._notify()

    def put_back(self, chunk: int) -> None:
        self._waiting.appendleft(chunk)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class BatchRun:
    """One batch: `slots` per peer pull chunks from one queue until all are answered."""

    def __init__(self, chunks: int, run_on: RunOn, fallback: RunChunk, answered: Answered) -> None:
        self.queue = ChunkQueue(chunks)
        self._run_on = run_on
        self._fallback = fallback
        self._answered = answered
        self.left: dict[str, JobError] = {}  # peers that left the batch, and why
        self._failure: JobError | None = None

    async def run(self, slots: Mapping[str, int], fallback_slots: int) -> None:
        """Every chunk answered, or raise the first error about the request."""
        with trio.CancelScope() as batch:
            async with trio.open_nursery() as nursery:
                for peer, count in slots.items():
                    nursery.start_soon(self._serve_peer, peer, count, batch)
            if self.queue.waiting:  # every peer left with chunks to go
                async with trio.open_nursery() as nursery:
                    for _ in range(max(1, fallback_slots)):
                        nursery.start_soon(self._fallback_slot, batch)
        if self._failure is not None:
            raise self._failure

    async def _serve_peer(self, peer: str, count: int, batch: trio.CancelScope) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(self._peer_slot, peer, nursery.cancel_scope, batch)

    async def _peer_slot(
        self, peer: str, peer_scope: trio.CancelScope, batch: trio.CancelScope
    ) -> None:
        waits = 0
        while (chunk := await self.queue.take()) is not None:
            try:
                result = await self._run_on(peer, chunk)
            except JobError as error:
                self.queue.put_back(chunk)
                if error.code is ErrorCode.OVERLOADED and waits < MAX_OVERLOADED_WAITS:
                    waits += 1
                    wait = min(error.retry_after or OVERLOADED_WAIT_S, MAX_OVERLOADED_WAIT_S)
                    with trio.move_on_after(wait):  # others may finish the batch meanwhile
                        await self.queue.all_answered.wait()
                    continue
                if error.code.retryable or error.code in PEER_FAULTS:
                    self._leave(peer, error, peer_scope)
                else:
                    self._fail(error, batch)
                return
            except BaseException:  # cancelled: the peer left, or the batch ended
                self.queue.put_back(chunk)
                raise
            waits = 0
            self._done(chunk, result)

    async def _fallback_slot(self, batch: trio.CancelScope) -> None:
        while (chunk := await self.queue.take()) is not None:
            try:
                result = await self._fallback(chunk)
            except JobError as error:
                self.queue.put_back(chunk)
                self._fail(error, batch)
                return
            except BaseException:
                self.queue.put_back(chunk)
                raise
            self._done(chunk, result)

    def _done(self, chunk: int, result: InferenceResult) -> None:
        self._answered(chunk, result)
        self.queue.answered()

    def _leave(self, peer: str, error: JobError, peer_scope: trio.CancelScope) -> None:
        if peer not in self.left:
            logger.info("batch: %s leaves the batch: %s", peer, error)
            self.left[peer] = error
        peer_scope.cancel()  # its other slots put their chunks back

    def _fail(self, error: JobError, batch: trio.CancelScope) -> None:
        if self._failure is None:
            self._failure = error
        batch.cancel()


def spread(concurrency: int, peers: list[str]) -> dict[str, int]:
    """`concurrency` slots over `peers`, best first: as even as can be, and the first
    `concurrency` peers only when there are more peers than slots."""
    concurrency = max(1, concurrency)
    chosen = peers[:concurrency]
    share, extra = divmod(concurrency, len(chosen)) if chosen else (0, 0)
    return {peer: share + (1 if i < extra else 0) for i, peer in enumerate(chosen)}
