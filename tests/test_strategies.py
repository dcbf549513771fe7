"""Placement strategies, `pick`, PeerStats and NodeInfo: pure values, no trio."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import pytest

from gossip import (
    Capabilities,
    GpuInfo,
    Load,
    ModelDescriptor,
    ModelEntry,
    ModelPerformance,
    PeerRecord,
    TensorSpec,
)
from scheduler import (
    Candidate,
    CoordinatorSnapshot,
    DistributionStrategy,
    Excluded,
    Exclusion,
    GpuNeed,
    NodeIndex,
    NodeInfo,
    PeerStats,
    Placement,
    Requirements,
    StatsConfig,
    expected_wait_ms,
    pick,
    place,
    settle,
    shortlist,
    to_probe,
    worth_probing,
)

M = "digits-mlp"
OTHER = "iris-tree"
NOW = 100.0
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
NONE = Requirements()

RR = DistributionStrategy.ROUND_ROBIN
LEAST = DistributionStrategy.LEAST_LOADED
MODEL = DistributionStrategy.MODEL_SPECIFIC
CAPABILITY = DistributionStrategy.CAPABILITY_BASED
LATENCY = DistributionStrategy.LATENCY_OPTIMIZED


# --- helpers ---------------------------------------------------------------------------


def node(
    peer: str,
    *,
    loaded: Sequence[str] = (M,),
    on_disk: Sequence[str] = (),
    in_flight: int = 0,
    queue: int = 0,
    cpus: int = 1,
    free_mb: int = 4096,
    gpus: int = 0,
    providers: Sequence[str] = (CPU,),
    latency: Mapping[str, float] | None = None,
    as_of: float = NOW - 0.5,
) -> NodeInfo:
    return NodeInfo(
        peer_id=peer,
        models_loaded=frozenset(loaded),
        models_on_disk=frozenset(on_disk),
        in_flight=in_flight,
        queue_length=queue,
        cpu_count=cpus,
        memory_mb=2 * free_mb,
        memory_available_mb=free_mb,
        gpu_count=gpus,
        gpu_memory_mb=8192 * gpus,
        providers=frozenset(providers),
        latency_ms=MappingProxyType(dict(latency or {})),
        as_of=as_of,
    )


def snapshot(
    *,
    outstanding: Mapping[str, int] | None = None,
    observed: Mapping[str, float] | None = None,
    backoff: Mapping[str, float] | None = None,
    turn: int = 0,
    reported: Mapping[str, tuple[float, int]] | None = None,
) -> CoordinatorSnapshot:
    """`observed` is latency of M by peer; `backoff` is seconds from NOW; `reported` is
    (seconds from NOW, others' load) by peer."""
    return CoordinatorSnapshot(
        outstanding_by_peer=dict(outstanding or {}),
        latency_by_peer_model={(p, M): ms for p, ms in (observed or {}).items()},
        backoff_by_peer={p: NOW + s for p, s in (backoff or {}).items()},
        turns_by_model={M: turn},
        reported_by_peer={p: (NOW + s, load) for p, (s, load) in (reported or {}).items()},
    )


def placed(
    strategy: DistributionStrategy,
    nodes: Sequence[NodeInfo],
    state: CoordinatorSnapshot,
    *,
    requirements: Requirements = NONE,
    power_of_two: bool = False,
    seed: int = 0,
) -> Placement:
    return place(
        strategy,
        M,
        NodeIndex(nodes),
        state,
        now=NOW,
        rng=random.Random(seed),
        requirements=requirements,
        power_of_two=power_of_two,
    )


def order(placement: Placement) -> list[str]:
    return [c.peer_id for c in placement.candidates]


def reasons(placement: Placement) -> dict[str, str]:
    return {c.peer_id: c.reason for c in placement.candidates}


def excluded(placement: Placement) -> dict[str, str]:
    return {e.peer_id: e.reason for e in placement.excluded}


# --- ROUND_ROBIN -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "backoff", "firsts", "excluded_ids"),
    [
        pytest.param(
            [node("c"), node("a"), node("b")],
            {},
            ["a", "b", "c", "a", "b", "c"],
            [],
            id="rotates-in-peer-id-order",
        ),
        pytest.param(
            [node("a"), node("b", loaded=(), on_disk=(M,)), node("c", in_flight=9)],
            {},
            ["a", "b", "c", "a"],
            [],
            id="load-and-on-disk-do-not-matter",
        ),
        pytest.param(
            [node("a"), node("x", loaded=(OTHER,)), node("b")],
            {},
            ["a", "b", "a", "b"],
            [],
            id="peers-not-serving-never-appear",
        ),
        pytest.param(
            [node("a"), node("b"), node("c")],
            {"b": 1.5},
            ["a", "c", "a", "c"],
            ["b"],
            id="backing-off-peer-is-excluded",
        ),
        pytest.param(
            [node("a"), node("b")],
            {"b": -1.0},
            ["a", "b", "a"],
            [],
            id="expired-backoff-is-not-excluded",
        ),
    ],
)
def test_round_robin(
    nodes: list[NodeInfo], backoff: dict[str, float], firsts: list[str], excluded_ids: list[str]
) -> None:
    usable = sorted(n.peer_id for n in nodes if n.serves(M) and n.peer_id not in excluded_ids)
    for turn, first in enumerate(firsts):
        placement = placed(RR, nodes, snapshot(backoff=backoff, turn=turn))
        shift = turn % len(usable)
        assert order(placement) == usable[shift:] + usable[:shift]
        assert order(placement)[0] == first
        assert sorted(excluded(placement)) == excluded_ids
    for peer in excluded_ids:
        assert excluded(placement)[peer] == f"backing off for {backoff[peer]:.2f} s after a failure"


def test_round_robin_advances_with_each_placed_request() -> None:
    index = NodeIndex([node("b"), node("a"), node("c")])
    stats = PeerStats()
    firsts = []
    for _ in range(5):
        firsts.append(place(RR, M, index, stats, now=NOW, rng=random.Random(0)).candidates[0])
        stats.placed(M)
    assert [c.peer_id for c in firsts] == ["a", "b", "c", "a", "b"]


# --- LEAST_LOADED ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "outstanding", "expected", "reason_of"),
    [
        pytest.param(
            [node("a", in_flight=3), node("b", in_flight=1), node("c", in_flight=2)],
            {},
            ["b", "c", "a"],
            ("a", "load 3 (3 running + 0 queued, 0 outstanding from here)"),
            id="in-flight-ranks",
        ),
        pytest.param(
            [node("a", in_flight=1, queue=3), node("b", in_flight=2)],
            {},
            ["b", "a"],
            ("a", "load 4 (1 running + 3 queued, 0 outstanding from here)"),
            id="queue-counts-as-load",
        ),
        pytest.param(
            [node("a"), node("b", in_flight=2), node("c", in_flight=3)],
            {"a": 5},
            ["b", "c", "a"],
            ("a", "load 5 (0 running + 0 queued, 5 outstanding from here)"),
            id="outstanding-from-here-adds",
        ),
        pytest.param(
            [node("b", queue=1), node("a", in_flight=1), node("c")],
            {},
            ["c", "a", "b"],
            ("b", "load 1 (0 running + 1 queued, 0 outstanding from here)"),
            id="ties-go-to-lower-peer-id",
        ),
        pytest.param(
            [node("a", in_flight=5), node("x", loaded=(OTHER,)), node("b", in_flight=7)],
            {},
            ["a", "b"],
            ("b", "load 7 (7 running + 0 queued, 0 outstanding from here)"),
            id="peers-not-serving-never-appear",
        ),
    ],
)
def test_least_loaded_sorted(
    nodes: list[NodeInfo],
    outstanding: dict[str, int],
    expected: list[str],
    reason_of: tuple[str, str],
) -> None:
    placement = placed(LEAST, nodes, snapshot(outstanding=outstanding), power_of_two=False)
    assert order(placement) == expected
    peer, reason = reason_of
    assert reasons(placement)[peer] == reason
    scores = [c.score for c in placement.candidates]
    assert scores == sorted(scores)


@pytest.mark.parametrize(
    "loads",
    [
        pytest.param([3, 1, 2], id="three-peers"),
        pytest.param([4, 0, 9, 2], id="four-peers"),
        pytest.param([6, 5, 4, 3, 2, 1, 0], id="seven-peers"),
    ],
)
def test_least_loaded_power_of_two_choices(loads: list[int]) -> None:
    nodes = [node(f"p{i}", in_flight=load) for i, load in enumerate(loads)]
    by_load = [f"p{i}" for i in sorted(range(len(loads)), key=lambda i: loads[i])]
    firsts: Counter[str] = Counter()
    for seed in range(400):
        placement = placed(LEAST, nodes, snapshot(), power_of_two=True, seed=seed)
        first, *rest = order(placement)
        firsts[first] += 1
        assert "better of two random choices" in placement.candidates[0].reason
        assert rest == [p for p in by_load if p != first]  # the rest keep their rank
    assert firsts[by_load[-1]] == 0  # the worst peer is never first
    assert len(firsts) > 1  # the first choice spreads over peers: the point of two choices
    assert firsts[by_load[0]] == max(firsts.values())  # the best peer is first most often


def test_least_loaded_two_peers_are_not_shuffled() -> None:
    nodes = [node("a", in_flight=2), node("b", in_flight=1)]
    for seed in range(50):
        assert order(placed(LEAST, nodes, snapshot(), power_of_two=True, seed=seed)) == ["b", "a"]


@pytest.mark.parametrize(
    ("reported", "expected", "reason_of_a"),
    [
        pytest.param(
            {"a": (-0.1, 0)},
            ["a", "b"],
            "load 1 (0 from others as it last told us, 1 from here)",
            id="a-fresher-report-replaces-the-record",
        ),
        pytest.param(
            {"a": (-0.9, 0)},
            ["b", "a"],
            "load 5 (4 running + 0 queued, 1 outstanding from here)",
            id="a-report-older-than-the-record-is-ignored",
        ),
        pytest.param(
            {"b": (-0.1, 6)},
            ["a", "b"],
            "load 5 (4 running + 0 queued, 1 outstanding from here)",
            id="each-peer-by-its-own-freshest",
        ),
    ],
)
def test_least_loaded_reads_the_freshest_load(
    reported: dict[str, tuple[float, int]], expected: list[str], reason_of_a: str
) -> None:
    # Both records arrived 0.5 s ago: a busy with 4, b with 2.
    nodes = [node("a", in_flight=4), node("b", in_flight=2)]
    state = snapshot(outstanding={"a": 1}, reported=reported)
    placement = placed(LEAST, nodes, state)
    assert order(placement) == expected
    assert reasons(placement)["a"] == reason_of_a


def test_a_report_counts_others_only_and_outstanding_adds_what_is_ours_now() -> None:
    stats = PeerStats()
    for _ in range(3):
        stats.sent("a")
    stats.done("a")  # one of ours finished: the peer answered it with its load, 5
    stats.reported("a", 5, NOW)
    assert stats.reported_load("a") == (NOW, 3)  # 2 of the 5 are ours
    stats.sent("a")
    nodes = [node("a", as_of=NOW - 1)]
    assert reasons(placed(LEAST, nodes, stats)) == {
        "a": "load 6 (3 from others as it last told us, 3 from here)"
    }
    stats.forget("a")
    assert stats.reported_load("a") is None


@pytest.mark.parametrize(
    ("probed", "expected"),
    [
        pytest.param(["a", "b"], ["b", "a", "c", "d", "e"], id="probed-b-is-emptier"),
        pytest.param(["a", "c"], ["a", "c", "b", "d", "e"], id="probed-stay-first"),
        pytest.param(["b"], ["b", "a", "c", "d", "e"], id="one-probe"),
        pytest.param(["zz", "a"], ["a", "b", "c", "d", "e"], id="not-a-candidate-is-ignored"),
        pytest.param([], ["a", "b", "c", "d", "e"], id="nothing-probed"),
        pytest.param(["e", "b"], ["b", "a", "c", "d", "e"], id="left-the-view-keeps-its-place"),
    ],
)
def test_settle_puts_the_probed_first_by_expected_completion(
    probed: list[str], expected: list[str]
) -> None:
    nodes = [node(p, latency={M: 10.0}) for p in "abcd"]  # e has just left the view
    # The view said every peer was idle; the probes found a with 3, b with 1, c with 9.
    state = snapshot(reported={"a": (0.0, 3), "b": (0.0, 1), "c": (0.0, 9)})
    ranking = Placement(M, tuple(Candidate(p, 0.0, "") for p in "abcde"))
    settled = settle(ranking, NodeIndex(nodes), state, probed)
    assert order(settled) == expected
    by_peer = {c.peer_id: c for c in settled.candidates}
    if "b" in probed:
        assert by_peer["b"].score == (1 + 1) * 10.0
        assert "1 from others as it last told us" in by_peer["b"].reason


B_LOADED = node("b", cpus=8, latency={M: 10.0})
B_ON_DISK = node("b", loaded=(), on_disk=(M,), cpus=8, latency={M: 10.0})
B_ONE_CPU = node("b", cpus=1, latency={M: 10.0})


@pytest.mark.parametrize(
    ("strategy", "b", "expected"),
    [
        pytest.param(LEAST, B_ON_DISK, ["b", "a"], id="least-loaded-by-load-alone"),
        pytest.param(LATENCY, B_ONE_CPU, ["b", "a"], id="latency-optimized-by-load-in-time"),
        pytest.param(MODEL, B_LOADED, ["b", "a"], id="model-specific-both-loaded-by-load"),
        pytest.param(MODEL, B_ON_DISK, ["a", "b"], id="model-specific-keeps-the-loaded-first"),
        pytest.param(CAPABILITY, B_LOADED, ["b", "a"], id="capability-equal-capacity-by-load"),
        pytest.param(CAPABILITY, B_ONE_CPU, ["a", "b"], id="capability-keeps-headroom-first"),
    ],
)
def test_settle_compares_the_probed_by_the_strategys_own_score_with_their_fresh_load(
    strategy: DistributionStrategy, b: NodeInfo, expected: list[str]
) -> None:
    # The probes found a with 3 and b with 1; a has 8 CPUs and the model loaded.
    nodes = [node("a", cpus=8, latency={M: 10.0}), b]
    state = snapshot(reported={"a": (0.0, 3), "b": (0.0, 1)})
    ranking = Placement(M, (Candidate("a", 0.0, ""), Candidate("b", 1.0, "")))
    settled = settle(ranking, NodeIndex(nodes), state, ["a", "b"], strategy=strategy)
    assert order(settled) == expected


@pytest.mark.parametrize("strategy", [LEAST, MODEL, CAPABILITY])
@pytest.mark.parametrize(
    ("reported", "expected"),
    [
        pytest.param({}, ["b", "a"], id="the-view-alone"),
        pytest.param({"a": (-0.1, 0)}, ["a", "b"], id="a-fresher-report-replaces-the-record"),
        pytest.param({"a": (-0.9, 0)}, ["b", "a"], id="a-report-older-than-the-record"),
    ],
)
def test_strategies_that_read_load_read_the_freshest(
    strategy: DistributionStrategy, reported: dict[str, tuple[float, int]], expected: list[str]
) -> None:
    # Records 0.5 s old: a busy with 4, b with 2. Equal otherwise: the load decides.
    nodes = [node("a", in_flight=4, cpus=4), node("b", in_flight=2, cpus=4)]
    placement = placed(strategy, nodes, snapshot(reported=reported))
    assert order(placement) == expected
    if reported == {"a": (-0.1, 0)}:
        assert "0 from others as it last told us, 0 from here" in reasons(placement)["a"]


@pytest.mark.parametrize(
    ("in_flight", "mine", "latency", "expected_ms"),
    [
        pytest.param(0, 0, {M: 10.0}, 0.0, id="idle"),
        pytest.param(3, 1, {M: 10.0}, 40.0, id="four-ahead"),
        pytest.param(2, 0, {}, 2 * 10.0, id="no-latency-gossiped-uses-the-prior"),
    ],
)
def test_expected_wait(
    in_flight: int, mine: int, latency: dict[str, float], expected_ms: float
) -> None:
    peer = node("a", in_flight=in_flight, latency=latency)
    assert expected_wait_ms(peer, M, snapshot(outstanding={"a": mine})) == expected_ms


@pytest.mark.parametrize(
    ("gossiped", "computed", "in_flight", "expected"),
    [
        pytest.param(None, None, 5, False, id="nothing-known-of-the-work"),
        pytest.param(0.5, None, 5, False, id="light-requests-by-gossip"),
        pytest.param(10.0, 0.5, 5, False, id="light-requests-by-answers-overrule-gossip"),
        pytest.param(0.5, 10.0, 5, True, id="heavy-requests-by-answers"),
        pytest.param(10.0, None, 0, False, id="no-queue-to-avoid"),
        pytest.param(10.0, None, 1, True, id="heavy-requests-and-a-queue"),
    ],
)
def test_worth_probing(
    gossiped: float | None, computed: float | None, in_flight: int, expected: bool
) -> None:
    peer = node("a", in_flight=in_flight, latency={M: gossiped} if gossiped else {})
    state = CoordinatorSnapshot(compute_by_model={M: computed} if computed else {})
    assert worth_probing(peer, M, state, rtt_ms=2.0) is expected


@pytest.mark.parametrize(
    ("peers", "queued", "expected"),
    [
        pytest.param("abc", 3, ["a", "b"], id="the-first-two"),
        pytest.param("a", 3, [], id="no-second-to-choose"),
        pytest.param("abc", 0, [], id="nothing-to-gain"),
    ],
)
def test_to_probe(peers: str, queued: int, expected: list[str]) -> None:
    nodes = [node(p, in_flight=queued, latency={M: 10.0}) for p in peers]
    ranking = Placement(M, tuple(Candidate(p, 0.0, "") for p in peers))
    assert to_probe(ranking, NodeIndex(nodes), snapshot(), rtt_ms=2.0) == expected


# --- MODEL_SPECIFIC --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "outstanding", "expected"),
    [
        pytest.param(
            [node("a", loaded=(), on_disk=(M,)), node("b", in_flight=50)],
            {},
            ["b", "a"],
            id="loaded-beats-idle-on-disk",
        ),
        pytest.param(
            [node("a", loaded=(), on_disk=(M,)), node("b")],
            {"b": 40},
            ["b", "a"],
            id="loaded-beats-on-disk-despite-outstanding",
        ),
        pytest.param(
            [node("a", in_flight=3), node("b", queue=1), node("c", in_flight=2)],
            {},
            ["b", "c", "a"],
            id="load-breaks-ties-among-loaded",
        ),
        pytest.param(
            [
                node("a", loaded=(), on_disk=(M,), in_flight=2),
                node("b", loaded=(), on_disk=(M,)),
                node("c", in_flight=9),
            ],
            {},
            ["c", "b", "a"],
            id="load-breaks-ties-among-on-disk",
        ),
        pytest.param(
            [node("a"), node("b", in_flight=1)],
            {"a": 3},
            ["b", "a"],
            id="outstanding-from-here-counts-as-load",
        ),
    ],
)
def test_model_specific(
    nodes: list[NodeInfo], outstanding: dict[str, int], expected: list[str]
) -> None:
    placement = placed(MODEL, nodes, snapshot(outstanding=outstanding))
    assert order(placement) == expected
    for n in nodes:
        where = "loaded in memory" if M in n.models_loaded else "on disk only"
        assert where in reasons(placement)[n.peer_id]


# --- CAPABILITY_BASED ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "requirements", "expected", "excluded_reasons"),
    [
        pytest.param(
            [node("a", cpus=2), node("b", cpus=8), node("c", cpus=4)],
            Requirements(),
            ["b", "c", "a"],
            {},
            id="higher-capacity-first",
        ),
        pytest.param(
            [node("a", cpus=8, in_flight=7), node("b", cpus=2)],
            Requirements(),
            ["b", "a"],
            {},
            id="load-lowers-headroom",
        ),
        pytest.param(
            [node("a", free_mb=512), node("b", free_mb=1024), node("c", free_mb=4096)],
            Requirements(min_memory_mb=1024),
            ["b", "c"],
            {"a": "512 MB free < 1024 MB required"},
            id="min-memory-against-free-memory",
        ),
        pytest.param(
            [node("a", cpus=64), node("b", gpus=1, providers=(CPU, CUDA))],
            Requirements(gpu=GpuNeed.REQUIRED),
            ["b"],
            {"a": "no GPU, and the request requires one"},
            id="gpu-required-excludes-gpu-less",
        ),
        pytest.param(
            [node("a", gpus=2), node("b", providers=(CPU, CUDA))],
            Requirements(provider=CUDA),
            ["b"],
            {"a": f"no {CUDA}"},
            id="provider-must-be-offered",
        ),
        pytest.param(
            [node("a", cpus=16), node("b", cpus=4, gpus=1)],
            Requirements(gpu=GpuNeed.PREFERRED),
            ["b", "a"],
            {},
            id="gpu-preferred-ranks-gpu-first-keeps-cpu",
        ),
        pytest.param(
            [node("a", cpus=16), node("b", cpus=4, gpus=1)],
            Requirements(gpu=GpuNeed.ANY),
            ["a", "b"],
            {},
            id="gpu-any-weighs-a-gpu-less",
        ),
    ],
)
def test_capability_based(
    nodes: list[NodeInfo],
    requirements: Requirements,
    expected: list[str],
    excluded_reasons: dict[str, str],
) -> None:
    placement = placed(CAPABILITY, nodes, snapshot(), requirements=requirements)
    assert order(placement) == expected
    assert excluded(placement) == excluded_reasons


# --- LATENCY_OPTIMIZED -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "observed", "outstanding", "expected", "reason_of"),
    [
        pytest.param(
            [node("a", latency={M: 1.0}), node("b", latency={M: 20.0})],
            {"a": 50.0},
            {},
            [("b", 20.0), ("a", 50.0)],
            ("a", "50.00 ms (observed here) x (0 outstanding + 1)"),
            id="observed-beats-gossiped",
        ),
        pytest.param(
            [node("a", latency={M: 30.0}), node("b", latency={M: 5.0})],
            {},
            {},
            [("b", 5.0), ("a", 30.0)],
            ("b", "5.00 ms (gossiped) x (0 outstanding + 1)"),
            id="gossiped-without-history",
        ),
        pytest.param(
            [node("a", latency={OTHER: 1.0}), node("b", latency={M: 15.0})],
            {},
            {},
            [("a", 10.0), ("b", 15.0)],
            ("a", "10.00 ms (no history, prior) x (0 outstanding + 1)"),
            id="prior-without-either",
        ),
        pytest.param(
            [node("a"), node("b")],
            {"a": 5.0, "b": 12.0},
            {"a": 3},
            [("b", 12.0), ("a", 20.0)],
            ("a", "5.00 ms (observed here) x (3 outstanding + 1)"),
            id="fast-but-busy-loses-to-slow-idle",
        ),
        pytest.param(
            [node("a", latency={M: 4.0}), node("b")],
            {},
            {"a": 2},
            [("b", 10.0), ("a", 12.0)],
            ("a", "4.00 ms (gossiped) x (2 outstanding + 1)"),
            id="outstanding-multiplies-gossiped",
        ),
    ],
)
def test_latency_optimized(
    nodes: list[NodeInfo],
    observed: dict[str, float],
    outstanding: dict[str, int],
    expected: list[tuple[str, float]],
    reason_of: tuple[str, str],
) -> None:
    placement = placed(LATENCY, nodes, snapshot(observed=observed, outstanding=outstanding))
    assert [(c.peer_id, c.score) for c in placement.candidates] == expected
    peer, reason = reason_of
    assert reasons(placement)[peer] == reason


# --- pick ------------------------------------------------------------------------------

SPREAD = [
    node("a", in_flight=3, cpus=2),
    node("b", loaded=(), on_disk=(M,), cpus=8),
    node("c", in_flight=1, cpus=4, gpus=1),
    node("d", queue=2, free_mb=256),
]


PICK_STATES = [
    ("fresh", snapshot(), Requirements()),
    ("turn-2", snapshot(turn=2), Requirements()),
    ("busy-c", snapshot(turn=7, outstanding={"c": 4}), Requirements()),
    ("requirements", snapshot(), Requirements(min_memory_mb=1024)),
    ("backoff-turn-1", snapshot(turn=1, backoff={"b": 1.0}), Requirements()),
    ("backoff-turn-2", snapshot(turn=2, backoff={"b": 1.0}), Requirements()),
]


@pytest.mark.parametrize(
    ("strategy", "state", "requirements"),
    [
        pytest.param(strategy, state, requirements, id=f"{strategy}-{name}")
        for strategy in (RR, MODEL, CAPABILITY)
        for name, state, requirements in PICK_STATES
    ],
)
def test_pick_is_the_first_placement(
    strategy: DistributionStrategy, state: CoordinatorSnapshot, requirements: Requirements
) -> None:
    index = NodeIndex(SPREAD)
    rng = random.Random(0)
    first = place(strategy, M, index, state, now=NOW, rng=rng, requirements=requirements)
    chosen = pick(strategy, M, index, state, now=NOW, rng=rng, requirements=requirements)
    assert chosen is not None
    assert chosen.peer_id == first.candidates[0].peer_id


@pytest.mark.parametrize("strategy", [LEAST])
@pytest.mark.parametrize(
    ("state", "never"),
    [
        pytest.param(snapshot(), {"a"}, id="worst-never-chosen"),
        pytest.param(snapshot(outstanding={"c": 60}), {"c"}, id="outstanding-makes-worst"),
        pytest.param(snapshot(backoff={"d": 2.0}), {"d"}, id="backing-off-never-chosen"),
    ],
)
def test_pick_two_random_choices(
    strategy: DistributionStrategy, state: CoordinatorSnapshot, never: set[str]
) -> None:
    # loads 6 > 3 > 1 > 0 and gossiped latencies in the same order: a is the worst
    # ((6 + 1) x 60 ms); 60 outstanding from here make c worse ((61 + 1) x 10 ms)
    nodes = [
        node("a", in_flight=6, latency={M: 60.0}),
        node("b", in_flight=3, latency={M: 30.0}),
        node("c", in_flight=1, latency={M: 10.0}),
        node("d", latency={M: 1.0}),
    ]
    index = NodeIndex(nodes)
    chosen: Counter[str] = Counter()
    for seed in range(200):
        candidate = pick(strategy, M, index, state, now=NOW, rng=random.Random(seed))
        assert candidate is not None
        chosen[candidate.peer_id] += 1
    assert set(chosen) <= {"a", "b", "c", "d"} - never
    assert len(chosen) > 1


# --- shortlist: what the orchestrator considers for one request ------------------------


def _large_view(n: int = 100) -> list[NodeInfo]:
    """n peers: even ones fast (5 ms), odd ones slow (20 ms), loads 0..4."""
    return [
        node(f"p{i:03d}", in_flight=i % 5, latency={M: 5.0 if i % 2 == 0 else 20.0})
        for i in range(n)
    ]


@pytest.mark.parametrize("strategy", [LEAST, LATENCY])
def test_a_shortlist_over_a_large_view_is_a_few_random_peers_ranked(
    strategy: DistributionStrategy,
) -> None:
    nodes = _large_view()
    state = snapshot(backoff={"p002": 1.0})
    tried = {"p004", "p006"}
    seen: set[str] = set()
    for seed in range(200):
        listed = shortlist(
            strategy,
            M,
            NodeIndex(nodes),
            state,
            now=NOW,
            rng=random.Random(seed),
            size=4,
            exclude=tried,
        )
        peers = order(listed)
        assert len(peers) == len(set(peers)) == 4
        assert not set(peers) & (tried | {"p002"})
        scores = [c.score for c in listed.candidates]
        assert scores == sorted(scores)
        seen.update(peers)
    assert len(seen) > 50  # spread over the view, not the same few


def test_a_shortlist_draws_peers_in_proportion_to_their_speed() -> None:
    index = NodeIndex(_large_view())
    drawn: Counter[bool] = Counter()
    for seed in range(500):
        listed = shortlist(LEAST, M, index, snapshot(), now=NOW, rng=random.Random(seed), size=2)
        drawn.update(int(p[1:]) % 2 == 0 for p in order(listed))
    assert 3.0 < drawn[True] / drawn[False] < 5.0  # fast peers serve 4x as much


@pytest.mark.parametrize("strategy", list(DistributionStrategy))
def test_a_shortlist_over_a_small_view_is_the_whole_ranking_less_the_excluded(
    strategy: DistributionStrategy,
) -> None:
    nodes = _large_view(12)
    state = snapshot(outstanding={"p001": 3})
    ranking = placed(strategy, nodes, state, power_of_two=True, seed=7)
    listed = shortlist(
        strategy, M, NodeIndex(nodes), state, now=NOW, rng=random.Random(7), exclude={"p003"}
    )
    assert listed.candidates == tuple(c for c in ranking.candidates if c.peer_id != "p003")
    assert listed.excluded == ranking.excluded


@pytest.mark.parametrize("size", [30, 100])
def test_a_shortlist_is_empty_when_nobody_is_left(size: int) -> None:
    nodes = _large_view(size)
    everyone = {n.peer_id for n in nodes}
    listed = shortlist(
        LEAST, M, NodeIndex(nodes), snapshot(), now=NOW, rng=random.Random(0), exclude=everyone
    )
    assert listed.candidates == ()


def test_a_shortlist_finds_the_few_peers_not_backing_off() -> None:
    nodes = _large_view(100)
    backing_off = {n.peer_id: 5.0 for n in nodes[3:]}  # all but p000, p001 and p002
    for seed in range(50):  # spare draws run out on some seeds: then every peer is ranked
        listed = shortlist(
            LEAST,
            M,
            NodeIndex(nodes),
            snapshot(backoff=backing_off),
            now=NOW,
            rng=random.Random(seed),
            size=4,
        )
        assert listed.candidates and set(order(listed)) <= {"p000", "p001", "p002"}


def test_pick_is_the_first_of_a_shortlist_of_two() -> None:
    index = NodeIndex(_large_view())
    for seed in range(20):
        first = pick(LEAST, M, index, snapshot(), now=NOW, rng=random.Random(seed))
        listed = shortlist(LEAST, M, index, snapshot(), now=NOW, rng=random.Random(seed))
        assert first == listed.candidates[0]


@pytest.mark.parametrize("strategy", list(DistributionStrategy))
@pytest.mark.parametrize(
    ("nodes", "state", "requirements"),
    [
        pytest.param([node("x", loaded=(OTHER,))], snapshot(), Requirements(), id="nothing-serves"),
        pytest.param(
            [node("a"), node("b"), node("c")],
            snapshot(backoff={"a": 1.0, "b": 1.0, "c": 1.0}),
            Requirements(),
            id="all-backing-off",
        ),
    ],
)
def test_pick_none(
    strategy: DistributionStrategy,
    nodes: list[NodeInfo],
    state: CoordinatorSnapshot,
    requirements: Requirements,
) -> None:
    index = NodeIndex(nodes)
    got = pick(strategy, M, index, state, now=NOW, rng=random.Random(0), requirements=requirements)
    assert got is None


def test_pick_none_when_no_capable_peer() -> None:
    index = NodeIndex([node("a"), node("b")])
    needs = Requirements(gpu=GpuNeed.REQUIRED)
    got = pick(CAPABILITY, M, index, snapshot(), now=NOW, rng=random.Random(0), requirements=needs)
    assert got is None


# --- PeerStats -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        pytest.param([(10.0, 0.0)], 10.0, id="first-sample"),
        pytest.param([(10.0, 0.0), (100.0, 0.1)], 100.0, id="jumps-up-at-once"),
        pytest.param([(100.0, 0.0), (10.0, 0.0)], 100.0, id="no-decay-without-time"),
        pytest.param(
            [(100.0, 0.0), (10.0, 10.0)],
            100.0 * math.exp(-1) + 10.0 * (1 - math.exp(-1)),
            id="decays-one-time-constant",
        ),
        pytest.param([(100.0, 0.0), (10.0, 1000.0)], 10.0, id="decays-fully-after-long"),
        pytest.param(
            [(100.0, 0.0), (10.0, 10.0), (10.0, 20.0)],
            (100.0 * math.exp(-1) + 10.0 * (1 - math.exp(-1))) * math.exp(-1)
            + 10.0 * (1 - math.exp(-1)),
            id="keeps-decaying",
        ),
    ],
)
def test_peak_ewma(samples: list[tuple[float, float]], expected: float) -> None:
    stats = PeerStats(StatsConfig(latency_decay_s=10.0))
    assert stats.observed_latency_ms("a", M) is None
    for latency, at in samples:
        stats.succeeded("a", M, latency, at)
    assert stats.observed_latency_ms("a", M) == pytest.approx(expected, abs=1e-6)
    assert stats.observed_latency_ms("a", OTHER) is None
    assert stats.observed_latency_ms("b", M) is None


@pytest.mark.parametrize(
    ("failures", "expected_s"),
    [
        pytest.param(1, 0.25, id="first-failure-base"),
        pytest.param(2, 0.5, id="doubles"),
        pytest.param(4, 2.0, id="doubles-again"),
        pytest.param(6, 8.0, id="below-cap"),
        pytest.param(7, 10.0, id="capped"),
        pytest.param(30, 10.0, id="stays-capped"),
    ],
)
def test_backoff_doubles_to_the_cap(failures: int, expected_s: float) -> None:
    stats = PeerStats(StatsConfig(backoff_base_s=0.25, backoff_cap_s=10.0))
    for _ in range(failures):
        stats.failed("a", NOW)
    assert stats.backoff_until("a") == pytest.approx(NOW + expected_s)
    assert stats.backoff_until("b") == -math.inf


def test_success_resets_backoff() -> None:
    stats = PeerStats(StatsConfig(backoff_base_s=0.25))
    for _ in range(5):
        stats.failed("a", NOW)
    stats.succeeded("a", M, 5.0, NOW + 5.0)
    assert stats.backoff_until("a") == -math.inf
    stats.failed("a", NOW + 6.0)
    assert stats.backoff_until("a") == pytest.approx(NOW + 6.25)


def test_overloaded_backoff_is_short_and_not_counted() -> None:
    stats = PeerStats(StatsConfig(backoff_base_s=0.25, overloaded_backoff_s=0.05))
    for _ in range(5):
        stats.failed("a", NOW, overloaded=True)
    assert stats.backoff_until("a") == pytest.approx(NOW + 0.05)
    stats.failed("a", NOW)
    assert stats.backoff_until("a") == pytest.approx(NOW + 0.25)


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        pytest.param("", 0, id="none"),
        pytest.param("ss", 2, id="two-sent"),
        pytest.param("ssd", 1, id="one-done"),
        pytest.param("d", 0, id="done-without-send"),
        pytest.param("sddd", 0, id="more-done-than-sent"),
        pytest.param("sddds", 1, id="counts-again-after-floor"),
    ],
)
def test_outstanding_never_negative(ops: str, expected: int) -> None:
    stats = PeerStats()
    for op in ops:
        (stats.sent if op == "s" else stats.done)("a")
    assert stats.outstanding("a") == expected
    assert stats.outstanding("b") == 0


@pytest.mark.parametrize(
    ("samples", "q", "expected"),
    [
        pytest.param(19, 0.95, None, id="too-few"),
        pytest.param(20, 0.95, 20.0, id="p95-of-20"),
        pytest.param(20, 0.5, 11.0, id="median-of-20"),
        pytest.param(100, 0.95, 96.0, id="p95-of-100"),
        pytest.param(100, 1.0, 100.0, id="q-1-is-the-max"),
    ],
)
def test_latency_quantile(samples: int, q: float, expected: float | None) -> None:
    stats = PeerStats()
    for i in range(samples, 0, -1):  # descending: the quantile must sort
        stats.succeeded(f"p{i % 3}", M, float(i), NOW)
    assert stats.latency_quantile_ms(M, q) == expected
    assert stats.latency_quantile_ms(OTHER, q) is None


def test_forget_drops_what_was_learned() -> None:
    stats = PeerStats()
    stats.succeeded("a", M, 5.0, NOW)
    stats.failed("a", NOW)
    stats.forget("a")
    assert stats.observed_latency_ms("a", M) is None
    assert stats.backoff_until("a") == -math.inf


# --- NodeInfo and NodeIndex ------------------------------------------------------------


def _descriptor(model_id: str) -> ModelDescriptor:
    return ModelDescriptor(
        id=model_id,
        version="1.0.0",
        sha256="0123456789abcdef" * 4,
        task_type="image-classification",
        subtypes=(),
        languages=(),
        max_input_length=64,
        accuracy=0.9,
        cost=1.0,
        description="",
        inputs=(TensorSpec("input", "float32", (None, 64)),),
        outputs=(TensorSpec("label", "int64", (None,)),),
    )


def _record(
    *,
    gpus: tuple[GpuInfo, ...],
    models: tuple[ModelEntry, ...],
    performance: tuple[ModelPerformance, ...],
) -> PeerRecord:
    providers = (CUDA, CPU) if gpus else (CPU,)
    return PeerRecord(
        peer_id="peer-1",
        boot_id="boot",
        seq=1,
        issued_at=1000.0,
        interval=1.0,
        addrs=("/ip4/127.0.0.1/tcp/4001",),
        capabilities=Capabilities(
            cpu_count=8, cpu_model="x", memory_mb=32768, gpus=gpus, providers=providers
        ),
        models=models,
        load=Load(
            in_flight=2,
            queue_length=3,
            cpu_percent=42.5,
            memory_available_mb=12000,
            gpu_utilization=tuple(10.0 for _ in gpus),
        ),
        performance=performance,
    )


@pytest.mark.parametrize(
    ("record", "is_local", "expected"),
    [
        pytest.param(
            _record(
                gpus=(GpuInfo("a100", 40960), GpuInfo("t4", 16384)),
                models=(
                    ModelEntry(_descriptor(M), loaded=True),
                    ModelEntry(_descriptor(OTHER), loaded=False),
                    ModelEntry(_descriptor("third"), loaded=True),
                ),
                performance=(
                    ModelPerformance(M, latency_ms=12.5, success_rate=1.0, samples=7),
                    ModelPerformance(OTHER, latency_ms=99.0, success_rate=1.0, samples=0),
                ),
            ),
            False,
            NodeInfo(
                peer_id="peer-1",
                models_loaded=frozenset({M, "third"}),
                models_on_disk=frozenset({OTHER}),
                in_flight=2,
                queue_length=3,
                cpu_percent=42.5,
                cpu_count=8,
                memory_mb=32768,
                memory_available_mb=12000,
                gpu_count=2,
                gpu_memory_mb=40960 + 16384,
                providers=frozenset({CUDA, CPU}),
                latency_ms=MappingProxyType({M: 12.5}),
                is_local=False,
            ),
            id="gpu-box-loaded-and-on-disk",
        ),
        pytest.param(
            _record(gpus=(), models=(), performance=()),
            True,
            NodeInfo(
                peer_id="peer-1",
                models_loaded=frozenset(),
                models_on_disk=frozenset(),
                in_flight=2,
                queue_length=3,
                cpu_percent=42.5,
                cpu_count=8,
                memory_mb=32768,
                memory_available_mb=12000,
                gpu_count=0,
                gpu_memory_mb=0,
                providers=frozenset({CPU}),
                latency_ms=MappingProxyType({}),
                is_local=True,
            ),
            id="cpu-only-local-no-models",
        ),
    ],
)
def test_node_info_from_record(record: PeerRecord, is_local: bool, expected: NodeInfo) -> None:
    info = NodeInfo.from_record(record, is_local=is_local)
    assert info == expected
    assert dict(info.latency_ms) == dict(expected.latency_ms)
    assert info.load == 5
    assert all(info.serves(m) for m in expected.models_loaded | expected.models_on_disk)
    assert not info.serves("unknown")


def test_node_index_by_model_in_peer_id_order() -> None:
    index = NodeIndex(
        [node("c", on_disk=(OTHER,)), node("a"), node("b", loaded=(OTHER,)), node("d", loaded=())]
    )
    assert [n.peer_id for n in index.serving(M)] == ["a", "c"]
    assert [n.peer_id for n in index.serving(OTHER)] == ["b", "c"]
    assert index.serving("unknown") == ()
    assert index.model_ids() == {M, OTHER}


def test_excluded_is_a_value() -> None:
    placement = placed(RR, [node("a")], snapshot(backoff={"a": 0.5}))
    assert placement.candidates == ()
    reason = "backing off for 0.50 s after a failure"
    assert placement.excluded == (Excluded("a", reason, Exclusion.BACKING_OFF),)
    assert placement.excluded[0].backing_off


def test_latency_optimized_ranks_everyone_in_a_small_view_and_samples_in_a_large_one() -> None:
    """Its signals are this coordinator's own and fresh, so no herd to avoid: it takes
    the best peer while ranking all is cheap, and two random choices past 64 peers."""
    small = NodeIndex([NodeInfo(f"p{i:03}", frozenset({M})) for i in range(10)])
    fast = CoordinatorSnapshot(latency_by_peer_model={("p007", M): 1.0})
    firsts = {
        pick(LATENCY, M, small, fast, now=NOW, rng=random.Random(seed)).peer_id  # type: ignore[union-attr]
        for seed in range(50)
    }
    assert firsts == {"p007"}
    large = NodeIndex([NodeInfo(f"p{i:03}", frozenset({M})) for i in range(100)])
    firsts = {
        pick(LATENCY, M, large, fast, now=NOW, rng=random.Random(seed)).peer_id  # type: ignore[union-attr]
        for seed in range(50)
    }
    assert len(firsts) > 10


def test_least_loaded_counts_load_in_time_when_peers_gossip_their_latency() -> None:
    fast_but_busier = node("fast", in_flight=4, latency={M: 10.0})  # (4 + 1) x 10 ms
    slow_but_idler = node("slow", in_flight=2, latency={M: 40.0})  # (2 + 1) x 40 ms
    placement = place(
        LEAST,
        M,
        NodeIndex([fast_but_busier, slow_but_idler]),
        snapshot(),
        now=NOW,
        rng=random.Random(0),
        power_of_two=False,
    )
    assert [c.peer_id for c in placement.candidates] == ["fast", "slow"]
    assert placement.candidates[0].reason.endswith("+ 1, x 10.00 ms per request")


def test_two_random_choices_draw_peers_in_proportion_to_their_speed() -> None:
    # Two fast peers and six 4x slower ones, all idle: drawn uniformly, two slow
    # peers would come up together in 15 of 28 pairs.
    nodes = [node(f"fast{i}", latency={M: 10.0}) for i in range(2)]
    nodes += [node(f"slow{i}", latency={M: 40.0}) for i in range(6)]
    index = NodeIndex(nodes)
    picks = Counter(
        candidate.peer_id.rstrip("0123456789")
        for seed in range(2000)
        if (candidate := pick(LEAST, M, index, snapshot(), now=NOW, rng=random.Random(seed)))
    )
    assert picks["fast"] / 2000 > 0.6  # uniform pairs would give 13/28 = 0.46
