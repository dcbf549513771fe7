"""Select models for a job, place them with the scheduler, run, learn from the outcome.

`ModelOrchestrator` is the basic half: the catalog of the network's models,
`select_models(task_type)` and running a named model while tracking how it did.
`EnhancedModelOrchestrator` adds the five strategies, cascades, early-stopping
fan-out and feedback. Each node has one; `get_enhanced_orchestrator()` finds the
one of the node running in the current trio context.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import numpy as np
import trio

from scheduler import (
    DistributedModelOrchestrator,
    DistributionStrategy,
    ErrorCode,
    InferenceRequest,
    InferenceResult,
    JobError,
    Tensors,
    new_job_id,
)

from ._catalog import ModelCatalog
from ._context import SelectionContext
from ._strategies import AdvancedModelSelectionStrategy, Selection, select
from ._tracker import ALL, PerformanceTracker

logger = logging.getLogger(__name__)

# Errors that are the caller's, not the model's: they teach the tracker nothing.
_CALLER_ERRORS = frozenset(
    {
        ErrorCode.INVALID_INPUT,
        ErrorCode.MALFORMED_MESSAGE,
        ErrorCode.MESSAGE_TOO_LARGE,
        ErrorCode.UNKNOWN_MODEL,
        ErrorCode.NO_CAPABLE_PEER,
    }
)

_current: ContextVar[EnhancedModelOrchestrator] = ContextVar("enhanced_orchestrator")


def get_enhanced_orchestrator() -> EnhancedModelOrchestrator:
    """The model orchestrator of the node running in the current trio context."""
    try:
        return _current.get()
    except LookupError:
        raise LookupError(
            "no node is running in this context; use it inside `async with open_node(...)`"
        ) from None


class ModelOrchestrator:
    """The network's models and the basic selection: best announced accuracy first.

    `catalog()` returns the current catalog (rebuilt by the node when its view
    changes); `scheduler` places and runs what is selected.
    """

    def __init__(
        self,
        scheduler: DistributedModelOrchestrator,
        catalog: Callable[[], ModelCatalog],
        *,
        tracker: PerformanceTracker | None = None,
        distribution: DistributionStrategy = DistributionStrategy.LEAST_LOADED,
        rng: random.Random | None = None,
        count_tokens: TokenCounter | None = None,
        run: RunModel | None = None,
    ) -> None:
        """`count_tokens(model_id, texts)`: the most tokens any of `texts` takes in that
        model's own tokenizer, None where this node does not hold it (then the tokens
        are estimated: `estimate_tokens`). `run(request, distribution, hedge)` runs a
        selected model (default: the scheduler's `run_distributed_inference`; a node
        passes one that also runs models served only as stages, through a chain)."""
        self.scheduler = scheduler
        self._run = run or self._run_whole
        self._count_tokens = count_tokens or (lambda model_id, texts: None)
        self.tracker = tracker if tracker is not None else PerformanceTracker()
        self.distribution = distribution
        self._catalog = catalog
        self._rng = rng or random.Random()

    def catalog(self) -> ModelCatalog:
        return self._catalog()

    async def _run_whole(
        self, request: InferenceRequest, distribution: DistributionStrategy, hedge: bool
    ) -> InferenceResult:
        return await self.scheduler.run_distributed_inference(request, distribution, hedge=hedge)

    def select_models(self, task_type: str, k: int | None = None) -> list[str]:
        """Models of `task_type`, most accurate first (learned accuracy where there is
        evidence, announced accuracy otherwise). Raises JobError UNKNOWN_TASK."""
        entries = self.catalog().for_task(task_type)
        ranked = sorted(
            entries,
            key=lambda e: (
                -self.tracker.quality(e.model_id, ALL, e.descriptor.accuracy).mean,
                e.descriptor.cost,
                e.model_id,
            ),
        )
        return [e.model_id for e in ranked][:k]

    async def run_model(
        self,
        request: InferenceRequest,
        distribution: DistributionStrategy | None = None,
        *,
        bucket: str = ALL,
        remember: bool = True,
        hedge: bool = False,
    ) -> InferenceResult:
        """Run `request` through the scheduler and track the outcome. Raises JobError."""
        started = trio.current_time()
        try:
            result = await self._run(request, distribution or self.distribution, hedge)
        except JobError as error:
            if error.code not in _CALLER_ERRORS:
                self.tracker.record_run(
                    request.model_id,
                    bucket,
                    ok=False,
                    latency_ms=(trio.current_time() - started) * 1e3,
                )
            raise
        self.tracker.record_run(
            request.model_id, bucket, ok=True, latency_ms=(trio.current_time() - started) * 1e3
        )
        if remember:
            self.tracker.remember_job(request.job_id, (request.model_id,), bucket)
        return result


class ModelStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"
    CANCELLED = "cancelled"  # early stopping made it unnecessary
    TIMED_OUT = "timed_out"


@dataclass(frozen=True, slots=True)
class ModelRun:
    model_id: str
    status: ModelStatus
    result: InferenceResult | None = None
    error: JobError | None = None
    elapsed_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class OptimizedResult:
    """What a fan-out returned: the answer it settled on (None when nothing sufficient
    arrived) and every model's status."""

    answer: InferenceResult | None
    runs: tuple[ModelRun, ...]
    stopped_early: bool
    elapsed_ms: float

    def results(self) -> list[InferenceResult]:
        return [r.result for r in self.runs if r.result is not None]

    def status(self) -> dict[str, ModelStatus]:
        return {r.model_id: r.status for r in self.runs}


class EnhancedModelOrchestrator(ModelOrchestrator):
    def activate(self) -> object:
        """Make this the context's orchestrator (for get_enhanced_orchestrator)."""
        return _current.set(self)

    def deactivate(self, token: object) -> None:
        _current.reset(token)  # type: ignore[arg-type]

    async def select_models_advanced(
        self,
        task_type: str,
        strategy: AdvancedModelSelectionStrategy | str = AdvancedModelSelectionStrategy.HYBRID,
        context: Mapping[str, object] | SelectionContext | None = None,
        *,
        k: int | None = None,
        sample: bool = False,
    ) -> list[str]:
        """The ids of the models `rank_models` ranks for a job in `context`, best first
        (for HYBRID, the cascade's stages, cheapest first).

            model_ids = await orchestrator.select_models_advanced(
                task_type="image-classification",
                strategy=AdvancedModelSelectionStrategy.CONTEXT_AWARE,
                context={"input_length": 64},
            )

        Raises JobError: UNKNOWN_TASK, NO_FITTING_MODEL, INVALID_SELECTION.
        """
        await trio.lowlevel.checkpoint()
        return self.rank_models(task_type, strategy, context, k=k, sample=sample).model_ids

    def rank_models(
        self,
        task_type: str,
        strategy: AdvancedModelSelectionStrategy | str = AdvancedModelSelectionStrategy.HYBRID,
        context: Mapping[str, object] | SelectionContext | None = None,
        *,
        k: int | None = None,
        sample: bool = False,
    ) -> Selection:
        """Rank the models of `task_type` for a job in `context`, with scores and reasons,
        and say why each model left out is.

        ADAPTIVE ranks by posterior means unless `sample` (then it draws, as a job does).
        Raises JobError: UNKNOWN_TASK, NO_FITTING_MODEL, INVALID_SELECTION.
        """
        return select(
            AdvancedModelSelectionStrategy.parse(strategy),
            task_type,
            self.catalog(),
            self.tracker,
            SelectionContext.parse(context),
            k=k,
            rng=self._rng if sample else None,
        )

    async def run_task(
        self,
        task_type: str,
        inputs: Tensors,
        *,
        strategy: AdvancedModelSelectionStrategy | str = AdvancedModelSelectionStrategy.HYBRID,
        context: Mapping[str, object] | SelectionContext | None = None,
        distribution: DistributionStrategy | None = None,
        timeout: float = 30.0,
        job_id: str | None = None,
        hedge: bool = False,
        texts: Sequence[str] = (),
        truncate: bool = False,
    ) -> InferenceResult:
        """Select a model (or a cascade, for HYBRID) for `task_type`, then place and run
        it. The result's `route` says which model answered how many rows.

        A text job (`texts`, no inputs) is as long as its longest text in each
        candidate's own tokens, unless the context says its `input_length`; with
        `truncate` (or the context's), a text may be cut to the chosen model's window."""
        parsed = SelectionContext.parse(context)
        lengths = None
        if texts and parsed.input_length is None:
            lengths = self._text_lengths(task_type, texts)
            parsed = replace(parsed, input_length=max(lengths.values()))
        elif parsed.input_length is None:
            parsed = replace(parsed, input_length=_input_length(inputs))
        chosen = select(
            AdvancedModelSelectionStrategy.parse(strategy),
            task_type,
            self.catalog(),
            self.tracker,
            parsed,
            rng=self._rng,
            input_lengths=lengths,
        )
        request = InferenceRequest(
            chosen.best,
            inputs,
            timeout,
            job_id or new_job_id(),
            texts=tuple(texts),
            truncate=bool(texts) and (truncate or parsed.truncate),
        )
        if chosen.strategy is AdvancedModelSelectionStrategy.HYBRID and len(chosen.ranked) > 1:
            return await self._cascade(request, chosen, parsed, distribution, hedge)
        result = await self.run_model(request, distribution, bucket=chosen.bucket, hedge=hedge)
        rows = len(texts) if texts else _rows(inputs)
        return replace(result, route=((result.model_id, rows),))

    def _text_lengths(self, task_type: str, texts: Sequence[str]) -> dict[str, int]:
        """Each candidate's tokens for `texts`: counted with its tokenizer where this
        node holds it, else `estimate_tokens`."""
        estimate: int | None = None
        lengths = {}
        for entry in self.catalog().for_task(task_type):
            counted = self._count_tokens(entry.model_id, texts)
            if counted is None:
                estimate = estimate_tokens(texts) if estimate is None else estimate
                counted = estimate
            lengths[entry.model_id] = counted
        return lengths

    async def _cascade(
        self,
        request: InferenceRequest,
        chosen: Selection,
        context: SelectionContext,
        distribution: DistributionStrategy | None,
        hedge: bool,
    ) -> InferenceResult:
        """Run the stages in turn; each later stage gets only the rows the previous
        answered with confidence below `context.confidence`."""
        deadline = trio.current_time() + request.timeout
        inputs: dict[str, np.ndarray[Any, Any]] = {
            k: np.asarray(v) for k, v in request.inputs.items()
        }
        texts = request.texts
        rows = len(texts) if texts else _rows(inputs)
        labels: list[str] | None = None
        pending = np.arange(rows)  # the rows still to answer, as indices into inputs
        merged: dict[str, np.ndarray[Any, Any]] | None = None
        route: list[tuple[str, int]] = []
        last: InferenceResult | None = None
        stages = chosen.model_ids
        for i, model_id in enumerate(stages):
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise JobError(
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"job {request.job_id}: cascade ran out of time at stage {model_id}",
                )
            sub = InferenceRequest(
                model_id,
                {k: v[pending] for k, v in inputs.items()},
                remaining,
                f"{request.job_id}/{i}" if i else request.job_id,
                request.requirements,
                texts=tuple(texts[j] for j in pending) if texts else (),
                truncate=request.truncate,
            )
            result = await self.run_model(
                sub, distribution, bucket=chosen.bucket, remember=False, hedge=hedge
            )
            try:
                _check_rows(result, len(pending))
            except JobError:  # the run "succeeded" with an answer that cannot be right
                self.tracker.record_run(model_id, chosen.bucket, ok=False, latency_ms=0.0)
                raise
            last = result
            confidence = _confidence(result.outputs, only_probabilities=bool(texts))
            if i == len(stages) - 1 or confidence is None:
                settled = np.ones(len(pending), dtype=bool)
            else:
                settled = np.asarray(confidence >= context.confidence, dtype=bool)
            merged = _merge(merged, result.outputs, pending, settled, rows)
            if result.labels:
                labels = labels or [""] * rows
                for j, label in zip(
                    pending[settled], np.asarray(result.labels)[settled], strict=True
                ):
                    labels[j] = str(label)
            route.append((model_id, int(settled.sum())))
            pending = pending[~settled]
            if not len(pending):
                break
        assert last is not None and merged is not None
        used = tuple(m for m, n in route if n)
        self.tracker.remember_job(request.job_id, used, chosen.bucket)
        return replace(
            last,
            job_id=request.job_id,
            model_id=used[-1] if used else last.model_id,
            outputs=merged,
            route=tuple(route),
            labels=tuple(labels) if labels else (),
        )

    async def run_optimized_parallel_inference(
        self,
        request: InferenceRequest,
        model_ids: Sequence[str],
        *,
        timeout: float | None = None,
        early_stopping: bool = True,
        quorum: int = 1,
        agree_on: str = "label",
        distribution: DistributionStrategy | None = None,
    ) -> OptimizedResult:
        """Run `request`'s inputs on each of `model_ids` at once.

        With `early_stopping`, return as soon as a sufficient answer arrives (the first
        success when `quorum` is 1, else `quorum` results whose `agree_on` output is
        equal) and cancel the other requests. Otherwise wait for all. Either way,
        return by `timeout` (default: the request's) with what arrived; never raise
        for one model's failure.
        """
        models = list(dict.fromkeys(model_ids))
        if not models:
            raise JobError(ErrorCode.INVALID_SELECTION, "model_ids is empty")
        if not 1 <= quorum <= len(models):
            raise JobError(
                ErrorCode.INVALID_SELECTION, f"quorum must be in [1, {len(models)}], got {quorum}"
            )
        limit = request.timeout if timeout is None else timeout
        if not limit > 0:
            raise JobError(ErrorCode.INVALID_SELECTION, f"timeout must be > 0, got {limit}")
        started = trio.current_time()
        runs: dict[str, ModelRun] = {}
        answer: list[InferenceResult] = []

        async def one(model_id: str, scope: trio.CancelScope) -> None:
            sub = replace(
                request,
                model_id=model_id,
                job_id=f"{request.job_id}/{model_id}",
                timeout=min(request.timeout, limit),
            )
            try:
                result = await self.run_model(sub, distribution, remember=False)
            except JobError as error:
                runs[model_id] = ModelRun(
                    model_id, ModelStatus.FAILED, error=error, elapsed_ms=_since(started)
                )
                return
            runs[model_id] = ModelRun(
                model_id, ModelStatus.OK, result=result, elapsed_ms=_since(started)
            )
            if early_stopping and not answer:
                arrived = [r.result for r in runs.values() if r.result is not None]
                if _agreeing(result, arrived, agree_on, quorum):
                    answer.append(result)
                    scope.cancel()

        with trio.move_on_after(limit):
            async with trio.open_nursery() as nursery:
                for model_id in models:
                    nursery.start_soon(one, model_id, nursery.cancel_scope)
        stopped_early = bool(answer)
        for model_id in models:
            if model_id not in runs:
                status = ModelStatus.CANCELLED if stopped_early else ModelStatus.TIMED_OUT
                runs[model_id] = ModelRun(model_id, status, elapsed_ms=_since(started))
        ordered = tuple(runs[m] for m in models)
        if not answer:
            agreed = _settle([r.result for r in ordered if r.result is not None], agree_on, quorum)
            if agreed is not None:
                answer.append(agreed)
        final = answer[0] if answer else None
        if final is not None:  # feedback on the answer credits the models that gave it
            mine = final.outputs.get(agree_on)
            used = tuple(
                r.model_id
                for r in ordered
                if r.result is not None
                and (
                    r.result is final
                    or (
                        mine is not None
                        and agree_on in r.result.outputs
                        and np.array_equal(r.result.outputs[agree_on], mine)
                    )
                )
            )
            self.tracker.remember_job(request.job_id, used, ALL)
        return OptimizedResult(final, ordered, stopped_early, _since(started))

    def feedback(self, job_id: str, score: float) -> tuple[str, ...]:
        """A quality score in [0, 1] for a job this node coordinated: 1 for a right answer,
        0 for a wrong one. Credits the models that answered it, once; returns them."""
        return self.tracker.feedback(job_id, score)


def _since(started: float) -> float:
    return (trio.current_time() - started) * 1e3


def _rows(inputs: Tensors) -> int:
    shapes = [np.shape(v) for v in inputs.values()]
    return int(shapes[0][0]) if shapes and shapes[0] else 1


TokenCounter = Callable[[str, Sequence[str]], int | None]
RunModel = Callable[
    [InferenceRequest, DistributionStrategy, bool], Awaitable[InferenceResult]
]  # (request, distribution, hedge) -> its result, as run_distributed_inference
BYTES_PER_TOKEN_ESTIMATE = 1  # never fewer tokens than this would say: see estimate_tokens
SPECIAL_TOKENS_ESTIMATE = 2


def estimate_tokens(texts: Sequence[str]) -> int:
    """The tokens of the longest of `texts` in a tokenizer this node does not hold,
    from its UTF-8 bytes: an upper bound for byte-level BPE (GPT-2, Qwen), character
    models and WordPiece (each token covers at least one byte), with two special
    tokens. So a model chosen on the estimate can take the text; one left out on it
    may have taken it (English runs about 4 bytes per BPE token), and its reason
    says the length."""
    longest = max(len(t.encode("utf-8")) for t in texts)
    return -(-longest // BYTES_PER_TOKEN_ESTIMATE) + SPECIAL_TOKENS_ESTIMATE


def _input_length(inputs: Tensors) -> int | None:
    """Features (or tokens) per row: the last dimension of the widest input."""
    lengths = [int(np.shape(v)[-1]) for v in inputs.values() if np.ndim(v) >= 2]
    return max(lengths) if lengths else None


def _check_rows(result: InferenceResult, rows: int) -> None:
    """A stage's outputs must have one row per input row to be merged: a peer that
    says otherwise is answering wrongly, not the caller."""
    for name, value in result.outputs.items():
        shape = np.shape(value)
        if not shape or shape[0] != rows:
            raise JobError(
                ErrorCode.MALFORMED_MESSAGE,
                f"{result.model_id} answered output {name!r} with shape {list(shape)} "
                f"for {rows} rows",
                peer=result.executor,
            )


def _confidence(
    outputs: Tensors, *, only_probabilities: bool = False
) -> np.ndarray[Any, Any] | None:
    """Per row, the top class probability; None when the model gives no probabilities.
    A tensor model's first 2-D float output counts as them; a text model's (its
    embeddings are 2-D floats too) only one named `probabilities`."""
    found = outputs.get("probabilities")
    probabilities = None if found is None else np.asarray(found)
    if probabilities is None and not only_probabilities:
        for value in outputs.values():
            array = np.asarray(value)
            if array.ndim == 2 and np.issubdtype(array.dtype, np.floating):
                probabilities = array
                break
    if probabilities is None:
        return None
    return np.asarray(np.max(np.asarray(probabilities, dtype=np.float64), axis=1))


def _merge(
    merged: dict[str, np.ndarray[Any, Any]] | None,
    outputs: Tensors,
    pending: np.ndarray[Any, Any],
    settled: np.ndarray[Any, Any],
    rows: int,
) -> dict[str, np.ndarray[Any, Any]]:
    """Write the settled rows of one stage's outputs into the answer."""
    if merged is None:
        merged = {}
        for name, value in outputs.items():
            array = np.asarray(value)
            merged[name] = np.zeros((rows, *array.shape[1:]), dtype=array.dtype)
    for name, target in merged.items():
        stage = outputs.get(name)
        if stage is None or np.shape(stage)[1:] != target.shape[1:]:
            raise JobError(
                ErrorCode.INTERNAL,
                f"cascade stages disagree on output {name!r}; they cannot be merged row by row",
            )
        target[pending[settled]] = np.asarray(stage)[settled]
    return merged


def _agreeing(
    candidate: InferenceResult, results: Sequence[InferenceResult], agree_on: str, quorum: int
) -> bool:
    """Whether `quorum` of `results` (the candidate among them) agree with `candidate`
    on its `agree_on` output."""
    if quorum == 1:
        return True
    mine = candidate.outputs.get(agree_on)
    if mine is None:
        return False
    same = sum(
        1 for r in results if agree_on in r.outputs and np.array_equal(r.outputs[agree_on], mine)
    )
    return same >= quorum


def _settle(results: list[InferenceResult], agree_on: str, quorum: int) -> InferenceResult | None:
    """Without early stopping: the first result that `quorum` results agree with."""
    return next((r for r in results if _agreeing(r, results, agree_on, quorum)), None)
