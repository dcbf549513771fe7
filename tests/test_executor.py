"""The executor on real bundled models: results, admission limits, cancellation."""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from p2p_node import ErrorCode, ExecutorConfig, JobError, bundled_models_dir
from p2p_node._executor import Executor, RunCost, load_model
from p2p_node._repository import read_repository


def executor(config: ExecutorConfig, limiter: trio.CapacityLimiter | None = None) -> Executor:
    cards = read_repository(bundled_models_dir(), frozenset({"digits-logreg", "digits-mlp"}))
    return Executor([load_model(c, config) for c in cards], config, limiter=limiter)


async def test_runs_a_model_and_reports_timings(digits) -> None:
    x, y = digits
    ex = executor(ExecutorConfig())
    with trio.fail_after(10):
        execution = await ex.run("digits-mlp", {"input": x[:200]})
    accuracy = float(np.mean(execution.outputs["label"] == y[:200]))
    assert accuracy > 0.9
    assert execution.outputs["probabilities"].shape == (200, 10)
    assert execution.compute_ms > 0 and execution.queue_ms >= 0
    assert ex.in_flight == 0


@pytest.mark.parametrize("wanted", [("label",), ("probabilities", "label")])
async def test_a_run_answers_only_the_outputs_asked_for_in_that_order(digits, wanted) -> None:
    x, _ = digits
    ex = executor(ExecutorConfig())
    with trio.fail_after(10):
        every = await ex.run("digits-mlp", {"input": x[:50]})
        some = await ex.run("digits-mlp", {"input": x[:50]}, wanted)
    assert tuple(some.outputs) == wanted
    for name in wanted:
        assert np.array_equal(some.outputs[name], every.outputs[name])


async def test_an_unknown_output_names_the_models_outputs(digits) -> None:
    x, _ = digits
    ex = executor(ExecutorConfig())
    with trio.fail_after(10), pytest.raises(JobError) as caught:
        await ex.run("digits-mlp", {"input": x[:1]}, ("label", "logits"))
    assert caught.value.code == ErrorCode.INVALID_INPUT
    assert "'logits'" in caught.value.message
    assert "['label', 'probabilities']" in caught.value.message
    assert ex.counters.admitted == 0  # refused before it was queued


async def test_descriptor_comes_from_the_model_and_its_card() -> None:
    (mlp,) = [d for d in executor(ExecutorConfig()).descriptors if d.id == "digits-mlp"]
    assert [s.describe() for s in mlp.inputs] == ["input float32 [N, 64]"]
    assert [s.describe() for s in mlp.outputs] == [
        "label int64 [N]",
        "probabilities float32 [N, 10]",
    ]
    assert mlp.task_type == "image-classification" and 0.9 < mlp.accuracy <= 1.0


async def test_unknown_model_names_the_models_served() -> None:
    with trio.fail_after(10), pytest.raises(JobError) as caught:
        await executor(ExecutorConfig()).run("digits-svm", {"input": np.zeros((1, 64), "f4")})
    assert caught.value.code == ErrorCode.UNKNOWN_MODEL
    assert "digits-logreg" in caught.value.message and "digits-mlp" in caught.value.message


async def test_a_full_queue_answers_overloaded_at_once_and_admits_again_after(digits) -> None:
    x, _ = digits
    limiter = trio.CapacityLimiter(1)
    ex = executor(ExecutorConfig(workers=1, queue_limit=2), limiter)
    results = []

    async def run_one() -> None:
        results.append(await ex.run("digits-logreg", {"input": x[:1]}))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await limiter.acquire()  # the only worker slot is busy
            nursery.start_soon(run_one)
            nursery.start_soon(run_one)
            await trio.testing.wait_all_tasks_blocked()
            assert ex.in_flight == 2
            with pytest.raises(JobError) as caught:
                await ex.run("digits-logreg", {"input": x[:1]})
            assert caught.value.code == ErrorCode.OVERLOADED
            assert caught.value.retryable
            limiter.release()
        assert len(results) == 2
        await ex.run("digits-logreg", {"input": x[:1]})  # admitted again
    assert ex.in_flight == 0


async def test_a_request_cancelled_while_queued_never_runs(digits, autojump_clock) -> None:
    x, _ = digits
    limiter = trio.CapacityLimiter(1)
    ex = executor(ExecutorConfig(workers=1), limiter)
    with trio.fail_after(10):
        await limiter.acquire()
        with trio.move_on_after(0.05) as scope:
            await ex.run("digits-logreg", {"input": x[:1]})
        assert scope.cancelled_caught
        assert ex.in_flight == 0
        assert limiter.borrowed_tokens == 1  # only ours: the cancelled run never took a slot
        limiter.release()


async def test_a_model_that_runs_fast_runs_inline_without_a_worker_slot(digits) -> None:
    x, _ = digits
    limiter = trio.CapacityLimiter(1)
    ex = executor(ExecutorConfig(workers=1, inline_below_ms=1000.0), limiter)
    with trio.fail_after(10):
        await ex.run("digits-logreg", {"input": x[:1]})  # first run: a worker thread
        async with limiter:  # no worker slot left, yet the next run completes
            execution = await ex.run("digits-logreg", {"input": x[:1]})
    assert execution.outputs["label"].shape == (1,)


async def test_a_request_far_larger_than_the_models_recent_runs_does_not_run_inline(
    digits,
) -> None:
    """A model whose one-row runs go inline still sends a 65,536-row request to a
    worker thread: inline, it would hold the event loop for its whole run."""
    x, _ = digits
    limiter = trio.CapacityLimiter(1)
    # 100 ms: a one-row run is far below; the large one is estimated 65,536 times one
    # row's run, which no run of onnxruntime from Python (over 1.6 us) keeps below.
    ex = executor(ExecutorConfig(workers=1, inline_below_ms=100.0), limiter)
    large = np.resize(x, (65_536, x.shape[1]))
    done = []

    async def run_large() -> None:
        done.append(await ex.run("digits-logreg", {"input": large}))

    with trio.fail_after(30):
        for i in range(4):  # the first in a worker thread, then inline
            await ex.run("digits-logreg", {"input": x[i : i + 1]})
        async with trio.open_nursery() as nursery:
            async with limiter:
                small = await ex.run("digits-logreg", {"input": x[:1]})  # inline: no slot
                nursery.start_soon(run_large)
                await trio.testing.wait_all_tasks_blocked()
                assert (done, ex.in_flight) == ([], 1)  # waiting for the worker slot
    assert small.outputs["label"].shape == (1,)
    assert done[0].outputs["label"].shape == (65_536,)


def test_a_models_run_cost_scales_with_the_input_size_and_never_below_its_runs() -> None:
    cost = RunCost(0.2, 64)
    assert cost.estimate(1) == cost.estimate(64) == 0.2
    assert cost.estimate(6_400) == pytest.approx(20.0)
    assert (
        cost.estimate(int(cost.inline_size(5.0)))
        <= 5.0
        < cost.estimate(int(cost.inline_size(5.0)) + 64)
    )
    cost.record(1.2, 640)  # EWMA: a fifth of the way to each
    assert (cost.ms, cost.size) == (pytest.approx(0.4), pytest.approx(179.2))


async def test_with_inline_off_every_run_needs_a_worker_slot(digits) -> None:
    x, _ = digits
    limiter = trio.CapacityLimiter(1)
    ex = executor(ExecutorConfig(workers=1, inline_below_ms=0.0), limiter)
    done = []

    async def run_one() -> None:
        done.append(await ex.run("digits-logreg", {"input": x[:1]}))

    with trio.fail_after(10):
        await run_one()
        async with trio.open_nursery() as nursery:
            await limiter.acquire()
            nursery.start_soon(run_one)
            await trio.testing.wait_all_tasks_blocked()
            assert (len(done), ex.in_flight) == (1, 1)  # waiting for the slot
            limiter.release()
    assert len(done) == 2


async def test_queued_requests_count_as_queued_until_their_run_starts(digits) -> None:
    x, _ = digits
    limiter = trio.CapacityLimiter(1)
    ex = executor(ExecutorConfig(workers=1, inline_below_ms=0.0), limiter)
    done = []

    async def run_one(i: int) -> None:
        done.append(await ex.run("digits-logreg", {"input": x[i : i + 1]}))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with limiter:
                for i in range(3):
                    nursery.start_soon(run_one, i)
                await ex.wait_counters(lambda c: c.admitted == 3)
                # Queued until their run starts, not by how many slots there are.
                assert (ex.in_flight, ex.running, ex.queue_length) == (3, 0, 3)
    assert len(done) == 3
    assert (ex.in_flight, ex.running, ex.queue_length) == (0, 0, 0)
    assert ex.runs == 1 and ex.merged == 3  # the slot, once free, ran them as one
