"""Placement strategies: pure functions from (model, nodes, this coordinator's counters)
to ranked candidates, each with the reason it ranks where it does.

A request's requirements are filters that run first, under every strategy, as
Kubernetes' filter plugins do: a peer that fails one is excluded with its `Exclusion`
(so is a peer backing off). Strategies only score the peers that pass.

Scores are costs: lower is better. A strategy never reads a clock or draws
randomness other than from the `rng` it is given, so a placement can be
replayed and tested exactly.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from ._node_info import NO_REQUIREMENTS, GpuNeed, NodeIndex, NodeInfo, Requirements, speed_of

DEFAULT_LATENCY_MS = 10.0  # the prior for a peer and model nobody has measured


class DistributionStrategy(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"
    MODEL_SPECIFIC = "model_specific"
    CAPABILITY_BASED = "capability_based"
    LATENCY_OPTIMIZED = "latency_optimized"


class CoordinatorState(Protocol):
    """This coordinator's own counters, as strategies read them."""

    def outstanding(self, peer_id: str) -> int: ...
    def observed_latency_ms(self, peer_id: str, model_id: str) -> float | None: ...
    def backoff_until(self, peer_id: str) -> float: ...
    def turns(self, model_id: str) -> int: ...
    def reported_load(self, peer_id: str) -> tuple[float, int] | None: ...
    def compute_ms(self, model_id: str) -> float | None: ...


@dataclass(frozen=True, slots=True)
class CoordinatorSnapshot:
    """A plain CoordinatorState: for tests, simulations and `p2p-node place`."""

    outstanding_by_peer: Mapping[str, int] = field(default_factory=dict)
    latency_by_peer_model: Mapping[tuple[str, str], float] = field(default_factory=dict)
    backoff_by_peer: Mapping[str, float] = field(default_factory=dict)
    turns_by_model: Mapping[str, int] = field(default_factory=dict)
    reported_by_peer: Mapping[str, tuple[float, int]] = field(default_factory=dict)
    compute_by_model: Mapping[str, float] = field(default_factory=dict)

    def outstanding(self, peer_id: str) -> int:
        return self.outstanding_by_peer.get(peer_id, 0)

    def observed_latency_ms(self, peer_id: str, model_id: str) -> float | None:
        return self.latency_by_peer_model.get((peer_id, model_id))

    def backoff_until(self, peer_id: str) -> float:
        return self.backoff_by_peer.get(peer_id, float("-inf"))

    def turns(self, model_id: str) -> int:
        return self.turns_by_model.get(model_id, 0)

    def reported_load(self, peer_id: str) -> tuple[float, int] | None:
        return self.reported_by_peer.get(peer_id)

    def compute_ms(self, model_id: str) -> float | None:
        return self.compute_by_model.get(model_id)


@dataclass(frozen=True, slots=True)
class Candidate:
    peer_id: str
    score: float
    reason: str


class Exclusion(StrEnum):
    """Why a peer is left out of a placement. The request's requirements are filters
    that run before any strategy scores (Kubernetes' filter plugins): a peer that
    fails one stays out whatever the strategy. A backoff passes with time."""

    MEMORY = "memory"  # less free memory than the request requires
    GPU = "gpu"  # no GPU, and the request requires one
    PROVIDER = "provider"  # lacks the execution provider the request requires
    BACKING_OFF = "backing_off"  # failed, or said OVERLOADED, a moment ago


@dataclass(frozen=True, slots=True)
class Excluded:
    """A peer left out, and why: `cause` for code, `reason` for people."""

    peer_id: str
    reason: str
    cause: Exclusion | None = None  # None: not known (the wire carries `reason` only)

    @property
    def backing_off(self) -> bool:
        return self.cause is Exclusion.BACKING_OFF


@dataclass(frozen=True, slots=True)
class Placement:
    """Where to run, best first, and who was left out and why."""

    model_id: str
    candidates: tuple[Candidate, ...]
    excluded: tuple[Excluded, ...] = ()


@dataclass(slots=True)
class _Context:
    """What a placement's scorers read, made for every job placed: not frozen, as a
    frozen dataclass's `__init__` sets each field through `object.__setattr__`
    (1.6 us against 0.5 here, of `shortlist`'s 5.6 for a model one node serves)."""

    model_id: str
    state: CoordinatorState
    requirements: Requirements
    rng: random.Random
    power_of_two: bool
    filters: bool = field(init=False)  # whether the requirements can leave anyone out

    def __post_init__(self) -> None:
        needs = self.requirements
        self.filters = bool(needs.min_memory_mb or needs.provider or needs.gpu is GpuNeed.REQUIRED)


Scorer = Callable[[NodeInfo, _Context], Candidate]


def place(
    strategy: DistributionStrategy,
    model_id: str,
    index: NodeIndex,
    state: CoordinatorState,
    *,
    now: float,
    rng: random.Random,
    requirements: Requirements = NO_REQUIREMENTS,
    power_of_two: bool = True,
) -> Placement:
    """Rank every node that serves `model_id`: those that fail a requirement or are
    backing off are excluded (whatever the strategy), the strategy scores the rest."""
    ctx = _Context(model_id, state, requirements, rng, power_of_two)
    usable: list[NodeInfo] = []
    excluded: list[Excluded] = []
    for node in index.serving(model_id):
        out = _exclusion(node, ctx, now)
        if out is None:
            usable.append(node)
        else:
            excluded.append(out)
    if strategy is DistributionStrategy.ROUND_ROBIN:
        ranked = _round_robin(usable, ctx)
    else:
        scorer = _SCORERS[strategy]
        ranked = [scorer(n, ctx) for n in usable]
        ranked.sort(key=_by_score)
        if power_of_two and len(ranked) > _P2C_ABOVE.get(strategy, len(ranked)):
            speed = {n.peer_id: speed_of(n, model_id) for n in usable}
            ranked = _two_choices(ranked, rng, [speed[c.peer_id] for c in ranked])
    return Placement(model_id, tuple(ranked), tuple(excluded))


def shortlist(
    strategy: DistributionStrategy,
    model_id: str,
    index: NodeIndex,
    state: CoordinatorState,
    *,
    now: float,
    rng: random.Random,
    requirements: Requirements = NO_REQUIREMENTS,
    size: int = 2,
    exclude: Collection[str] = frozenset(),
) -> Placement:
    """The candidates worth considering for one request, best first: O(size) over a
    large view.

    Over many candidates (more than 16, and more than LATENCY_OPTIMIZED's 64),
    for the strategies that draw at random (LEAST_LOADED, LATENCY_OPTIMIZED):
    `size` distinct peers drawn in proportion to their speed, skipping those
    `place` excludes and those in `exclude`, ranked by the strategy's score. Size 2
    is power of two choices. Otherwise `place`'s ranking (with its two random
    choices first) less `exclude`. An empty shortlist means nobody is left:
    `place` says why.
    """
    serving = index.serving(model_id)
    above = _P2C_ABOVE.get(strategy)
    if above is not None and len(serving) - len(exclude) > max(above, size, _RANK_ALL_UP_TO):
        ctx = _Context(model_id, state, requirements, rng, True)
        speeds = index.cumulative_speeds(model_id)
        drawn = _draw_distinct(serving, speeds, size, exclude, ctx, now)
        if drawn:  # else the spare draws ran out on peers excluded or backing off
            scorer = _SCORERS[strategy]
            return Placement(
                model_id, tuple(sorted((scorer(n, ctx) for n in drawn), key=_by_score))
            )
    ranking = place(strategy, model_id, index, state, now=now, rng=rng, requirements=requirements)
    if not exclude:  # a job's first try
        return ranking
    kept = tuple(c for c in ranking.candidates if c.peer_id not in exclude)
    return Placement(model_id, kept, ranking.excluded)


def _draw_distinct(
    serving: Sequence[NodeInfo],
    cumulative: Sequence[float],
    size: int,
    exclude: Collection[str],
    ctx: _Context,
    now: float,
) -> list[NodeInfo]:
    """Up to `size` distinct peers drawn in proportion to their speed, skipping the
    excluded and those `place` would leave out."""
    drawn: dict[str, NodeInfo] = {}
    for _ in range(4 * size):  # spare draws, for peers drawn twice, excluded or backing off
        node = serving[_draw(cumulative, ctx.rng)]
        if node.peer_id in drawn or node.peer_id in exclude:
            continue
        if _exclusion(node, ctx, now) is not None:
            continue
        drawn[node.peer_id] = node
        if len(drawn) == size:
            break
    return list(drawn.values())


def pick(
    strategy: DistributionStrategy,
    model_id: str,
    index: NodeIndex,
    state: CoordinatorState,
    *,
    now: float,
    rng: random.Random,
    requirements: Requirements = NO_REQUIREMENTS,
) -> Candidate | None:
    """The first choice only: the better of two random peers where two random choices
    apply (O(1)), `place`'s first otherwise."""
    listed = shortlist(
        strategy, model_id, index, state, now=now, rng=rng, requirements=requirements
    )
    return listed.candidates[0] if listed.candidates else None


_RANK_ALL_UP_TO = 16  # candidates: ranking them all costs less than the decision budget
_UNUSED_RNG = random.Random(0)  # for scorers, which draw nothing
PROBED = 2  # candidates whose load a coordinator asks for before sending (see `settle`)


def settle(
    placement: Placement,
    index: NodeIndex,
    state: CoordinatorState,
    probed: Sequence[str],
    *,
    strategy: DistributionStrategy = DistributionStrategy.LEAST_LOADED,
    requirements: Requirements = NO_REQUIREMENTS,
) -> Placement:
    """Put the `probed` candidates first, the best by fresh load leading.

    A coordinator asks its first few candidates for their load just before it
    sends (their answers are in `state.reported_load`, fresher than any gossip),
    and compares them again with that load. LEAST_LOADED and LATENCY_OPTIMIZED
    compare by expected completion, (load + 1) x latency per request (LEAST_LOADED's
    score); MODEL_SPECIFIC and CAPABILITY_BASED by their own score, which keeps
    their preference (the model loaded; capacity) and reads the same fresh load.
    This is Sparrow's batch sampling, with the two probes spent on the best two by
    the strategy's own ranking rather than two random peers. Candidates not probed
    keep their order, after the probed ones.
    """
    candidates = {c.peer_id for c in placement.candidates}
    nodes = [n for n in (index.node(p) for p in set(probed) & candidates) if n is not None]
    ctx = _Context(placement.model_id, state, requirements, _UNUSED_RNG, False)
    scorer = _SETTLE_BY.get(strategy, _least_loaded)
    settled = sorted((scorer(n, ctx) for n in nodes), key=_by_score)
    asked = {n.peer_id for n in nodes}
    rest = [c for c in placement.candidates if c.peer_id not in asked]
    return Placement(placement.model_id, (*settled, *rest), placement.excluded)


def expected_wait_ms(node: NodeInfo, model_id: str, state: CoordinatorState) -> float:
    """How long a request sent to `node` now would queue, as this coordinator guesses:
    load x latency per request (the prior where the peer has gossiped none). A probe
    is worth its round trip only when this exceeds it."""
    load, _, _ = _load(node, state)
    return load * node.latency_ms.get(model_id, DEFAULT_LATENCY_MS)


def worth_probing(node: NodeInfo, model_id: str, state: CoordinatorState, rtt_ms: float) -> bool:
    """Whether to probe before sending a request for `model_id`, `node` being the first
    candidate and a probe taking `rtt_ms`.

    A probe delays the request by its round trip and costs both ends about one
    message's work (in py-libp2p, about a millisecond of CPU each). It pays when
    there is a queue to avoid (the expected wait at the first candidate is longer
    than the round trip) and the requests are heavier than the probe (their
    compute time, as answers reported it, else the gossiped latency, is longer
    than the round trip): light requests under load would spend more on probes
    than on the work.
    """
    work = state.compute_ms(model_id)
    if work is None:
        work = node.latency_ms.get(model_id)
    if work is None or work < rtt_ms:
        return False
    return expected_wait_ms(node, model_id, state) >= rtt_ms


def to_probe(
    ranked: Placement, index: NodeIndex, state: CoordinatorState, rtt_ms: float
) -> list[str]:
    """The candidates to ask for their load before sending, probes taking `rtt_ms`:
    the first PROBED when the first is `worth_probing`, none when that does not pay
    or there is no second candidate to choose."""
    if len(ranked.candidates) < 2:
        return []
    first = index.node(ranked.candidates[0].peer_id)
    if first is None or not worth_probing(first, ranked.model_id, state, rtt_ms):
        return []
    return [c.peer_id for c in ranked.candidates[:PROBED]]


def _by_score(candidate: Candidate) -> tuple[float, str]:
    return (candidate.score, candidate.peer_id)


def _exclusion(node: NodeInfo, ctx: _Context, now: float) -> Excluded | None:
    """Why `node` is out, or None. Requirements first: they hold whatever the time, so
    a peer that fails one is not waited for when its backoff ends."""
    if ctx.filters:
        unmet = _unmet_requirement(node, ctx.requirements)
        if unmet is not None:
            return Excluded(node.peer_id, unmet[1], unmet[0])
    until = ctx.state.backoff_until(node.peer_id)
    if until > now:
        reason = f"backing off for {until - now:.2f} s after a failure"
        return Excluded(node.peer_id, reason, Exclusion.BACKING_OFF)
    return None


def _unmet_requirement(node: NodeInfo, needs: Requirements) -> tuple[Exclusion, str] | None:
    if node.memory_available_mb < needs.min_memory_mb:
        why = f"{node.memory_available_mb} MB free < {needs.min_memory_mb} MB required"
        return Exclusion.MEMORY, why
    if needs.gpu is GpuNeed.REQUIRED and node.gpu_count == 0:
        return Exclusion.GPU, "no GPU, and the request requires one"
    if needs.provider and needs.provider not in node.providers:
        return Exclusion.PROVIDER, f"no {needs.provider}"
    return None


def _draw(cumulative: Sequence[float], rng: random.Random) -> int:
    """An index drawn in proportion to its weight (`cumulative`: the running sums of
    the weights, so that a draw is a bisection). The same draw as `rng.choices`."""
    return bisect.bisect(cumulative, rng.random() * cumulative[-1], 0, len(cumulative) - 1)


def _two_choices(
    ranked: list[Candidate], rng: random.Random, speeds: Sequence[float]
) -> list[Candidate]:
    """Power of two choices: the better of two random candidates goes first.

    Many coordinators reading the same stale view would all pick the same
    least-loaded peer; two random choices spread them while still avoiding the
    worst peers (Mitzenmacher; Sparrow). Candidates are drawn in proportion to
    their speed: drawn uniformly, two slow peers come up together so often that
    the slow ones get more than their share of the work.
    """
    cumulative = list(itertools.accumulate(speeds))
    a = _draw(cumulative, rng)
    b = a
    while b == a:
        b = _draw(cumulative, rng)
    first = ranked[min(a, b)]  # ranked is sorted, so the lower index is the better one
    rest = [c for c in ranked if c is not first]
    reason = f"{first.reason}; better of two random choices"
    return [Candidate(first.peer_id, first.score, reason), *rest]


def _round_robin(nodes: Sequence[NodeInfo], ctx: _Context) -> list[Candidate]:
    turn = ctx.state.turns(ctx.model_id)
    n = len(nodes)
    order = [nodes[(turn + step) % n] for step in range(n)]
    return [
        Candidate(node.peer_id, float(step), f"turn {turn}: position {step} of {n}")
        for step, node in enumerate(order)
    ]


def _least_loaded(node: NodeInfo, ctx: _Context) -> Candidate:
    """Load in time: (load + 1) x the peer's gossiped latency for the model, so that a
    queue of 4 on a peer 4x faster counts as 1 (see `_load`). Before a peer has
    gossiped a latency for the model, its load alone decides."""
    load, mine, reported = _load(node, ctx.state)
    how = _load_reason(node, load, mine, reported)
    latency = node.latency_ms.get(ctx.model_id)
    if latency is None:
        return Candidate(node.peer_id, float(load), how)
    return Candidate(
        node.peer_id, (load + 1) * latency, f"{how} + 1, x {latency:.2f} ms per request"
    )


def _load_reason(node: NodeInfo, load: int, mine: int, reported: int | None) -> str:
    """`_load`'s figures, and where they come from."""
    if reported is None:
        return (
            f"load {load} ({node.in_flight} running + {node.queue_length} queued, "
            f"{mine} outstanding from here)"
        )
    return f"load {load} ({reported} from others as it last told us, {mine} from here)"


def _load(node: NodeInfo, state: CoordinatorState) -> tuple[int, int, int | None]:
    """Requests ahead of one sent to `node` now: (all, those from here, those from
    others as the peer last reported them, None when its gossiped record is fresher).

    Others' load is the fresher of what the peer gossiped and what it reported with
    its last answer or probe to us; outstanding requests from here are added. A
    report is kept without our own requests (which `outstanding` counts now); a
    gossiped load still holds the ones we had there when it was recorded, so it
    errs towards busy."""
    mine = state.outstanding(node.peer_id)
    report = state.reported_load(node.peer_id)
    if report is not None and report[0] >= node.as_of:
        return report[1] + mine, mine, report[1]
    return node.load + mine, mine, None


# What a model only on disk adds to a peer's cost under MODEL_SPECIFIC: the units of
# LEAST_LOADED's score (ms of expected completion, or requests where no latency is
# gossiped), so a peer with the model loaded goes first unless its queue is absurd.
_ON_DISK_COST = 1e6


def _model_specific(node: NodeInfo, ctx: _Context) -> Candidate:
    """Peers with the model in memory first; among them (and among those with it on
    disk only), LEAST_LOADED's fresh load in time decides."""
    by_load = _least_loaded(node, ctx)
    loaded = ctx.model_id in node.models_loaded
    where = "loaded in memory" if loaded else "on disk only (loads on first use)"
    return Candidate(
        node.peer_id,
        by_load.score + (0.0 if loaded else _ON_DISK_COST),
        f"{ctx.model_id} {where}; {by_load.reason}",
    )


def _capability_based(node: NodeInfo, ctx: _Context) -> Candidate:
    """Headroom: capacity (CPUs, and GPUs weighted by the request's need for one) over
    the fresh load LEAST_LOADED reads (see `_load`), plus one."""
    load, mine, reported = _load(node, ctx.state)
    gpu_weight = 8 if ctx.requirements.gpu is GpuNeed.ANY else 32
    capacity = node.cpu_count + gpu_weight * node.gpu_count
    headroom = capacity / (load + 1)
    return Candidate(
        node.peer_id,
        -headroom,
        f"capacity {capacity} ({node.cpu_count} CPUs, {node.gpu_count} GPUs) "
        f"over {_load_reason(node, load, mine, reported)}",
    )


def _latency_optimized(node: NodeInfo, ctx: _Context) -> Candidate:
    mine = ctx.state.outstanding(node.peer_id)
    observed = ctx.state.observed_latency_ms(node.peer_id, ctx.model_id)
    if observed is not None:
        estimate, source = observed, "observed here"
    elif ctx.model_id in node.latency_ms:
        estimate, source = node.latency_ms[ctx.model_id], "gossiped"
    else:
        estimate, source = DEFAULT_LATENCY_MS, "no history, prior"
    return Candidate(
        node.peer_id,
        estimate * (mine + 1),
        f"{estimate:.2f} ms ({source}) x ({mine} outstanding + 1)",
    )


_SCORERS: Mapping[DistributionStrategy, Scorer] = {
    DistributionStrategy.LEAST_LOADED: _least_loaded,
    DistributionStrategy.MODEL_SPECIFIC: _model_specific,
    DistributionStrategy.CAPABILITY_BASED: _capability_based,
    DistributionStrategy.LATENCY_OPTIMIZED: _latency_optimized,
}
# Random choices, above this many candidates: two in `place` (what `p2p-node place`
# shows), and over large views (`shortlist`) the orchestrator's draw of a few.
# LEAST_LOADED reads gossiped load, which every coordinator sees equally stale:
# random choices keep them from herding.
# LATENCY_OPTIMIZED reads this coordinator's own, fresh counters, so it ranks
# everyone while that is cheap: with p2c, two slow peers are drawn together often
# enough to sink p99 (bench.scheduler: 4.2x the oracle vs 1.3x without at 80% load).
_P2C_ABOVE: Mapping[DistributionStrategy, int] = {
    DistributionStrategy.LEAST_LOADED: 2,
    DistributionStrategy.LATENCY_OPTIMIZED: 64,
}
# How `settle` compares probed candidates: by expected completion, unless the
# strategy's own score holds a preference that a probe's answer must not override.
_SETTLE_BY: Mapping[DistributionStrategy, Scorer] = {
    DistributionStrategy.MODEL_SPECIFIC: _model_specific,
    DistributionStrategy.CAPABILITY_BASED: _capability_based,
}
