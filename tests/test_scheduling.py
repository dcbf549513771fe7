"""Integration: placement, failover and fan-out across real nodes (p2p_node.testing)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import trio
import trio.lowlevel

from p2p_node import Client, ExecutorConfig, NodeConfig
from p2p_node._executor import Executor
from p2p_node.testing import open_swarm
from scheduler import (
    DistributionStrategy,
    InferenceRequest,
    get_distributed_orchestrator,
    majority_vote,
)

SVM, LOGREG, MLP = "digits-svm", "digits-logreg", "digits-mlp"


async def test_a_job_whose_executing_node_is_killed_completes_elsewhere(digits) -> None:
    x, y = digits
    models = [frozenset({"cancer-logreg"}), frozenset({SVM}), frozenset({SVM})]
    results = []
    with trio.fail_after(90):
        async with open_swarm(3, topology="full", models=models) as swarm:
            await swarm.wait_converged()
            coordinator = swarm[0].orchestrator
            first = coordinator.placement(SVM, DistributionStrategy.ROUND_ROBIN).candidates[0]
            victim = next(i for i in (1, 2) if swarm[i].peer_id == first.peer_id)
            survivor = swarm[3 - victim].peer_id
            # Hold the victim's worker slots: the job reaches it and waits there, so the
            # kill always lands mid-request (closing a host takes long enough for a
            # small job to finish otherwise).
            slots = swarm[victim]._executor._limiter
            holders = [object() for _ in range(int(slots.total_tokens))]
            for holder in holders:
                slots.acquire_on_behalf_of_nowait(holder)

            async def submit() -> None:
                request = InferenceRequest(SVM, {"input": x}, timeout=60)
                results.append(
                    await coordinator.run_distributed_inference(
                        request, DistributionStrategy.ROUND_ROBIN
                    )
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(submit)
                while swarm[victim].in_flight == 0:  # noqa: ASYNC110
                    await trio.sleep(0.005)  # the request reaching the victim: no hook
                await swarm.kill(victim)
    (result,) = results
    assert result.executor == survivor
    assert np.mean(result.outputs["label"] == y) > 0.95


async def test_five_hundred_jobs_with_a_node_killed_midway_are_all_answered_once(
    digits,
) -> None:
    x, y = digits
    served = frozenset({LOGREG})
    answers: Counter[str] = Counter()
    labels: dict[int, int] = {}
    with trio.fail_after(120):
        async with open_swarm(5, topology="full", models=[served] * 5) as swarm:
            await swarm.wait_converged()
            async with (
                Client.connect(swarm[0].addrs[0]) as c0,
                Client.connect(swarm[1].addrs[0]) as c1,
            ):
                clients = [c0, c1]
                jobs = trio.Semaphore(8)

                async def job(k: int) -> None:
                    async with jobs:
                        row = k % len(x)
                        result = await clients[k % 2].submit(
                            LOGREG, {"input": x[row : row + 1]}, job_id=f"job-{k}", timeout=30
                        )
                    answers[result.job_id] += 1
                    labels[row] = int(result.outputs["label"][0])

                async with trio.open_nursery() as nursery:
                    for k in range(250):
                        nursery.start_soon(job, k)
                async with trio.open_nursery() as nursery:
                    for k in range(250, 500):
                        nursery.start_soon(job, k)
                    await trio.lowlevel.checkpoint()
                    await swarm.kill(3)  # an executor, never an entry node
    assert len(answers) == 500
    assert set(answers.values()) == {1}
    assert np.mean([labels[r] == y[r] for r in labels]) > 0.9


async def test_parallel_inference_over_three_models_and_a_vote(digits) -> None:
    x, y = digits
    models = [frozenset({SVM}), frozenset({LOGREG}), frozenset({MLP})]
    with trio.fail_after(60):
        async with open_swarm(3, topology="full", models=models) as swarm:
            await swarm.wait_converged()
            orchestrator = swarm[0].orchestrator
            request = InferenceRequest("unused", {"input": x[:200]}, timeout=30)
            outcome = await orchestrator.run_distributed_parallel_inference(
                request, [SVM, LOGREG, MLP, "no-such-model"]
            )
    assert [o.model_id for o in outcome.outcomes] == [SVM, LOGREG, MLP, "no-such-model"]
    assert {r.executor for r in outcome.results()} == {swarm[i].peer_id for i in range(3)}
    assert set(outcome.errors()) == {"no-such-model"}
    votes = majority_vote(outcome.results())
    assert np.mean(votes == y[:200]) > 0.95


async def test_the_orchestrator_of_the_node_in_this_context(tmp_path) -> None:
    from p2p_node import NodeConfig, open_node

    with trio.fail_after(30):
        async with open_node(
            NodeConfig(data_dir=tmp_path / "n", serve_models=frozenset({MLP}))
        ) as node:
            assert get_distributed_orchestrator() is node.orchestrator


async def test_probes_and_answers_report_the_load_a_peer_holds(digits) -> None:
    x, _ = digits
    # Node 0 coordinates; nodes 1 and 2 serve the model, and are held busy at first.
    models = [frozenset({LOGREG}), frozenset({SVM}), frozenset({SVM})]
    base = NodeConfig(
        data_dir=None,  # type: ignore[arg-type]  # open_swarm sets one per node
        executor=ExecutorConfig(inline_below_ms=0),
    )
    results = []
    with trio.fail_after(60):
        async with open_swarm(3, models=models, base=base) as swarm:
            await swarm.wait_converged()
            coordinator, workers = swarm[0], (swarm[1], swarm[2])
            assert [await coordinator.probe_load(w.peer_id, 5) for w in workers] == [0, 0]
            async with Client.connect(coordinator.addrs[0]) as client, trio.open_nursery() as jobs:

                async def submit() -> None:
                    results.append(await client.submit(SVM, {"input": x[:2]}))

                with swarm.busy(1), swarm.busy(2):
                    for _ in range(5):
                        jobs.start_soon(submit)
                    for w in workers:
                        await w.executor.wait_counters(lambda c: c.admitted > 0)
                    await _until_admitted([w.executor for w in workers], 5)
                    held = [w.executor.in_flight for w in workers]
                    probed = [await coordinator.probe_load(w.peer_id, 5) for w in workers]
                    assert probed == held and sum(held) == 5
                    assert await coordinator.probe_load(coordinator.peer_id, 5) == 0
    assert len(results) == 5
    assert all(r.load is not None and 0 <= r.load < 5 for r in results)


async def _until_admitted(executors: list[Executor], total: int) -> None:
    """Until `executors` have admitted `total` requests between them."""
    while sum(e.counters.admitted for e in executors) < total:
        async with trio.open_nursery() as any_admits:

            async def admits(executor: Executor, seen: int) -> None:
                await executor.wait_counters(lambda c: c.admitted > seen)
                any_admits.cancel_scope.cancel()

            for e in executors:
                any_admits.start_soon(admits, e, e.counters.admitted)
