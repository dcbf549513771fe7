"""The seed's enhanced-model-selection examples, as its documentation writes them (the
import path aside: `ai_orchestrator.core.model_selection` is `selection` here), run
against a real node in a real network of three.

The seed's task and model names ("text-generation", "model1", ...) and its context
values are examples: the bundled digits models stand in, one per node, and the
context is one they fit (the seed's 5000-long input fits none of them; that case
is below too).
"""

from __future__ import annotations

import pytest
import trio
from seed_network import LOGREG, MLP, SVM, own_node_in_a_network

from scheduler import ErrorCode, InferenceRequest, JobError
from selection import AdvancedModelSelectionStrategy, ModelStatus, get_enhanced_orchestrator

TASK = "image-classification"


async def test_select_models_advanced_as_the_seed_writes_it(tmp_path) -> None:
    with trio.fail_after(90):
        async with own_node_in_a_network(tmp_path / "me"):
            # Get the enhanced orchestrator
            orchestrator = get_enhanced_orchestrator()

            # Select models using advanced strategies
            model_ids = await orchestrator.select_models_advanced(
                task_type=TASK,
                strategy=AdvancedModelSelectionStrategy.CONTEXT_AWARE,
                context={"input_length": 64, "language": "en"}
            )  # fmt: skip

            ranking = orchestrator.rank_models(
                TASK,
                AdvancedModelSelectionStrategy.CONTEXT_AWARE,
                {"input_length": 64, "language": "en"},
            )
    assert type(model_ids) is list and all(type(m) is str for m in model_ids)
    assert sorted(model_ids) == sorted([SVM, LOGREG, MLP])  # the network's digits models
    assert model_ids == ranking.model_ids  # the ranking, with reasons, stays available
    assert all(r.reasons for r in ranking.ranked)


async def test_the_seeds_long_input_fits_no_bundled_model_and_says_what_fits(tmp_path) -> None:
    with trio.fail_after(90):
        async with own_node_in_a_network(tmp_path / "me"):
            orchestrator = get_enhanced_orchestrator()
            with pytest.raises(JobError) as caught:
                await orchestrator.select_models_advanced(
                    task_type=TASK,
                    strategy=AdvancedModelSelectionStrategy.CONTEXT_AWARE,
                    context={"input_length": 5000, "language": "en"},
                )
    assert caught.value.code is ErrorCode.NO_FITTING_MODEL
    assert "input_length <= 64" in caught.value.message


async def test_run_optimized_parallel_inference_as_the_seed_writes_it(tmp_path, digits) -> None:
    x, y = digits
    with trio.fail_after(90):
        async with own_node_in_a_network(tmp_path / "me") as (node, peers):
            request = InferenceRequest(SVM, {"input": x[:100]})
            orchestrator = get_enhanced_orchestrator()

            # Run optimized parallel inference
            responses = await orchestrator.run_optimized_parallel_inference(
                request,
                model_ids=[SVM, LOGREG, MLP],
                timeout=5.0,
                early_stopping=True
            )  # fmt: skip

    answer = responses.answer
    assert answer is not None and responses.stopped_early
    assert responses.status()[answer.model_id] is ModelStatus.OK
    where = {SVM: peers[0].peer_id, LOGREG: peers[1].peer_id, MLP: node.peer_id}
    assert answer.executor == where[answer.model_id]
    assert (answer.outputs["label"] == y[:100]).mean() > 0.9
