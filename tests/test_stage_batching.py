"""Continuous batching per stage: the decode steps of concurrent sessions of one stage
model run as one onnxruntime batch on the stage peer, and every session still gets
the whole model's tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio

from p2p_node import bundled_models_dir
from p2p_node._config import NodeConfig
from p2p_node._repository import read_model_card
from p2p_node._shard import shard, stage_id
from p2p_node._stages import (
    StageState,
    decode_rows,
    run_chain_locally,
    run_stage_batch,
)
from p2p_node.testing import open_swarm
from scheduler import JobError

BUNDLED = bundled_models_dir()
GPT = "pydoc-gpt-small"
PROMPTS = [[5, 17, 99, 3, 250, 7, 42], [11, 300, 4], [8, 8, 120, 77, 5, 61, 200, 33, 90, 14, 2]]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage-batch-repo")
    shard(BUNDLED / GPT, 2, out)
    shard(BUNDLED / GPT, 3, out)
    return out


def _greedy_whole(prompt: list[int], steps: int) -> list[int]:
    from test_shard import _greedy_whole as whole

    return whole(prompt, steps)


def _decode(token: int, position: int) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.array([[token]], np.int64),
        "attention_mask": np.ones((1, position + 1), np.int64),
        "position_ids": np.array([[position]], np.int64),
    }


@pytest.mark.parametrize("k", [2, 3])
def test_batched_stage_steps_of_sessions_of_different_lengths_match_the_whole_model(
    repo: Path, k: int
) -> None:
    from test_shard import _session

    cards = [read_model_card(repo / stage_id(GPT, i, k)) for i in range(k)]
    chain = [(_session(c.onnx_path), c.stage) for c in cards]
    states = [[StageState() for _ in range(k)] for _ in PROMPTS]
    tokens: list[list[int]] = []
    for prompt, st in zip(PROMPTS, states, strict=True):  # prefills alone
        n = len(prompt)
        feeds = {
            "input_ids": np.array([prompt], np.int64),
            "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None],
        }
        logits = run_chain_locally(chain, feeds, st, last_only=True)["logits"]  # type: ignore[arg-type]
        tokens.append([int(np.argmax(logits[0, -1]))])
    steps = 40
    for _ in range(steps - 1):  # every decode step of the 3 sessions: one run per stage
        received = [
            _decode(t[-1], len(p) + len(t) - 1) for p, t in zip(PROMPTS, tokens, strict=True)
        ]
        finals: list[dict[str, np.ndarray]] = [{} for _ in PROMPTS]
        for i, (session, spec) in enumerate(chain):
            for r, st in zip(received, states, strict=True):
                assert decode_rows(spec, r, st[i]) >= 0  # type: ignore[arg-type]
            out = run_stage_batch(
                session,  # type: ignore[arg-type]
                spec,  # type: ignore[arg-type]
                [(r, st[i], True) for r, st in zip(received, states, strict=True)],
            )
            received = [forward for forward, _ in out]
            for f, (_, made) in zip(finals, out, strict=True):
                f.update(made)
        for t, f in zip(tokens, finals, strict=True):
            assert f["logits"].shape == (1, 1, 512)
            t.append(int(np.argmax(f["logits"][0, -1])))
    assert tokens == [_greedy_whole(p, steps) for p in PROMPTS]
    # A prefill is no decode step: it runs alone.
    session, spec = chain[0]
    assert decode_rows(spec, {"input_ids": np.array([[1, 2]])}, StageState()) == -1  # type: ignore[arg-type]


async def test_concurrent_sessions_share_batches_at_each_stage_peer(
    repo: Path, tmp_path: Path
) -> None:
    models = [frozenset()] + [frozenset({f"{GPT}@{i}of2"}) for i in (1, 2)]
    steps = 30
    got: dict[int, list[int]] = {}
    config = NodeConfig(data_dir=tmp_path, shutdown_grace=1.0, target_degree=0, models_dir=repo)
    with trio.fail_after(120):
        async with open_swarm(3, models=models, base=config) as swarm:
            await swarm.wait_converged()
            while True:
                try:
                    swarm[0].chains.plan(GPT)
                    break
                except JobError:
                    await trio.sleep(0.05)

            async def one(i: int) -> None:
                got[i] = [t async for t in swarm[0].chains.generate(GPT, PROMPTS[i], steps)]

            async with trio.open_nursery() as nursery:
                for i in range(len(PROMPTS)):
                    nursery.start_soon(one, i)
            batchers = [swarm[j].chains.batchers[stage_id(GPT, j - 1, 2)] for j in (1, 2)]
    assert got == {i: _greedy_whole(p, steps) for i, p in enumerate(PROMPTS)}
    for b in batchers:
        # Every decode step ran, and some of them together: fewer runs than steps.
        assert b.rows == len(PROMPTS) * (steps - 1)
        assert b.largest >= 2
        assert b.runs < b.rows
