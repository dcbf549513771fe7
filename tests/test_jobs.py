"""Each job id is answered once: JobOnce in virtual time, and client failover across
real nodes when the coordinator dies mid-job."""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from p2p_node import Client, ExecutorConfig, NodeConfig
from p2p_node._jobs import JobOnce, fingerprint
from p2p_node._messages import RunRequest
from p2p_node.testing import open_swarm
from scheduler import DistributionStrategy, ErrorCode, InferenceResult, JobError

PRINT = b"same request"


def result(label: int = 1, rows: int = 1) -> InferenceResult:
    return InferenceResult("job", "m", {"label": np.full(rows, label)}, "peer", 0.0, 1.0)


class Runs:
    """A job that takes `delay` seconds and counts how often it really ran."""

    def __init__(self, delay: float = 1.0, outcome: InferenceResult | JobError | None = None):
        self.delay, self.count = delay, 0
        self.outcome = outcome or result()

    async def __call__(self) -> InferenceResult:
        self.count += 1
        await trio.sleep(self.delay)
        if isinstance(self.outcome, JobError):
            raise self.outcome
        return self.outcome


async def test_a_duplicate_while_running_waits_for_the_same_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    once, job = JobOnce(), Runs()
    answers = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(lambda: _append(answers, once.run("client", "j", PRINT, job)))
        late = await once.run("client", "j", PRINT, job)
    assert job.count == 1 and once.duplicates == 3
    assert all(a is answers[0] for a in answers) and late is answers[0]


async def _append(answers: list[InferenceResult], call) -> None:  # type: ignore[no-untyped-def]
    answers.append(await call)


async def test_a_non_retryable_error_is_the_answer_and_a_retryable_one_is_not_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    once = JobOnce()
    bad = Runs(outcome=JobError(ErrorCode.INVALID_INPUT, "wrong shape"))
    busy = Runs(outcome=JobError(ErrorCode.OVERLOADED, "busy"))
    with trio.fail_after(10):
        for _ in range(2):
            with pytest.raises(JobError, match="wrong shape"):
                await once.run("client", "bad", PRINT, bad)
            with pytest.raises(JobError, match="busy"):
                await once.run("client", "busy", PRINT, busy)
    assert bad.count == 1 and busy.count == 2


async def test_a_job_abandoned_by_its_caller_runs_again_for_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    once, job = JobOnce(), Runs(delay=5.0)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(once.run, "client", "j", PRINT, job)
            await trio.sleep(1.0)
            waiter_done = trio.Event()

            async def waiter() -> None:
                await once.run("client", "j", PRINT, job)
                waiter_done.set()

            nursery.start_soon(waiter)
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()  # the first caller (and the waiter) hang up
        await once.run("client", "j", PRINT, job)
    assert job.count == 2


async def test_the_same_id_for_a_different_request_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    once = JobOnce()
    with trio.fail_after(10):
        await once.run("client", "j", PRINT, Runs())
        with pytest.raises(JobError, match="already used for a different request") as caught:
            await once.run("client", "j", b"another", Runs())
    assert caught.value.code is ErrorCode.INVALID_INPUT


class Prints:
    """Fingerprints computed on demand, counted."""

    def __init__(self) -> None:
        self.computed: list[bytes] = []

    def of(self, value: bytes):  # type: ignore[no-untyped-def]
        def compute() -> bytes:
            self.computed.append(value)
            return value

        return compute


async def test_a_fingerprint_is_computed_only_when_an_id_comes_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    once, prints = JobOnce(), Prints()
    with trio.fail_after(10):
        for i in range(3):
            await once.run("client", f"j{i}", prints.of(PRINT), Runs(delay=0))
        assert prints.computed == []  # no id came twice: nothing hashed
        await once.run("client", "j1", prints.of(PRINT), Runs(delay=0))  # resent: same answer
        assert prints.computed == [PRINT, PRINT]  # the kept job's, and the newcomer's
        with pytest.raises(JobError, match="already used for a different request") as caught:
            await once.run("client", "j2", prints.of(b"another"), Runs(delay=0))
    assert caught.value.code is ErrorCode.INVALID_INPUT
    assert once.duplicates == 1


async def test_what_an_unhashed_request_holds_counts_towards_the_bytes_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    once = JobOnce(max_bytes=1000, ttl_s=60)
    with trio.fail_after(10):
        await once.run("client", "small", lambda: PRINT, Runs(delay=0), holds=100)
        await once.run("client", "big", lambda: PRINT, Runs(delay=0), holds=900)
        assert len(once) == 1  # 108 + 908 bytes > 1000: the older went
        await once.run("client", "hashed", PRINT, Runs(delay=0), holds=900)
        assert len(once) == 2  # a fingerprint given as bytes holds nothing: 908 + 8


async def test_the_cache_is_bounded_by_count_bytes_and_age(
    autojump_clock: trio.testing.MockClock,
) -> None:
    once = JobOnce(max_jobs=3, max_bytes=1000, ttl_s=60)
    with trio.fail_after(100):
        for i in range(5):
            await once.run("client", f"j{i}", PRINT, Runs(delay=0))
        assert len(once) == 3
        await once.run("client", "big", PRINT, Runs(delay=0, outcome=result(rows=124)))  # 992 bytes
        assert len(once) == 2  # j4 (8 bytes) and big: j3 had to go
        await trio.sleep(61)
        await once.run("client", "fresh", PRINT, Runs(delay=0))
        assert len(once) == 1


async def test_two_clients_may_use_the_same_job_id(
    autojump_clock: trio.testing.MockClock,
) -> None:
    once, job = JobOnce(), Runs()
    with trio.fail_after(10):
        await once.run("alice", "j", PRINT, job)
        await once.run("bob", "j", b"bob's own request", job)
    assert job.count == 2


def test_fingerprints_tell_requests_apart() -> None:
    x = np.arange(6, dtype=np.float32)
    same = RunRequest("a", "m", {"input": x.reshape(2, 3)}, 100)
    again = RunRequest("b", "m", {"input": x.reshape(2, 3).copy()}, 999)
    assert fingerprint(same) == fingerprint(again)  # ids and timeouts do not matter
    for other in (
        RunRequest("a", "m", {"input": x.reshape(3, 2)}, 100),
        RunRequest("a", "m2", {"input": x.reshape(2, 3)}, 100),
        RunRequest("a", "", {"input": x.reshape(2, 3)}, 100, task="t"),
        RunRequest("a", "m", {"input": x.reshape(2, 3).astype(np.float64)}, 100),
    ):
        assert fingerprint(other) != fingerprint(same)


# --- real nodes ----------------------------------------------------------------------

SVM = "digits-svm"
BASE = NodeConfig(
    data_dir=None,  # type: ignore[arg-type]  # open_swarm sets one per node
    shutdown_grace=1.0,
    target_degree=0,
    executor=ExecutorConfig(inline_below_ms=0),
)


async def test_a_job_sent_twice_to_a_node_runs_once(digits) -> None:
    x, _ = digits
    with trio.fail_after(60):
        async with open_swarm(1, models=[frozenset({SVM})], base=BASE) as swarm:
            async with Client.connect(swarm[0].addrs[0]) as client:
                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(
                            lambda: client.submit(SVM, {"input": x[:5]}, job_id="same")
                        )
                again = await client.submit(SVM, {"input": x[:5]}, job_id="same")
                with pytest.raises(JobError, match="different request"):
                    await client.submit(SVM, {"input": x[:6]}, job_id="same")
            counters = swarm[0].executor.counters
    assert counters.admitted == 1 and counters.completed == 1
    assert again.outputs["label"].shape == (5,)


async def test_a_client_fails_over_when_its_coordinator_dies_mid_job(digits) -> None:
    x, y = digits
    # Nodes 0 and 1 coordinate; only node 2 serves the model.
    models = [frozenset({"cancer-logreg"}), frozenset({"cancer-logreg"}), frozenset({SVM})]
    answers = []
    with trio.fail_after(60):
        async with open_swarm(3, models=models, base=BASE) as swarm:
            await swarm.wait_converged()
            addrs = [swarm[0].addrs[0], swarm[1].addrs[0]]
            async with Client.connect(addrs) as client:
                assert client.peer_id == swarm[0].peer_id
                async with trio.open_nursery() as nursery:
                    with swarm.busy(2):  # the job waits at node 2...

                        async def submit() -> None:
                            answers.append(await client.submit(SVM, {"input": x}, job_id="j"))

                        nursery.start_soon(submit)
                        await swarm[2].executor.wait_counters(lambda c: c.admitted == 1)
                        await swarm.kill(0)  # ...when its coordinator dies
                        await swarm[2].executor.wait_counters(lambda c: c.admitted == 2)
                failovers, coordinator = client.failovers, client.peer_id
            counters = swarm[2].executor.counters
    (answer,) = answers
    assert np.mean(answer.outputs["label"] == y) > 0.95
    assert failovers == 1 and coordinator == swarm[1].peer_id
    # The dead coordinator's request was dropped at node 2; the retry ran.
    assert counters.completed == 1 and counters.cancelled_waiting == 1


async def test_a_hedged_job_is_answered_by_the_second_peer_when_the_first_is_stuck(
    digits,
) -> None:
    x, _ = digits
    models = [frozenset({"cancer-logreg"}), frozenset({SVM}), frozenset({SVM})]
    with trio.fail_after(60):
        async with open_swarm(3, models=models, base=BASE) as swarm:
            await swarm.wait_converged()
            robin = DistributionStrategy.ROUND_ROBIN
            first = swarm[0].orchestrator.placement(SVM, robin).candidates[0].peer_id
            stuck = next(i for i in (1, 2) if swarm[i].peer_id == first)
            async with Client.connect(swarm[0].addrs[0]) as client:
                with swarm.busy(stuck):
                    result = await client.submit(
                        SVM, {"input": x[:3]}, strategy=robin, hedge=True, timeout=20
                    )
                    await swarm[stuck].executor.wait_counters(lambda c: c.cancelled_waiting == 1)
    assert result.executor == swarm[3 - stuck].peer_id
