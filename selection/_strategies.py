"""The five advanced selection strategies. Pure: a catalog, a tracker and a context
in, a ranking with scores and reasons out.

Every strategy first leaves out the models that cannot take the job (input
length, language, modality, a latency bound), saying why for each; then:

- MULTI_OBJECTIVE normalises accuracy, latency and cost over the candidates and
  combines them with the caller's weights. Pareto-dominated models are left out.
- ADAPTIVE is discounted Thompson sampling over reward = quality - lambda x cost,
  quality learned per context bucket from labelled outcomes and feedback.
- CONTEXT_AWARE scores like MULTI_OBJECTIVE, but with what was learned in the
  job's own context bucket (input length band, language), not overall.
- SPECIALIZED ranks models of the context's subtype first, then general models.
- HYBRID is a cascade: the cheapest adequate model first, escalating to stronger
  ones when an answer's confidence is below the context's threshold. Its stages
  are the accuracy/cost frontier, ordered by the rank fusion of the others.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from scheduler import ErrorCode, JobError

from ._catalog import CatalogEntry, ModelCatalog
from ._context import DEFAULT_CONTEXT, SelectionContext, modality_of
from ._tracker import ALL, PerformanceTracker, QualityEstimate

RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al., 2009)
ADEQUATE_MARGIN = 0.05  # a cascade starts with a model at most this far below the best
MAX_STAGES = 3


class AdvancedModelSelectionStrategy(StrEnum):
    MULTI_OBJECTIVE = "multi_objective"
    ADAPTIVE = "adaptive"
    CONTEXT_AWARE = "context_aware"
    HYBRID = "hybrid"
    SPECIALIZED = "specialized"

    @classmethod
    def parse(cls, name: str | AdvancedModelSelectionStrategy) -> AdvancedModelSelectionStrategy:
        try:
            return cls(str(name).lower().replace("-", "_"))
        except ValueError:
            raise JobError(
                ErrorCode.INVALID_SELECTION,
                f"unknown selection strategy {name!r}; choose one of {[s.value for s in cls]}",
            ) from None


@dataclass(frozen=True, slots=True)
class RankedModel:
    model_id: str
    score: float
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LeftOut:
    model_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Selection:
    """A ranking, best first. For HYBRID, `ranked` is the cascade, cheapest stage first."""

    strategy: AdvancedModelSelectionStrategy
    task_type: str
    bucket: str
    ranked: tuple[RankedModel, ...]
    excluded: tuple[LeftOut, ...]

    @property
    def model_ids(self) -> list[str]:
        return [r.model_id for r in self.ranked]

    @property
    def best(self) -> str:
        return self.ranked[0].model_id


@dataclass(frozen=True, slots=True)
class _Candidate:
    entry: CatalogEntry
    quality: QualityEstimate
    success: float
    latency_ms: float
    latency_known: bool

    @property
    def model_id(self) -> str:
        return self.entry.model_id

    @property
    def cost(self) -> float:
        return self.entry.descriptor.cost


def select(
    strategy: AdvancedModelSelectionStrategy,
    task_type: str,
    catalog: ModelCatalog,
    tracker: PerformanceTracker,
    context: SelectionContext = DEFAULT_CONTEXT,
    *,
    k: int | None = None,
    rng: random.Random | None = None,
    input_lengths: Mapping[str, int] | None = None,
) -> Selection:
    """Rank the models of `task_type` for a job in `context`. Raises JobError:
    UNKNOWN_TASK, NO_FITTING_MODEL, INVALID_SELECTION.

    `input_lengths`: the job's length in each model's own units (a text job's
    tokens, by model id), where it differs from `context.input_length`."""
    if k is not None and k < 1:
        raise JobError(ErrorCode.INVALID_SELECTION, f"k must be >= 1, got {k}")
    entries = catalog.for_task(task_type)
    fitting, excluded = _fit(entries, context, input_lengths or {})
    if not fitting:
        raise _nothing_fits(task_type, excluded, entries, context)
    bucket = context.bucket()
    learn_in = bucket if strategy is AdvancedModelSelectionStrategy.CONTEXT_AWARE else ALL
    candidates = _candidates(fitting, tracker, learn_in)
    ranked, more_excluded = _RANKERS[strategy](candidates, context, tracker, bucket, rng)
    if not ranked:
        raise _nothing_fits(task_type, excluded + more_excluded, entries, context)
    return Selection(
        strategy,
        task_type,
        bucket,
        tuple(ranked[:k]) if k is not None else tuple(ranked),
        tuple(excluded + more_excluded),
    )


# --- filters ---------------------------------------------------------------------------


def _fit(
    entries: Sequence[CatalogEntry], context: SelectionContext, lengths: Mapping[str, int]
) -> tuple[list[CatalogEntry], list[LeftOut]]:
    """The models that can take the job, and why each other one cannot. With
    `context.truncate`, when no window is long enough, the models with the largest
    window that fit in every other way take it, truncated."""
    fitting: list[CatalogEntry] = []
    excluded: list[tuple[LeftOut, CatalogEntry | None]] = []  # the entry: only too short
    for entry in entries:
        model = entry.descriptor
        length = lengths.get(model.id, context.input_length)
        if context.modality is not None and modality_of(model.task_type) != context.modality:
            reason = f"modality {modality_of(model.task_type)}, not {context.modality}"
            excluded.append((LeftOut(model.id, reason), None))
        elif length is not None and model.max_input_length and length > model.max_input_length:
            reason = f"input length {length} > its maximum {model.max_input_length}"
            other = _misfit(entry, context)
            excluded.append((LeftOut(model.id, reason), entry if other is None else None))
        elif (other := _misfit(entry, context)) is not None:
            excluded.append((LeftOut(model.id, other), None))
        else:
            fitting.append(entry)
    too_short = [entry for _, entry in excluded if entry is not None]
    if context.truncate and not fitting and too_short:
        widest = max(e.descriptor.max_input_length for e in too_short)
        fitting = [e for e in too_short if e.descriptor.max_input_length == widest]
        excluded = [(x, e) for x, e in excluded if e not in fitting]
    return fitting, [x for x, _ in excluded]


def _misfit(entry: CatalogEntry, context: SelectionContext) -> str | None:
    """Why `entry` cannot take a job in `context` for its language or latency."""
    model = entry.descriptor
    if context.language is not None and model.languages and context.language not in model.languages:
        return f"language {context.language} not among {list(model.languages)}"
    if (
        context.max_latency_ms is not None
        and entry.latency_ms is not None
        and entry.latency_ms > context.max_latency_ms
    ):
        return f"latency {entry.latency_ms:.1f} ms > bound {context.max_latency_ms:g} ms"
    return None


def _nothing_fits(
    task_type: str,
    excluded: Sequence[LeftOut],
    entries: Sequence[CatalogEntry],
    context: SelectionContext,
) -> JobError:
    longest = max((e.descriptor.max_input_length for e in entries), default=0)
    languages = sorted({lang for e in entries for lang in e.descriptor.languages})
    subtypes = sorted({s for e in entries for s in e.descriptor.subtypes})
    fits = [f"input_length <= {longest}" if longest else "any input_length"]
    fits.append(f"language in {languages}" if languages else "any language")
    if subtypes:
        fits.append(f"subtype in {subtypes}")
    reasons = "; ".join(f"{x.model_id}: {x.reason}" for x in excluded)
    return JobError(
        ErrorCode.NO_FITTING_MODEL,
        f"no model of task {task_type!r} fits the context ({reasons}); "
        f"what fits: {', '.join(fits)}",
    )


def _candidates(
    entries: Sequence[CatalogEntry], tracker: PerformanceTracker, bucket: str
) -> list[_Candidate]:
    """Each model's quality posterior, success rate and latency. Latency comes from this
    node's runs, else the serving peers' announcements, else the relative cost."""
    seen = {
        e.model_id: _first_known(tracker.latency_ms(e.model_id, bucket), e.latency_ms)
        for e in entries
    }
    known = [(lat, e.descriptor.cost) for e in entries if (lat := seen[e.model_id]) is not None]
    ms_per_cost = statistics.median(lat / max(c, 1e-9) for lat, c in known) if known else 1.0
    return [
        _Candidate(
            entry=e,
            quality=tracker.quality(e.model_id, bucket, e.descriptor.accuracy),
            success=tracker.success_rate(e.model_id, bucket),
            latency_ms=_or(seen[e.model_id], e.descriptor.cost * ms_per_cost),
            latency_known=seen[e.model_id] is not None,
        )
        for e in entries
    ]


def _first_known(first: float | None, second: float | None) -> float | None:
    return first if first is not None else second


def _or(known: float | None, default: float) -> float:
    return known if known is not None else default


# --- rankers -----------------------------------------------------------------------------

_Ranked = tuple[list[RankedModel], list[LeftOut]]


def _normalise(values: Sequence[float]) -> list[float]:
    low, high = min(values), max(values)
    if high - low < 1e-12:
        return [1.0 for _ in values]
    return [(v - low) / (high - low) for v in values]


def _weighted(candidates: Sequence[_Candidate], context: SelectionContext) -> list[RankedModel]:
    wa, wl, wc = context.weights.normalised()
    accuracy = _normalise([c.quality.mean * c.success for c in candidates])
    speed = [1.0 - x for x in _normalise([c.latency_ms for c in candidates])]
    cheap = [1.0 - x for x in _normalise([c.cost for c in candidates])]
    ranked = []
    for i, c in enumerate(candidates):
        score = wa * accuracy[i] + wl * speed[i] + wc * cheap[i]
        ranked.append(
            RankedModel(
                c.model_id,
                round(score, 6),
                (
                    f"accuracy {c.quality.mean:.4f} ({_evidence(c.quality)})",
                    f"latency {c.latency_ms:.2f} ms"
                    if c.latency_known
                    else "latency not measured yet (cost stands in)",
                    f"cost {c.cost:g}",
                    f"score {wa:.2f}x{accuracy[i]:.2f} + {wl:.2f}x{speed[i]:.2f} "
                    f"+ {wc:.2f}x{cheap[i]:.2f}",
                ),
            )
        )
    return _by_score(ranked)


def _by_score(ranked: list[RankedModel]) -> list[RankedModel]:
    return sorted(ranked, key=lambda r: (-r.score, r.model_id))


def _evidence(quality: QualityEstimate) -> str:
    if quality.observations < 0.5:
        return "announced"
    return f"learned from {quality.observations:.0f} outcomes"


def _accuracy(c: _Candidate) -> float:
    return c.quality.mean * c.success


def _dominators(
    candidates: Sequence[_Candidate], with_latency: bool
) -> dict[str, tuple[_Candidate, _Candidate]]:
    """Model id -> (it, a model at least as good on every objective and better on one).
    Objectives: accuracy up and cost down, and latency down `with_latency`."""

    def costs(c: _Candidate) -> tuple[float, ...]:
        return (-_accuracy(c), c.cost, c.latency_ms) if with_latency else (-_accuracy(c), c.cost)

    out = {}
    for c in candidates:
        for d in candidates:
            mine, theirs = costs(c), costs(d)
            if (
                d is not c
                and theirs != mine
                and all(t <= m for t, m in zip(theirs, mine, strict=True))
            ):
                out[c.model_id] = (c, d)
                break
    return out


def _dominated(candidates: Sequence[_Candidate]) -> dict[str, str]:
    """Model id -> which model dominates it on (accuracy up, latency down, cost down)."""
    return {
        model_id: (
            f"Pareto-dominated by {d.model_id} (accuracy {_accuracy(d):.4f} >= "
            f"{_accuracy(c):.4f}, latency {d.latency_ms:.2f} <= {c.latency_ms:.2f} ms, "
            f"cost {d.cost:g} <= {c.cost:g})"
        )
        for model_id, (c, d) in _dominators(candidates, with_latency=True).items()
    }


def _multi_objective(
    candidates: list[_Candidate],
    context: SelectionContext,
    tracker: PerformanceTracker,
    bucket: str,
    rng: random.Random | None,
) -> _Ranked:
    dominated = _dominated(candidates)
    frontier = [c for c in candidates if c.model_id not in dominated]
    left_out = [LeftOut(m, why) for m, why in sorted(dominated.items())]
    return _weighted(frontier, context), left_out


def _context_aware(
    candidates: list[_Candidate],
    context: SelectionContext,
    tracker: PerformanceTracker,
    bucket: str,
    rng: random.Random | None,
) -> _Ranked:
    ranked = _weighted(candidates, context)
    note = f"learned in context {bucket}"
    return [RankedModel(r.model_id, r.score, (note, *r.reasons)) for r in ranked], []


def _adaptive(
    candidates: list[_Candidate],
    context: SelectionContext,
    tracker: PerformanceTracker,
    bucket: str,
    rng: random.Random | None,
) -> _Ranked:
    """Thompson sampling: each model's quality drawn from its posterior in the bucket;
    reward = quality x success - lambda x cost / max cost. Without an rng the posterior
    means are used (a deterministic ranking for display and rank fusion)."""
    # ADAPTIVE learns per bucket: re-read quality there, falling back to overall.
    top_cost = max(c.cost for c in candidates) or 1.0
    ranked = []
    for c in candidates:
        posterior = tracker.quality(c.model_id, bucket, c.entry.descriptor.accuracy)
        quality = posterior.mean if rng is None else posterior.sample(rng)
        penalty = context.cost_penalty * c.cost / top_cost
        ranked.append(
            RankedModel(
                c.model_id,
                round(quality * c.success - penalty, 6),
                (
                    f"{'mean' if rng is None else 'sampled'} quality {quality:.4f} "
                    f"(posterior mean {posterior.mean:.4f}, {_evidence(posterior)} in {bucket})",
                    f"success rate {c.success:.3f}",
                    f"cost penalty {context.cost_penalty:g}x{c.cost:g}/{top_cost:g}",
                ),
            )
        )
    return _by_score(ranked), []


def _specialized(
    candidates: list[_Candidate],
    context: SelectionContext,
    tracker: PerformanceTracker,
    bucket: str,
    rng: random.Random | None,
) -> _Ranked:
    """Specialists of the subtype first, general models (no subtypes) after; models
    specialised in another subtype are left out."""
    ranked, left_out = [], []
    for c in candidates:
        subtypes = c.entry.descriptor.subtypes
        quality = c.quality.mean * c.success
        if context.subtype is None:
            ranked.append(RankedModel(c.model_id, quality, ("no subtype asked",)))
        elif context.subtype in subtypes:
            ranked.append(
                RankedModel(
                    c.model_id,
                    round(1.0 + quality, 6),
                    (f"specialist in {context.subtype}", f"accuracy {quality:.4f}"),
                )
            )
        elif not subtypes:
            ranked.append(
                RankedModel(
                    c.model_id,
                    quality,
                    (
                        f"general model (no specialist in {context.subtype})",
                        f"accuracy {quality:.4f}",
                    ),
                )
            )
        else:
            left_out.append(LeftOut(c.model_id, f"specialised in {list(subtypes)}"))
    return _by_score(ranked), left_out


def _hybrid(
    candidates: list[_Candidate],
    context: SelectionContext,
    tracker: PerformanceTracker,
    bucket: str,
    rng: random.Random | None,
) -> _Ranked:
    fused = _fuse(candidates, context, tracker, bucket)
    usable = [c for c in candidates if c.model_id in fused]
    best = max(c.quality.mean * c.success for c in usable)
    frontier_reason = _dominated_on_accuracy_and_cost(usable)
    stages = sorted(
        (
            c
            for c in usable
            if c.model_id not in frontier_reason
            and c.quality.mean * c.success >= best - ADEQUATE_MARGIN
        ),
        key=lambda c: (c.cost, -c.quality.mean),
    )
    if len(stages) > MAX_STAGES:  # keep the ends; the middle by fused rank
        middle = sorted(stages[1:-1], key=lambda c: -fused[c.model_id])[: MAX_STAGES - 2]
        stages = [stages[0], *sorted(middle, key=lambda c: c.cost), stages[-1]]
    chosen = {c.model_id for c in stages}
    ranked = []
    for i, c in enumerate(stages):
        role = (
            "first stage: cheapest adequate model"
            if i == 0
            else f"stage {i + 1}: answers rows below confidence {context.confidence:g}"
        )
        ranked.append(
            RankedModel(
                c.model_id,
                round(fused[c.model_id], 6),
                (
                    role,
                    f"accuracy {c.quality.mean:.4f}, cost {c.cost:g}",
                    f"rank fusion score {fused[c.model_id]:.4f}",
                ),
            )
        )
    left_out = []
    for c in usable:
        if c.model_id in chosen:
            continue
        if c.model_id in frontier_reason:
            reason = frontier_reason[c.model_id]
        elif c.quality.mean * c.success < best - ADEQUATE_MARGIN:
            reason = f"accuracy {c.quality.mean:.4f} more than {ADEQUATE_MARGIN} below the best"
        else:
            reason = f"cascade holds at most {MAX_STAGES} stages"
        left_out.append(LeftOut(c.model_id, reason))
    return ranked, left_out


def _dominated_on_accuracy_and_cost(candidates: Sequence[_Candidate]) -> dict[str, str]:
    return {
        model_id: (
            f"no cascade stage: {d.model_id} is as accurate ({_accuracy(d):.4f}) "
            f"and as cheap ({d.cost:g})"
        )
        for model_id, (_, d) in _dominators(candidates, with_latency=False).items()
    }


def _fuse(
    candidates: list[_Candidate],
    context: SelectionContext,
    tracker: PerformanceTracker,
    bucket: str,
) -> dict[str, float]:
    """Reciprocal rank fusion of the other strategies' (deterministic) rankings."""
    scores = {c.model_id: 0.0 for c in candidates}
    rankers: list[_Ranker] = [_multi_objective, _context_aware, _adaptive]
    if context.subtype is not None:
        rankers.append(_specialized)
    for ranker in rankers:
        ranked, _ = ranker(candidates, context, tracker, bucket, None)
        for position, r in enumerate(ranked):
            scores[r.model_id] += 1.0 / (RRF_K + position + 1)
    return scores


_Ranker = Callable[
    [list[_Candidate], SelectionContext, PerformanceTracker, str, random.Random | None], _Ranked
]
_RANKERS: dict[AdvancedModelSelectionStrategy, _Ranker] = {
    AdvancedModelSelectionStrategy.MULTI_OBJECTIVE: _multi_objective,
    AdvancedModelSelectionStrategy.ADAPTIVE: _adaptive,
    AdvancedModelSelectionStrategy.CONTEXT_AWARE: _context_aware,
    AdvancedModelSelectionStrategy.SPECIALIZED: _specialized,
    AdvancedModelSelectionStrategy.HYBRID: _hybrid,
}
