"""Continuous batching per stage: the decode steps of concurrent sessions of one stage
model run as one onnxruntime batch on the stage peer, and every session still gets
the whole model's tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio
from text_models import wait_for_chains

from p2p_node import _stages, bundled_models_dir
from p2p_node._config import ExecutorConfig, NodeConfig
from p2p_node._repository import read_model_card
from p2p_node._shard import copy_bundled_stages, stage_id
from p2p_node._stages import (
    StageState,
    Unpaddable,
    decode_rows,
    run_chain_locally,
    run_stage_batch,
)
from p2p_node.testing import open_swarm

BUNDLED = bundled_models_dir()
GPT = "pydoc-gpt-small"
PROMPTS = [[5, 17, 99, 3, 250, 7, 42], [11, 300, 4], [8, 8, 120, 77, 5, 61, 200, 33, 90, 14, 2]]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage-batch-repo")
    copy_bundled_stages(GPT, 2, out)
    copy_bundled_stages(GPT, 3, out)
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


@pytest.mark.parametrize(("k", "batch"), [(2, True), (3, True), (2, False)])
async def test_concurrent_sessions_share_batches_at_each_stage_peer(
    repo: Path, tmp_path: Path, k: int, batch: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A step waits for the others' frames until every task waits (all nodes run in
    # this process), not the production bound of a few ms that a loaded machine passes.
    monkeypatch.setattr(_stages, "GATHER_S", 30.0)
    monkeypatch.setattr(_stages, "GATHER_RUNS", 1e6)
    models = [frozenset()] + [frozenset({f"{GPT}@{i}of{k}"}) for i in range(1, k + 1)]
    steps = 30
    got: dict[int, list[int]] = {}
    config = NodeConfig(
        data_dir=tmp_path,
        shutdown_grace=1.0,
        target_degree=0,
        models_dir=repo,
        executor=ExecutorConfig(batch_decode=batch),  # False: --no-batch-decode
    )
    with trio.fail_after(120):
        async with open_swarm(k + 1, models=models, base=config) as swarm:
            await swarm.wait_converged()
            await wait_for_chains(swarm[0], GPT)

            async def one(i: int) -> None:
                got[i] = [t async for t in swarm[0].chains.generate(GPT, PROMPTS[i], steps)]

            async with trio.open_nursery() as nursery:
                for i in range(len(PROMPTS)):
                    nursery.start_soon(one, i)
            batchers = [
                swarm[j].chains.batchers.get(stage_id(GPT, j - 1, k)) for j in range(1, k + 1)
            ]
            # Hung up: every stage peer forgets the sessions' keys (and frees their caches).
            for _ in range(1000):
                if not any(swarm[j].chains.stage_keys for j in range(1, k + 1)) and not any(
                    b is not None and b.sessions for b in batchers
                ):
                    break
                await trio.sleep(0.01)
            else:
                raise AssertionError("a stage peer kept a session after the hang-up")
    assert got == {i: _greedy_whole(p, steps) for i, p in enumerate(PROMPTS)}
    if not batch:
        assert batchers == [None] * k
        return
    # Each stage but the last sent its batches' steps on to the next in frames of rows.
    assert all(b is not None and b.sent > 0 for b in batchers[:-1])
    # ... and the last sent the answers of its batches to the coordinator in frames of rows.
    assert batchers[-1] is not None and batchers[-1].answered > 0
    for b in batchers:
        assert b is not None
        # Every decode step ran, and some of them together: fewer runs than steps.
        assert b.rows == len(PROMPTS) * (steps - 1)
        assert b.largest >= 2
        assert b.runs < b.rows


def test_a_mask_that_cannot_be_padded_changes_nothing_and_steps_run_per_length(
    repo: Path,
) -> None:
    from test_shard import _session

    card = read_model_card(repo / stage_id(GPT, 0, 2))
    session, spec = _session(card.onnx_path), card.stage
    assert spec is not None
    states = [StageState(), StageState()]
    for prompt, state in zip(PROMPTS[:2], states, strict=True):
        n = len(prompt)
        feeds = {
            "input_ids": np.array([prompt], np.int64),
            "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None],
        }
        run_chain_locally([(session, spec)], feeds, [state])
    before = [dict(s.past) for s in states]
    # A session's own mask with a hole in it: which value pads it is not known.
    odd = _decode(1, len(PROMPTS[0]))
    odd["attention_mask"][0, 0] = 0
    steps = [(odd, states[0], True), (_decode(2, len(PROMPTS[1])), states[1], True)]
    with pytest.raises(Unpaddable):
        run_stage_batch(session, spec, steps)
    assert all(s.past == b for s, b in zip(states, before, strict=True))
    # Steps whose caches are as long run together without padding.
    assert len(run_stage_batch(session, spec, steps[:1])) == 1
    # A prefill is no decode step: it runs alone.
    assert decode_rows(spec, {"input_ids": np.array([[1, 2]])}, StageState()) == -1


def test_frames_of_rows_round_trip_and_bad_ones_are_value_errors() -> None:
    from p2p_node._stages import StageRows, StageStep, decode_frame, encode_rows, encode_step

    a, b = _decode(5, 3), _decode(9, 7)
    frame = decode_frame(encode_rows(StageRows([(3, a), (2**62, b)], True), 1 << 20), True)
    assert isinstance(frame, StageRows) and frame.last_only
    assert [k for k, _ in frame.rows] == [3, 2**62]
    for (_, got), sent in zip(frame.rows, (a, b), strict=True):
        assert all(np.array_equal(got[n], sent[n]) for n in sent)
    keyed = encode_step(StageStep(a, key=7), 1 << 20)
    step = decode_frame(keyed, True)
    assert isinstance(step, StageStep) and step.key == 7
    bad = [
        encode_rows(StageRows([(1, a)]), 1 << 20),  # rows on /1.0.0
        keyed,  # a key on /1.0.0
    ]
    for payload in bad:
        with pytest.raises(ValueError):
            decode_frame(payload, False)
    packed = [
        {"rows": []},
        {"rows": [[1, {}], [1, {}]]},
        {"rows": [[-1, {}]]},
        {"rows": [[True, {}]]},
        {"rows": [[1]]},
        {"rows": [[1, {}]], "last": 1},
        {"rows": [[1, {}]], "hops": []},
        {"rows": [[1, {"x": ["float32", [2], b"1234"]}]]},
        {"rows": [[0, {}]] * 300},
        {"t": {}, "k": 2**63},
    ]
    import msgpack

    for body in packed:
        with pytest.raises(ValueError):
            decode_frame(msgpack.packb(body), True)
    from p2p_node._stages import decode_answer_rows, encode_answer_rows

    answers = decode_answer_rows(msgpack.unpackb(encode_answer_rows([("s1", a)], 1 << 20)))
    assert [sid for sid, _ in answers] == ["s1"]
    assert np.array_equal(answers[0][1]["input_ids"], a["input_ids"])
    for body in (
        {"rows": []},
        {"rows": [["", {}]]},
        {"rows": [[1, {}]]},
        {"rows": [["s", {}]], "t": {}},
        {"rows": [["s", {"x": 1}]]},
        {"rows": "s"},
    ):
        with pytest.raises(ValueError):
            decode_answer_rows(body)


async def test_a_stage_peer_that_speaks_only_stage_1_0_0_gets_each_step_alone(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2p_node import _node

    # The stage peers serve /1.1.0 under another name: as an older peer, they do not speak it.
    monkeypatch.setattr(_node, "STAGE_BATCH_PROTOCOL", "/p2p-node/stage/0.0.0-none")
    monkeypatch.setattr(_node, "ANSWER_BATCH_PROTOCOL", "/p2p-node/stage-answer/0.0.0-none")
    monkeypatch.setattr(_stages, "GATHER_S", 30.0)
    monkeypatch.setattr(_stages, "GATHER_RUNS", 1e6)
    k, steps = 3, 12
    models = [frozenset()] + [frozenset({f"{GPT}@{i}of{k}"}) for i in range(1, k + 1)]
    config = NodeConfig(data_dir=tmp_path, shutdown_grace=1.0, target_degree=0, models_dir=repo)
    got: dict[int, list[int]] = {}
    with trio.fail_after(120):
        async with open_swarm(k + 1, models=models, base=config) as swarm:
            await swarm.wait_converged()
            await wait_for_chains(swarm[0], GPT)

            async def one(i: int) -> None:
                got[i] = [t async for t in swarm[0].chains.generate(GPT, PROMPTS[i], steps)]

            async with trio.open_nursery() as nursery:
                for i in range(len(PROMPTS)):
                    nursery.start_soon(one, i)
            batchers = [swarm[j].chains.batchers[stage_id(GPT, j - 1, k)] for j in (1, 2, 3)]
            unbatched = [swarm[j].chains.stage_unbatched for j in (0, 1, 2)]
            answers_unbatched = swarm[3].chains.answer_unbatched
    assert got == {i: _greedy_whole(p, steps) for i, p in enumerate(PROMPTS)}
    assert unbatched == [{swarm[j + 1].peer_id} for j in (0, 1, 2)]
    assert answers_unbatched == {swarm[0].peer_id}
    assert [(b.sent, b.answered) for b in batchers] == [(0, 0)] * 3
    assert all(b.runs < b.rows for b in batchers)  # each stage still batches
