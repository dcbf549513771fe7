"""The bundled sentence-embedding model minilm-l6-v2, run as its model.toml says.

These use only committed files: the int8 model.onnx, its tokenizer.json, and
tests/data/minilm-reference.npz (texts and their embeddings from the float64
numpy reference, tools/minilm_reference.py, on the pretrained fp32 weights).
The builder's own check over 128 sentences needs the weights' wheel; its
figures are in the model's README.md. The last test builds a tiny random BERT
with the builder and checks it against the reference, when the `build` extra is
installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from p2p_node._repository import ModelCard, TextSpec, bundled_models_dir, read_repository

FIXTURE = Path(__file__).parent / "data" / "minilm-reference.npz"
TOOLS = Path(__file__).resolve().parent.parent / "tools"
ENCODING_FIELDS = {
    "input_ids": "ids",
    "attention_mask": "attention_mask",
    "token_type_ids": "type_ids",
}
MIN_COSINE_INT8 = 0.99

Array = np.ndarray[Any, Any]


@pytest.fixture(scope="module")
def card() -> ModelCard:
    (card,) = read_repository(bundled_models_dir(), frozenset({"minilm-l6-v2"}))
    return card


@pytest.fixture(scope="module")
def embed(card: ModelCard) -> Any:
    """texts -> [n, 384] embeddings, tokenized and fed as the card's [text] table says."""
    text = card.text
    assert text is not None
    tokenizer = text_tokenizer(text)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(card.onnx_path), options, providers=["CPUExecutionProvider"])

    def run(texts: list[str]) -> Array:
        encodings = tokenizer.encode_batch(texts)
        feeds = {
            graph_input: np.array(
                [getattr(e, ENCODING_FIELDS[feature]) for e in encodings], np.int64
            )
            for graph_input, feature in text.inputs
        }
        (embeddings,) = session.run(["sentence_embedding"], feeds)
        result: Array = embeddings
        return result

    return run


def text_tokenizer(text: TextSpec) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(text.tokenizer_path))
    tokenizer.no_truncation()  # tokenizer.json has its own (128); the card's limit rules
    if text.truncation:
        tokenizer.enable_truncation(max_length=text.max_tokens)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest of a batch
    return tokenizer


def test_the_graph_takes_token_ids_and_gives_one_vector_per_text(card: ModelCard) -> None:
    session = ort.InferenceSession(str(card.onnx_path), providers=["CPUExecutionProvider"])
    inputs = {i.name: (i.type, len(i.shape)) for i in session.get_inputs()}
    assert inputs == dict.fromkeys(
        ("input_ids", "attention_mask", "token_type_ids"), ("tensor(int64)", 2)
    )
    (output,) = session.get_outputs()
    assert (output.name, output.type, output.shape[1]) == (
        "sentence_embedding",
        "tensor(float)",
        384,
    )


def test_embeddings_are_unit_vectors(embed: Any) -> None:
    got = embed(["A short one.", "A somewhat longer sentence about the weather in spring."])
    assert got.shape == (2, 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


_MEANING = {
    "guitar": (
        "A man is playing a guitar.",
        "Someone is strumming a guitar.",
        "The stock market fell sharply today.",
    ),
    "cooking": (
        "A woman is slicing an onion.",
        "Someone is cutting vegetables in a kitchen.",
        "The train to Paris leaves at noon.",
    ),
    "python-docs": (
        "The for statement iterates over the items of a sequence.",
        "A for loop runs its body once for each element of a list.",
        "Dogs are loyal animals that enjoy long walks.",
    ),
    "weather": (
        "It is raining heavily in the city tonight.",
        "There is a downpour in town this evening.",
        "He finished reading the novel in one afternoon.",
    ),
}


@pytest.mark.parametrize(("anchor", "paraphrase", "unrelated"), _MEANING.values(), ids=_MEANING)
def test_a_paraphrase_is_closer_than_an_unrelated_sentence(
    embed: Any, anchor: str, paraphrase: str, unrelated: str
) -> None:
    a, p, u = embed([anchor, paraphrase, unrelated])
    assert float(a @ p) > float(a @ u) + 0.3


def test_it_agrees_with_the_numpy_reference(embed: Any) -> None:
    fixture = np.load(FIXTURE)
    texts, reference = [str(t) for t in fixture["texts"]], fixture["embeddings"]
    assert len(texts) >= 8 and reference.shape == (len(texts), 384)
    cosines = np.sum(embed(texts) * reference, axis=1)
    assert cosines.min() >= MIN_COSINE_INT8, dict(zip(texts, cosines.round(4), strict=True))


def test_a_text_over_the_limit_is_cut_to_its_first_tokens(card: ModelCard) -> None:
    """The fixture's last text is over the limit: it is cut as sentence-transformers
    cuts, to [CLS], the first max_tokens - 2 tokens, [SEP]."""
    assert card.text is not None and card.text.truncation
    long_text = str(np.load(FIXTURE)["texts"][-1])
    whole = Tokenizer.from_file(str(card.text.tokenizer_path))
    whole.no_truncation()
    whole.no_padding()
    ids = whole.encode(long_text).ids
    assert len(ids) > card.text.max_tokens
    cut = text_tokenizer(card.text).encode(long_text).ids
    assert cut == [*ids[: card.text.max_tokens - 1], ids[-1]]


def test_padding_does_not_change_a_texts_embedding(embed: Any) -> None:
    sentence = "Exceptions can be handled with try statements."
    (alone,) = embed([sentence])
    padded, _ = embed([sentence, "A much longer sentence " * 12 + "pads the first one."])
    # Not equal: int8 activations are scaled per batch. Ignoring the mask gives 0.39.
    assert float(alone @ padded) > 0.995


def test_the_builder_and_the_reference_agree_on_a_tiny_random_bert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, card: ModelCard
) -> None:
    """tools/minilm.py's ONNX graph and tools/minilm_reference.py, written separately,
    give the same embeddings for random weights of BERT's layout; the int8 pass runs."""
    pytest.importorskip("safetensors", reason="the build extra builds MiniLM")
    from safetensors.numpy import save_file

    monkeypatch.syspath_prepend(str(TOOLS))
    import minilm
    import minilm_int8
    from minilm_reference import reference_embeddings

    assert card.text is not None
    config = {"hidden_act": "gelu", "position_embedding_type": "absolute"}
    config |= {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 4}
    config |= {"layer_norm_eps": 1e-12}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    (tmp_path / "tokenizer.json").write_bytes(card.text.tokenizer_path.read_bytes())
    weights = _random_bert(np.random.default_rng(0), vocab=30522, hidden=16, ffn=32, layers=2)
    save_file(weights, str(tmp_path / "model.safetensors"))

    shape = minilm.BertShape.read(tmp_path)
    model = minilm.build_graph(weights, shape)
    texts = ["A short one.", "Padding and the mask: a longer text " * 4, "Tiny."]
    tokenizer = minilm.batch_tokenizer(tmp_path / "tokenizer.json", shape.max_tokens)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(["sentence_embedding"], minilm.feeds(tokenizer, texts))
    reference = reference_embeddings(tmp_path, texts, shape.max_tokens)
    np.testing.assert_allclose(minilm.cosines(got, reference), 1.0, atol=1e-5)

    calibration = [minilm.feeds(tokenizer, [t]) for t in texts]
    int8 = minilm_int8.quantize(model, calibration, tmp_path)
    quantized = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    (got8,) = quantized.run(["sentence_embedding"], minilm.feeds(tokenizer, texts))
    assert got8.shape == (3, 16) and minilm.cosines(got8, reference).min() > 0.9


def _random_bert(
    rng: np.random.Generator, vocab: int, hidden: int, ffn: int, layers: int
) -> dict[str, Array]:
    def normal(*shape: int, scale: float = 0.5) -> Array:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {
        "embeddings.word_embeddings.weight": normal(vocab, hidden),
        "embeddings.position_embeddings.weight": normal(512, hidden),
        "embeddings.token_type_embeddings.weight": normal(2, hidden),
        "embeddings.LayerNorm.weight": 1 + normal(hidden, scale=0.1),
        "embeddings.LayerNorm.bias": normal(hidden, scale=0.1),
    }
    linears = {
        "attention.self.query": (hidden, hidden),
        "attention.self.key": (hidden, hidden),
        "attention.self.value": (hidden, hidden),
        "attention.output.dense": (hidden, hidden),
        "intermediate.dense": (ffn, hidden),
        "output.dense": (hidden, ffn),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name, (n_out, n_in) in linears.items():
            weights[p + name + ".weight"] = normal(n_out, n_in, scale=n_in**-0.5)
            weights[p + name + ".bias"] = normal(n_out, scale=0.1)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            weights[p + norm + ".weight"] = 1 + normal(hidden, scale=0.1)
            weights[p + norm + ".bias"] = normal(hidden, scale=0.1)
    return weights
