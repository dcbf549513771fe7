"""A request's requirements filter candidates under every strategy: pure placements,
and the orchestrator over an in-memory fake network in virtual time.

Each view makes the peers that fail the requirement the most attractive ones by every
strategy's own criterion (first in peer id order, idle, the model loaded, many CPUs,
fast), so that a strategy that did not filter would pick them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import pytest
import trio
import trio.testing

from scheduler import (
    DistributedModelOrchestrator,
    DistributionStrategy,
    ErrorCode,
    Exclusion,
    GpuNeed,
    InferenceRequest,
    InferenceResult,
    JobError,
    NodeIndex,
    NodeInfo,
    PeerStats,
    Requirements,
    pick,
    place,
    shortlist,
)

M = "digits-mlp"
NOW = 100.0
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
STRATEGIES = list(DistributionStrategy)


def attractive(peer: str, *, free_mb: int = 8192, gpus: int = 0, cuda: bool = False) -> NodeInfo:
    """Idle, the model loaded, 64 CPUs, 1 ms: every strategy's favourite."""
    return NodeInfo(
        peer_id=peer,
        models_loaded=frozenset({M}),
        cpu_count=64,
        memory_available_mb=free_mb,
        gpu_count=gpus,
        providers=frozenset({CPU, CUDA} if cuda else {CPU}),
        latency_ms=MappingProxyType({M: 1.0}),
        as_of=NOW - 0.5,
    )


def capable(peer: str) -> NodeInfo:
    """Meets every requirement below, and looks worse by every strategy's criterion:
    busy, the model on disk only, one CPU, 50 ms."""
    return NodeInfo(
        peer_id=peer,
        models_loaded=frozenset(),
        models_on_disk=frozenset({M}),
        in_flight=3,
        cpu_count=1,
        memory_available_mb=2048,
        gpu_count=1,
        providers=frozenset({CPU, CUDA}),
        latency_ms=MappingProxyType({M: 50.0}),
        as_of=NOW - 0.5,
    )


@dataclass(frozen=True)
class Case:
    requirements: Requirements
    incapable: tuple[NodeInfo, ...]  # each fails the requirements
    causes: dict[str, tuple[Exclusion, str]] = field(default_factory=dict)


GPU_REASON = "no GPU, and the request requires one"
CASES = {
    "gpu-required": Case(
        Requirements(gpu=GpuNeed.REQUIRED),
        (attractive("a"), attractive("b", cuda=True)),
        {"a": (Exclusion.GPU, GPU_REASON), "b": (Exclusion.GPU, GPU_REASON)},
    ),
    "min-memory": Case(
        Requirements(min_memory_mb=2048),
        (attractive("a", free_mb=1024), attractive("b", free_mb=2047, gpus=1, cuda=True)),
        {
            "a": (Exclusion.MEMORY, "1024 MB free < 2048 MB required"),
            "b": (Exclusion.MEMORY, "2047 MB free < 2048 MB required"),
        },
    ),
    "provider": Case(
        Requirements(provider=CUDA),
        (attractive("a"), attractive("b", gpus=2)),
        {"a": (Exclusion.PROVIDER, f"no {CUDA}"), "b": (Exclusion.PROVIDER, f"no {CUDA}")},
    ),
    "all-three-each-fails-one": Case(
        Requirements(min_memory_mb=2048, gpu=GpuNeed.REQUIRED, provider=CUDA),
        (
            attractive("a", free_mb=512, gpus=1, cuda=True),
            attractive("b", cuda=True),
            attractive("c", gpus=1),
        ),
        {
            "a": (Exclusion.MEMORY, "512 MB free < 2048 MB required"),
            "b": (Exclusion.GPU, GPU_REASON),
            "c": (Exclusion.PROVIDER, f"no {CUDA}"),
        },
    ),
}
CAPABLE = ("y", "z")


def view(case: Case, spare_incapable: int = 0) -> NodeIndex:
    """The case's peers and two capable ones; `spare_incapable` more copies of the
    first incapable peer make a view large enough that strategies draw from it."""
    spares = [
        NodeInfo(**{**_fields(case.incapable[0]), "peer_id": f"i{k:03d}"})
        for k in range(spare_incapable)
    ]
    return NodeIndex([*case.incapable, *spares, *(capable(p) for p in CAPABLE)])


def _fields(node: NodeInfo) -> dict[str, object]:
    return {name: getattr(node, name) for name in NodeInfo.__dataclass_fields__}


def table() -> list[object]:
    return [
        pytest.param(strategy, case, id=f"{strategy}-{name}")
        for strategy in STRATEGIES
        for name, case in CASES.items()
    ]


# --- pure placements -------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "case"), table())
def test_place_leaves_out_every_peer_that_fails_a_requirement(
    strategy: DistributionStrategy, case: Case
) -> None:
    index = view(case)
    stats = PeerStats()
    for turn in range(6):  # round robin's turns, two random choices' seeds
        for p2c in (True, False):
            placement = place(
                strategy,
                M,
                index,
                stats,
                now=NOW,
                rng=random.Random(turn),
                requirements=case.requirements,
                power_of_two=p2c,
            )
            assert sorted(c.peer_id for c in placement.candidates) == list(CAPABLE)
            got = {e.peer_id: (e.cause, e.reason) for e in placement.excluded}
            assert got == case.causes
            assert not any(e.backing_off for e in placement.excluded)
        stats.placed(M)


@pytest.mark.parametrize(("strategy", "case"), table())
@pytest.mark.parametrize("spare", [0, 100], ids=["small-view", "large-view"])
def test_a_shortlist_and_pick_never_hold_a_peer_that_fails_a_requirement(
    strategy: DistributionStrategy, case: Case, spare: int
) -> None:
    # Over a large view, LEAST_LOADED and LATENCY_OPTIMIZED draw peers at random.
    index = view(case, spare)
    for seed in range(30):
        for size in (2, 4):
            listed = shortlist(
                strategy,
                M,
                index,
                PeerStats(),
                now=NOW,
                rng=random.Random(seed),
                requirements=case.requirements,
                size=size,
            )
            assert listed.candidates
            assert {c.peer_id for c in listed.candidates} <= set(CAPABLE)
        chosen = pick(
            strategy,
            M,
            index,
            PeerStats(),
            now=NOW,
            rng=random.Random(seed),
            requirements=case.requirements,
        )
        assert chosen is not None and chosen.peer_id in CAPABLE


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_without_requirements_the_attractive_peers_are_chosen(
    strategy: DistributionStrategy,
) -> None:
    # The control: the same views without requirements place on the incapable peers.
    index = view(CASES["all-three-each-fails-one"])
    chosen = pick(strategy, M, index, PeerStats(), now=NOW, rng=random.Random(0))
    assert chosen is not None and chosen.peer_id in {"a", "b", "c"}


def test_a_requirement_a_peer_fails_outranks_its_backoff() -> None:
    # Backing off passes with time; failing a requirement does not: waiting for the
    # backoff to end would be waiting for nothing.
    case = CASES["gpu-required"]
    stats = PeerStats()
    stats.failed("a", NOW)
    stats.failed("y", NOW)
    placement = place(
        DistributionStrategy.LEAST_LOADED,
        M,
        view(case),
        stats,
        now=NOW,
        rng=random.Random(0),
        requirements=case.requirements,
    )
    causes = {e.peer_id: e.cause for e in placement.excluded}
    assert causes == {"a": Exclusion.GPU, "b": Exclusion.GPU, "y": Exclusion.BACKING_OFF}
    assert [e.peer_id for e in placement.excluded if e.backing_off] == ["y"]


# --- the orchestrator ------------------------------------------------------------------


@dataclass
class FakeNetwork:
    """The node's transport, in memory: every peer answers after 10 ms and reports a
    load; probes say every incapable peer is idle and the capable ones are not."""

    failures: dict[str, int] = field(default_factory=dict)  # peer: calls that fail first
    calls: list[str] = field(default_factory=list)
    probes: list[str] = field(default_factory=list)

    async def send(
        self, peer_id: str, request: InferenceRequest, timeout: float
    ) -> InferenceResult:
        self.calls.append(peer_id)
        await trio.sleep(0.01)
        if self.failures.get(peer_id, 0) > 0:
            self.failures[peer_id] -= 1
            raise JobError(ErrorCode.PEER_UNREACHABLE, "scripted", peer=peer_id)
        return InferenceResult(
            job_id=request.job_id,
            model_id=request.model_id,
            outputs={"label": np.zeros(1, dtype=np.int64)},
            executor=peer_id,
            queue_ms=0.0,
            compute_ms=10.0,
            load=0 if peer_id not in CAPABLE else 2,
        )

    async def run_local(self, request: InferenceRequest) -> InferenceResult:
        raise AssertionError("no peer here is local")

    async def probe(self, peer_id: str, timeout: float) -> int:
        self.probes.append(peer_id)
        await trio.sleep(0.001)
        return 0 if peer_id not in CAPABLE else 3


def orchestrator(index: NodeIndex, network: FakeNetwork) -> DistributedModelOrchestrator:
    return DistributedModelOrchestrator(
        "coordinator",
        index=lambda: index,
        send=network.send,
        run_local=network.run_local,
        probe=network.probe,
        rng=random.Random(0),
    )


def request(requirements: Requirements) -> InferenceRequest:
    inputs = {"input": np.zeros((1, 64), dtype=np.float32)}
    return InferenceRequest(M, inputs, timeout=5.0, requirements=requirements)


@pytest.mark.parametrize(("strategy", "case"), table())
async def test_the_orchestrator_runs_only_on_peers_that_meet_the_requirements(
    strategy: DistributionStrategy, case: Case, autojump_clock: trio.testing.MockClock
) -> None:
    network = FakeNetwork()
    coordinator = orchestrator(view(case), network)
    with trio.fail_after(30):
        for _ in range(8):
            result = await coordinator.run_distributed_inference(
                request(case.requirements), strategy
            )
            assert result.executor in CAPABLE
        await coordinator.run_distributed_inference(
            request(case.requirements), strategy, hedge=True
        )
    assert network.calls and set(network.calls) <= set(CAPABLE)
    assert set(network.probes) <= set(CAPABLE)


@pytest.mark.parametrize(("strategy", "case"), table())
async def test_no_peer_meets_the_requirements(
    strategy: DistributionStrategy, case: Case, autojump_clock: trio.testing.MockClock
) -> None:
    network = FakeNetwork()
    coordinator = orchestrator(NodeIndex(case.incapable), network)
    with trio.fail_after(10):
        start = trio.current_time()
        with pytest.raises(JobError) as caught:
            await coordinator.run_distributed_inference(request(case.requirements), strategy)
        assert trio.current_time() == start  # nothing to wait for
    assert caught.value.code is ErrorCode.NO_CAPABLE_PEER
    for peer, (_, reason) in case.causes.items():
        assert f"{peer}: {reason}" in caught.value.message
    assert network.calls == []


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_the_capable_peer_backing_off_is_waited_for(
    strategy: DistributionStrategy, autojump_clock: trio.testing.MockClock
) -> None:
    # The one capable peer fails once and backs off; the incapable ones stay out, and
    # the orchestrator waits for the backoff (a structured status) to end.
    case = CASES["gpu-required"]
    network = FakeNetwork(failures={"z": 1})
    coordinator = orchestrator(NodeIndex([*case.incapable, capable("z")]), network)
    with trio.fail_after(10):
        result = await coordinator.run_distributed_inference(request(case.requirements), strategy)
    assert result.executor == "z"
    assert network.calls == ["z", "z"]
