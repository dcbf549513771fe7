"""The executor on real bundled models: results, admission limits, cancellation."""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from p2p_node import ErrorCode, ExecutorConfig, JobError, bundled_models_dir
from p2p_node._executor import Executor, load_model
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
