"""The selection layer's pure parts: context parsing, the catalog, the tracker and the
five strategies, table-driven over small hand-made catalogs."""

from __future__ import annotations

import random
from typing import Any

import pytest

from gossip import ModelDescriptor, TensorSpec
from scheduler import ErrorCode, JobError
from selection import (
    ALL,
    AdvancedModelSelectionStrategy,
    CatalogEntry,
    ModelCatalog,
    PerformanceTracker,
    SelectionContext,
    TrackerConfig,
    select,
)

S = AdvancedModelSelectionStrategy
TASK = "image-classification"


def model(
    model_id: str,
    accuracy: float,
    cost: float,
    *,
    task: str = TASK,
    subtypes: tuple[str, ...] = (),
    languages: tuple[str, ...] = (),
    max_input_length: int = 64,
) -> ModelDescriptor:
    return ModelDescriptor(
        id=model_id,
        version="1",
        sha256="0" * 64,
        task_type=task,
        subtypes=subtypes,
        languages=languages,
        max_input_length=max_input_length,
        accuracy=accuracy,
        cost=cost,
        description="",
        inputs=(TensorSpec("input", "float32", (None, 64)),),
        outputs=(TensorSpec("label", "int64", (None,)),),
    )


def catalog(*models: ModelDescriptor, latency: dict[str, float] | None = None) -> ModelCatalog:
    latency = latency or {}
    return ModelCatalog(CatalogEntry(m, ("peer",), latency.get(m.id)) for m in models)


# Four models like the bundled digits ones: cheap-and-good, cheap-and-worse, a
# dominated one, and an expensive best.
DIGITS = catalog(
    model("logreg", 0.970, 1.0, subtypes=("digits",)),
    model("mlp", 0.978, 1.07, subtypes=("digits",)),
    model("forest", 0.972, 2.16, subtypes=("digits",)),
    model("svm", 0.994, 17.9, subtypes=("digits",)),
    latency={"logreg": 0.02, "mlp": 0.021, "forest": 0.042, "svm": 0.35},
)


def ranked(selection: Any) -> list[str]:
    return [r.model_id for r in selection.ranked]


# --- context ------------------------------------------------------------------------


def test_context_parses_command_line_strings() -> None:
    context = SelectionContext.parse(
        {"input_length": "100", "language": "en", "accuracy_weight": "1", "cost_weight": "0"}
    )
    assert context.input_length == 100
    assert context.language == "en"
    assert context.weights.normalised() == (1.0, 0.0, 0.0)
    assert context.bucket() == "len<=128,lang=en"
    assert SelectionContext.parse(context.to_wire()) == context


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ({"colour": "red"}, "unknown context keys \\['colour'\\]; known keys are"),
        ({"accuracy_weight": -1}, "weight accuracy must be a finite number >= 0"),
        ({"accuracy_weight": "nan"}, "accuracy_weight must be finite"),
        (
            {"accuracy_weight": 0, "latency_weight": 0, "cost_weight": 0},
            "weights are all zero; give at least one of accuracy_weight",
        ),
        ({"input_length": "long"}, "input_length must be an integer"),
        ({"input_length": True}, "input_length must be an integer"),
        ({"confidence": 2}, "confidence must be in \\[0, 1\\]"),
        ({"language": ""}, "language must be a string of 1 to 64"),
    ],
)
def test_bad_contexts_are_invalid_selection(raw: dict[str, object], complaint: str) -> None:
    with pytest.raises(JobError, match=complaint) as caught:
        SelectionContext.parse(raw)
    assert caught.value.code is ErrorCode.INVALID_SELECTION


def test_strategy_names_parse_and_bad_ones_name_the_choices() -> None:
    assert S.parse("multi-objective") is S.MULTI_OBJECTIVE
    assert S.parse("HYBRID") is S.HYBRID
    with pytest.raises(JobError, match="choose one of \\['multi_objective'") as caught:
        S.parse("fastest")
    assert caught.value.code is ErrorCode.INVALID_SELECTION


# --- catalog ------------------------------------------------------------------------


def test_unknown_task_names_the_task_types_served() -> None:
    with pytest.raises(JobError, match="the network serves \\['image-classification'\\]") as e:
        select(S.MULTI_OBJECTIVE, "translation", DIGITS, PerformanceTracker())
    assert e.value.code is ErrorCode.UNKNOWN_TASK


# --- the strategies, table-driven ----------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "best"),
    [
        ({"accuracy_weight": 1, "latency_weight": 0, "cost_weight": 0}, "svm"),
        ({"accuracy_weight": 0, "latency_weight": 0, "cost_weight": 1}, "logreg"),
        ({"accuracy_weight": 0, "latency_weight": 1, "cost_weight": 0}, "logreg"),
        ({"accuracy_weight": 2, "latency_weight": 1, "cost_weight": 1}, "mlp"),
    ],
    ids=["accuracy", "cost", "latency", "balanced"],
)
def test_multi_objective_follows_the_weights(weights: dict[str, float], best: str) -> None:
    chosen = select(S.MULTI_OBJECTIVE, TASK, DIGITS, PerformanceTracker(), _ctx(weights))
    assert chosen.best == best


@pytest.mark.parametrize("seed", range(20))
def test_multi_objective_never_chooses_a_dominated_model(seed: int) -> None:
    rng = random.Random(seed)
    weights = {
        "accuracy_weight": rng.random(),
        "latency_weight": rng.random(),
        "cost_weight": rng.random(),
    }
    chosen = select(S.MULTI_OBJECTIVE, TASK, DIGITS, PerformanceTracker(), _ctx(weights))
    assert "forest" not in ranked(chosen)
    (left_out,) = chosen.excluded
    assert left_out.model_id == "forest"
    assert left_out.reason.startswith("Pareto-dominated by mlp")


@pytest.mark.parametrize(
    ("context", "fits", "left_out"),
    [
        ({"input_length": 30}, {"short", "long", "en-only"}, {}),
        ({"input_length": 100}, {"long"}, {"short": "input length 100 > its maximum 64"}),
        ({"language": "de"}, {"short", "long"}, {"en-only": "language de not among ['en']"}),
        ({"modality": "text"}, set(), {}),
    ],
    ids=["short-input", "long-input", "language", "modality"],
)
def test_context_aware_filters_with_a_reason_for_each(
    context: dict[str, object], fits: set[str], left_out: dict[str, str]
) -> None:
    models = catalog(
        model("short", 0.9, 1.0, max_input_length=64),
        model("long", 0.8, 2.0, max_input_length=512),
        model("en-only", 0.95, 1.0, languages=("en",), max_input_length=64),
    )
    if not fits:
        with pytest.raises(JobError, match="what fits: input_length <= 512") as caught:
            select(S.CONTEXT_AWARE, TASK, models, PerformanceTracker(), _ctx(context))
        assert caught.value.code is ErrorCode.NO_FITTING_MODEL
        return
    chosen = select(S.CONTEXT_AWARE, TASK, models, PerformanceTracker(), _ctx(context))
    assert set(ranked(chosen)) == fits
    reasons = {x.model_id: x.reason for x in chosen.excluded}
    for model_id, reason in left_out.items():
        assert reasons[model_id] == reason


def test_context_aware_scores_with_what_was_learned_in_the_bucket() -> None:
    models = catalog(model("a", 0.9, 1.0, max_input_length=512), model("b", 0.9, 1.0))
    tracker = PerformanceTracker()
    for _ in range(50):  # in short inputs, a is bad and b is good
        tracker.record_quality("a", "len<=64", 0.0)
        tracker.record_quality("b", "len<=64", 1.0)
    short, long = _ctx({"input_length": 50}), _ctx({"input_length": 300})
    assert select(S.CONTEXT_AWARE, TASK, models, tracker, short).best == "b"
    # Long inputs have no evidence of their own; only a fits, whatever it learned.
    assert select(S.CONTEXT_AWARE, TASK, models, tracker, long).best == "a"


@pytest.mark.parametrize(
    ("subtype", "expected", "left_out"),
    [
        ("digits", ["digit-net", "general"], ["letter-net"]),
        ("faces", ["general"], ["digit-net", "letter-net"]),
        (None, ["letter-net", "general", "digit-net"], []),
    ],
    ids=["specialist", "fallback-to-general", "no-subtype"],
)
def test_specialized_prefers_the_subtype_then_general_models(
    subtype: str | None, expected: list[str], left_out: list[str]
) -> None:
    models = catalog(
        model("digit-net", 0.90, 1.0, subtypes=("digits",)),
        model("letter-net", 0.99, 1.0, subtypes=("letters",)),
        model("general", 0.95, 1.0),
    )
    context = _ctx({} if subtype is None else {"subtype": subtype})
    chosen = select(S.SPECIALIZED, TASK, models, PerformanceTracker(), context)
    assert ranked(chosen) == expected
    assert sorted(x.model_id for x in chosen.excluded) == left_out


def test_hybrid_cascades_from_the_cheapest_adequate_model_to_the_best() -> None:
    chosen = select(S.HYBRID, TASK, DIGITS, PerformanceTracker())
    assert ranked(chosen) == ["logreg", "mlp", "svm"]
    assert chosen.ranked[0].reasons[0] == "first stage: cheapest adequate model"
    assert "no cascade stage: mlp is as accurate" in chosen.excluded[0].reason


def test_hybrid_skips_cheap_models_that_are_not_adequate() -> None:
    models = catalog(model("guess", 0.5, 0.1), model("ok", 0.96, 1.0), model("best", 0.99, 10))
    chosen = select(S.HYBRID, TASK, models, PerformanceTracker())
    assert ranked(chosen) == ["ok", "best"]
    assert chosen.excluded[0].reason.startswith("accuracy 0.5000 more than 0.05 below")


def test_adaptive_without_evidence_ranks_by_announced_accuracy_less_cost() -> None:
    chosen = select(S.ADAPTIVE, TASK, DIGITS, PerformanceTracker(), _ctx({"cost_penalty": 0}))
    assert ranked(chosen) == ["svm", "mlp", "forest", "logreg"]
    penalised = select(S.ADAPTIVE, TASK, DIGITS, PerformanceTracker(), _ctx({"cost_penalty": 1}))
    assert penalised.best == "mlp"


def test_adaptive_learns_which_model_is_right_and_explores_less() -> None:
    models = catalog(model("a", 0.9, 1.0), model("b", 0.9, 1.0))
    truth = {"a": 0.6, "b": 0.9}
    tracker, rng = PerformanceTracker(), random.Random(1)
    picks = []
    for _ in range(600):
        pick = select(S.ADAPTIVE, TASK, models, tracker, rng=rng).best
        picks.append(pick)
        tracker.record_quality(pick, ALL, 1.0 if rng.random() < truth[pick] else 0.0)
    assert picks[:100].count("a") >= 5  # it tried both early on
    assert picks[-200:].count("b") >= 170  # and settled (discounting keeps some doubt)


def test_adaptive_follows_drift() -> None:
    models = catalog(model("a", 0.9, 1.0), model("b", 0.9, 1.0))
    tracker, rng = PerformanceTracker(TrackerConfig(discount=0.99)), random.Random(2)
    picks = []
    for step in range(1200):
        truth = {"a": 0.9, "b": 0.6} if step < 600 else {"a": 0.6, "b": 0.9}
        pick = select(S.ADAPTIVE, TASK, models, tracker, rng=rng).best
        picks.append(pick)
        tracker.record_quality(pick, ALL, 1.0 if rng.random() < truth[pick] else 0.0)
    assert picks[400:600].count("a") >= 180
    assert picks[-200:].count("b") >= 180


@pytest.mark.parametrize("k", [1, 2])
def test_k_limits_the_ranking(k: int) -> None:
    for strategy in S:
        chosen = select(strategy, TASK, DIGITS, PerformanceTracker(), k=k)
        assert len(chosen.ranked) == k


def test_k_below_one_is_invalid() -> None:
    with pytest.raises(JobError, match="k must be >= 1") as caught:
        select(S.HYBRID, TASK, DIGITS, PerformanceTracker(), k=0)
    assert caught.value.code is ErrorCode.INVALID_SELECTION


# --- the tracker ------------------------------------------------------------------------


def test_tracker_learns_quality_latency_and_success_per_bucket() -> None:
    tracker = PerformanceTracker(TrackerConfig(discount=0.995))
    tracker.record_run("m", "len<=64", ok=True, latency_ms=10.0)
    tracker.record_run("m", "len<=64", ok=False, latency_ms=99.0)
    tracker.record_quality("m", "len<=64", 1.0)
    tracker.record_quality("m", "len<=64", 0.0)
    facts = tracker.describe()["m"]
    assert set(facts) == {"len<=64", ALL}
    assert facts["len<=64"]["runs"] == 2 and facts["len<=64"]["failures"] == 1
    assert facts["len<=64"]["latency_ms"] == 10.0
    assert facts["len<=64"]["quality"] == pytest.approx(0.995 / 1.995, abs=1e-3)
    assert tracker.quality("m", "other-bucket", 0.5).observations == pytest.approx(1.995)


def test_a_change_point_is_detected_and_the_bucket_explores_again() -> None:
    tracker = PerformanceTracker(TrackerConfig(discount=1.0, drift_window=50, drift_sigmas=3.0))
    for i in range(200):  # "a" is right 19 times in 20, "b" is rarely tried
        tracker.record_quality("a", "x", 0.0 if i % 20 == 0 else 1.0)
        if i % 10 == 0:
            tracker.record_quality("b", "x", 1.0 if i % 20 else 0.0)
    assert tracker.drifts == {}
    before_b = tracker.quality("b", "x", 0.5).observations
    for i in range(50):  # then "a" is right one time in two
        tracker.record_quality("a", "x", float(i % 2))
    assert tracker.drifts.get("x", 0) >= 1
    a = tracker.quality("a", "x", 0.5)
    assert a.observations < 100 and a.mean < 0.7  # its older scores were dropped
    assert tracker.quality("b", "x", 0.5).observations < before_b / 5  # explore b again


def test_a_stationary_model_rarely_raises_a_change_point() -> None:
    # A 3-sigma test on every observation has false alarms; they must stay rare (a
    # false alarm costs some exploration, nothing else).
    tracker = PerformanceTracker(TrackerConfig(discount=1.0, drift_window=50, drift_sigmas=3.0))
    rng = random.Random(7)
    for _ in range(5000):
        tracker.record_quality("a", "x", 1.0 if rng.random() < 0.9 else 0.0)
    assert tracker.drifts.get("x", 0) <= 2


def test_tracker_memory_is_bounded() -> None:
    tracker = PerformanceTracker(TrackerConfig(max_entries=10, max_jobs=5))
    for i in range(100):
        tracker.record_run(f"m{i}", f"b{i}", ok=True, latency_ms=1.0)
        tracker.remember_job(f"job{i}", [f"m{i}"], f"b{i}")
    assert len(tracker) == 10
    with pytest.raises(JobError, match="not among the last 5 unscored jobs") as caught:
        tracker.feedback("job0", 1.0)
    assert caught.value.code is ErrorCode.UNKNOWN_JOB
    assert tracker.feedback("job99", 1.0) == ("m99",)


def test_tracker_round_trips_through_bytes() -> None:
    tracker = PerformanceTracker()
    tracker.record_run("m", "len<=64", ok=True, latency_ms=3.0)
    tracker.record_quality("m", "len<=64", 0.5)
    tracker.remember_job("job", ["m"], "len<=64")
    restored = PerformanceTracker.from_bytes(tracker.to_bytes())
    assert restored.describe() == tracker.describe()
    assert restored.feedback("job", 1.0) == ("m",)


@pytest.mark.parametrize("data", [b"", b"\x00garbage", b"\x81\xa1v\x02", b"\x81\xa1v\x01"], ids=str)
def test_tracker_refuses_bytes_it_did_not_write(data: bytes) -> None:
    with pytest.raises(ValueError, match="not a performance tracker"):
        PerformanceTracker.from_bytes(data)


@pytest.mark.parametrize("score", [-0.5, 1.5, float("nan")])
def test_tracker_refuses_scores_outside_zero_one(score: float) -> None:
    with pytest.raises(JobError, match="score must be in \\[0, 1\\]"):
        PerformanceTracker().record_quality("m", ALL, score)


def _ctx(raw: dict[str, object]) -> SelectionContext:
    return SelectionContext.parse(raw)
