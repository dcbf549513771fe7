"""DistributedModelOrchestrator over an in-memory fake network, in virtual time."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pytest
import trio
import trio.testing

from scheduler import (
    DistributedModelOrchestrator,
    DistributionStrategy,
    ErrorCode,
    GpuNeed,
    InferenceRequest,
    InferenceResult,
    JobError,
    NodeIndex,
    NodeInfo,
    OrchestratorConfig,
    Requirements,
    get_distributed_orchestrator,
    majority_vote,
    mean,
)

M = "digits-mlp"
LOCAL = "local"
INPUTS = {"input": np.zeros((1, 64), dtype=np.float32)}
CONFIG = OrchestratorConfig()
HEDGE = CONFIG.hedge_delay_s
T = TypeVar("T")

LEAST = DistributionStrategy.LEAST_LOADED
LATENCY = DistributionStrategy.LATENCY_OPTIMIZED
CAPABILITY = DistributionStrategy.CAPABILITY_BASED


# --- the fake network ------------------------------------------------------------------


@dataclass(frozen=True)
class Ok:
    """Answer after `delay` seconds."""

    delay: float = 0.01
    label: int = 0
    load: int | None = None  # what the answer reports of the peer's load


@dataclass(frozen=True)
class Fail:
    """Raise JobError(`code`) after `delay` seconds."""

    code: ErrorCode
    delay: float = 0.01


@dataclass(frozen=True)
class Hang:
    """Never answer."""


HANG = Hang()
Outcome = Ok | Fail | Hang
# A script is played one outcome per call, the last one repeating; a function is asked
# on every call (it may read trio.current_time()).
Behaviour = Sequence[Outcome] | Callable[[InferenceRequest], Outcome]


@dataclass
class Call:
    peer: str
    job_id: str
    model_id: str
    via: str  # "send" or "local"
    started: float
    timeout: float | None
    ended: float | None = None
    cancelled: bool = False


@dataclass
class FakePeers:
    """Stands in for the node's transport: the `send` and `run_local` the orchestrator takes."""

    local_peer_id: str
    behaviour: Mapping[str, Behaviour]
    calls: list[Call] = field(default_factory=list)
    # What a probe of each peer answers (a load, or an Outcome-like Fail / Hang), after
    # `probe_delay` seconds; every probe is noted in `probes` as (peer, time asked).
    loads: Mapping[str, int | Fail | Hang | Exception] = field(default_factory=dict)
    probe_delay: float = 0.001
    probes: list[tuple[str, float]] = field(default_factory=list)
    _played: dict[str, int] = field(default_factory=dict)

    async def probe(self, peer_id: str, timeout: float) -> int:
        self.probes.append((peer_id, trio.current_time()))
        answer = self.loads[peer_id]
        if isinstance(answer, Hang):
            await trio.sleep_forever()
        await trio.sleep(self.probe_delay)
        if isinstance(answer, Fail):
            raise JobError(answer.code, "scripted probe failure", peer=peer_id)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def send(
        self, peer_id: str, request: InferenceRequest, timeout: float
    ) -> InferenceResult:
        assert peer_id != self.local_peer_id, "the local node is run, never sent to"
        return await self._serve(peer_id, request, "send", timeout)

    async def run_local(self, request: InferenceRequest) -> InferenceResult:
        return await self._serve(self.local_peer_id, request, "local", None)

    def peers(self) -> list[str]:
        return [c.peer for c in self.calls]

    def _next(self, peer_id: str, request: InferenceRequest) -> Outcome:
        behaviour = self.behaviour[peer_id]
        if callable(behaviour):
            return behaviour(request)
        turn = self._played.get(peer_id, 0)
        self._played[peer_id] = turn + 1
        return behaviour[min(turn, len(behaviour) - 1)]

    async def _serve(
        self, peer_id: str, request: InferenceRequest, via: str, timeout: float | None
    ) -> InferenceResult:
        call = Call(peer_id, request.job_id, request.model_id, via, trio.current_time(), timeout)
        self.calls.append(call)
        outcome = self._next(peer_id, request)
        try:
            if isinstance(outcome, Hang):
                await trio.sleep_forever()
            assert isinstance(outcome, Ok | Fail)
            await trio.sleep(outcome.delay)
            if isinstance(outcome, Fail):
                raise JobError(outcome.code, f"scripted {outcome.code.name}", peer=peer_id)
            return InferenceResult(
                job_id=request.job_id,
                model_id=request.model_id,
                outputs={"label": np.array([outcome.label], dtype=np.int64)},
                executor=peer_id,
                queue_ms=0.0,
                compute_ms=outcome.delay * 1e3,
                load=outcome.load,
            )
        except trio.Cancelled:
            call.cancelled = True
            raise
        finally:
            call.ended = trio.current_time()


def node(
    peer: str,
    *,
    models: Sequence[str] = (M,),
    in_flight: int = 0,
    free_mb: int = 4096,
    gpus: int = 0,
    latency_ms: float | None = None,
) -> NodeInfo:
    return NodeInfo(
        peer_id=peer,
        models_loaded=frozenset(models),
        in_flight=in_flight,
        memory_available_mb=free_mb,
        gpu_count=gpus,
        latency_ms={} if latency_ms is None else {m: latency_ms for m in models},
        is_local=peer == LOCAL,
    )


def setup(
    nodes: Sequence[NodeInfo],
    behaviour: Mapping[str, Behaviour],
    *,
    config: OrchestratorConfig = CONFIG,
    seed: int = 0,
    loads: Mapping[str, int | Fail | Hang | Exception] | None = None,
    probe_delay: float = 0.001,
) -> tuple[DistributedModelOrchestrator, FakePeers]:
    """With `loads`, the orchestrator probes (FakePeers.probe); without, it cannot."""
    fake = FakePeers(LOCAL, behaviour, loads=loads or {}, probe_delay=probe_delay)
    orchestrator = DistributedModelOrchestrator(
        LOCAL,
        index=lambda: NodeIndex(nodes),
        send=fake.send,
        run_local=fake.run_local,
        probe=fake.probe if loads is not None else None,
        config=config,
        rng=random.Random(seed),
    )
    return orchestrator, fake


def request(model_id: str = M, *, timeout: float = 5.0, **kwargs: object) -> InferenceRequest:
    return InferenceRequest(model_id, INPUTS, timeout=timeout, **kwargs)  # type: ignore[arg-type]


def all_idle(orchestrator: DistributedModelOrchestrator, fake: FakePeers) -> bool:
    return all(orchestrator.stats.outstanding(p) == 0 for p in fake.behaviour)


def run_in_virtual_time(scenario: Callable[[], Awaitable[T]]) -> T:
    """trio.run with an autojump clock, so that the error itself (not pytest-trio's
    ExceptionGroup around it) reaches the test."""
    return trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


# --- where a request runs --------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(DistributionStrategy))
async def test_the_local_node_runs_what_it_ranks_best(
    strategy: DistributionStrategy, autojump_clock: trio.testing.MockClock
) -> None:
    # "local" sorts before "remote" (round robin's first turn) and is idle, roomier and loaded
    nodes = [
        NodeInfo(LOCAL, frozenset({M}), cpu_count=8, memory_available_mb=8192, is_local=True),
        NodeInfo("remote", frozenset(), frozenset({M}), in_flight=4, latency_ms={M: 50.0}),
    ]
    orchestrator, fake = setup(nodes, {LOCAL: [Ok()], "remote": [Ok()]})
    with trio.fail_after(10):
        result = await orchestrator.run_distributed_inference(request(), strategy)
    assert result.executor == LOCAL
    assert [(c.peer, c.via) for c in fake.calls] == [(LOCAL, "local")]


@pytest.mark.parametrize(
    "code",
    [
        pytest.param(ErrorCode.PEER_UNREACHABLE, id="peer-unreachable"),
        pytest.param(ErrorCode.INTERNAL, id="internal"),
        pytest.param(ErrorCode.SHUTTING_DOWN, id="shutting-down"),
        pytest.param(ErrorCode.DEADLINE_EXCEEDED, id="peer-deadline-exceeded"),
    ],
)
async def test_a_retryable_failure_fails_over_and_backs_the_peer_off(
    code: ErrorCode, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = [node("a"), node("b", in_flight=1)]  # a ranks first while it is healthy
    orchestrator, fake = setup(nodes, {"a": [Fail(code, delay=0.1)], "b": [Ok()]})
    with trio.fail_after(30):
        start = trio.current_time()
        first = await orchestrator.run_distributed_inference(request(timeout=5.0))
        assert first.executor == "b"
        assert fake.peers() == ["a", "b"]
        assert fake.calls[0].timeout == pytest.approx(5.0)
        assert fake.calls[1].timeout == pytest.approx(5.0 - 0.1)  # what is left of the deadline
        assert fake.calls[1].started == pytest.approx(start + 0.1)  # no wait before failing over

        second = await orchestrator.run_distributed_inference(request())
        assert second.executor == "b"
        assert fake.peers() == ["a", "b", "b"]  # a is backing off

        await trio.sleep(CONFIG.stats.backoff_base_s)
        third = await orchestrator.run_distributed_inference(request())
        assert third.executor == "b"
        assert fake.peers() == ["a", "b", "b", "a", "b"]  # a's backoff ran out: tried first again
    assert all_idle(orchestrator, fake)


@pytest.mark.parametrize(
    "code",
    [
        pytest.param(ErrorCode.INVALID_INPUT, id="invalid-input"),
        pytest.param(ErrorCode.UNKNOWN_MODEL, id="unknown-model"),
        pytest.param(ErrorCode.MALFORMED_MESSAGE, id="malformed-message"),
        pytest.param(ErrorCode.MESSAGE_TOO_LARGE, id="message-too-large"),
    ],
)
async def test_a_non_retryable_error_comes_back_at_once(
    code: ErrorCode, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = [node("a"), node("b", in_flight=1), node("c", in_flight=2)]
    orchestrator, fake = setup(nodes, {p: [Fail(code, delay=0.2)] for p in "abc"})
    with trio.fail_after(30):
        start = trio.current_time()
        with pytest.raises(JobError) as caught:
            await orchestrator.run_distributed_inference(request())
        assert trio.current_time() - start == pytest.approx(0.2)
    assert caught.value.code is code
    assert len(fake.calls) == 1
    assert all_idle(orchestrator, fake)


def test_a_callers_invalid_input_does_not_back_the_peer_off() -> None:
    nodes = [node("a")]
    orchestrator, _ = setup(nodes, {"a": [Fail(ErrorCode.INVALID_INPUT), Ok()]})

    async def scenario() -> None:
        with trio.fail_after(30):
            with pytest.raises(JobError):
                await orchestrator.run_distributed_inference(request())
            assert orchestrator.stats.backoff_until("a") <= trio.current_time()
            start = trio.current_time()
            await orchestrator.run_distributed_inference(request())
            assert trio.current_time() - start == pytest.approx(0.01)  # no wait for a backoff

    run_in_virtual_time(scenario)


@pytest.mark.parametrize(
    ("peers", "max_attempts"),
    [
        pytest.param(5, 1, id="one-attempt"),
        pytest.param(5, 2, id="two-attempts"),
        pytest.param(5, 3, id="default-three"),
        pytest.param(2, 3, id="two-peers-one-retried-after-backoff"),
        pytest.param(200, 3, id="a-large-view-drawn-from"),
    ],
)
async def test_at_most_max_attempts_peers_are_tried(
    peers: int, max_attempts: int, autojump_clock: trio.testing.MockClock
) -> None:
    names = [f"p{i}" for i in range(peers)]
    nodes = [node(p, in_flight=i) for i, p in enumerate(names)]
    unreachable: list[Outcome] = [Fail(ErrorCode.PEER_UNREACHABLE)]
    config = OrchestratorConfig(max_attempts=max_attempts)
    orchestrator, fake = setup(nodes, dict.fromkeys(names, unreachable), config=config)
    with trio.fail_after(60):
        with pytest.raises(JobError) as caught:
            await orchestrator.run_distributed_inference(request(timeout=30.0))
    assert caught.value.code is ErrorCode.PEER_UNREACHABLE
    assert len(fake.calls) == max_attempts
    if peers > max_attempts:
        assert len(set(fake.peers())) == max_attempts  # never the same peer twice
    assert all_idle(orchestrator, fake)


# --- when nothing can run it -----------------------------------------------------------


async def test_no_peer_serves_the_model(autojump_clock: trio.testing.MockClock) -> None:
    nodes = [node("a", models=("iris-tree",)), node("b", models=("wine-svm", "iris-tree"))]
    orchestrator, fake = setup(nodes, {"a": [Ok()], "b": [Ok()]})
    with trio.fail_after(10):
        start = trio.current_time()
        with pytest.raises(JobError) as caught:
            await orchestrator.run_distributed_inference(request("sentiment"))
        assert trio.current_time() == start
    assert caught.value.code is ErrorCode.NO_CAPABLE_PEER
    assert "'sentiment'" in caught.value.message
    assert "['iris-tree', 'wine-svm']" in caught.value.message
    assert fake.calls == []


@pytest.mark.parametrize(
    ("requirements", "expected_reasons"),
    [
        pytest.param(
            Requirements(min_memory_mb=8192),
            ["a: 1024 MB free < 8192 MB required", "b: 2048 MB free < 8192 MB required"],
            id="not-enough-memory",
        ),
        pytest.param(
            Requirements(gpu=GpuNeed.REQUIRED),
            ["a: no GPU, and the request requires one", "b: no GPU, and the request requires one"],
            id="no-gpu",
        ),
        pytest.param(
            Requirements(provider="CUDAExecutionProvider"),
            ["a: no CUDAExecutionProvider", "b: no CUDAExecutionProvider"],
            id="no-provider",
        ),
    ],
)
async def test_capability_based_with_a_requirement_no_node_meets(
    requirements: Requirements,
    expected_reasons: list[str],
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = [node("a", free_mb=1024), node("b", free_mb=2048)]
    orchestrator, fake = setup(nodes, {"a": [Ok()], "b": [Ok()]})
    with trio.fail_after(10):
        start = trio.current_time()
        with pytest.raises(JobError) as caught:
            await orchestrator.run_distributed_inference(
                request(requirements=requirements), CAPABILITY
            )
        assert trio.current_time() == start
    assert caught.value.code is ErrorCode.NO_CAPABLE_PEER
    for reason in expected_reasons:
        assert reason in caught.value.message
    assert fake.calls == []


@pytest.mark.parametrize(
    "nodes",
    [
        pytest.param([node("a", gpus=1)], id="only-the-capable-peer"),
        pytest.param(
            [node("a", gpus=1), node("b")],
            id="beside-an-incapable-peer",
        ),
    ],
)
def test_a_transient_failure_of_the_capable_peer_is_retried(nodes: list[NodeInfo]) -> None:
    behaviour: dict[str, Behaviour] = {"a": [Fail(ErrorCode.PEER_UNREACHABLE), Ok()], "b": [Ok()]}
    orchestrator, fake = setup(nodes, behaviour)
    needs = Requirements(gpu=GpuNeed.REQUIRED)

    async def scenario() -> InferenceResult:
        with trio.fail_after(10):
            return await orchestrator.run_distributed_inference(
                request(requirements=needs), CAPABILITY
            )

    result = run_in_virtual_time(scenario)
    assert result.executor == "a"
    assert fake.peers() == ["a", "a"]


# --- overload and deadlines ------------------------------------------------------------


def overloaded_until(t: float) -> Callable[[InferenceRequest], Outcome]:
    def behaviour(request: InferenceRequest) -> Outcome:
        return Ok() if trio.current_time() >= t else Fail(ErrorCode.OVERLOADED, delay=0.0)

    return behaviour


@pytest.mark.parametrize(
    ("b_recovers_after", "expected_executor"),
    [
        pytest.param(math.inf, None, id="all-stay-overloaded"),
        pytest.param(1.0, "b", id="one-recovers-mid-wait"),
    ],
)
async def test_every_peer_overloaded(
    b_recovers_after: float,
    expected_executor: str | None,
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    nodes = [node("a"), node("b", in_flight=1)]
    behaviour = {"a": overloaded_until(math.inf), "b": overloaded_until(start + b_recovers_after)}
    orchestrator, fake = setup(nodes, behaviour)
    with trio.fail_after(30):
        if expected_executor is None:
            with pytest.raises(JobError) as caught:
                await orchestrator.run_distributed_inference(request(timeout=2.0))
            assert caught.value.code is ErrorCode.OVERLOADED
            assert "digits-mlp" in caught.value.message
            assert trio.current_time() - start == pytest.approx(2.0)
        else:
            result = await orchestrator.run_distributed_inference(request(timeout=2.0))
            assert result.executor == expected_executor
            elapsed = trio.current_time() - start
            assert b_recovers_after <= elapsed <= b_recovers_after + 0.1
    assert {"a", "b"} <= set(fake.peers())
    assert len(fake.calls) > 4  # it kept trying while it waited
    assert all_idle(orchestrator, fake)


@pytest.mark.parametrize(
    ("behaviour", "expected_calls", "last_error"),
    [
        pytest.param({"a": [HANG]}, ["a"], None, id="the-only-peer-hangs"),
        pytest.param(
            {"a": [Fail(ErrorCode.PEER_UNREACHABLE)], "b": [HANG]},
            ["a", "b"],
            "PEER_UNREACHABLE",
            id="fail-over-to-a-hanging-peer",
        ),
    ],
)
async def test_a_hanging_peer_meets_the_deadline(
    behaviour: dict[str, Behaviour],
    expected_calls: list[str],
    last_error: str | None,
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = [node("a"), node("b", in_flight=1)][: len(behaviour)]
    orchestrator, fake = setup(nodes, behaviour)
    with trio.fail_after(30):
        start = trio.current_time()
        with pytest.raises(JobError) as caught:
            await orchestrator.run_distributed_inference(request(timeout=1.5))
        assert trio.current_time() - start == pytest.approx(1.5)
    assert caught.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert ("last error" in caught.value.message) is (last_error is not None)
    if last_error:
        assert last_error in caught.value.message
    assert fake.peers() == expected_calls
    assert fake.calls[-1].cancelled
    assert all_idle(orchestrator, fake)


# --- hedging ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "hedge", "expected_executor", "expected_calls", "elapsed"),
    [
        pytest.param(
            Ok(delay=1.0),
            True,
            "b",
            [("a", 0.0, True), ("b", HEDGE, False)],
            HEDGE + 0.01,
            id="slow-first-is-hedged-and-cancelled",
        ),
        pytest.param(
            Ok(delay=1.0), False, "a", [("a", 0.0, False)], 1.0, id="no-hedge-waits-for-first"
        ),
        pytest.param(
            Ok(delay=0.01), True, "a", [("a", 0.0, False)], 0.01, id="fast-first-needs-no-hedge"
        ),
        pytest.param(
            Fail(ErrorCode.PEER_UNREACHABLE, delay=0.01),
            True,
            "b",
            [("a", 0.0, False), ("b", 0.01, False)],
            0.02,
            id="failed-first-starts-the-hedge-at-once",
        ),
    ],
)
async def test_hedging(
    first: Outcome,
    hedge: bool,
    expected_executor: str,
    expected_calls: list[tuple[str, float, bool]],
    elapsed: float,
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = [node("a"), node("b", in_flight=1)]
    orchestrator, fake = setup(nodes, {"a": [first], "b": [Ok(delay=0.01)]})
    with trio.fail_after(30):
        start = trio.current_time()
        result = await orchestrator.run_distributed_inference(request(), hedge=hedge)
        assert trio.current_time() - start == pytest.approx(elapsed)
    assert result.executor == expected_executor
    calls = [(c.peer, round(c.started - start, 6), c.cancelled) for c in fake.calls]
    assert calls == expected_calls  # (peer, started after, cancelled)
    assert all_idle(orchestrator, fake)


async def test_the_hedge_delay_follows_the_observed_p95(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = [node("a"), node("b", in_flight=1)]
    orchestrator, fake = setup(nodes, {"a": [Ok(delay=0.2)] * 20 + [Ok(delay=5.0)], "b": [Ok()]})
    with trio.fail_after(60):
        for _ in range(20):
            await orchestrator.run_distributed_inference(request())
        start = trio.current_time()
        result = await orchestrator.run_distributed_inference(request(), hedge=True)
    assert result.executor == "b"
    assert fake.calls[-1].peer == "b"
    assert fake.calls[-1].started - start == pytest.approx(0.2)


# --- counters --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "hedge", "cancel_after"),
    [
        pytest.param({"a": [Ok()], "b": [Ok()]}, False, math.inf, id="success"),
        pytest.param(
            {"a": [Fail(ErrorCode.PEER_UNREACHABLE)], "b": [Fail(ErrorCode.INTERNAL)]},
            False,
            math.inf,
            id="retryable-failures",
        ),
        pytest.param(
            {"a": [Fail(ErrorCode.INVALID_INPUT)], "b": [Ok()]}, False, math.inf, id="invalid"
        ),
        pytest.param({"a": [HANG], "b": [HANG]}, False, math.inf, id="deadline"),
        pytest.param({"a": [Ok(delay=1.0)], "b": [Ok()]}, True, math.inf, id="hedge-loser"),
        pytest.param({"a": [HANG], "b": [HANG]}, True, 0.5, id="caller-cancels"),
    ],
)
async def test_outstanding_returns_to_zero(
    behaviour: dict[str, Behaviour],
    hedge: bool,
    cancel_after: float,
    autojump_clock: trio.testing.MockClock,
) -> None:
    orchestrator, fake = setup([node("a"), node("b", in_flight=1)], behaviour)
    in_flight: list[int] = []

    async def run() -> None:
        with trio.move_on_after(cancel_after), contextlib.suppress(JobError):
            await orchestrator.run_distributed_inference(request(timeout=2.0), hedge=hedge)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await trio.sleep(0.005)
            in_flight.append(orchestrator.stats.outstanding("a"))
    assert in_flight == [1]  # the counter did count the request while it ran
    assert all_idle(orchestrator, fake)


# --- fresh load: what answers report, and probes ------------------------------------


@pytest.mark.parametrize(
    "strategy", [LEAST, LATENCY, DistributionStrategy.MODEL_SPECIFIC, CAPABILITY]
)
async def test_a_probe_overrules_a_stale_view(
    strategy: DistributionStrategy, autojump_clock: trio.testing.MockClock
) -> None:
    # The view (a record from a while ago) says a is the less busy; the probes say b is.
    nodes = [node("a", in_flight=2, latency_ms=10.0), node("b", in_flight=3, latency_ms=10.0)]
    orchestrator, fake = setup(nodes, {"a": [Ok()], "b": [Ok()]}, loads={"a": 9, "b": 0})
    with trio.fail_after(10):
        result = await orchestrator.run_distributed_inference(request(), strategy)
    assert result.executor == "b"
    assert sorted(p for p, _ in fake.probes) == ["a", "b"]  # both asked, concurrently:
    assert {t for _, t in fake.probes} == {fake.probes[0][1]}
    assert fake.calls[0].started == pytest.approx(fake.probes[0][1] + fake.probe_delay)


async def test_round_robin_does_not_rank_by_load_and_never_probes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Heavy requests and queues: the other strategies would probe here (the test above).
    nodes = [node("a", in_flight=2, latency_ms=10.0), node("b", in_flight=3, latency_ms=10.0)]
    orchestrator, fake = setup(nodes, {"a": [Ok()], "b": [Ok()]}, loads={"a": 9, "b": 0})
    with trio.fail_after(10):
        await orchestrator.run_distributed_inference(request(), DistributionStrategy.ROUND_ROBIN)
    assert fake.probes == []


async def test_no_probe_when_the_wait_it_could_save_is_shorter_than_its_round_trip(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Heavy requests, but a is idle: nothing to gain from asking.
    nodes = [node("a", latency_ms=10.0), node("b", in_flight=3, latency_ms=10.0)]
    orchestrator, fake = setup(nodes, {"a": [Ok()], "b": [Ok()]}, loads={"a": 9, "b": 0})
    with trio.fail_after(10):
        result = await orchestrator.run_distributed_inference(request())
    assert (result.executor, fake.probes) == ("a", [])


async def test_light_requests_are_never_probed_for(autojump_clock: trio.testing.MockClock) -> None:
    # Long queues, but each request computes for 0.1 ms: less than a probe would cost.
    nodes = [node("a", in_flight=5), node("b", in_flight=5)]
    light: list[Outcome] = [Ok(delay=0.0001)]
    orchestrator, fake = setup(nodes, {"a": light, "b": light}, loads={"a": 5, "b": 5})
    with trio.fail_after(10):
        for _ in range(10):
            await orchestrator.run_distributed_inference(request())
    assert orchestrator.stats.compute_ms(M) == pytest.approx(0.1)
    assert fake.probes == []


async def test_probing_stops_where_its_round_trip_costs_more_than_it_saves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Every peer holds 2 requests of 10 ms (the prior) each: a 20 ms wait. Probes that
    # take 40 ms teach the orchestrator that they cost more than that.
    nodes = [node("a", in_flight=2), node("b", in_flight=2)]
    behaviour: dict[str, Behaviour] = {"a": [Ok(load=2)], "b": [Ok(load=2)]}
    orchestrator, fake = setup(nodes, behaviour, loads={"a": 2, "b": 2}, probe_delay=0.04)
    with trio.fail_after(60):
        for _ in range(20):
            await orchestrator.run_distributed_inference(request())
        probed = len(fake.probes)
        assert 2 <= probed < 20
        assert fake.probes[-1][1] < fake.calls[10].started  # it stopped, and stayed stopped
        await trio.sleep(CONFIG.probe_refresh_s)
        for _ in range(5):
            await orchestrator.run_distributed_inference(request())
    assert len(fake.probes) == probed + 2  # after a while, one probe round re-measures


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(HANG, id="hangs"),
        pytest.param(Fail(ErrorCode.PEER_UNREACHABLE), id="fails"),
        pytest.param(RuntimeError("a bug in the probe"), id="crashes"),
    ],
)
async def test_a_probe_that_fails_or_hangs_leaves_the_estimate(
    answer: Fail | Hang | Exception, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = [node("a", in_flight=2, latency_ms=10.0), node("b", in_flight=3, latency_ms=10.0)]
    orchestrator, fake = setup(nodes, {"a": [Ok()], "b": [Ok()]}, loads={"a": answer, "b": 9})
    with trio.fail_after(10):
        start = trio.current_time()
        result = await orchestrator.run_distributed_inference(request())
    assert sorted(p for p, _ in fake.probes) == ["a", "b"]
    assert result.executor == "a"  # b said 9; a keeps the view's 2
    assert fake.calls[0].started <= start + CONFIG.probe_timeout_s
    assert orchestrator.stats.reported_load("b") == (pytest.approx(start + 0.001), 9)
    assert orchestrator.stats.reported_load("a") is None


async def test_each_answer_reports_the_peers_load(autojump_clock: trio.testing.MockClock) -> None:
    # a looks idle in the view, but its answer says 6 others' requests wait there now.
    nodes = [node("a"), node("b", in_flight=1)]
    orchestrator, _ = setup(nodes, {"a": [Ok(load=6)], "b": [Ok()]})
    with trio.fail_after(10):
        first = await orchestrator.run_distributed_inference(request())
        at = trio.current_time()
        second = await orchestrator.run_distributed_inference(request())
    assert (first.executor, second.executor) == ("a", "b")
    assert orchestrator.stats.reported_load("a") == (at, 6)


# --- several models at once ------------------------------------------------------------


async def test_parallel_inference_reports_a_partial_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = [node("p1", models=("m1",)), node("p2", models=("m2",)), node("p3", models=("m3",))]
    behaviour: dict[str, Behaviour] = {
        "p1": [Ok(delay=0.3, label=1)],
        "p2": [Fail(ErrorCode.UNKNOWN_MODEL, delay=0.1)],
        "p3": [Ok(delay=0.2, label=3)],
    }
    orchestrator, fake = setup(nodes, behaviour)
    req = request("m1", job_id="job")
    with trio.fail_after(10):
        start = trio.current_time()
        parallel = await orchestrator.run_distributed_parallel_inference(req, ["m3", "m2", "m1"])
        assert trio.current_time() - start == pytest.approx(0.3)  # concurrently, not in turn
    assert [o.model_id for o in parallel.outcomes] == ["m3", "m2", "m1"]
    assert [r.executor for r in parallel.results()] == ["p3", "p1"]
    assert [r.job_id for r in parallel.results()] == ["job/m3", "job/m1"]
    assert list(parallel.errors()) == ["m2"]
    assert parallel.errors()["m2"].code is ErrorCode.UNKNOWN_MODEL
    assert parallel.outcomes[1].result is None
    assert sorted(c.model_id for c in fake.calls) == ["m1", "m2", "m3"]


def result_with(**outputs: object) -> InferenceResult:
    return InferenceResult(
        job_id="j",
        model_id=M,
        outputs={k: np.asarray(v) for k, v in outputs.items()},
        executor="a",
        queue_ms=0.0,
        compute_ms=1.0,
    )


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        pytest.param([[3]], [3], id="one-model"),
        pytest.param([[2], [2], [2]], [2], id="unanimous"),
        pytest.param([[1], [4], [4]], [4], id="majority"),
        pytest.param([[7], [2]], [2], id="tie-goes-to-smallest"),
        pytest.param([[5], [3], [9]], [3], id="three-way-tie-smallest"),
        pytest.param([[0, 1, 2], [0, 2, 2], [1, 2, 0]], [0, 2, 2], id="per-row"),
    ],
)
def test_majority_vote(labels: list[list[int]], expected: list[int]) -> None:
    results = [result_with(label=np.array(row, dtype=np.int64)) for row in labels]
    assert majority_vote(results).tolist() == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param([[1.0, 2.0]], [1.0, 2.0], id="one-model"),
        pytest.param([[0.0, 3.0], [3.0, 6.0], [6.0, 0.0]], [3.0, 3.0], id="three-vectors"),
        pytest.param(
            [[[1, 2], [3, 4]], [[3, 4], [5, 6]], [[5, 6], [7, 8]]],
            [[3.0, 4.0], [5.0, 6.0]],
            id="three-int-matrices",
        ),
    ],
)
def test_mean(values: list[object], expected: list[object]) -> None:
    results = [result_with(score=v) for v in values]
    got = mean(results, "score")
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, np.asarray(expected))


@pytest.mark.parametrize(
    "combine",
    [
        pytest.param(lambda rs: majority_vote(rs), id="majority-vote"),
        pytest.param(lambda rs: mean(rs, "score"), id="mean"),
    ],
)
def test_combining_nothing_is_an_error(combine: Callable[[list[InferenceResult]], object]) -> None:
    with pytest.raises(ValueError, match="at least one result"):
        combine([])


# --- the context's orchestrator --------------------------------------------------------


def test_get_distributed_orchestrator() -> None:
    with pytest.raises(LookupError, match="no node is running"):
        get_distributed_orchestrator()
    orchestrator, _ = setup([node("a")], {"a": [Ok()]})
    token = orchestrator.activate()
    try:
        assert get_distributed_orchestrator() is orchestrator
    finally:
        orchestrator.deactivate(token)
    with pytest.raises(LookupError):
        get_distributed_orchestrator()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"shortlist": 1}, "shortlist must be >= 2", id="shortlist-of-one"),
        pytest.param({"max_attempts": 0}, "max_attempts must be >= 1", id="no-attempts"),
    ],
)
def test_a_config_that_cannot_work_is_refused(changes: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OrchestratorConfig(**changes)  # type: ignore[arg-type]
