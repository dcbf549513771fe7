"""The seed's distributed-execution examples, as its documentation writes them (the
import path aside: `ai_orchestrator.core.distributed` is `scheduler` here), run
against a real node in a real network of three.

The seed's model names ("model1", ...) are examples: the bundled digits models
stand in for them, one per node, so that where each request ran shows it was
distributed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import trio

from p2p_node import Node, NodeConfig, open_node
from p2p_node.testing import open_swarm
from scheduler import (
    DistributionStrategy,
    InferenceRequest,
    get_distributed_orchestrator,
    majority_vote,
)

SVM, LOGREG, MLP = "digits-svm", "digits-logreg", "digits-mlp"


@asynccontextmanager
async def own_node_in_a_network(data_dir: Path) -> AsyncIterator[tuple[Node, list[Node]]]:
    """This task's own node, serving MLP, joined to two more serving SVM and LOGREG.

    `open_node` in this task is what binds `get_distributed_orchestrator()` here.
    Yields when the node's view holds both peers alive (their models with them).
    """
    async with open_swarm(2, models=[frozenset({SVM}), frozenset({LOGREG})]) as swarm:
        config = NodeConfig(
            data_dir=data_dir,
            serve_models=frozenset({MLP}),
            bootstrap=tuple(swarm[i].addrs[0] for i in range(2)),
            shutdown_grace=1.0,
        )
        async with open_node(config) as node:
            others = {swarm[0].peer_id, swarm[1].peer_id}
            await node.view.wait_until(lambda v: others <= {p.peer_id for p in v.alive()})
            yield node, [swarm[0], swarm[1]]


async def test_run_distributed_inference_as_the_seed_writes_it(tmp_path, digits) -> None:
    x, y = digits
    with trio.fail_after(90):
        async with own_node_in_a_network(tmp_path / "me") as (_, peers):
            request = InferenceRequest(SVM, {"input": x[:100]})

            # Get the distributed orchestrator
            orchestrator = get_distributed_orchestrator()

            # Run inference on a distributed node
            response = await orchestrator.run_distributed_inference(
                request,
                strategy=DistributionStrategy.CAPABILITY_BASED
            )  # fmt: skip

    assert response.model_id == SVM
    assert response.executor == peers[0].peer_id  # the one node that serves it
    assert np.mean(response.outputs["label"] == y[:100]) > 0.95


async def test_run_distributed_parallel_inference_as_the_seed_writes_it(tmp_path, digits) -> None:
    x, y = digits
    with trio.fail_after(90):
        async with own_node_in_a_network(tmp_path / "me") as (node, peers):
            request = InferenceRequest(SVM, {"input": x[:100]})
            orchestrator = get_distributed_orchestrator()

            # Run parallel inference across multiple nodes
            responses = await orchestrator.run_distributed_parallel_inference(
                request,
                model_ids=[SVM, LOGREG, MLP]
            )  # fmt: skip

    assert responses.errors() == {}
    assert [r.model_id for r in responses.results()] == [SVM, LOGREG, MLP]
    executors = [r.executor for r in responses.results()]
    assert executors == [peers[0].peer_id, peers[1].peer_id, node.peer_id]
    assert np.mean(majority_vote(responses.results()) == y[:100]) > 0.95
