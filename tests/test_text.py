"""Text jobs on one node: the [text] table, tokenization, limits, postprocessing,
and selection counting a text job's length in tokens."""

from __future__ import annotations

import threading
from pathlib import Path

import msgpack
import numpy as np
import onnxruntime as ort
import pytest
import trio
from text_models import HIDDEN, embedding_table, write_text_model, write_tokenizer

from gossip import ModelDescriptor, TensorSpec
from p2p_node import ExecutorConfig, _codec, bundled_models_dir
from p2p_node._cli import parse_args
from p2p_node._executor import TOKENIZE_INLINE_CHARS, Executor
from p2p_node._jobs import fingerprint
from p2p_node._messages import InvalidMessage, RunRequest, WireError
from p2p_node._repository import (
    Postprocess,
    RepositoryError,
    TextSpec,
    parse_text_spec,
    read_repository,
)
from p2p_node._text import TextModel, mean_pool_normalize
from scheduler import ErrorCode, InferenceRequest, InferenceResult, JobError
from selection import (
    AdvancedModelSelectionStrategy,
    ModelCatalog,
    PerformanceTracker,
    SelectionContext,
    select,
)
from selection._orchestrator import estimate_tokens

TASK = "sentence-embedding"
SENTENCES = ["the cat sat on the mat", "a dog runs fast in the park", "good movie"]


def executor(root: Path, **config: int) -> Executor:
    return Executor.from_cards(read_repository(root), ExecutorConfig(**config))


def reference_embeddings(texts: list[str], table: np.ndarray, tokenizer_path: Path) -> np.ndarray:
    """What the tiny encoder gives, computed here: each text alone, no padding."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    out = []
    for text in texts:
        vectors = table[tokenizer.encode(text).ids]
        mean = vectors.mean(axis=0)
        out.append(mean / np.linalg.norm(mean))
    return np.array(out, dtype=np.float32)


async def test_an_embedding_job_is_tokenized_pooled_and_normalised_per_text(tmp_path) -> None:
    model_dir = write_text_model(tmp_path, "emb", max_tokens=32)
    with trio.fail_after(30):
        execution = await executor(tmp_path).run("emb", {}, texts=SENTENCES)
    got = execution.outputs["embeddings"]
    want = reference_embeddings(SENTENCES, embedding_table(), model_dir / "tokenizer.json")
    assert got.shape == (len(SENTENCES), HIDDEN)
    assert np.allclose(got, want, atol=1e-5)  # padding of the shorter texts changed nothing
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


async def test_a_large_text_job_is_tokenized_off_the_event_loop(tmp_path, monkeypatch) -> None:
    write_text_model(tmp_path, "emb", max_tokens=32)
    threads: list[bool] = []
    prepare = TextModel.prepare

    def recording(self: TextModel, *args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread() is threading.main_thread())
        return prepare(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(TextModel, "prepare", recording)
    many = SENTENCES * (TOKENIZE_INLINE_CHARS // len("".join(SENTENCES)) + 1)
    with trio.fail_after(30):
        ex = executor(tmp_path)
        small = await ex.run("emb", {}, texts=SENTENCES)
        large = await ex.run("emb", {}, texts=many)
    assert threads == [True, False]  # a few sentences inline; many in a worker thread
    assert np.allclose(large.outputs["embeddings"][: len(SENTENCES)], small.outputs["embeddings"])


async def test_a_classifier_answers_label_names_from_its_table(tmp_path) -> None:
    write_text_model(tmp_path, "cls", max_tokens=32, classes=("neg", "pos", "neutral"))
    with trio.fail_after(30):
        execution = await executor(tmp_path).run("cls", {}, texts=SENTENCES)
    session = ort.InferenceSession(str(tmp_path / "cls" / "model.onnx"))
    probabilities = execution.outputs["probabilities"]
    assert probabilities.shape == (3, 3)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    for i, text in enumerate(SENTENCES):  # one at a time, against the graph itself
        from tokenizers import Tokenizer

        ids = np.array(
            [Tokenizer.from_file(str(tmp_path / "cls" / "tokenizer.json")).encode(text).ids]
        )
        logits = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
        assert execution.outputs["label"][i] == int(np.argmax(logits))
        assert execution.labels[i] == ("neg", "pos", "neutral")[int(np.argmax(logits))]


@pytest.mark.parametrize(
    ("texts", "config", "says"),
    [
        pytest.param([""], {}, "text 0 is empty", id="empty-text"),
        pytest.param(["good", ""], {}, "text 1 is empty", id="second-text-empty"),
        pytest.param(["good"] * 5, {"max_batch_rows": 4}, "cap of 4", id="too-many"),
        pytest.param(["the cat " * 10], {}, "limit of 8", id="too-long"),
    ],
)
async def test_bad_text_is_invalid_input_naming_the_limit(tmp_path, texts, config, says) -> None:
    write_text_model(tmp_path, "emb", max_tokens=8, truncation=False)
    with trio.fail_after(30), pytest.raises(JobError) as caught:
        await executor(tmp_path, **config).run("emb", {}, texts=texts)
    assert caught.value.code is ErrorCode.INVALID_INPUT
    assert says in caught.value.message


async def test_a_long_text_is_truncated_to_the_window_when_allowed(tmp_path) -> None:
    model_dir = write_text_model(tmp_path, "emb", max_tokens=8, truncation=False)
    long = "the cat sat on the mat in the park on a good day"
    with trio.fail_after(30):
        node = executor(tmp_path)
        cut = await node.run("emb", {}, texts=[long], truncate=True)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=8)
    vectors = embedding_table()[tokenizer.encode(long).ids]
    assert len(tokenizer.encode(long).ids) == 8
    mean = vectors.mean(axis=0)
    assert np.allclose(cut.outputs["embeddings"][0], mean / np.linalg.norm(mean), atol=1e-5)


async def test_a_model_that_truncates_itself_takes_a_long_text(tmp_path) -> None:
    write_text_model(tmp_path, "emb", max_tokens=8, truncation=True)
    with trio.fail_after(30):
        answer = await executor(tmp_path).run("emb", {}, texts=["the cat " * 50])
    assert answer.outputs["embeddings"].shape == (1, HIDDEN)


async def test_text_to_a_tensor_model_and_to_no_model_are_refused(tmp_path) -> None:
    write_text_model(tmp_path, "emb", max_tokens=8)
    (tmp_path / "digits-logreg").symlink_to(bundled_models_dir() / "digits-logreg")
    node = executor(tmp_path)
    with trio.fail_after(30):
        with pytest.raises(JobError) as tensors_only:
            await node.run("digits-logreg", {}, texts=["good"])
        with pytest.raises(JobError) as unknown:
            await node.run("nope", {}, texts=["good"])
    assert tensors_only.value.code is ErrorCode.INVALID_INPUT
    assert "text models: ['emb']" in tensors_only.value.message
    assert unknown.value.code is ErrorCode.UNKNOWN_MODEL


def test_an_already_pooled_output_is_only_normalised() -> None:
    pooled = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    assert np.allclose(mean_pool_normalize(pooled, mask), [[0.6, 0.8], [0.0, 1.0]])
    per_token = np.array([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]], dtype=np.float32)
    pooled_here = mean_pool_normalize(per_token, np.array([[1, 1, 0]]))  # padding left out
    assert np.allclose(pooled_here, [[2**-0.5, 2**-0.5]])


GOOD = {
    "tokenizer": "tokenizer.json",
    "max_tokens": 16,
    "truncation": True,
    "postprocess": "mean_pool_normalize",
    "inputs": {"ids": "input_ids"},
}


def test_a_text_table_parses_into_a_spec() -> None:
    spec = parse_text_spec(Path("m/model.toml"), GOOD)
    assert spec == TextSpec(
        Path("m/tokenizer.json"), 16, True, (("ids", "input_ids"),), Postprocess.MEAN_POOL_NORMALIZE
    )


@pytest.mark.parametrize(
    ("change", "says"),
    [
        pytest.param({"max_tokens": 0}, "max_tokens", id="max-tokens"),
        pytest.param({"tokenizer": "../x.json"}, "tokenizer", id="tokenizer-path"),
        pytest.param({"postprocess": "pool"}, "postprocess", id="postprocess"),
        pytest.param({"inputs": {"x": "pixels"}}, "inputs", id="unknown-input"),
        pytest.param({"truncation": "yes"}, "truncation", id="truncation"),
        pytest.param({"labels": ["a"]}, "labels", id="labels-without-postprocess"),
        pytest.param({"postprocess": "labels", "labels": ["x" * 129]}, "1 to 128", id="long-label"),
        pytest.param({"postprocess": "labels"}, "labels", id="postprocess-without-labels"),
        pytest.param({"colour": 1}, "unknown fields ['colour']", id="unknown-field"),
    ],
)
def test_a_bad_text_table_names_the_file_and_field(change, says) -> None:
    with pytest.raises(RepositoryError) as caught:
        parse_text_spec(Path("m/model.toml"), {**GOOD, **change})
    assert "m/model.toml" in str(caught.value) and says in str(caught.value)


def test_a_table_feeding_inputs_the_graph_lacks_fails_at_start(tmp_path) -> None:
    model_dir = write_text_model(tmp_path, "emb", max_tokens=8)
    toml = (model_dir / "model.toml").read_text()
    (model_dir / "model.toml").write_text(toml.replace('attention_mask = "attention_mask"\n', ""))
    with pytest.raises(RepositoryError, match="graph takes"):
        executor(tmp_path)


def test_a_missing_tokenizer_fails_at_start(tmp_path) -> None:
    model_dir = write_text_model(tmp_path, "emb", max_tokens=8)
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(RepositoryError, match="tokenizer"):
        executor(tmp_path)


# --- selection over text ---------------------------------------------------------------


def _descriptor(model_id: str, window: int, accuracy: float) -> ModelDescriptor:
    return ModelDescriptor(
        id=model_id,
        version="1",
        sha256="f" * 64,
        task_type="sentence-embedding",
        subtypes=(),
        languages=("en",),
        max_input_length=window,
        accuracy=accuracy,
        cost=1.0,
        description="",
        inputs=(TensorSpec("input_ids", "int64", (None, None)),),
        outputs=(TensorSpec("embeddings", "float32", (None, 8)),),
    )


CATALOG = ModelCatalog.from_records(
    [],
    local_peer_id="me",
    local_models=[_descriptor("small", 256, 0.9), _descriptor("large", 1024, 0.7)],
)
PRODUCT = {"input_length": 5000, "language": "en"}


@pytest.mark.parametrize("strategy", list(AdvancedModelSelectionStrategy))
def test_the_product_example_names_the_largest_window(strategy) -> None:
    with pytest.raises(JobError) as caught:
        select(
            strategy,
            "sentence-embedding",
            CATALOG,
            PerformanceTracker(),
            SelectionContext.parse(PRODUCT),
        )
    assert caught.value.code is ErrorCode.NO_FITTING_MODEL
    assert "input_length <= 1024" in caught.value.message


@pytest.mark.parametrize("strategy", list(AdvancedModelSelectionStrategy))
def test_with_truncation_allowed_the_largest_window_takes_it(strategy) -> None:
    context = SelectionContext.parse({**PRODUCT, "truncate": "true"})
    chosen = select(strategy, "sentence-embedding", CATALOG, PerformanceTracker(), context)
    assert chosen.model_ids == ["large"]
    assert [x.model_id for x in chosen.excluded] == ["small"]


def test_truncation_does_not_pass_over_a_window_that_fits() -> None:
    context = SelectionContext.parse({"input_length": 200, "truncate": True})
    chosen = select(
        AdvancedModelSelectionStrategy.MULTI_OBJECTIVE,
        "sentence-embedding",
        CATALOG,
        PerformanceTracker(),
        context,
    )
    assert chosen.best == "small"  # more accurate, and its window is long enough


def test_each_candidate_is_measured_in_its_own_tokens() -> None:
    chosen = select(
        AdvancedModelSelectionStrategy.MULTI_OBJECTIVE,
        "sentence-embedding",
        CATALOG,
        PerformanceTracker(),
        SelectionContext(),
        input_lengths={"small": 300, "large": 200},
    )
    assert chosen.model_ids == ["large"]
    assert chosen.excluded[0].reason == "input length 300 > its maximum 256"


@pytest.mark.parametrize(
    ("value", "parsed"), [("true", True), ("no", False), (1, True), (False, False)]
)
def test_truncate_in_a_context_reads_as_a_bool(value, parsed) -> None:
    context = SelectionContext.parse({"truncate": value})
    assert context.truncate is parsed
    assert SelectionContext.parse(context.to_wire()) == context


def test_truncate_must_be_a_truth_value() -> None:
    with pytest.raises(JobError) as caught:
        SelectionContext.parse({"truncate": "maybe"})
    assert caught.value.code is ErrorCode.INVALID_SELECTION


def test_the_token_estimate_never_undercounts_a_byte_level_tokenizer(tmp_path) -> None:
    tokenizer = write_tokenizer(tmp_path / "t.json")  # word level: fewer tokens than bytes
    for text in ["the cat", "héllo wörld ☃", "a" * 300]:
        assert estimate_tokens([text]) == len(text.encode("utf-8")) + 2
        assert estimate_tokens([text]) >= len(tokenizer.encode(text).ids)


# --- the command line --------------------------------------------------------------------

PEER = [
    "submit",
    "--peer",
    "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWMgBawwNoAtxb9FuYT4E1bDZyZfE4EK1H3pzfU6f3vTdM",
]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        pytest.param([*PEER, "--model", "m"], "give --input FILE, or texts", id="nothing"),
        pytest.param(
            [*PEER, "--model", "m", "--input", "x.npy", "--text", "hi"],
            "give --input FILE, or texts",
            id="both",
        ),
        pytest.param(
            [*PEER, "--model", "m", "--text", "hi", "--batch-size", "2", "--output", "o.npy"],
            "--batch-size and --outputs go with --input",
            id="batch",
        ),
        pytest.param(
            [*PEER, "--model", "m", "--input", "x.npy", "--truncate"],
            "--truncate goes with --text",
            id="truncate",
        ),
    ],
)
def test_text_flags_that_do_not_go_together(capsys, argv, says) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_args(argv)
    assert caught.value.code == 2
    assert f"p2p-node submit: error: {says}" in capsys.readouterr().err


def test_text_flags_are_taken(tmp_path) -> None:
    args = parse_args(
        [*PEER, "--task", TASK, "--text", "a", "--text", "b", "--texts-file", "t.txt", "--truncate"]
    )
    assert args.text == ["a", "b"] and args.texts_file == Path("t.txt") and args.truncate


def test_a_job_sent_again_is_the_same_text_job_only_with_the_same_texts() -> None:
    job = RunRequest("a", "m", {}, 100, texts=("good movie", "bad"))
    assert fingerprint(job) == fingerprint(RunRequest("b", "m", {}, 5, texts=("good movie", "bad")))
    for other in (
        RunRequest("a", "m", {}, 100, texts=("good movie",)),
        RunRequest("a", "m", {}, 100, texts=("good", "movie bad")),
        RunRequest("a", "m", {}, 100, texts=("good movie", "bad"), truncate=True),
    ):
        assert fingerprint(other) != fingerprint(job)


# --- on the wire ---------------------------------------------------------------------------


def test_texts_and_labels_cross_the_wire() -> None:
    job = RunRequest("a", "m", {}, 100, texts=("good movie", "ünïcode ☃"), truncate=True)
    assert _codec.decode_request(_codec.encode(job)) == job
    result = InferenceResult("a", "m", {}, "peer", 1.0, 2.0, labels=("pos", "neg"))
    assert _codec.decode_reply(_codec.encode(result)).labels == ("pos", "neg")  # type: ignore[union-attr]
    tensor_job = RunRequest("a", "m", {"x": np.zeros(2, np.float32)}, 100)
    assert b"texts" not in _codec.encode(tensor_job)  # sparse: older peers never see it


@pytest.mark.parametrize(
    ("texts", "says"),
    [
        pytest.param([], "texts must be a list of 1 to 1024 items, got 0", id="empty-list"),
        pytest.param([""], "text must be 1 to", id="empty-text"),
        pytest.param([b"raw bytes"], "text must be a string, got bytes", id="bytes"),
        pytest.param(["a"] * 1025, "1 to 1024 items, got 1025", id="too-many"),
        pytest.param("not a list", "texts must be a list", id="not-a-list"),
    ],
)
def test_bad_texts_from_a_peer_are_malformed(texts, says) -> None:
    raw = msgpack.unpackb(_codec.encode(RunRequest("a", "m", {}, 100, texts=("x",))))
    raw["texts"] = texts
    with pytest.raises(WireError) as caught:
        _codec.decode_request(msgpack.packb(raw, use_bin_type=True))
    assert caught.value.code is ErrorCode.MALFORMED_MESSAGE
    assert says in caught.value.message


def test_a_text_that_is_not_utf8_is_refused_before_it_is_read() -> None:
    payload = _codec.encode(RunRequest("a", "m", {}, 100, texts=("hello",)))
    with pytest.raises(WireError) as caught:
        _codec.decode_request(payload.replace(b"hello", b"h\xffllo"))
    assert caught.value.code is ErrorCode.MALFORMED_MESSAGE


def test_a_job_is_texts_or_tensors() -> None:
    with pytest.raises(InvalidMessage, match="texts or input tensors"):
        RunRequest("a", "m", {"x": np.zeros(1, np.float32)}, 100, texts=("x",))
    with pytest.raises(InvalidMessage, match="truncate goes with texts"):
        RunRequest("a", "m", {"x": np.zeros(1, np.float32)}, 100, truncate=True)
    with pytest.raises(ValueError, match="truncate goes with texts"):
        InferenceRequest("m", {"x": np.zeros(1, np.float32)}, truncate=True)
