"""A batch job: many rows as chunks, pulled by the peers that run them.

`submit_batch` (what `Client.submit_batch` runs) learns from the client's node
which peers serve the model and how to reach them, dials them, and gives each
peer a few slots. A slot takes the next chunk, sends it straight to its peer
(the infer protocol: run here, no forwarding), and takes another when the
answer is in. So faster peers take more chunks, and no chunk crosses the
network twice, as it does when a coordinator receives it and then forwards it.

Failures, by what they say:
- about the request (bad input, say): the batch fails with that error at once;
- about the peer (gone, timed out, refusing this client or model, answering
  nonsense): its chunk is put back for the other slots and the peer leaves the
  batch. A peer that the client's node drops from its view (reported departed:
  dead, or frozen with its connections open) fails that way too, within a
  `WATCH_PERIOD_S` of the drop (`abandon_departed`), not at its chunks' timeout;
- OVERLOADED: the slot waits as asked (5 s at most, or briefly when not told, and
  no longer than the batch lasts) and tries again, a few times in a row at most,
  then the peer leaves the batch.

Chunks left when every peer has left go through `fallback` (the client's node,
as ordinary jobs that fail over on their own); its errors end the batch.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import multiaddr
import numpy as np
import trio

from scheduler import (
    DistributionStrategy,
    ErrorCode,
    InferenceRequest,
    InferenceResult,
    JobError,
    Tensors,
)

from ._config import ConfigError, parse_peer_multiaddr
from ._errors import unwrap_single_errors

if TYPE_CHECKING:
    from ._client import Client
    from ._messages import PeerReport

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
WATCH_PERIOD_S = 1.0  # how often a batch asks the client's node which peers it still sees

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
            logger.info("batch: %s leaves the batch: %s", peer, error, extra={"peer": peer})
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


# --- a batch from a client ----------------------------------------------------------


class Dialer(Protocol):
    """What a batch needs of the client's libp2p side (its `Rpc`)."""

    async def connect(self, addr: multiaddr.Multiaddr, timeout: float) -> str: ...

    async def infer(
        self, peer_id: str, request: InferenceRequest, timeout: float
    ) -> InferenceResult: ...

    def abandon(self, peer_id: str, why: str) -> None: ...


@dataclass(frozen=True, slots=True)
class BatchResult:
    outputs: dict[str, np.ndarray[Any, Any]]  # every chunk's outputs, in input order
    chunks_by_executor: dict[str, int]  # peer id -> chunks it ran
    chunks: int


async def submit_batch(
    client: Client,
    dialer: Dialer,
    model_id: str,
    inputs: Tensors,
    *,
    batch_size: int,
    strategy: DistributionStrategy | None,
    timeout: float,
    concurrency: int,
    direct: bool,
    outputs: Sequence[str],
    on_progress: Callable[[int, int], None] | None,
    dial_timeout: float,
) -> BatchResult:
    """`Client.submit_batch`, which documents it; `dialer` is the client's `Rpc`."""
    wanted = tuple(outputs)
    rows = row_count(inputs, batch_size)
    bounds = [(start, min(start + batch_size, rows)) for start in range(0, rows, batch_size)]
    results: list[InferenceResult | None] = [None] * len(bounds)
    done = 0

    def chunk(i: int) -> Tensors:
        start, end = bounds[i]
        return {name: array[start:end] for name, array in inputs.items()}

    async def run_on(peer_id: str, i: int) -> InferenceResult:
        request = InferenceRequest(model_id, chunk(i), timeout, outputs=wanted)
        return await dialer.infer(peer_id, request, timeout)

    async def via_node(i: int) -> InferenceResult:
        return await client.submit(
            model_id, chunk(i), timeout=timeout, strategy=strategy, outputs=wanted
        )

    def answered(i: int, result: InferenceResult) -> None:
        nonlocal done
        results[i] = result
        start, end = bounds[i]
        done += end - start
        if on_progress:
            on_progress(done, rows)

    peers = (
        await batch_peers(client, dialer, model_id, strategy, concurrency, dial_timeout)
        if direct
        else []
    )
    slots = spread(concurrency, peers)
    with unwrap_single_errors():
        async with trio.open_nursery() as nursery:
            if slots:
                nursery.start_soon(abandon_departed, client, dialer, frozenset(slots))
            await BatchRun(len(bounds), run_on, via_node, answered).run(
                slots, fallback_slots=concurrency
            )
            nursery.cancel_scope.cancel()
    finished = [r for r in results if r is not None]
    joined = {
        name: np.concatenate([r.outputs[name] for r in finished]) for name in finished[0].outputs
    }
    return BatchResult(joined, dict(Counter(r.executor for r in finished)), len(bounds))


async def abandon_departed(
    client: Client, dialer: Dialer, peers: frozenset[str], period: float = WATCH_PERIOD_S
) -> None:
    """Until cancelled: every `period`, ask the client's node which peers its view
    holds, and abandon the exchanges with each of `peers` it no longer holds.

    The client has no failure detector of its own; its node has one (beats). A
    peer it drops is dead or frozen, and a frozen one keeps its connections
    open, so its chunks would wait out their timeout. Abandoned, they fail as
    PEER_UNREACHABLE: back to the queue, and the peer leaves the batch. A
    dropped peer is abandoned again at every look, in case a slot sent it a
    chunk in between. A look the node does not answer in time is skipped.
    """
    while True:
        await trio.sleep(period)
        node = client.peer_id  # the node the client uses now (it may fail over)
        try:
            reports = await client.peers(timeout=period)
        except JobError as error:
            logger.debug("batch: no view from %s: %s", node, error, extra={"peer": node})
            continue
        held = {r.record.peer_id for r in reports} | {node}
        for peer_id in peers - held:
            dialer.abandon(peer_id, f"{node} reported it departed with a chunk in flight")


def row_count(inputs: Tensors, batch_size: int) -> int:
    """The rows every input has (the same for all), to split into `batch_size` chunks."""
    if batch_size < 1:
        raise JobError(ErrorCode.INVALID_INPUT, f"batch size must be >= 1, got {batch_size}")
    counts = {np.asarray(a).shape[0] if np.ndim(a) else -1 for a in inputs.values()}
    if len(counts) != 1 or -1 in counts:
        raise JobError(
            ErrorCode.INVALID_INPUT,
            f"a batch needs every input to have the same number of rows, got {sorted(counts)}",
        )
    (rows,) = counts
    if rows == 0:
        raise JobError(ErrorCode.INVALID_INPUT, "a batch needs at least one row")
    return rows


async def batch_peers(
    client: Client,
    dialer: Dialer,
    model_id: str,
    strategy: DistributionStrategy | None,
    most: int,
    dial_timeout: float,
) -> list[str]:
    """The first `most` peers the client's node ranks for `model_id` (itself
    included), less those the client cannot reach."""
    try:
        placement = await client.place(
            model_id, strategy or DistributionStrategy.LEAST_LOADED, timeout=dial_timeout
        )
        reports = {r.record.peer_id: r for r in await client.peers(timeout=dial_timeout)}
    except JobError as error:
        logger.info("batch: no direct placement (%s); the node places every chunk", error)
        return []
    ranked = [c.peer_id for c in placement.candidates][: 2 * max(1, most)]
    reached = {client.peer_id}
    # Dial them all at once (each at every address at once); those not reached
    # within the dial timeout are left out, and the next ranked take their place.
    with trio.move_on_after(dial_timeout):
        async with trio.open_nursery() as nursery:
            for peer_id in ranked:
                if peer_id not in reached and peer_id in reports:
                    nursery.start_soon(_dial, dialer, reports[peer_id], reached, dial_timeout)
    return [peer_id for peer_id in ranked if peer_id in reached][: max(1, most)]


async def _dial(dialer: Dialer, report: PeerReport, reached: set[str], timeout: float) -> None:
    """Add the peer to `reached` once one of its addresses answers as that peer."""
    peer_id = report.record.peer_id

    async def one(addr: str, scope: trio.CancelScope) -> None:
        try:
            target = parse_peer_multiaddr(addr)
            answered_as = await dialer.connect(target, timeout)
        except (JobError, ConfigError) as error:
            logger.debug(
                "batch: cannot reach %s at %s: %s", peer_id, addr, error, extra={"peer": peer_id}
            )
            return
        if answered_as == peer_id:
            reached.add(peer_id)
            scope.cancel()

    async with trio.open_nursery() as nursery:
        for addr in report.record.addrs:
            nursery.start_soon(one, addr, nursery.cancel_scope)
