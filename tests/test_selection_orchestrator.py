"""EnhancedModelOrchestrator over an in-memory fake network, in virtual time:
early stopping, quorums, timeouts, cascades and feedback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import trio
import trio.testing

from gossip import ModelDescriptor, TensorSpec
from scheduler import (
    DistributedModelOrchestrator,
    ErrorCode,
    InferenceRequest,
    InferenceResult,
    JobError,
    NodeIndex,
    NodeInfo,
)
from selection import (
    AdvancedModelSelectionStrategy,
    CatalogEntry,
    EnhancedModelOrchestrator,
    ModelCatalog,
    ModelStatus,
    get_enhanced_orchestrator,
)

TASK = "image-classification"
INPUTS = {"input": np.zeros((4, 64), dtype=np.float32)}


@dataclass
class Behaviour:
    """How a fake model answers: after `delay` s, `label` for every row and the
    per-row top probability `confidence` (or fail with `fail`)."""

    delay: float
    label: int = 0
    confidence: Callable[[np.ndarray], np.ndarray] | None = None
    fail: ErrorCode | None = None


@dataclass
class FakeNetwork:
    """One peer per model. Records every request sent, and which were cancelled."""

    models: dict[str, Behaviour]
    sent: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)

    def index(self) -> NodeIndex:
        return NodeIndex([NodeInfo(f"peer-{m}", frozenset({m})) for m in self.models])

    async def send(self, peer: str, request: InferenceRequest, timeout: float) -> InferenceResult:
        behaviour = self.models[request.model_id]
        self.sent.append(request.model_id)
        x = np.asarray(request.inputs["input"])
        self.rows[request.model_id] = self.rows.get(request.model_id, 0) + len(x)
        try:
            await trio.sleep(behaviour.delay)
        except trio.Cancelled:
            self.cancelled.append(request.model_id)
            raise
        if behaviour.fail is not None:
            raise JobError(behaviour.fail, "fake failure", peer=peer)
        confidence = np.ones(len(x)) if behaviour.confidence is None else behaviour.confidence(x)
        probabilities = np.stack([confidence, 1 - confidence], axis=1).astype(np.float32)
        return InferenceResult(
            request.job_id,
            request.model_id,
            {"label": np.full(len(x), behaviour.label), "probabilities": probabilities},
            peer,
            0.0,
            behaviour.delay * 1e3,
        )

    async def local(self, request: InferenceRequest) -> InferenceResult:
        raise AssertionError("no model runs locally in this fake")


def descriptor(model_id: str, accuracy: float, cost: float) -> ModelDescriptor:
    return ModelDescriptor(
        model_id,
        "1",
        "0" * 64,
        TASK,
        (),
        (),
        64,
        accuracy,
        cost,
        "",
        (TensorSpec("input", "float32", (None, 64)),),
        (TensorSpec("label", "int64", (None,)),),
    )


def orchestrator(
    network: FakeNetwork, accuracy: dict[str, tuple[float, float]] | None = None
) -> EnhancedModelOrchestrator:
    scheduler = DistributedModelOrchestrator("local", network.index, network.send, network.local)
    accuracy = accuracy or {m: (0.9, 1.0) for m in network.models}
    catalog = ModelCatalog(
        CatalogEntry(descriptor(m, a, c), (f"peer-{m}",)) for m, (a, c) in accuracy.items()
    )
    return EnhancedModelOrchestrator(scheduler, lambda: catalog)


def request(timeout: float = 60.0) -> InferenceRequest:
    return InferenceRequest("unused", INPUTS, timeout=timeout, job_id="job")


# --- run_optimized_parallel_inference -------------------------------------------------


async def test_early_stopping_returns_the_first_answer_and_cancels_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = FakeNetwork({"fast": Behaviour(0.1), "slow": Behaviour(5), "slower": Behaviour(9)})
    selector = orchestrator(network)
    with trio.fail_after(30):
        start = trio.current_time()
        out = await selector.run_optimized_parallel_inference(
            request(), ["fast", "slow", "slower"], early_stopping=True
        )
        took = trio.current_time() - start
    assert took == pytest.approx(0.1)
    assert out.answer is not None and out.answer.model_id == "fast"
    assert out.stopped_early
    assert out.status() == {
        "fast": ModelStatus.OK,
        "slow": ModelStatus.CANCELLED,
        "slower": ModelStatus.CANCELLED,
    }
    assert sorted(network.cancelled) == ["slow", "slower"]


async def test_a_quorum_waits_for_agreement_not_for_the_first_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = FakeNetwork(
        {
            "a": Behaviour(0.1, label=1),
            "b": Behaviour(0.2, label=2),
            "c": Behaviour(0.3, label=1),
            "d": Behaviour(7, label=1),
        }
    )
    with trio.fail_after(30):
        start = trio.current_time()
        out = await orchestrator(network).run_optimized_parallel_inference(
            request(), ["a", "b", "c", "d"], quorum=2
        )
        took = trio.current_time() - start
    assert took == pytest.approx(0.3)
    assert out.answer is not None
    assert out.answer.outputs["label"].tolist() == [1, 1, 1, 1]
    assert out.status()["d"] is ModelStatus.CANCELLED and network.cancelled == ["d"]


async def test_without_early_stopping_it_waits_for_all_until_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = FakeNetwork({"a": Behaviour(0.1), "b": Behaviour(0.5), "stuck": Behaviour(1e9)})
    with trio.fail_after(30):
        start = trio.current_time()
        out = await orchestrator(network).run_optimized_parallel_inference(
            request(), ["a", "b", "stuck"], early_stopping=False, timeout=2.0
        )
        took = trio.current_time() - start
    assert took == pytest.approx(2.0)
    assert not out.stopped_early
    assert out.status() == {
        "a": ModelStatus.OK,
        "b": ModelStatus.OK,
        "stuck": ModelStatus.TIMED_OUT,
    }
    assert out.answer is not None and out.answer.model_id == "a"
    assert [r.model_id for r in out.results()] == ["a", "b"]


async def test_failures_are_reported_per_model_and_nothing_is_raised(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = FakeNetwork(
        {"bad": Behaviour(0.1, fail=ErrorCode.INVALID_INPUT), "good": Behaviour(0.2)}
    )
    with trio.fail_after(30):
        out = await orchestrator(network).run_optimized_parallel_inference(
            request(), ["bad", "good"]
        )
    assert out.status() == {"bad": ModelStatus.FAILED, "good": ModelStatus.OK}
    failed = out.runs[0].error
    assert failed is not None and failed.code is ErrorCode.INVALID_INPUT
    assert out.answer is not None and out.answer.model_id == "good"


async def test_when_every_model_fails_there_is_no_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = FakeNetwork({"a": Behaviour(0.1, fail=ErrorCode.INVALID_INPUT)})
    with trio.fail_after(30):
        out = await orchestrator(network).run_optimized_parallel_inference(request(), ["a"])
    assert out.answer is None and out.status() == {"a": ModelStatus.FAILED}


@pytest.mark.parametrize(
    ("kwargs", "complaint"),
    [
        ({"model_ids": []}, "model_ids is empty"),
        ({"model_ids": ["a"], "quorum": 2}, "quorum must be in \\[1, 1\\]"),
        ({"model_ids": ["a"], "timeout": 0}, "timeout must be > 0"),
    ],
)
async def test_bad_fan_out_arguments_are_invalid_selection(
    kwargs: dict[str, object], complaint: str
) -> None:
    selector = orchestrator(FakeNetwork({"a": Behaviour(0.1)}))
    with trio.fail_after(5), pytest.raises(JobError, match=complaint) as caught:
        await selector.run_optimized_parallel_inference(request(), **kwargs)  # type: ignore[arg-type]
    assert caught.value.code is ErrorCode.INVALID_SELECTION


# --- cascades --------------------------------------------------------------------------


async def test_a_cascade_sends_only_unconfident_rows_to_the_stronger_model(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Rows whose first feature is 1 are hard for the cheap model.
    def unsure_on_marked_rows(x: np.ndarray) -> np.ndarray:
        return np.where(x[:, 0] == 1, 0.55, 0.99)

    network = FakeNetwork(
        {
            "cheap": Behaviour(0.01, label=3, confidence=unsure_on_marked_rows),
            "strong": Behaviour(0.5, label=7),
        }
    )
    selector = orchestrator(network, {"cheap": (0.95, 1.0), "strong": (0.99, 20.0)})
    x = np.zeros((5, 64), dtype=np.float32)
    x[[1, 3], 0] = 1
    with trio.fail_after(30):
        result = await selector.run_task(TASK, {"input": x}, strategy="hybrid", job_id="job-c")
    assert result.outputs["label"].tolist() == [3, 7, 3, 7, 3]
    assert result.route == (("cheap", 3), ("strong", 2))
    assert network.rows == {"cheap": 5, "strong": 2}
    assert selector.feedback("job-c", 1.0) == ("cheap", "strong")


async def test_a_confident_cascade_never_calls_the_strong_model(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = FakeNetwork({"cheap": Behaviour(0.01, label=3), "strong": Behaviour(0.5, label=7)})
    selector = orchestrator(network, {"cheap": (0.95, 1.0), "strong": (0.99, 20.0)})
    with trio.fail_after(30):
        result = await selector.run_task(TASK, INPUTS, context={"confidence": 0.9})
    assert result.route == (("cheap", 4),)
    assert network.sent == ["cheap"]
    assert result.model_id == "cheap"


async def test_a_single_model_strategy_runs_the_top_model_and_remembers_the_job(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = FakeNetwork({"a": Behaviour(0.01), "b": Behaviour(0.01)})
    selector = orchestrator(network, {"a": (0.8, 1.0), "b": (0.9, 1.0)})
    with trio.fail_after(30):
        result = await selector.run_task(TASK, INPUTS, strategy="multi_objective", job_id="j")
    assert result.model_id == "b" and result.route == (("b", 4),)
    assert selector.feedback("j", 0.0) == ("b",)
    learned = selector.tracker.describe()["b"]
    assert learned["len<=64"]["runs"] == 1 and learned["len<=64"]["quality"] == 0.0
    with pytest.raises(JobError) as caught:
        selector.feedback("never-ran", 1.0)
    assert caught.value.code is ErrorCode.UNKNOWN_JOB


async def test_the_callers_mistakes_teach_the_tracker_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = FakeNetwork({"a": Behaviour(0.01, fail=ErrorCode.INVALID_INPUT)})
    selector = orchestrator(network)
    with trio.fail_after(30), pytest.raises(JobError):
        await selector.run_task(TASK, INPUTS, strategy=AdvancedModelSelectionStrategy.ADAPTIVE)
    assert selector.tracker.describe() == {}


def test_outside_a_node_there_is_no_enhanced_orchestrator() -> None:
    with pytest.raises(LookupError, match="no node is running in this context"):
        get_enhanced_orchestrator()


async def test_a_cascade_stage_answering_the_wrong_number_of_rows_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class ShortAnswers(FakeNetwork):
        async def send(
            self, peer: str, request: InferenceRequest, timeout: float
        ) -> InferenceResult:
            result = await super().send(peer, request, timeout)
            return InferenceResult(
                result.job_id,
                result.model_id,
                {k: np.asarray(v)[:1] for k, v in result.outputs.items()},
                peer,
                0.0,
                1.0,
            )

    network = ShortAnswers({"cheap": Behaviour(0.01), "strong": Behaviour(0.5)})
    selector = orchestrator(network, {"cheap": (0.95, 1.0), "strong": (0.99, 20.0)})
    with trio.fail_after(30), pytest.raises(JobError, match="for 4 rows") as caught:
        await selector.run_task(TASK, INPUTS, strategy="hybrid")
    assert caught.value.code is ErrorCode.MALFORMED_MESSAGE
    assert caught.value.peer == "peer-cheap"
    assert selector.tracker.describe()["cheap"]["*"]["failures"] == 1


async def test_feedback_on_a_quorum_answer_credits_the_models_that_gave_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = FakeNetwork(
        {"a": Behaviour(0.1, label=1), "b": Behaviour(0.2, label=2), "c": Behaviour(0.3, label=1)}
    )
    selector = orchestrator(network)
    with trio.fail_after(30):
        await selector.run_optimized_parallel_inference(
            request(), ["a", "b", "c"], quorum=2, early_stopping=False
        )
    assert selector.feedback("job", 0.0) == ("a", "c")
