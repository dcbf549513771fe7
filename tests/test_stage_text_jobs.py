"""Text jobs (strings, not tensors) and generations on a model served only as stages:
the coordinator tokenizes, with the tokenizer beside its own stage or one it read
from a stage's peer, and the chain answers with the whole model's embeddings and
tokens. Any node coordinates, one with no model at all included."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import trio
from text_models import wait_for_chains
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
            await wait_for_chains(swarm[0], MINILM)
            await wait_for_chains(swarm[1], MINILM)
            async with Client.connect(swarm[1].addrs[0]) as client:
                result = await client.submit(MINILM, texts=TEXTS)
            # A node that serves no stage of it reads the tokenizer from a stage's peer.
            async with Client.connect(swarm[0].addrs[0]) as client:
                elsewhere = await client.submit(MINILM, texts=TEXTS)
            # A generator served as stages takes no one-shot text job.
            with pytest.raises(JobError) as generator:
                await swarm[1].chains.run_text_job("j", "pydoc-gpt-small", TEXTS, False, 10.0)
    assert result.executor == swarm[2].peer_id  # the last stage's peer answered
    np.testing.assert_allclose(result.outputs["embeddings"], _whole(TEXTS), atol=1e-5, rtol=0)
    np.testing.assert_allclose(elsewhere.outputs["embeddings"], _whole(TEXTS), atol=1e-5, rtol=0)
    assert generator.value.code is ErrorCode.INVALID_INPUT


async def test_a_node_with_no_models_coordinates_generation_and_embeddings(
    repo: Path, tmp_path: Path
) -> None:
    """Node 0 serves nothing: it reads each model's tokenizer from a stage's peer, once,
    checked chunk by chunk (a stage-1 peer that corrupts it is passed over)."""
    from test_shard import _greedy_whole

    models = [
        frozenset(),
        frozenset({f"{MINILM}@1of2", "pydoc-gpt-small@1of2"}),
        frozenset({f"{MINILM}@2of2", "pydoc-gpt-small@2of2"}),
    ]
    gpt = "pydoc-gpt-small"
    tokenizer = Tokenizer.from_file(str(BUNDLED / gpt / "tokenizer.json"))
    prompt = "The module"
    bad_sha = hashlib.sha256((BUNDLED / MINILM / "tokenizer.json").read_bytes()).hexdigest()
    config = NodeConfig(data_dir=tmp_path, shutdown_grace=1.0, target_degree=0, models_dir=repo)
    with trio.fail_after(90):
        async with open_swarm(3, models=models, base=config) as swarm:
            await swarm.wait_converged()
            await wait_for_chains(swarm[0], MINILM, gpt)
            # Stage 1's peer sends MiniLM's tokenizer corrupted: it is read from stage 2's.
            swarm[1].fetches.tamper = lambda sha, i, data: (
                b"!" + data[1:] if sha == bad_sha else data
            )
            async with Client.connect(swarm[0].addrs[0]) as client:
                first = await client.submit(MINILM, texts=TEXTS)
                again = await client.submit(MINILM, texts=TEXTS[:1])
                async with client.generate(prompt, gpt, max_tokens=24) as generation:
                    text = await generation.text()
            texts = dict(swarm[0].chains._texts)
            corrupt = swarm[0].fetches.corrupt_chunks
            # Read once each: model.toml and tokenizer.json (one chunk each), MiniLM's
            # from both peers (stage 1's corrupted), the generator's from stage 1's.
            served = [swarm[i].fetches.served_chunks for i in (1, 2)]
            assert not swarm[0].executor.models.ids()
    whole = _whole(TEXTS)
    np.testing.assert_allclose(first.outputs["embeddings"], whole, atol=1e-5, rtol=0)
    np.testing.assert_allclose(again.outputs["embeddings"], _whole(TEXTS[:1]), atol=1e-5, rtol=0)
    assert first.executor == swarm[2].peer_id
    expected = _greedy_whole(tokenizer.encode(prompt).ids, 24)
    summary = generation.summary
    assert summary is not None and summary.tokens == len(expected)
    assert text == tokenizer.decode(expected)
    assert corrupt == 1 and served == [4, 2]
    assert str(texts[MINILM].source) == f"{MINILM}@2of2/model.toml"  # stage 1's was bad
    assert str(texts[gpt].source) == f"{gpt}@1of2/model.toml"
    assert not (tmp_path / "models").exists() and not (tmp_path / "fetching").exists()


async def test_no_tokenizer_anywhere_is_a_typed_error_naming_why(
    repo: Path, tmp_path: Path
) -> None:
    """Every stage peer corrupts the tokenizer: NO_CAPABLE_PEER, saying so; the node
    goes on, and a job once the peers behave succeeds."""
    models = [frozenset(), frozenset({f"{MINILM}@1of2"}), frozenset({f"{MINILM}@2of2"})]
    sha = hashlib.sha256((BUNDLED / MINILM / "tokenizer.json").read_bytes()).hexdigest()
    config = NodeConfig(data_dir=tmp_path, shutdown_grace=1.0, target_degree=0, models_dir=repo)
    with trio.fail_after(60):
        async with open_swarm(3, models=models, base=config) as swarm:
            await swarm.wait_converged()
            await wait_for_chains(swarm[0], MINILM)
            for i in (1, 2):
                swarm[i].fetches.tamper = lambda s, i, data: data[:-1] if s == sha else data
            async with Client.connect(swarm[0].addrs[0]) as client:
                with pytest.raises(JobError) as refused:
                    await client.submit(MINILM, texts=TEXTS)
                for i in (1, 2):
                    swarm[i].fetches.tamper = None
                result = await client.submit(MINILM, texts=TEXTS)
    assert refused.value.code is ErrorCode.NO_CAPABLE_PEER
    assert (
        "tokenizer" in refused.value.message and "does not match its hash" in refused.value.message
    )
    np.testing.assert_allclose(result.outputs["embeddings"], _whole(TEXTS), atol=1e-5, rtol=0)


async def test_task_named_requests_select_a_model_served_only_as_stages(
    repo: Path, tmp_path: Path
) -> None:
    """A job naming only its task, on a network where the model is a chain of stages:
    the catalog lists the parent (never a stage), and the job runs through the chain,
    asked of a node with no models and of a stage's peer alike."""
    from test_shard import _greedy_whole

    gpt = "pydoc-gpt-small"
    models = [
        frozenset(),
        frozenset({f"{MINILM}@1of2", f"{gpt}@1of2"}),
        frozenset({f"{MINILM}@2of2", f"{gpt}@2of2"}),
    ]
    tokenizer = Tokenizer.from_file(str(BUNDLED / gpt / "tokenizer.json"))
    prompt = "The module"
    config = NodeConfig(data_dir=tmp_path, shutdown_grace=1.0, target_degree=0, models_dir=repo)
    with trio.fail_after(90):
        async with open_swarm(3, models=models, base=config) as swarm:
            await swarm.wait_converged()
            await wait_for_chains(swarm[0], MINILM, gpt)
            await wait_for_chains(swarm[1], gpt)
            catalogs = [
                {(e.model_id, e.stages) for e in swarm[i].catalog().entries()} for i in (0, 1)
            ]
            results, texts = [], []
            for i in (0, 1):
                async with Client.connect(swarm[i].addrs[0]) as client:
                    results.append(await client.submit_task("sentence-embedding", texts=TEXTS))
                    async with client.generate(
                        prompt, task="text-generation", max_tokens=16
                    ) as generation:
                        texts.append((await generation.text(), generation.summary))
    assert catalogs == [{(MINILM, 2), (gpt, 2)}] * 2
    whole = _whole(TEXTS)
    for result in results:
        assert result.model_id == MINILM and result.executor == swarm[2].peer_id
        np.testing.assert_allclose(result.outputs["embeddings"], whole, atol=1e-5, rtol=0)
    expected = tokenizer.decode(_greedy_whole(tokenizer.encode(prompt).ids, 16))
    for text, summary in texts:
        assert text == expected
        assert summary is not None and summary.model_id == gpt
