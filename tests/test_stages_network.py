"""Chains over real nodes: activations go stage peer to stage peer, the answers match
the whole model's, a stage peer killed mid-generation is replaced without the client
seeing an error, and no node needs memory for the whole model."""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import trio
from text_models import wait_for_chains

from p2p_node import bundled_models_dir
from p2p_node._config import ExecutorConfig, NodeConfig
from p2p_node._repository import read_model_card
from p2p_node._shard import copy_bundled_stages
from p2p_node.testing import open_swarm
from scheduler import ErrorCode, JobError

BUNDLED = bundled_models_dir()
GPT = "pydoc-gpt-small"
MINILM = "minilm-l6-v2"
PROMPT = [5, 17, 99, 3, 250, 7, 42]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage-repo")
    copy_bundled_stages(GPT, 3, out)
    copy_bundled_stages(MINILM, 2, out)
    shutil.copytree(BUNDLED / GPT, out / GPT)
    return out


def _base(repo: Path, tmp: Path, **changes: object) -> NodeConfig:
    config = NodeConfig(data_dir=tmp, shutdown_grace=1.0, target_degree=0, models_dir=repo)
    return replace(config, **changes)  # type: ignore[arg-type]


def _greedy_whole(prompt: list[int], steps: int) -> list[int]:
    from test_shard import _greedy_whole as whole

    return whole(prompt, steps)


# Node 0 coordinates, 1 serves stage 1, 2 and 3 both serve stage 2, 4 serves stage 3.
MIDDLE_TWICE = [
    frozenset(),
    frozenset({f"{GPT}@1of3"}),
    frozenset({f"{GPT}@2of3"}),
    frozenset({f"{GPT}@2of3"}),
    frozenset({f"{GPT}@3of3"}),
]


async def test_embedding_through_two_stage_peers_matches_the_whole_model(
    repo: Path, tmp_path: Path
) -> None:
    models = [frozenset(), frozenset({f"{MINILM}@1of2"}), frozenset({f"{MINILM}@2of2"})]
    rng = np.random.default_rng(1)
    ids = rng.integers(100, 3000, (2, 21)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, 15:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    whole = ort.InferenceSession(
        str(BUNDLED / MINILM / "model.onnx"), providers=["CPUExecutionProvider"]
    ).run(["sentence_embedding"], feeds)[0]
    with trio.fail_after(60):
        async with open_swarm(3, models=models, base=_base(repo, tmp_path)) as swarm:
            await swarm.wait_converged()
            await wait_for_chains(swarm[0], MINILM)
            plan = swarm[0].chains.plan(MINILM)
            assert plan.peers == (swarm[1].peer_id, swarm[2].peer_id)
            staged = await swarm[0].chains.run(MINILM, feeds)
            # Each stage peer counts its runs, as it does jobs: records announce them.
            for i, stage in ((1, f"{MINILM}@1of2"), (2, f"{MINILM}@2of2")):
                assert [p.model_id for p in swarm[i].executor.performance()] == [stage]
    np.testing.assert_allclose(staged["sentence_embedding"], whole, atol=1e-5, rtol=0)
    # Stage 2's peer got the activations from stage 1's, not from the coordinator.
    assert set(staged) == {"sentence_embedding"}


async def test_activations_over_the_request_limit_are_a_typed_error(
    repo: Path, tmp_path: Path
) -> None:
    models = [frozenset(), frozenset({f"{MINILM}@1of2"}), frozenset({f"{MINILM}@2of2"})]
    ids = np.full((4, 200), 1000, np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
    base = _base(repo, tmp_path, max_request_bytes=256 * 1024)
    with trio.fail_after(60):
        async with open_swarm(3, models=models, base=base) as swarm:
            await swarm.wait_converged()
            await wait_for_chains(swarm[0], MINILM)
            with pytest.raises(JobError) as caught:
                await swarm[0].chains.run(MINILM, feeds)
    assert caught.value.code is ErrorCode.MESSAGE_TOO_LARGE
    assert "262,144" in caught.value.message and "max_request_bytes" in caught.value.message


async def test_generation_through_three_stage_peers_token_for_token(
    repo: Path, tmp_path: Path
) -> None:
    models = [frozenset()] + [frozenset({f"{GPT}@{i}of3"}) for i in (1, 2, 3)]
    with trio.fail_after(120):
        async with open_swarm(4, models=models, base=_base(repo, tmp_path)) as swarm:
            await swarm.wait_converged()
            await wait_for_chains(swarm[0], GPT)
            tokens = [t async for t in swarm[0].chains.generate(GPT, PROMPT, 100)]
    assert tokens == _greedy_whole(PROMPT, 100)


async def test_consecutive_stages_on_one_peer_run_without_a_hop(repo: Path, tmp_path: Path) -> None:
    models = [frozenset({f"{GPT}@1of3", f"{GPT}@2of3"}), frozenset({f"{GPT}@3of3"})]
    with trio.fail_after(60):
        async with open_swarm(2, models=models, base=_base(repo, tmp_path)) as swarm:
            await swarm.wait_converged()
            await wait_for_chains(swarm[0], GPT)
            plan = swarm[0].chains.plan(GPT)
            assert plan.peers == (swarm[0].peer_id, swarm[0].peer_id, swarm[1].peer_id)
            assert "no hop" in plan.hops[1].reason
            tokens = [t async for t in swarm[0].chains.generate(GPT, PROMPT, 20)]
    assert tokens == _greedy_whole(PROMPT, 20)


async def test_a_middle_stage_peer_killed_mid_generation_is_replaced(
    repo: Path, tmp_path: Path
) -> None:
    models = MIDDLE_TWICE
    with trio.fail_after(120):
        async with open_swarm(5, models=models, base=_base(repo, tmp_path)) as swarm:
            await swarm.wait_converged()
            await wait_for_chains(swarm[0], GPT)
            chains = swarm[0].chains
            used = chains.plan(GPT).peers[1]
            victim = next(i for i in (2, 3) if swarm[i].peer_id == used)
            tokens = []
            async for token in chains.generate(GPT, PROMPT, 60):
                tokens.append(token)
                if len(tokens) == 20:
                    await swarm.kill(victim)
    assert tokens == _greedy_whole(PROMPT, 60)
    assert len(chains.times.failovers) == 1


async def test_no_node_can_hold_the_whole_model_yet_jobs_succeed(
    repo: Path, tmp_path: Path
) -> None:
    whole_mb = sum(f.stat().st_size for f in (BUNDLED / GPT).iterdir()) / (1 << 20)
    budget = whole_mb * 0.6  # below the whole model, above its largest stage
    executor = ExecutorConfig(model_memory_mb=budget)
    assert read_model_card(repo / GPT).memory_bytes > budget * (1 << 20)
    models = [frozenset({f"{GPT}@{i}of3"}) for i in (1, 2, 3)]
    with trio.fail_after(60):
        base = _base(repo, tmp_path, executor=executor)
        async with open_swarm(3, models=models, base=base) as swarm:
            await swarm.wait_converged()
            await wait_for_chains(swarm[0], GPT)
            for i in range(3):
                assert swarm[i].executor.models.used_bytes <= budget * (1 << 20)
            tokens = [t async for t in swarm[0].chains.generate(GPT, PROMPT, 30)]
    assert tokens == _greedy_whole(PROMPT, 30)


async def test_a_job_on_a_model_served_only_as_stages_goes_through_the_chain(
    repo: Path, tmp_path: Path
) -> None:
    from p2p_node import Client

    models = [frozenset(), frozenset({f"{MINILM}@1of2"}), frozenset({f"{MINILM}@2of2"})]
    ids = np.array([[101, 2023, 2003, 1037, 3231, 102]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
    whole = ort.InferenceSession(
        str(BUNDLED / MINILM / "model.onnx"), providers=["CPUExecutionProvider"]
    ).run(["sentence_embedding"], feeds)[0]
    with trio.fail_after(60):
        async with open_swarm(3, models=models, base=_base(repo, tmp_path)) as swarm:
            await swarm.wait_converged()
            await wait_for_chains(swarm[0], MINILM)
            async with Client.connect(swarm[0].addrs[0]) as client:
                result = await client.submit(MINILM, feeds)
                named = await client.submit(MINILM, feeds, outputs=["sentence_embedding"])
                with pytest.raises(JobError) as unknown:
                    await client.submit(MINILM, feeds, outputs=["logits"])
    assert result.executor == swarm[2].peer_id  # the last stage's peer answered
    np.testing.assert_allclose(result.outputs["sentence_embedding"], whole, atol=1e-5, rtol=0)
    assert list(named.outputs) == ["sentence_embedding"]
    assert unknown.value.code is ErrorCode.INVALID_INPUT
    assert "'logits'" in unknown.value.message and "sentence_embedding" in unknown.value.message


async def test_generate_protocol_runs_a_generation_through_the_chain(
    repo: Path, tmp_path: Path
) -> None:
    from tokenizers import Tokenizer

    from p2p_node import Client

    tokenizer = Tokenizer.from_file(str(BUNDLED / GPT / "tokenizer.json"))
    prompt = "The module"
    models = [frozenset({f"{GPT}@{i}of3"}) for i in (1, 2, 3)]
    with trio.fail_after(60):
        async with open_swarm(3, models=models, base=_base(repo, tmp_path)) as swarm:
            await swarm.wait_converged()
            await wait_for_chains(swarm[0], GPT)
            async with Client.connect(swarm[0].addrs[0]) as client:
                async with client.generate(prompt, GPT, max_tokens=24) as generation:
                    text = await generation.text()
    summary = generation.summary
    assert summary is not None and summary.executor == swarm[2].peer_id
    expected = _greedy_whole(tokenizer.encode(prompt).ids, 24)
    assert summary.tokens == len(expected)
    assert text == tokenizer.decode(expected)


async def test_demo_stages_serves_models_bigger_than_any_node() -> None:
    from p2p_node._demo_stages import run_stage_demo

    with trio.fail_after(120):
        notes, rows = await run_stage_demo()
    assert len(rows) == 3 and "same as whole" in rows[1][3]
    assert "max |staged - whole| 0.0e+00" in rows[2][3]
    assert all("every node's --model-memory-mb" in note for note in notes)


async def test_bad_stage_steps_get_typed_errors_and_the_node_goes_on(
    repo: Path, tmp_path: Path
) -> None:
    from p2p_node._channel import Channel
    from p2p_node._stages import (
        ANSWER_PROTOCOL,
        STAGE_BATCH_PROTOCOL,
        STAGE_PROTOCOL,
        Hop,
        StageFailure,
        StageRows,
        StageStep,
        decode_answer,
        encode_rows,
        encode_step,
    )

    models = [frozenset(), frozenset({f"{MINILM}@1of2"}), frozenset({f"{MINILM}@2of2"})]
    with trio.fail_after(60):
        async with open_swarm(3, models=models, base=_base(repo, tmp_path)) as swarm:
            await swarm.wait_converged()
            target = swarm[1].peer_id
            steps = [
                b"\xc1garbage",
                encode_step(
                    StageStep({}, (Hop(target, "no-such@1of2"),), reply=("x", "y")), 1 << 20
                ),
                encode_step(StageStep({}, (Hop(swarm[2].peer_id, f"{MINILM}@2of2"),)), 1 << 20),
                encode_step(
                    StageStep({}, (Hop(target, f"{MINILM}@1of2"),), reply=("x", "y")), 1 << 20
                ),
            ]
            codes = []
            for payload in steps:
                stream = await swarm[0].open_stream(target, STAGE_PROTOCOL, 5)
                channel = Channel(stream, 1 << 20)
                await channel.send(payload)
                answer = decode_answer(await channel.receive())
                assert isinstance(answer, StageFailure)
                codes.append(answer.code)
                await channel.discard()
            # On /1.1.0: rows before a session's first step, or of a key never opened.
            ids = np.array([[101, 2023, 102]], np.int64)
            feeds = {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "token_type_ids": 0 * ids,
            }
            hops = (Hop(target, f"{MINILM}@1of2"), Hop(swarm[2].peer_id, f"{MINILM}@2of2"))
            first = StageStep(feeds, hops, reply=(swarm[0].peer_id, "nobody's"), key=1)
            for frames in (
                [encode_rows(StageRows([(1, {})]), 1 << 20)],
                [encode_step(first, 1 << 20), encode_rows(StageRows([(2, {})]), 1 << 20)],
            ):
                stream = await swarm[0].open_stream(target, STAGE_BATCH_PROTOCOL, 5)
                channel = Channel(stream, 1 << 20)
                for payload in frames:
                    await channel.send(payload)
                answer = decode_answer(await channel.receive())
                assert isinstance(answer, StageFailure)
                codes.append(answer.code)
                await channel.discard()
            # Answers for a session nobody opened are dropped.
            stream = await swarm[0].open_stream(target, ANSWER_PROTOCOL, 5)
            channel = Channel(stream, 1 << 20)
            await channel.send(b"\x81\xa1s\xa4nope")
            await channel.discard()
            await wait_for_chains(swarm[0], MINILM)
            ids = np.array([[101, 2023, 102]], np.int64)
            feeds = {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "token_type_ids": 0 * ids,
            }
            staged = await swarm[0].chains.run(MINILM, feeds)
    assert codes == [
        ErrorCode.MALFORMED_MESSAGE,
        ErrorCode.UNKNOWN_MODEL,
        ErrorCode.MALFORMED_MESSAGE,
        ErrorCode.INVALID_INPUT,
        ErrorCode.MALFORMED_MESSAGE,
        ErrorCode.MALFORMED_MESSAGE,
    ]
    assert staged["sentence_embedding"].shape == (1, 384)


async def test_a_frozen_stage_peer_is_replaced_when_the_failure_detector_drops_it(
    repo: Path, tmp_path: Path
) -> None:
    models = MIDDLE_TWICE
    # Stages run in worker threads, so that holding a node's workers freezes it.
    base = _base(repo, tmp_path, executor=ExecutorConfig(inline_below_ms=0))
    with trio.fail_after(90):
        async with open_swarm(5, models=models, base=base) as swarm:
            await swarm.wait_converged()
            await wait_for_chains(swarm[0], GPT)
            chains = swarm[0].chains
            used = chains.plan(GPT).peers[1]
            victim = next(i for i in (2, 3) if swarm[i].peer_id == used)
            tokens = []
            with ExitStack() as frozen:
                async for token in chains.generate(GPT, PROMPT, 40):
                    tokens.append(token)
                    if len(tokens) == 10:  # alive, connected, silent and stuck
                        frozen.enter_context(swarm.busy(victim))
                        swarm.stall(victim, 60)
    assert tokens == _greedy_whole(PROMPT, 40)
    assert len(chains.times.failovers) == 1
