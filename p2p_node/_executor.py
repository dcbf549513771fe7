"""Runs ONNX models: validated inputs, bounded admission, merged runs, worker threads."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import outcome
import trio

from gossip import ModelDescriptor, ModelPerformance, TensorSpec
from scheduler import ErrorCode, JobError, Tensors

from ._batching import (
    COMPANY_EXPECTED,
    Answer,
    Batch,
    BatchPolicy,
    BatchResult,
    Lane,
    Request,
    execute,
    mixes_rows,
    taken_along,
)
from ._config import ExecutorConfig
from ._decoder import read_text_table
from ._repository import ModelCard, RepositoryError
from ._residency import MB, LoadedModel, ResidentModels
from ._text import TextModels

logger = logging.getLogger(__name__)

TOKENIZE_INLINE_CHARS = 2048  # a text job longer than this is tokenized in a thread

# onnxruntime's type strings for the tensor element types we carry on the wire.
_ORT_DTYPES = {
    "tensor(bool)": "bool",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(float16)": "float16",
    "tensor(float)": "float32",
    "tensor(double)": "float64",
}
GPU_PROVIDERS = ("CUDAExecutionProvider",)
CPU_PROVIDER = "CPUExecutionProvider"
COMPUTE_EWMA_ALPHA = 0.2
# A request estimated to take this long (ms) runs in parts at once where worker slots
# are free, each part this many rows or more (Executor._spare_slots).
SPLIT_ABOVE_MS = 5.0
SPLIT_MIN_ROWS = 256
UNNAMED_INPUT = ""  # the only input of a single-input model, named by the executor


@dataclass(frozen=True, slots=True)
class Execution:
    """A request's outputs. `queue_ms`: from its admission until the run that answered
    it started. `compute_ms`: that run's time, which is shared: a request merged with
    others reports the merged run's time, not a share of it."""

    outputs: dict[str, np.ndarray[Any, Any]]
    queue_ms: float
    compute_ms: float
    labels: tuple[str, ...] = ()  # a text classifier's label names, one per text


def choose_providers(available: Iterable[str], use_gpu: bool) -> list[str]:
    """GPU providers first when wanted and present; the CPU provider always."""
    available = list(available)
    chosen = [p for p in GPU_PROVIDERS if use_gpu and p in available]
    return [*chosen, CPU_PROVIDER]


# Sessions shared by the nodes of one process (a swarm of many nodes, see
# p2p_node.testing): one per model file, content and session settings, held
# weakly, so a session lives while some node has it loaded. onnxruntime's `run`
# is thread-safe. Each node still counts the model's memory in its own budget.
SessionKey = tuple[str, str, int, tuple[str, ...], bool]
_sessions: weakref.WeakValueDictionary[SessionKey, ort.InferenceSession] = (
    weakref.WeakValueDictionary()
)
_session_locks: dict[SessionKey, threading.Lock] = {}
_sessions_lock = threading.Lock()


def shared_session(
    card: ModelCard, config: ExecutorConfig, *, spin_after_runs: bool = True
) -> ort.InferenceSession:
    """The process's session of `card` with `config`'s settings, made if none is held.
    Without `spin_after_runs`, its intra-op threads sleep once a run ends, where
    onnxruntime's default has them spin on for the next (`_wide_session`)."""
    providers = choose_providers(ort.get_available_providers(), config.use_gpu)
    key = (
        str(card.onnx_path),
        card.sha256,
        config.intra_op_threads,
        tuple(providers),
        spin_after_runs,
    )
    with _sessions_lock:
        lock = _session_locks.setdefault(key, threading.Lock())
    with lock:  # two nodes loading one model at once make it once
        session = _sessions.get(key)
        if session is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = config.intra_op_threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            if not spin_after_runs:
                options.add_session_config_entry("session.force_spinning_stop", "1")
            session = ort.InferenceSession(str(card.onnx_path), options, providers=providers)
            _sessions[key] = session
        return session


@functools.lru_cache(maxsize=256)
def _mixes_rows(onnx_path: str, sha256: str) -> bool:
    return mixes_rows(Path(onnx_path))


def load_model(card: ModelCard, config: ExecutorConfig) -> LoadedModel:
    try:
        session = shared_session(card, config)
        wide = _wide_session(card, config)
    except Exception as error:  # onnxruntime raises its own unrelated types
        raise RepositoryError(f"{card.onnx_path}: onnxruntime cannot load it: {error}") from None
    descriptor = ModelDescriptor(
        id=card.id,
        version=card.version,
        sha256=card.sha256,
        task_type=card.task_type,
        subtypes=card.subtypes,
        languages=card.languages,
        max_input_length=card.max_input_length,
        accuracy=card.accuracy,
        cost=card.cost,
        description=card.description,
        inputs=tuple(_spec(card, node) for node in session.get_inputs()),
        outputs=tuple(_spec(card, node) for node in session.get_outputs()),
    )
    mixes = _mixes_rows(str(card.onnx_path), card.sha256)
    return LoadedModel(descriptor, session, card, mixes, wide)


def _wide_session(card: ModelCard, config: ExecutorConfig) -> ort.InferenceSession | None:
    """For a text generator that batches its decode steps on the CPU: a second session
    of it whose runs use the threads of every worker slot (`workers` x
    `intra_op_threads`), for the steps of many rows and the prefills of many
    tokens (`_generation.WIDE_STEP_ROWS`, `WIDE_PREFILL_TOKENS`) whose products
    may be large enough to share between cores, where a step of one row's are
    not: each engine measures whether they are (`_generation.WideChoice`). None
    where it cannot pay, or where two of the model would not fit the memory
    budget (the second counts in it: `LoadedModel.memory_bytes`).

    Its threads spin only within a run, and sleep once it ends. With onnxruntime's
    default they spin on after it, for tens of milliseconds: in a node whose
    steps ran on the one-slot session, the wide session's idle thread spun on
    a core of its own between its rare runs (0.94 of a core at 16 sessions,
    bench.text), and each wide run found it spinning or asleep by chance, which
    `WideChoice`'s probes then measured. Kept from spinning at all, a wide step
    woke it for each of its products, and lost to one thread."""
    if config.workers == 1 or not config.batch_decode:
        return None
    if choose_providers(ort.get_available_providers(), config.use_gpu)[0] != CPU_PROVIDER:
        return None
    budget = config.model_memory_mb
    if budget is not None and 2 * card.memory_bytes > budget * MB:
        return None
    table = read_text_table(card)
    if table is None or table.get("postprocess") != "generate":
        return None
    threads = config.workers * config.intra_op_threads
    return shared_session(card, replace(config, intra_op_threads=threads), spin_after_runs=False)


def take_free_slots(limiter: trio.CapacityLimiter, count: int) -> list[object]:
    """`count` of `limiter`'s slots, taken now: the caller knows they are free (a
    run that takes the idle workers' slots for more threads or parts). Each is
    an object of its own, for `give_back`."""
    slots = [object() for _ in range(count)]
    for slot in slots:
        limiter.acquire_on_behalf_of_nowait(slot)
    return slots


def give_back(limiter: trio.CapacityLimiter, slots: Iterable[object]) -> None:
    for slot in slots:
        limiter.release_on_behalf_of(slot)


def _spec(card: ModelCard, node: Any) -> TensorSpec:
    dtype = _ORT_DTYPES.get(node.type)
    if dtype is None:
        raise RepositoryError(
            f"{card.onnx_path}: {node.name!r} has type {node.type}; only tensors are served "
            "(convert classifiers with zipmap disabled)"
        )
    shape = tuple(d if isinstance(d, int) else None for d in node.shape)
    return TensorSpec(node.name, dtype, shape)


def validate_inputs(
    model: ModelDescriptor, inputs: Tensors, *, max_rows: int | None = None
) -> dict[str, np.ndarray[Any, Any]]:
    """The feeds for `model`, or INVALID_INPUT naming what was expected and what came.

    A single input may come unnamed (name ""). An input is converted to the
    declared dtype when numpy calls that a same-kind cast (int to float, float64
    to float32); other dtypes and any shape mismatch are refused. An input whose
    leading dimension is the model's batch axis (not fixed) may have at most
    `max_rows` rows.
    """
    checks = _input_checks(model)
    if len(checks) == 1 and len(inputs) == 1 and UNNAMED_INPUT in inputs:
        inputs = {checks[0].spec.name: inputs[UNNAMED_INPUT]}
    if len(inputs) != len(checks) or any(c.spec.name not in inputs for c in checks):
        raise JobError(
            ErrorCode.INVALID_INPUT,
            f"model {model.id} takes inputs {_describe(model.inputs)}; "
            f"got {sorted(inputs) or 'none'}",
        )
    feeds = {}
    for check in checks:
        spec, name = check.spec, check.spec.name
        array = inputs[name]
        if type(array) is not np.ndarray:
            array = np.asarray(array)
        shape = array.shape
        shape_ok = len(shape) == check.ndim and all(shape[i] == want for i, want in check.fixed)
        same = array.dtype == check.dtype
        if not shape_ok or not (same or np.can_cast(array.dtype, check.dtype, casting="same_kind")):
            got = f"{name} {array.dtype.name} [{', '.join(map(str, shape))}]"
            raise JobError(
                ErrorCode.INVALID_INPUT,
                f"model {model.id} expects {spec.describe()}; got {got}",
            )
        if 0 in shape:
            raise JobError(ErrorCode.INVALID_INPUT, f"model {model.id}: input {name!r} is empty")
        if max_rows is not None and check.batch_axis:
            _check_rows(model.id, name, shape[0], max_rows)
        feeds[name] = array if same else _cast(model.id, name, array, check.dtype)
    return feeds


def _cast(model_id: str, name: str, array: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """`array` as `dtype`; refused where a value does not fit, which a cast would
    silently change: an integer past the narrower type's range (it would wrap), a
    float past it (it would become inf)."""
    if dtype.kind in "iu" and array.dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise JobError(
                ErrorCode.INVALID_INPUT,
                f"model {model_id}: input {name!r} holds {low if low < info.min else high}, "
                f"outside {dtype.name}'s range [{info.min}, {info.max}]",
            )
        return array.astype(dtype, copy=False)
    with np.errstate(over="raise"):
        try:
            return array.astype(dtype, copy=False)
        except FloatingPointError:
            limit = float(np.finfo(dtype).max)
            raise JobError(
                ErrorCode.INVALID_INPUT,
                f"model {model_id}: input {name!r} holds values beyond {dtype.name}'s range "
                f"(+-{limit:.4g})",
            ) from None


@dataclass(frozen=True, slots=True)
class _InputCheck:
    """One declared input, as `validate_inputs` checks it."""

    spec: TensorSpec
    dtype: np.dtype[Any]
    ndim: int
    fixed: tuple[tuple[int, int], ...]  # (axis, size) of each fixed dimension
    batch_axis: bool  # a leading dimension that is not fixed


# Per descriptor (by identity, kept alive with it): what validating its inputs checks,
# worked out once, not for each small job.
_CHECKS: dict[int, tuple[ModelDescriptor, tuple[_InputCheck, ...]]] = {}


def _input_checks(model: ModelDescriptor) -> tuple[_InputCheck, ...]:
    known = _CHECKS.get(id(model))
    if known is not None and known[0] is model:
        return known[1]
    checks = tuple(
        _InputCheck(
            spec,
            np.dtype(spec.dtype),
            len(spec.shape),
            tuple((i, d) for i, d in enumerate(spec.shape) if d is not None),
            bool(spec.shape) and spec.shape[0] is None,
        )
        for spec in model.inputs
    )
    if len(_CHECKS) > 1024:  # descriptors come and go only as models are (re)loaded
        _CHECKS.clear()
    _CHECKS[id(model)] = (model, checks)
    return checks


def _check_rows(model_id: str, name: str, rows: int, max_rows: int) -> None:
    if rows > max_rows:
        raise JobError(
            ErrorCode.INVALID_INPUT,
            f"model {model_id}: input {name!r} has {rows} rows, more than this node's cap of "
            f"{max_rows} rows per request (max_batch_rows); split the rows into smaller "
            "jobs (`p2p-node submit --batch-size`)",
        )


def _describe(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(s.describe() for s in specs)


@dataclass(frozen=True, slots=True)
class ExecutorCounters:
    """Requests by how they ended, since the node started."""

    admitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled_waiting: int = 0  # cancelled before its ONNX run began: used no compute
    # Cancelled mid-run: its part is discarded, and onnxruntime told to terminate the
    # run once no request is left in it.
    cancelled_running: int = 0


class Executor:
    """Runs this node's models. At most `queue_limit` requests are admitted at once.

    Admitted requests wait for one of `workers` thread slots, then run in a
    worker thread (or inline, for models that have run fast: see ExecutorConfig).
    The request that gets a slot takes along the requests for its model queued
    behind it that stack with it, and they share one onnxruntime run
    (`_batching`; `batching=False` turns that off). A request cancelled while it
    waits never starts; one cancelled while it runs is abandoned, and once no
    request is left in its run onnxruntime is told to terminate it, which it
    does at its next node boundary; the thread slot is busy until then. Which
    models are in memory, within the memory budget, is `models`' business.

    The node's `max_batch_rows` caps the rows of one request (past it the
    request is INVALID_INPUT) and of one merged run; `max_batch_rows` in a
    model.toml lowers the cap on merged runs for that model (1: never merged),
    and a request with more rows than that runs alone, never refused for it.
    """

    def __init__(
        self,
        models: Sequence[LoadedModel],
        config: ExecutorConfig,
        *,
        limiter: trio.CapacityLimiter | None = None,
        batching: bool = True,
    ) -> None:
        """Serve `models`, kept loaded in order while they fit the memory budget."""
        self._config = config
        self._limiter = limiter or trio.CapacityLimiter(config.workers)
        self.models = ResidentModels(config, load_model, self._limiter)
        for model in models:
            self.models.add(model)
        self.texts = TextModels.load((m.card, m.descriptor) for m in models)
        self._batching = batching
        self._lanes: dict[str, Lane] = {}
        self._admitted = 0
        self._started = 0  # admitted requests in a batch that has been formed
        self.runs = 0  # onnxruntime runs: fewer than requests when requests merge
        self.merged = 0  # requests completed by a run shared with other requests
        self.split = 0  # requests run in parts at once, in spare worker slots
        # Each model's recent runs; decide whether a request runs inline.
        self._costs: dict[str, RunCost] = {}
        self._stats: dict[str, _ModelStats] = {}
        # ExecutorCounters' fields, counted in place: a frozen copy per request costs
        # more than a one-row run of a small model.
        self._counts = dict.fromkeys(ExecutorCounters.__dataclass_fields__, 0)
        self._counted = trio.lowlevel.ParkingLot()

    @classmethod
    def from_cards(
        cls,
        cards: Sequence[ModelCard],
        config: ExecutorConfig,
        *,
        limiter: trio.CapacityLimiter | None = None,
        batching: bool = True,
    ) -> Executor:
        """Load each model once, for its descriptor (and to fail at start if it cannot
        load), keeping loaded those that fit the memory budget. Refuses a model bigger
        than the whole budget before loading anything."""
        executor = cls._fitting(cards, config, limiter, batching)
        models = [load_model(card, config) for card in cards]
        for model in models:
            executor.models.add(model)
        executor.texts = TextModels.load((m.card, m.descriptor) for m in models)
        return executor

    @classmethod
    async def load(
        cls, cards: Sequence[ModelCard], config: ExecutorConfig, *, batching: bool = True
    ) -> Executor:
        """`from_cards` with the sessions built in a worker thread, so that a node
        starting (onnxruntime builds and optimises each graph) does not stall the
        event loop it may share: the harness runs many nodes in one."""
        executor = cls._fitting(cards, config, None, batching)
        models = await trio.to_thread.run_sync(lambda: [load_model(c, config) for c in cards])
        for model in models:
            executor.models.add(model)
        executor.texts = TextModels.load((m.card, m.descriptor) for m in models)
        return executor

    @classmethod
    def _fitting(
        cls,
        cards: Sequence[ModelCard],
        config: ExecutorConfig,
        limiter: trio.CapacityLimiter | None,
        batching: bool,
    ) -> Executor:
        """An executor with no model yet; refuses any of `cards` bigger than the budget."""
        executor = cls([], config, limiter=limiter, batching=batching)
        for card in cards:
            executor.models.check_fits(card)
        return executor

    @property
    def descriptors(self) -> tuple[ModelDescriptor, ...]:
        return self.models.descriptors

    @property
    def in_flight(self) -> int:
        """Admitted requests: running, or waiting for a worker slot."""
        return self._admitted

    @property
    def running(self) -> int:
        """Admitted requests whose run has started (requests merged share one run)."""
        return self._started

    @property
    def queue_length(self) -> int:
        """Admitted requests still waiting for their run to start."""
        return self._admitted - self._started

    def batch_policy(self, model_id: str) -> BatchPolicy:
        """How requests for `model_id` merge (KeyError if it is not served)."""
        return self._lane(model_id).policy

    def performance(self) -> tuple[ModelPerformance, ...]:
        """Per model: EWMA of latency (queue + compute) and of success, and run count."""
        return tuple(
            ModelPerformance(model_id, stats.latency_ms, stats.success_rate, stats.samples)
            for model_id, stats in sorted(self._stats.items())
        )

    def serves(self, model_id: str) -> bool:
        return model_id in self.models

    def note_run(self, model_id: str, *, ok: bool, latency_ms: float) -> None:
        """A run of `model_id` made outside `run` (a chain's stage: p2p_node/_stages),
        counted in `performance()` as the executor's own runs are."""
        self._stats.setdefault(model_id, _ModelStats()).record(ok=ok, latency_ms=latency_ms)

    @property
    def limiter(self) -> trio.CapacityLimiter:
        """The worker slots; holding them all makes this node's requests queue."""
        return self._limiter

    @property
    def counters(self) -> ExecutorCounters:
        """Requests by how they ended, so far."""
        return ExecutorCounters(**self._counts)

    async def wait_counters(self, predicate: Callable[[ExecutorCounters], bool]) -> None:
        """Until the counters satisfy `predicate` (tests and the harness use it)."""
        while not predicate(self.counters):
            await self._counted.park()

    def _count(self, **increments: int) -> None:
        counts = self._counts
        for name, n in increments.items():
            counts[name] += n
        if self._counted:  # someone waits in wait_counters
            self._counted.unpark_all()

    async def run(
        self,
        model_id: str,
        inputs: Tensors,
        outputs: Sequence[str] = (),
        *,
        texts: Sequence[str] = (),
        truncate: bool = False,
    ) -> Execution:
        """Run `model_id` on `inputs`; answer the `outputs` named (all when empty). A
        text job (`texts`, no inputs) is tokenized here, then run as tensors.

        A request is validated before it is queued, so a bad one is refused alone;
        a good one may share its run with others queued for the model (see
        Execution for what its timings then mean)."""
        if texts:
            return await self._run_texts(model_id, texts, truncate)
        descriptor = self.models.get(model_id)
        if descriptor is None:
            raise JobError(
                ErrorCode.UNKNOWN_MODEL,
                f"this node does not serve model {model_id!r}; it serves {self.models.ids()}",
            )
        feeds = validate_inputs(descriptor, inputs, max_rows=self._config.max_batch_rows)
        names = validate_outputs(descriptor, outputs)
        if self._admitted >= self._config.queue_limit:
            raise JobError(
                ErrorCode.OVERLOADED,
                f"{self._admitted} requests admitted, queue limit {self._config.queue_limit}",
            )
        self._admitted += 1
        self._count(admitted=1)
        stats = self._stats.get(model_id)
        if stats is None:
            stats = self._stats[model_id] = _ModelStats()
        admitted_at = time.perf_counter()
        request = Request(feeds, names)
        try:
            model = self.models.hold(model_id)
            if model is None:  # not in memory: loaded first
                async with self.models.use(model_id) as model:
                    answer = await self._serve(model, request)
            else:
                try:
                    answer = await self._serve(model, request)
                finally:
                    self.models.release(model_id)
            if answer.error is not None:
                raise answer.error
        except JobError:
            self._count(failed=1)
            stats.record(ok=False, latency_ms=(time.perf_counter() - admitted_at) * 1e3)
            raise
        except trio.Cancelled:
            self._count(**{self._leave(request): 1})
            raise
        finally:
            self._admitted -= 1
            if request.batch is not None:
                self._started -= 1
        self.merged += answer.shared
        self._count(completed=1)
        stats.record(ok=True, latency_ms=(answer.finished - admitted_at) * 1e3)
        return Execution(
            outputs=answer.outputs,
            queue_ms=max(0.0, answer.started - admitted_at) * 1e3,
            compute_ms=(answer.finished - answer.started) * 1e3,
        )

    async def _run_texts(self, model_id: str, texts: Sequence[str], truncate: bool) -> Execution:
        text = self.texts.get(model_id)
        if text is None:
            code = ErrorCode.INVALID_INPUT if model_id in self.models else ErrorCode.UNKNOWN_MODEL
            raise JobError(
                code,
                f"model {model_id!r} takes no text here; text models: {sorted(self.texts.ids())}",
            )
        prepare = functools.partial(
            text.prepare, texts, truncate=truncate, max_rows=self._config.max_batch_rows
        )
        # Tokenizing takes about 0.1 ms per sentence here (18 ms for 128): past a few
        # sentences' worth it leaves the event loop to a worker thread.
        if sum(len(t) for t in texts) > TOKENIZE_INLINE_CHARS:
            job = await trio.to_thread.run_sync(prepare)
        else:
            job = prepare()
        execution = await self.run(model_id, job.feeds, job.wanted)
        outputs, labels = job.finish(execution.outputs)
        return replace(execution, outputs=outputs, labels=labels)

    def _lane(self, model_id: str) -> Lane:
        lane = self._lanes.get(model_id)
        if lane is None:
            descriptor, card = self.models.get(model_id), self.models.card(model_id)
            if descriptor is None or card is None:
                raise KeyError(model_id)
            policy = BatchPolicy.of(
                descriptor,
                card,
                self._config.max_batch_rows,
                enabled=self._batching,
                rows_mix=self.models.mixes_rows(model_id),
            )
            lane = self._lanes[model_id] = Lane(model_id, policy)
        return lane

    async def _serve(self, model: LoadedModel, request: Request) -> Answer:
        """Queue `request` and wait for its answer: from a batch it forms itself when
        its turn comes, or from another request's batch that took it along."""
        lane = self._lane(model.descriptor.id)
        lane.queue(request)
        cost = self._costs.get(lane.model_id)
        inline = cost is not None and cost.estimate(request.size) < self._config.inline_below_ms
        if inline:
            # Requests started with it queue meanwhile. Waking here, it finds out whether
            # a batch took it: no cancel needed to tell it.
            if COMPANY_EXPECTED.get() or len(lane) > 1:
                await trio.lowlevel.checkpoint()
            if request.batch is None and lane.waits_for(request):
                with taken_along(request):
                    await lane.gather(request)
            if request.batch is None:
                assert cost is not None  # (inline only once the model has a cost)
                budget = cost.inline_size(self._config.inline_below_ms)
                batch = self._take(lane, request, request, None, budget)
                result = outcome.capture(execute, model, batch)
                self._finish(lane, batch, _unwrap(result, model, batch))
        else:
            with taken_along(request):
                await self._run_in_thread(model, lane, request)
        if request.answer is None:
            request.done = trio.Event()
            await request.done.wait()
        assert request.answer is not None  # set before `done` is
        return request.answer

    async def _run_in_thread(self, model: LoadedModel, lane: Lane, request: Request) -> None:
        """Wait for a worker slot; then run in a worker thread the batch formed for
        `request`, or, if another batch took it meanwhile, for the next one queued.
        The slot is held until the thread ends, even if every request leaves."""
        slot = object()
        await self._limiter.acquire_on_behalf_of(slot)
        try:
            await lane.gather(request)
        except BaseException:
            self._limiter.release_on_behalf_of(slot)
            raise
        first = request if request.batch is None else lane.head()
        if first is None:
            self._limiter.release_on_behalf_of(slot)
            return
        batch = self._take(lane, first, request, slot)
        batch.spare = self._spare_slots(lane, batch)
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome[BatchResult]) -> None:  # in the worker thread
            with contextlib.suppress(trio.RunFinishedError):  # the node stopped meanwhile
                token.run_sync_soon(self._finish, lane, batch, _unwrap(result, model, batch))

        trio.lowlevel.start_thread_soon(
            functools.partial(execute, model, batch), deliver, name=f"onnx {lane.model_id}"
        )

    def _take(
        self,
        lane: Lane,
        first: Request,
        caller: Request,
        slot: object | None,
        max_size: float = math.inf,
    ) -> Batch:
        batch = lane.take(first, caller, slot, max_size)
        self._started += len(batch.members)
        return batch

    def _spare_slots(self, lane: Lane, batch: Batch) -> list[object]:
        """The worker slots free now, taken for `batch` if it is one request estimated
        at SPLIT_ABOVE_MS or more, of rows that run apart: it then runs in parts at
        once (`run_split`), one more per slot, each of SPLIT_MIN_ROWS rows or more.
        Only slots free now: no request waits for them (one that comes meanwhile
        waits for the shortened run)."""
        if len(batch.members) != 1 or not lane.merges:
            return []
        (request,) = batch.members
        cost = self._costs.get(lane.model_id)
        if request.key is None or cost is None or cost.estimate(request.size) < SPLIT_ABOVE_MS:
            return []
        count = min(int(self._limiter.available_tokens), request.rows // SPLIT_MIN_ROWS - 1)
        return take_free_slots(self._limiter, max(0, count))

    def _finish(self, lane: Lane, batch: Batch, result: BatchResult) -> None:
        """Answer the requests still in `batch`; free its worker slots."""
        if batch.slot is not None:
            self._limiter.release_on_behalf_of(batch.slot)
        give_back(self._limiter, batch.spare)
        self.split += result.parts
        for compute_ms, size in result.runs:
            cost = self._costs.get(lane.model_id)
            if cost is None:
                self._costs[lane.model_id] = RunCost(compute_ms, size)
            else:
                cost.record(compute_ms, size)
        if result.split_failed and lane.merges:
            lane.merges = False
            logger.warning(
                "model %s: a merged run's outputs did not split by rows; its requests no "
                "longer merge (set max_batch_rows = 1 in its model.toml)",
                lane.model_id,
            )
        for request in batch.members:
            if request.left:
                continue
            request.answer = result.answers.get(request) or _no_answer(lane.model_id)
            if request.done is not None:
                request.done.set()
        self.runs += len(result.runs)

    def _leave(self, request: Request) -> str:
        """A cancelled request leaves its lane or its batch; the counter it ends in."""
        if request.batch is None:
            if request.lane is not None:
                request.lane.remove(request)
            return "cancelled_waiting"
        request.batch.leave(request)
        return "cancelled_running" if request.began else "cancelled_waiting"


def _unwrap(result: outcome.Outcome[BatchResult], model: LoadedModel, batch: Batch) -> BatchResult:
    """The batch's result, or INTERNAL for each of its requests if running it raised
    (a bug: the run's own errors are answers), so that none waits forever."""
    try:
        return result.unwrap()
    except Exception as error:
        logger.exception("model %s: running a batch failed", model.descriptor.id)
        why = f"{type(error).__name__}: {error}"
        return BatchResult({r: _no_answer(model.descriptor.id, why) for r in batch.members}, ())


def _no_answer(model_id: str, why: str = "its run gave it no answer") -> Answer:
    error = JobError(ErrorCode.INTERNAL, f"model {model_id} failed: {why}")
    return Answer({}, error, time.perf_counter(), time.perf_counter(), shared=False)


class RunCost:
    """A model's recent runs on this node: EWMAs of one run's compute time and of its
    input elements. A request is estimated at that time scaled by its own input
    elements, never below it: right for requests the size of recent runs, high
    for larger ones. So a request many times the size of the model's recent runs
    goes to a worker thread, where running it inline would have held the event
    loop, and every connection of the node, for the whole run: 72 ms for one
    16 MiB batch of digits-mlp after one-row jobs."""

    __slots__ = ("ms", "size")

    def __init__(self, ms: float, size: int) -> None:
        self.ms = ms
        self.size = float(max(1, size))

    def record(self, ms: float, size: int) -> None:
        self.ms += COMPUTE_EWMA_ALPHA * (ms - self.ms)
        self.size += COMPUTE_EWMA_ALPHA * (max(1, size) - self.size)

    def estimate(self, size: int) -> float:
        """The compute, in ms, of a run of `size` input elements."""
        return self.ms * max(1.0, size / self.size)

    def inline_size(self, budget_ms: float) -> float:
        """The input elements of the largest run estimated under `budget_ms`."""
        return self.size * budget_ms / self.ms if self.ms > 0 else math.inf


class _ModelStats:
    """EWMAs of one model's latency and success on this node."""

    __slots__ = ("latency_ms", "samples", "success_rate")

    def __init__(self) -> None:
        self.latency_ms = 0.0
        self.success_rate = 1.0
        self.samples = 0

    def record(self, *, ok: bool, latency_ms: float) -> None:
        alpha = 1.0 if self.samples == 0 else COMPUTE_EWMA_ALPHA
        self.latency_ms += alpha * (latency_ms - self.latency_ms)
        self.success_rate += COMPUTE_EWMA_ALPHA * ((1.0 if ok else 0.0) - self.success_rate)
        self.samples += 1


def validate_outputs(model: ModelDescriptor, wanted: Sequence[str]) -> list[str]:
    """The output names to fetch, in the model's order for all of them; INVALID_INPUT
    naming the model's outputs when one is not among them."""
    declared = [spec.name for spec in model.outputs]
    unknown = [name for name in wanted if name not in declared]
    if unknown:
        raise JobError(
            ErrorCode.INVALID_INPUT,
            f"model {model.id} has no output {unknown[0]!r}; its outputs are {declared}",
        )
    return list(wanted) or declared
