"""Integration: selection across real nodes (libp2p, GossipSub, onnxruntime) and the
bundled models on their held-out data."""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from p2p_node import Client, ExecutorConfig, NodeConfig, open_node
from p2p_node.testing import open_swarm
from scheduler import ErrorCode, InferenceRequest, JobError
from selection import ModelStatus, get_enhanced_orchestrator

LOGREG, MLP, FOREST, SVM = "digits-logreg", "digits-mlp", "digits-forest", "digits-svm"
TASK = "image-classification"


async def test_a_task_job_cascades_across_peers_and_keeps_the_best_models_accuracy(
    digits,
) -> None:
    x, y = digits
    models = [frozenset({LOGREG, MLP, "cancer-logreg"}), frozenset({SVM})]
    with trio.fail_after(60):
        async with open_swarm(2, models=models) as swarm:
            await swarm.wait_converged()
            async with Client.connect(swarm[0].addrs[0]) as client:
                result = await client.submit_task(TASK, {"input": x}, selection="hybrid")
                alone = await client.submit(SVM, {"input": x})
                feedback = await client.feedback(result.job_id, 1.0)
    routed = dict(result.route)
    assert list(routed) == [LOGREG, MLP, SVM]
    assert sum(routed.values()) == len(x)
    assert 0 < routed[SVM] < len(x) / 2  # most rows never reach the expensive model
    accuracy = np.mean(result.outputs["label"] == y)
    best = np.mean(alone.outputs["label"] == y)
    assert accuracy >= 0.99 * best
    assert feedback == (LOGREG, MLP, SVM)


async def test_select_shows_the_ranking_reasons_and_what_was_learned(digits) -> None:
    x, y = digits
    with trio.fail_after(60):
        async with open_swarm(1, models=[frozenset({LOGREG, SVM})]) as swarm:
            async with Client.connect(swarm[0].addrs[0]) as client:
                for i in range(3):
                    result = await client.submit_task(
                        TASK, {"input": x[i : i + 1]}, selection="multi_objective"
                    )
                    await client.feedback(result.job_id, float(result.outputs["label"][0] == y[i]))
                chosen, learned = await client.select(
                    TASK, "multi_objective", context={"accuracy_weight": 1}
                )
    assert chosen.best == SVM
    assert any(reason.startswith("accuracy ") for reason in chosen.ranked[0].reasons)
    ran = {entry.model_id for entry in learned if entry.runs}
    assert ran  # the jobs above were tracked
    assert any(entry.quality is not None for entry in learned)


@pytest.mark.parametrize(
    ("task", "selection", "context", "code", "message"),
    [
        ("translation", "hybrid", {}, ErrorCode.UNKNOWN_TASK, "the network serves"),
        (TASK, "fastest", {}, ErrorCode.INVALID_SELECTION, "choose one of"),
        (TASK, "hybrid", {"colour": "red"}, ErrorCode.INVALID_SELECTION, "known keys are"),
        (TASK, "hybrid", {"input_length": 100}, ErrorCode.NO_FITTING_MODEL, "input_length <= 64"),
        (
            TASK,
            "multi_objective",
            {"accuracy_weight": -1},
            ErrorCode.INVALID_SELECTION,
            "weight accuracy",
        ),
    ],
    ids=["unknown-task", "unknown-strategy", "unknown-context-key", "nothing-fits", "bad-weight"],
)
async def test_bad_task_jobs_get_typed_errors_and_the_node_keeps_serving(
    digits, task: str, selection: str, context: dict[str, object], code: ErrorCode, message: str
) -> None:
    x, _ = digits
    with trio.fail_after(60):
        async with open_swarm(1, models=[frozenset({LOGREG})]) as swarm:
            async with Client.connect(swarm[0].addrs[0]) as client:
                with pytest.raises(JobError, match=message) as caught:
                    await client.submit_task(
                        task,
                        {"input": x[:1]},
                        selection=selection,
                        context=context,  # type: ignore[arg-type]
                    )
                with pytest.raises(JobError) as unknown_job:
                    await client.feedback("no-such-job", 1.0)
                after = await client.submit_task(TASK, {"input": x[:2]})
    assert caught.value.code is code
    assert unknown_job.value.code is ErrorCode.UNKNOWN_JOB
    assert after.outputs["label"].shape == (2,)


async def test_early_stopping_cancels_the_other_requests_on_their_peers(digits) -> None:
    x, _ = digits
    # Node 0 coordinates; each of nodes 1-3 serves one model.
    models = [
        frozenset({"cancer-logreg"}),
        frozenset({SVM}),
        frozenset({FOREST}),
        frozenset({LOGREG}),
    ]
    base = NodeConfig(
        data_dir=None,  # type: ignore[arg-type]  # open_swarm sets one per node
        shutdown_grace=1.0,
        target_degree=0,
        executor=ExecutorConfig(inline_below_ms=0),
    )
    outcome = []
    with trio.fail_after(60):
        async with open_swarm(4, models=models, base=base) as swarm:
            await swarm.wait_converged()

            async def fan_out() -> None:
                outcome.append(
                    await swarm[0].selector.run_optimized_parallel_inference(
                        InferenceRequest(LOGREG, {"input": x}), [LOGREG, SVM, FOREST]
                    )
                )

            with swarm.busy(1), swarm.busy(2):
                async with trio.open_nursery() as nursery:
                    with swarm.busy(3):  # every request queues at its peer...
                        nursery.start_soon(fan_out)
                        for i in (1, 2, 3):
                            await swarm[i].executor.wait_counters(lambda c: c.admitted == 1)
                    # ...until node 3 may answer: the first answer stops the others.
                for i in (1, 2):
                    await swarm[i].executor.wait_counters(lambda c: c.cancelled_waiting == 1)
            # Released: nothing that was cancelled runs now.
            await trio.testing.wait_all_tasks_blocked()
            counters = [swarm[i].executor.counters for i in (1, 2)]
    (out,) = outcome
    assert out.answer is not None and out.answer.model_id == LOGREG
    assert out.status() == {
        LOGREG: ModelStatus.OK,
        SVM: ModelStatus.CANCELLED,
        FOREST: ModelStatus.CANCELLED,
    }
    for c in counters:
        assert (c.admitted, c.completed, c.cancelled_waiting, c.cancelled_running) == (1, 0, 1, 0)


async def test_what_selection_learned_survives_a_restart(tmp_path, digits) -> None:
    x, y = digits
    config = NodeConfig(data_dir=tmp_path, serve_models=frozenset({LOGREG, MLP}))
    with trio.fail_after(60):
        async with open_node(config):
            selector = get_enhanced_orchestrator()
            for i in range(20):
                result = await selector.run_task(TASK, {"input": x[i : i + 1]}, job_id=f"j{i}")
                if i < 19:  # j19 stays unscored
                    selector.feedback(result.job_id, float(result.outputs["label"][0] == y[i]))
            learned = selector.tracker.describe()
        assert learned
        async with open_node(config):
            restored = get_enhanced_orchestrator().tracker
            assert restored.describe() == learned
            assert restored.feedback("j19", 1.0)  # unscored jobs are remembered too


async def test_an_unreadable_tracker_file_is_moved_aside_and_the_node_starts(tmp_path) -> None:
    (tmp_path / "selection-tracker.msgpack").write_bytes(b"\x00 not a tracker")
    config = NodeConfig(data_dir=tmp_path, serve_models=frozenset({LOGREG}))
    with trio.fail_after(30):
        async with open_node(config):
            assert len(get_enhanced_orchestrator().tracker) == 0
    assert (tmp_path / "selection-tracker.unreadable").read_bytes() == b"\x00 not a tracker"


async def test_a_job_is_scored_once(digits) -> None:
    x, _ = digits
    with trio.fail_after(60):
        async with open_swarm(1, models=[frozenset({LOGREG})]) as swarm:
            async with Client.connect(swarm[0].addrs[0]) as client:
                result = await client.submit_task(TASK, {"input": x[:1]})
                assert await client.feedback(result.job_id, 1.0) == (LOGREG,)
                with pytest.raises(JobError) as twice:
                    await client.feedback(result.job_id, 0.0)
            learned = swarm[0].selector.tracker.describe()[LOGREG]
    assert twice.value.code is ErrorCode.UNKNOWN_JOB
    assert learned["*"]["quality"] == 1.0 and learned["*"]["quality_weight"] == 1.0
