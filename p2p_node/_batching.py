"""Dynamic batching: requests for one model queued together share one onnxruntime run.

A request joins its model's queue (a `Lane`) once it is validated and admitted,
so a bad request never joins anyone. Whichever queued request gets to run
first (a worker slot, or its turn on the event loop for a model run inline)
takes along the requests queued behind it that stack with it: their inputs
are concatenated on the batch axis (the leading dimension), the model runs
once, and each request gets its own rows of every output back.

What may merge:

- a model merges when every input and every output has a dynamic leading
  dimension (a fixed one, batch 1 included, or a 0-d tensor: never) and its
  run may take more than one row;
- two requests stack when each has the same number of rows in every input and
  the same trailing dimensions (its key); a request whose inputs disagree on
  their row counts runs alone;
- requests asking for different outputs merge: the run fetches the union, and
  each request is answered only what it asked for, in its order. Keeping them
  apart would split a stream of mixed requests into runs of one, and a tensor
  the model computes anyway costs only its copy out.

Bounds (`BatchPolicy`): at most `max_rows` rows in a merged run: the node's
`max_batch_rows`, lowered per model by `max_batch_rows` in its model.toml (1:
never merged). A request with more rows than that still runs, alone: only the
node's cap refuses a request, so batching never changes which requests are
accepted. A run waits for company up to `max_batch_wait_us` (model.toml, 0
by default) after the request it is formed for was queued: by default it takes
what is queued and an idle node never waits. A run on the event loop's thread
(a small model's: `ExecutorConfig.inline_below_ms`) takes along only what
keeps it within that bound, never a large request queued for a worker thread.

A failing merged run is retried with each request alone: validation checks
names, dtypes and shapes but not values, so one request's values can fail a
run (an index out of range), and its neighbours then get exactly the answer
they would have got unmerged. A merged run whose outputs do not split by rows
(an output's leading dimension is not the total of the rows) is retried the
same way, and the model merges no more.

Merging assumes the leading dimension is the batch axis and its rows are
independent. A graph with an operator that mixes rows (`ROW_MIXING_OPS`:
dynamic quantization takes its scale from the whole tensor, so the bundled
int8 MiniLM's embeddings move by up to 0.008 when merged) is never merged.
Any other model for which it is false (a sequence without a batch axis, say
[tokens]) sets `max_batch_rows = 1` in its model.toml.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
import outcome
import trio

from gossip import ModelDescriptor
from scheduler import ErrorCode, JobError

from ._repository import ModelCard
from ._residency import LoadedModel

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

# Whether requests that could merge with this task's may come in the same scheduling
# round (True unless whoever started the task knows better). A model run inline
# waits one round for them to queue; the pipelined server clears it for a request
# that came alone, with nothing else in flight on its stream, so that a lone job
# (concurrency 1) does not pay that round.
COMPANY_EXPECTED: ContextVar[bool] = ContextVar("company_expected", default=True)

Array = np.ndarray[Any, Any]
Key = tuple[tuple[str, tuple[int, ...]], ...]  # per input: its name and trailing dims

# Operators whose result for one row depends on the other rows of the tensor.
# DynamicQuantizeLinear (onnxruntime's quantize_dynamic) scales by the whole
# tensor's range.
ROW_MIXING_OPS = frozenset({"DynamicQuantizeLinear"})


def mixes_rows(onnx_path: Path) -> bool:
    """Whether the graph (or a subgraph of it) has one of `ROW_MIXING_OPS`. Reads the
    graph without its external weights; one `onnx` cannot read is taken to mix.
    (`onnx` is imported here, not with the module: it takes a second to import
    here, which every command of the CLI paid, running a model or not.)"""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as error:  # protobuf's and onnx's errors share no base
        logger.warning("%s: cannot read its graph (%s); it will not merge", onnx_path, error)
        return True
    return any(node.op_type in ROW_MIXING_OPS for node in _nodes(model.graph))


def _nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    import onnx  # (imported by mixes_rows already)

    for node in graph.node:
        yield node
        for attribute in node.attribute:  # If, Loop, Scan: their bodies
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _nodes(subgraph)


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How one model's requests are merged.

    `max_rows`: the most rows in a merged run. `wait_s`: how long a run may wait
    for requests to merge, from when the request it is formed for was queued.
    `merges`: whether the model has a batch axis on every input and output, and
    no operator that mixes rows.
    """

    max_rows: int
    wait_s: float
    merges: bool

    @classmethod
    def of(
        cls,
        descriptor: ModelDescriptor,
        card: ModelCard,
        node_max_rows: int,
        *,
        enabled: bool,
        rows_mix: bool = False,
    ) -> BatchPolicy:
        """The policy from the model's specs and graph, its model.toml and the node's cap."""
        max_rows = min(node_max_rows, card.max_batch_rows or node_max_rows)
        axis = all(
            s.shape and s.shape[0] is None for s in (*descriptor.inputs, *descriptor.outputs)
        )
        merges = enabled and axis and not rows_mix and max_rows > 1
        return cls(max_rows, card.max_batch_wait_us / 1e6, merges)


@dataclass(frozen=True, slots=True)
class Answer:
    """What one request got: its outputs or its error, and the run that gave it."""

    outputs: dict[str, Array]
    error: JobError | None
    started: float  # time.perf_counter() when the run that answered it started
    finished: float
    shared: bool  # that run was merged with other requests


class Request:
    """One admitted request, from when it is queued until it is answered or leaves."""

    __slots__ = (
        "answer",
        "batch",
        "began",
        "done",
        "feeds",
        "key",
        "lane",
        "left",
        "names",
        "options",
        "queued_at",
        "rows",
        "scope",
        "size",
    )

    def __init__(self, feeds: dict[str, Array], names: list[str]) -> None:
        self.feeds = feeds
        self.names = names
        self.size = sum(array.size for array in feeds.values())  # input elements
        self.rows = 0
        self.key: Key | None = None  # None: runs alone
        self.queued_at = 0.0  # trio time
        self.lane: Lane | None = None
        # While it waits where only a cancel can reach it (a worker slot, company): set,
        # and cancelled when another request's batch takes it.
        self.scope: trio.CancelScope | None = None
        self.batch: Batch | None = None
        # Terminates its own run when it leaves. Made only for a run of its own after a
        # merged run failed (`execute`); a batch of one runs with the batch's.
        self.options: ort.RunOptions | None = None
        self.began = False  # set by the run, in its thread
        self.left = False  # cancelled after it was taken into a batch
        self.answer: Answer | None = None  # set once, when it is answered
        # Made only when its task must wait for the answer: at c=32 inline, one
        # request's run answers the others before they look.
        self.done: trio.Event | None = None


@contextmanager
def taken_along(request: Request) -> Iterator[None]:
    """A wait that ends, without error, if another request's batch takes `request`."""
    request.scope = trio.CancelScope()
    try:
        with request.scope:
            yield
    finally:
        request.scope = None


class Batch:
    """Requests taken to run together, and the worker slot they run in (None: inline).
    A batch of one large request may also hold `spare` slots, free when it was
    taken: it then runs in that many parts more at once (`run_split`)."""

    __slots__ = ("members", "options", "slot", "spare")

    def __init__(self, members: list[Request], slot: object | None) -> None:
        self.members = members
        self.slot = slot
        self.spare: list[object] = []
        self.options = ort.RunOptions()  # the merged run's: terminated when all have left

    def leave(self, request: Request) -> None:
        """`request` was cancelled: its part is not run if the run has not begun, and
        discarded if it has; the run is told to stop once no request is left in it."""
        request.left = True
        if request.options is not None:
            request.options.terminate = True
        if all(r.left for r in self.members):
            self.options.terminate = True


class Lane:
    """One model's queued requests: admitted, not yet taken into a batch."""

    def __init__(self, model_id: str, policy: BatchPolicy) -> None:
        self.model_id = model_id
        self.policy = policy
        self.merges = policy.merges  # turned off if a merged run's outputs did not split
        self._queued: list[Request] = []
        self._arrived = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._queued)

    def queue(self, request: Request) -> None:
        request.lane = self
        request.queued_at = trio.current_time()
        if self.policy.merges:
            feeds = request.feeds
            if len(feeds) == 1:  # most models: the same key, without a set, a sort, a generator
                ((name, array),) = feeds.items()
                request.rows = array.shape[0]
                request.key = ((name, array.shape[1:]),)
            else:
                rows = {array.shape[0] for array in feeds.values()}
                if len(rows) == 1:
                    (request.rows,) = rows
                    request.key = tuple((n, a.shape[1:]) for n, a in sorted(feeds.items()))
        self._queued.append(request)
        if self._arrived:  # a run waits for company (max_batch_wait_us)
            self._arrived.unpark_all()

    def remove(self, request: Request) -> None:
        if request in self._queued:
            self._queued.remove(request)

    def head(self) -> Request | None:
        return self._queued[0] if self._queued else None

    def waits_for(self, request: Request) -> bool:
        """Whether a run formed for `request` waits for company (not by default)."""
        return self.policy.wait_s > 0 and request.key is not None and self.merges

    async def gather(self, request: Request) -> None:
        """Wait, while `request` is queued, until the requests that stack with it fill
        a run or it has waited `wait_s` since it was queued. Call it in
        `taken_along(request)`: another batch may take `request` meanwhile."""
        if not self.waits_for(request):
            return
        deadline = request.queued_at + self.policy.wait_s
        while request.batch is None and self._rows_with(request) < self.policy.max_rows:
            with trio.move_on_at(deadline) as timer:
                await self._arrived.park()
            if timer.cancelled_caught:
                return

    def _rows_with(self, first: Request) -> int:
        return sum(r.rows for r in self._queued if r.key == first.key)

    def take(
        self, first: Request, caller: Request, slot: object | None, max_size: float = math.inf
    ) -> Batch:
        """A batch of `first` and the queued requests that stack with it, in queue
        order, within `max_rows` and `max_size` input elements (an inline run's
        bound: a large request queued for a worker thread is not taken along).
        Each request taken but `caller` stops waiting."""
        members, rows, size = [first], first.rows, first.size
        if first.key is not None and self.merges:
            for r in self._queued:
                if rows >= self.policy.max_rows:
                    break
                if (
                    r is not first
                    and r.key == first.key
                    and rows + r.rows <= self.policy.max_rows
                    and size + r.size <= max_size
                ):
                    members.append(r)
                    rows += r.rows
                    size += r.size
        batch = Batch(members, slot)
        for r in members:
            r.batch = batch
            if r is not caller and r.scope is not None:
                r.scope.cancel()  # it stops waiting to run
        self._queued = [r for r in self._queued if r.batch is None]
        return batch


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What running a batch gave: an answer per request still in it when it began."""

    answers: dict[Request, Answer]
    runs: tuple[tuple[float, int], ...]  # each onnxruntime run's time (ms) and input size
    split_failed: bool = False  # a merged (or split) run's outputs did not split by rows
    parts: bool = False  # its one request ran in parts at once


def execute(model: LoadedModel, batch: Batch) -> BatchResult:
    """Run `batch`, in a worker thread or inline: one run for all its requests still
    in it, or each alone if there is one, or if the merged run failed."""
    active = [r for r in batch.members if not r.left]
    for r in active:
        r.began = True
    if len(batch.members) == 1 and active:  # alone: its leaving terminates the batch's run
        (request,) = active
        if batch.spare:
            split = run_split(model, request, 1 + len(batch.spare), batch.options)
            if split is not None:
                return BatchResult({request: split}, ((_ms(split), request.size),), parts=True)
        answer = _run_alone(model, request, batch.options)
        failed = bool(batch.spare)  # (its parts' outputs did not split by rows)
        return BatchResult({request: answer}, ((_ms(answer), request.size),), failed)
    runs: list[tuple[float, int]] = []
    split_failed = False
    if len(active) > 1:
        merged = _run_merged(model, active, batch.options)
        size = sum(r.size for r in active)
        if isinstance(merged, dict):
            return BatchResult(merged, ((_ms(next(iter(merged.values()))), size),))
        reason, elapsed_ms = merged
        runs.append((elapsed_ms, size))
        split_failed = reason is None
        logger.info(
            "model %s: a run of %d merged requests failed (%s); running each alone",
            model.descriptor.id,
            len(active),
            reason or "its outputs do not split by rows",
        )
    answers = {}
    for r in active:
        # Its own options before it checks `left`: a leave() then either is seen here
        # or sees the options, and terminates the run.
        r.options = ort.RunOptions()
        if not r.left:  # leaving between retries skips its own
            answers[r] = _run_alone(model, r, r.options)
            runs.append((_ms(answers[r]), r.size))
    return BatchResult(answers, tuple(runs), split_failed)


def _run_merged(
    model: LoadedModel, requests: Sequence[Request], options: ort.RunOptions
) -> dict[Request, Answer] | tuple[JobError | None, float]:
    """Each request's answer from one run; or why it failed (None: the outputs did not
    split by rows) and how long it took."""
    wanted = {n for r in requests for n in r.names}
    names = [s.name for s in model.descriptor.outputs if s.name in wanted]
    started = time.perf_counter()
    try:
        feeds = {n: np.concatenate([r.feeds[n] for r in requests]) for n in requests[0].feeds}
        values = model.session.run(names, feeds, options)
    except Exception as error:  # onnxruntime's errors share no base; numpy's MemoryError
        return _job_error(model, error), (time.perf_counter() - started) * 1e3
    finished = time.perf_counter()
    total = sum(r.rows for r in requests)
    if any(v.shape[:1] != (total,) for v in values):
        return None, (finished - started) * 1e3
    by_name = dict(zip(names, values, strict=True))
    answers, offset = {}, 0
    for r in requests:
        rows = slice(offset, offset + r.rows)
        outputs = {n: by_name[n][rows] for n in r.names}
        answers[r] = Answer(outputs, None, started, finished, shared=True)
        offset += r.rows
    return answers


def run_split(
    model: LoadedModel, request: Request, parts: int, options: ort.RunOptions
) -> Answer | None:
    """`request` run as `parts` runs of consecutive rows at once, one in this thread
    and each other in a thread of its own, their outputs joined; None if they did
    not split by rows. A model that merges has independent rows, so the answer is
    the one a single run gives, in less time where the cores are free: 26-33 ms
    against 37-44 for 65,520 rows of digits-mlp in two parts on this 2-core machine."""
    edges = [request.rows * i // parts for i in range(parts + 1)]
    spans = list(itertools.pairwise(edges))
    chunks = [{name: array[lo:hi] for name, array in request.feeds.items()} for lo, hi in spans]
    results: list[outcome.Outcome[list[Array]] | None] = [None] * parts
    finished = threading.Semaphore(0)

    def deliver(part: int, result: outcome.Outcome[list[Array]]) -> None:
        results[part] = result
        finished.release()

    started = time.perf_counter()
    for part in range(1, parts):
        trio.lowlevel.start_thread_soon(
            functools.partial(model.session.run, request.names, chunks[part], options),
            functools.partial(deliver, part),
            name=f"onnx {model.descriptor.id} part {part}",
        )
    results[0] = outcome.capture(model.session.run, request.names, chunks[0], options)
    for _ in range(1, parts):
        finished.acquire()
    done = time.perf_counter()
    values = []
    for result in results:
        assert result is not None  # (each part delivered before `finished` was released)
        if isinstance(result, outcome.Error):
            error = result.error
            if not isinstance(error, Exception):
                raise error
            return Answer({}, _job_error(model, error), started, done, shared=False)
        values.append(result.value)
    for (lo, hi), got in zip(spans, values, strict=True):
        if any(v.shape[:1] != (hi - lo,) for v in got):
            return None
    outputs = {
        name: np.concatenate([got[i] for got in values]) for i, name in enumerate(request.names)
    }
    return Answer(outputs, None, started, done, shared=False)


def _run_alone(model: LoadedModel, request: Request, options: ort.RunOptions) -> Answer:
    started = time.perf_counter()
    try:
        values = model.session.run(request.names, request.feeds, options)
    except Exception as error:  # onnxruntime's pybind error types share no useful base
        return Answer({}, _job_error(model, error), started, time.perf_counter(), shared=False)
    outputs = dict(zip(request.names, values, strict=True))
    return Answer(outputs, None, started, time.perf_counter(), shared=False)


def _job_error(model: LoadedModel, error: Exception) -> JobError:
    kind = type(error).__name__
    code = ErrorCode.INVALID_INPUT if kind == "InvalidArgument" else ErrorCode.INTERNAL
    return JobError(code, f"model {model.descriptor.id} failed: {kind}: {error}")


def _ms(answer: Answer) -> float:
    return (answer.finished - answer.started) * 1e3
