"""Stages: `p2p-node shard` splits a model at layer boundaries, and the stages, run
in turn, give what the whole model gives (embeddings to 1e-5, generation token for
token over 100 tokens)."""

from __future__ import annotations

import contextlib
import tomllib
from pathlib import Path

import msgpack
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_node import bundled_models_dir
from p2p_node._cli import main
from p2p_node._decoder import DecoderLayout
from p2p_node._generation import prefill_feeds
from p2p_node._repository import read_model_card, read_repository
from p2p_node._shard import ShardError, bundled_stages_dir, shard, stage_id
from p2p_node._stages import (
    StageState,
    StageStep,
    decode_answer,
    decode_step,
    encode_answer,
    encode_step,
    run_chain_locally,
)
from scheduler import ErrorCode, JobError

BUNDLED = bundled_models_dir()


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def stages_dir() -> Path:
    """The shipped splits: `test_the_bundled_stages_are_what_shard_writes` checks them."""
    return bundled_stages_dir()


def _chain(stages_dir: Path, model: str, k: int) -> list[tuple[ort.InferenceSession, object]]:
    cards = [read_model_card(stages_dir / stage_id(model, i, k)) for i in range(k)]
    return [(_session(c.onnx_path), c.stage) for c in cards]  # type: ignore[misc]


def test_stage_cards_say_parent_index_and_boundaries(stages_dir: Path) -> None:
    cards = [c for c in read_repository(stages_dir) if c.id.startswith("pydoc-gpt-small@")]
    assert len(cards) == 5
    middle = read_model_card(stages_dir / "pydoc-gpt-small@2of3")
    assert middle.stage is not None
    assert (middle.stage.parent, middle.stage.index, middle.stage.k) == ("pydoc-gpt-small", 1, 3)
    assert middle.stage.boundary_in and middle.stage.boundary_out
    assert "past_key_values.2.key" in middle.stage.inputs
    assert "input_ids" not in middle.stage.inputs
    assert middle.text is None  # a stage alone is no text model
    with (middle.onnx_path.parent / "model.toml").open("rb") as f:
        assert tomllib.load(f)["stage"]["text"]["postprocess"] == "generate"
    sha = {c.id: c.sha256 for c in cards}
    # Layers 0-1 of 4 make the first stage of both splits: the same graph, the same id.
    assert sha["pydoc-gpt-small@1of2"] == sha["pydoc-gpt-small@1of3"]
    assert len(set(sha.values())) == 4


@pytest.mark.parametrize("k", [2, 3])
def test_staged_embeddings_match_the_whole_model(stages_dir: Path, k: int) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(100, 2000, (3, 17)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    whole = _session(BUNDLED / "minilm-l6-v2" / "model.onnx").run(["sentence_embedding"], feeds)[0]
    staged = run_chain_locally(_chain(stages_dir, "minilm-l6-v2", k), feeds)  # type: ignore[arg-type]
    assert set(staged) == {"sentence_embedding"}
    np.testing.assert_allclose(staged["sentence_embedding"], whole, atol=1e-5, rtol=0)


def _greedy_whole(prompt: list[int], steps: int) -> list[int]:
    session = _session(BUNDLED / "pydoc-gpt-small" / "model.onnx")
    layout = DecoderLayout(4, 4, 32, 512, 0, 256)
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(names, prefill_feeds(prompt, layout)), strict=True))
    tokens = [int(np.argmax(out["logits"][0, -1]))]
    for _ in range(steps - 1):
        n = len(prompt) + len(tokens) - 1
        feeds = {
            "input_ids": np.array([[tokens[-1]]], np.int64),
            "attention_mask": np.ones((1, n + 1), np.int64),
            "position_ids": np.array([[n]], np.int64),
        }
        for i in range(4):
            feeds[f"past_key_values.{i}.key"] = out[f"present.{i}.key"]
            feeds[f"past_key_values.{i}.value"] = out[f"present.{i}.value"]
        out = dict(zip(names, session.run(names, feeds), strict=True))
        tokens.append(int(np.argmax(out["logits"][0, -1])))
    return tokens


@pytest.mark.parametrize("k", [2, 3])
def test_staged_generation_matches_token_for_token(stages_dir: Path, k: int) -> None:
    prompt = [5, 17, 99, 3, 250, 7, 42]
    steps = 100
    chain = _chain(stages_dir, "pydoc-gpt-small", k)
    states = [StageState() for _ in range(k)]
    n = len(prompt)
    feeds = {
        "input_ids": np.array([prompt], np.int64),
        "attention_mask": np.ones((1, n), np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }
    tokens = []
    for _ in range(steps):
        logits = run_chain_locally(chain, feeds, states, last_only=True)["logits"]  # type: ignore[arg-type]
        assert logits.shape == (1, 1, 512)
        tokens.append(int(np.argmax(logits[0, -1])))
        n += 1
        feeds = {
            "input_ids": np.array([[tokens[-1]]], np.int64),
            "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.array([[n - 1]], np.int64),
        }
    assert tokens == _greedy_whole(prompt, steps)


def test_shard_refuses_what_it_cannot_split(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="layers"):
        shard(BUNDLED / "pydoc-gpt-small", 5, tmp_path)
    with pytest.raises(ShardError, match="layers"):
        shard(BUNDLED / "pydoc-gpt-small", 0, tmp_path)
    with pytest.raises(ShardError, match="no layers"):
        shard(BUNDLED / "digits-logreg", 2, tmp_path)
    written = shard(BUNDLED / "pydoc-gpt-small", 2, tmp_path)
    with pytest.raises(ShardError, match="stage already"):
        shard(written[0], 2, tmp_path / "again")


def test_shard_command_writes_stage_directories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "shard",
            "--model",
            str(BUNDLED / "pydoc-gpt-small"),
            "--stages",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "pydoc-gpt-small@1of2",
        "pydoc-gpt-small@2of2",
    ]
    assert "wrote" in capsys.readouterr().out
    assert (
        main(
            [
                "shard",
                "--model",
                str(BUNDLED / "digits-logreg"),
                "--stages",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
        == 1
    )


def test_stage_frames_round_trip_and_refuse_bad_input() -> None:
    tensors = {"h": np.arange(6, dtype=np.float32).reshape(2, 3), "m": np.array([True, False])}
    step = decode_step(encode_step(StageStep(tensors, last_only=True), 1 << 20))
    assert step.last_only and not step.hops
    for name, value in tensors.items():
        np.testing.assert_array_equal(step.tensors[name], value)
        assert step.tensors[name].dtype == value.dtype
    with pytest.raises(JobError) as caught:
        encode_step(StageStep({"h": np.zeros(1000, np.float32)}), 1000)
    assert caught.value.code is ErrorCode.MESSAGE_TOO_LARGE and "1,000" in caught.value.message
    short = msgpack.packb({"t": {"x": ["float32", [2], b"\0" * 4]}})
    odd = msgpack.packb({"t": {"x": ["object", [1], b"\0" * 8]}})
    for bad in (b"\xc1", b"\x90", short, odd, msgpack.packb({"t": {}, "who": 1})):
        with pytest.raises(ValueError):
            decode_step(bad)
    answer = decode_answer(encode_answer({"x": np.ones((1, 2), np.float32)}, 1000))
    assert isinstance(answer, dict) and answer["x"].shape == (1, 2)


def test_the_bundled_stages_are_what_shard_writes(tmp_path: Path) -> None:
    shipped = {c.id: c for c in read_repository(bundled_stages_dir())}
    assert len(shipped) == 15
    for model in ("pydoc-gpt-small", "pydoc-gpt-large", "minilm-l6-v2"):
        for k in (2, 3):
            for directory in shard(BUNDLED / model, k, tmp_path):
                card = read_model_card(directory)
                assert shipped[card.id].sha256 == card.sha256, card.id
                there = shipped[card.id].onnx_path.parent
                assert sorted(p.name for p in there.iterdir()) == sorted(
                    p.name for p in directory.iterdir()
                )
                for name in ("model.toml", "tokenizer.json"):
                    assert (there / name).read_bytes() == (directory / name).read_bytes()


def test_a_default_node_announces_no_stage() -> None:
    """The splits live apart from bundled_models, so a default record does not grow."""
    assert not [c.id for c in read_repository(BUNDLED) if c.stage is not None]


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_stage_frames_from_any_bytes_are_a_step_or_a_value_error(data: bytes) -> None:
    for decode in (decode_step, decode_answer):
        with contextlib.suppress(ValueError):
            decode(data)
