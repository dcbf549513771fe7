"""Text jobs (strings, not tensors) on a model served only as stages: the coordinator
tokenizes with the tokenizer beside its own stage and the chain answers with the
whole model's embeddings; a node with no stage of the model says why it cannot."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import trio
from tokenizers import Tokenizer

from p2p_node import Client, bundled_models_dir
from p2p_node._config import NodeConfig
from p2p_node._shard import copy_bundled_stages
from p2p_node.testing import open_swarm
from scheduler import ErrorCode, JobError

BUNDLED = bundled_models_dir()
MINILM = "minilm-l6-v2"
TEXTS = ["the cat sat on the mat", "a stage is a range of layers", "hello"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage-text-repo")
    copy_bundled_stages(MINILM, 2, out)
    shutil.copytree(BUNDLED / "pydoc-gpt-small", out / "pydoc-gpt-small")
    copy_bundled_stages("pydoc-gpt-small", 2, out)
    return out


def _whole(texts: list[str]) -> np.ndarray:
    tokenizer = Tokenizer.from_file(str(BUNDLED / MINILM / "tokenizer.json"))
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], np.int64)
    feeds = {
        "input_ids": ids,
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], np.int64),
    }
    session = ort.InferenceSession(
        str(BUNDLED / MINILM / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    value = session.run(["sentence_embedding"], feeds)[0]
    return value / np.linalg.norm(value, axis=1, keepdims=True)


async def test_a_text_job_on_a_model_served_only_as_stages_goes_through_the_chain(
    repo: Path, tmp_path: Path
) -> None:
    models = [
        frozenset({"pydoc-gpt-small"}),
        frozenset({f"{MINILM}@1of2", "pydoc-gpt-small@1of2"}),
        frozenset({f"{MINILM}@2of2", "pydoc-gpt-small@2of2"}),
    ]
    config = NodeConfig(data_dir=tmp_path, shutdown_grace=1.0, target_degree=0, models_dir=repo)
    with trio.fail_after(60):
        async with open_swarm(3, models=models, base=config) as swarm:
            await swarm.wait_converged()
            while True:
                try:
                    swarm[0].chains.plan(MINILM)
                    swarm[1].chains.plan(MINILM)
                    break
                except JobError:
                    await trio.sleep(0.05)
            async with Client.connect(swarm[1].addrs[0]) as client:
                result = await client.submit(MINILM, texts=TEXTS)
            # A node that serves no stage of it has no tokenizer for it: a typed error.
            async with Client.connect(swarm[0].addrs[0]) as client:
                with pytest.raises(JobError) as refused:
                    await client.submit(MINILM, texts=TEXTS)
            # A generator served as stages takes no one-shot text job.
            with pytest.raises(JobError) as generator:
                await swarm[1].chains.run_text_job("j", "pydoc-gpt-small", TEXTS, False, 10.0)
    assert result.executor == swarm[2].peer_id  # the last stage's peer answered
    np.testing.assert_allclose(result.outputs["embeddings"], _whole(TEXTS), atol=1e-5, rtol=0)
    assert refused.value.code is ErrorCode.NO_CAPABLE_PEER
    assert "tokenizer" in refused.value.message
    assert generator.value.code is ErrorCode.INVALID_INPUT
