"""The seed's distributed-execution examples, as its documentation writes them (the
import path aside: `ai_orchestrator.core.distributed` is `scheduler` here), run
against a real node in a real network of three.

The seed's model names ("model1", ...) are examples: the bundled digits models
stand in for them, one per node, so that where each request ran shows it was
distributed.
"""

from __future__ import annotations

import numpy as np
import trio
from seed_network import LOGREG, MLP, SVM, own_node_in_a_network

from scheduler import (
    DistributionStrategy,
    InferenceRequest,
    get_distributed_orchestrator,
    majority_vote,
)


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
