"""The bundled text generators, run from their committed files with onnxruntime.

These check what a node relies on when it generates: the graph has Hugging
Face Optimum's decoder layout; a prefill then decode steps on the KV cache
give what re-running the whole sequence gives; and sessions of different
lengths give the same logits in one left-padded batch as alone, whether they
were prefilled together or join a batch between steps (continuous batching).
The builder (tools/gpt.py) is exercised only where torch is installed.
"""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from tokenizers import Tokenizer

from p2p_node import bundled_models_dir
from p2p_node._repository import read_model_card

GENERATORS = ("pydoc-gpt-small", "pydoc-gpt-large")
TOLERANCE = 1e-4
GREEDY_TOKENS = 30
PROMPTS = ("The import statement", "A class definition may be")
TOOLS = Path(__file__).resolve().parent.parent / "tools"

Feeds = dict[str, np.ndarray]


class Generator:
    """A committed generator's graph, tokenizer and declared decoder layout."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = model_dir
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.text = text_table(model_dir)
        decoder = self.text["decoder"]
        self.layers: int = decoder["layers"]
        self.heads: int = decoder["heads"]
        self.head_dim: int = decoder["head_dim"]
        self.eos: int = decoder["eos_token_id"]
        self.context: int = self.text["max_tokens"]
        self.past_names = [
            f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")
        ]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.heads, 0, self.head_dim)
        return [np.zeros(shape, np.float32) for _ in self.past_names]

    def run(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        positions: np.ndarray,
        past: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits and the present caches, from one run of the graph."""
        past = self.empty_past(len(ids)) if past is None else past
        feeds: Feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feeds.update(zip(self.past_names, past, strict=True))
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def prompt(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)


def text_table(model_dir: Path) -> dict[str, Any]:
    """The [text] table of model.toml."""
    with (model_dir / "model.toml").open("rb") as f:
        table: dict[str, Any] = tomllib.load(f)["text"]
    return table


def left_padded(prompts: list[list[int]], pad: int) -> tuple[np.ndarray, ...]:
    """ids, attention mask and position ids of prompts padded on the left."""
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask, positions_of(mask)


def positions_of(mask: np.ndarray) -> np.ndarray:
    """Position ids as Hugging Face computes them for left padding (0 on padding)."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)


def one_row(prompt: list[int]) -> tuple[np.ndarray, ...]:
    ids = np.asarray([prompt], np.int64)
    return ids, np.ones_like(ids), positions_of(np.ones_like(ids))


def greedy_with_cache(g: Generator, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens: one prefill, then one decode step per token on the cache;
    also each chosen token's logits row."""
    ids, mask, positions = one_row(prompt)
    logits, past = g.run(ids, mask, positions)
    tokens, rows = [], []
    for _ in range(n):
        rows.append(logits[0, -1])
        tokens.append(int(np.argmax(logits[0, -1])))
        length = mask.shape[1]
        mask = np.ones((1, length + 1), np.int64)
        step = np.asarray([[tokens[-1]]], np.int64)
        logits, past = g.run(step, mask, np.asarray([[length]], np.int64), past)
    return tokens, np.stack(rows)


@pytest.fixture(scope="module", params=GENERATORS)
def generator(request: pytest.FixtureRequest) -> Generator:
    return Generator(bundled_models_dir() / request.param)


# --- the committed files ---------------------------------------------------------------


def test_the_card_and_tokenizer_agree_with_the_graph(generator: Generator) -> None:
    card = read_model_card(generator.dir)
    vocab = generator.tokenizer.get_vocab_size()
    logits = generator.session.get_outputs()[0]

    assert (card.task_type, card.languages) == ("text-generation", ("en",))
    assert card.max_input_length == generator.context
    assert generator.text["tokenizer"] == "tokenizer.json"
    assert generator.text["postprocess"] == "generate"
    assert logits.shape[2] == vocab == generator.text["decoder"]["vocab_size"]
    assert generator.tokenizer.id_to_token(generator.eos) == "<|endoftext|>"
    assert generator.prompt("Hi")[0] == generator.text["decoder"]["bos_token_id"]


def test_the_tokenizer_round_trips_any_text(generator: Generator) -> None:
    text = "Déjà vu: naïve café, 東京, emoji 🐍 and\ttabs\n  indented"
    ids = generator.prompt(text)

    assert generator.tokenizer.decode(ids) == text  # the leading EOT is skipped


def test_the_graph_has_optimums_decoder_layout(generator: Generator) -> None:
    g = generator
    inputs = [(i.name, i.type, i.shape) for i in g.session.get_inputs()]
    outputs = [(o.name, o.type, o.shape) for o in g.session.get_outputs()]
    present = [name.replace("past_key_values", "present") for name in g.past_names]

    assert [n for n, _, _ in inputs] == [
        "input_ids",
        "attention_mask",
        "position_ids",
        *g.past_names,
    ]
    assert [n for n, _, _ in outputs] == ["logits", *present]
    assert [t for _, t, _ in inputs] == ["tensor(int64)"] * 3 + ["tensor(float)"] * 2 * g.layers
    assert all(t == "tensor(float)" for _, t, _ in outputs)
    for _, _, shape in inputs[:3]:
        assert len(shape) == 2 and not any(isinstance(d, int) for d in shape)
    for _, _, shape in inputs[3:] + outputs[1:]:
        assert isinstance(shape[0], str) and isinstance(shape[2], str)
        assert shape[1::2] == [g.heads, g.head_dim]


def test_prefill_then_decode_shapes(generator: Generator) -> None:
    g = generator
    ids, mask, positions = left_padded([g.prompt("ab"), g.prompt("a longer prompt")], g.eos)
    batch, seq = ids.shape
    logits, present = g.run(ids, mask, positions)
    vocab = g.tokenizer.get_vocab_size()

    assert logits.shape == (batch, seq, vocab)
    assert all(p.shape == (batch, g.heads, seq, g.head_dim) for p in present)
    step_mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    logits, present = g.run(ids[:, -1:], step_mask, positions[:, -1:] + 1, present)
    assert logits.shape == (batch, 1, vocab)
    assert all(p.shape == (batch, g.heads, seq + 1, g.head_dim) for p in present)


# --- the KV cache ----------------------------------------------------------------------


def test_decoding_on_the_cache_matches_rerunning_the_whole_sequence(
    generator: Generator,
) -> None:
    g = generator
    prompt = g.prompt(PROMPTS[0])
    tokens, cached_rows = greedy_with_cache(g, prompt, GREEDY_TOKENS)

    full, _ = g.run(*one_row(prompt + tokens))  # no cache: every position at once
    full_rows = full[0, len(prompt) - 1 : len(prompt) - 1 + GREEDY_TOKENS]
    assert [int(t) for t in np.argmax(full_rows, axis=1)] == tokens
    np.testing.assert_allclose(cached_rows, full_rows, rtol=0, atol=TOLERANCE)
    assert len(set(tokens)) > 1  # a real continuation, not one token repeated


# --- sessions of different lengths in one batch --------------------------------------


def test_a_left_padded_batch_gives_each_session_its_own_logits(generator: Generator) -> None:
    g = generator
    prompts = [g.prompt(PROMPTS[0]), g.prompt(PROMPTS[1] + " of several more words")]
    assert len(prompts[0]) != len(prompts[1])
    steps = 8
    alone = [greedy_with_cache(g, p, steps) for p in prompts]

    ids, mask, positions = left_padded(prompts, g.eos)
    logits, past = g.run(ids, mask, positions)
    for step in range(steps):
        for row, (_, rows) in enumerate(alone):
            np.testing.assert_allclose(logits[row, -1], rows[step], rtol=0, atol=TOLERANCE)
        chosen = np.asarray([[tokens[step]] for tokens, _ in alone], np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        logits, past = g.run(chosen, mask, positions[:, -1:] + 1 + step, past)


def test_sessions_prefilled_apart_decode_together(generator: Generator) -> None:
    """Continuous batching: each session's cache, left-padded to the longest, joins
    one decode batch, and a session leaves it between steps."""
    g = generator
    prompts = [g.prompt(PROMPTS[1]), g.prompt("x"), g.prompt(PROMPTS[0] + " in Python")]
    steps = 4
    alone = [greedy_with_cache(g, p, steps + 1) for p in prompts]
    caches, lengths = [], []
    for prompt in prompts:
        _, cache = g.run(*one_row(prompt))
        caches.append(cache)
        lengths.append(len(prompt))
    sessions = list(range(len(prompts)))
    fed = [0] * len(prompts)  # tokens of each session's continuation fed so far

    for step in range(steps):
        if step == 2:
            sessions.remove(1)  # finished: the others go on without it
        past_len = max(lengths[s] for s in sessions)
        past = [
            np.concatenate([pad_past(caches[s][k], past_len) for s in sessions])
            for k in range(len(g.past_names))
        ]
        mask = np.zeros((len(sessions), past_len + 1), np.int64)
        for row, s in enumerate(sessions):
            mask[row, past_len - lengths[s] :] = 1
        ids = np.asarray([[alone[s][0][fed[s]]] for s in sessions], np.int64)
        positions = np.asarray([[lengths[s]] for s in sessions], np.int64)
        logits, present = g.run(ids, mask, positions, past)
        for row, s in enumerate(sessions):
            fed[s] += 1
            want = alone[s][1][fed[s]]
            np.testing.assert_allclose(logits[row, 0], want, rtol=0, atol=TOLERANCE)
            caches[s] = [p[row : row + 1, :, past_len - lengths[s] :] for p in present]
            lengths[s] += 1


def pad_past(cache: np.ndarray, length: int) -> np.ndarray:
    """A [1, heads, past, head_dim] cache left-padded with zeros to `length`."""
    pad = length - cache.shape[2]
    return np.pad(cache, ((0, 0), (0, 0), (pad, 0), (0, 0)))


# --- the graph against a plain numpy GPT ------------------------------------------------


def numpy_gpt(
    weights: dict[str, np.ndarray],
    g: Generator,
    ids: np.ndarray,
    mask: np.ndarray,
    positions: np.ndarray,
    past: list[np.ndarray],
) -> tuple[np.ndarray, list[np.ndarray]]:
    """GPT-2's forward pass (pre-norm blocks, tanh GELU, output tied to the token
    embedding) over a cache, in numpy from the graph's weights, written apart
    from the graph: its logits and presents."""

    def norm(x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        scaled = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
        return scaled * weights[f"{name}.weight"] + weights[f"{name}.bias"]

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        return x @ weights[f"{name}.matrix"] + weights[f"{name}.bias"]

    def heads(t: np.ndarray) -> np.ndarray:  # [b, s, d] -> [b, heads, s, head_dim]
        return t.reshape(*t.shape[:2], g.heads, g.head_dim).transpose(0, 2, 1, 3)

    tokens = weights["model.token_embedding.weight"]
    x = tokens[ids] + weights["model.position_embedding.weight"][positions]
    seq, total = ids.shape[1], mask.shape[1]
    causal = np.arange(total)[None, :] <= np.arange(total - seq, total)[:, None]
    allowed = causal[None, None] & (mask[:, None, None, :] > 0)
    presents = []
    for i in range(g.layers):
        p = f"model.blocks.{i}"
        qkv = linear(norm(x, f"{p}.ln1"), f"{p}.attention.qkv")
        q, k, v = (heads(t) for t in np.split(qkv, 3, axis=-1))
        k = np.concatenate([past[2 * i], k], axis=2)
        v = np.concatenate([past[2 * i + 1], v], axis=2)
        presents += [k, v]
        # Finite, as torch's masked_fill: a padded query sees no key, and its row stays finite.
        scores = np.where(allowed, q @ k.transpose(0, 1, 3, 2) / np.sqrt(g.head_dim), -1e30)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attended = (scores / scores.sum(-1, keepdims=True)) @ v
        attended = attended.transpose(0, 2, 1, 3).reshape(x.shape)
        x = x + linear(attended, f"{p}.attention.proj")
        h = linear(norm(x, f"{p}.ln2"), f"{p}.mlp.0")
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
        x = x + linear(h, f"{p}.mlp.2")
    logits = norm(x, "model.ln_f") @ tokens.T
    return logits, presents


def test_the_graph_computes_a_gpt(generator: Generator) -> None:
    """The committed graph (onnxruntime's fused attention) against numpy, on a
    left-padded prefill and a decode step on its cache, at every position its mask
    keeps (a padded position's logits mean nothing)."""
    g = generator
    model = onnx.load(str(g.dir / "model.onnx"))
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    ids, mask, positions = left_padded([g.prompt(PROMPTS[1]), g.prompt("x")], g.eos)
    steps = [(ids, mask, positions)]
    step_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    steps.append((np.asarray([[5], [7]], np.int64), step_mask, positions[:, -1:] + 1))
    past = g.empty_past(2)
    for ids, mask, positions in steps:
        logits, present = g.run(ids, mask, positions, past)
        want, want_present = numpy_gpt(weights, g, ids, mask, positions, past)
        kept = mask[:, -ids.shape[1] :] > 0
        np.testing.assert_allclose(logits[kept], want[kept], rtol=0, atol=TOLERANCE)
        for got, cache in zip(present, want_present, strict=True):
            rows = got.transpose(0, 2, 1, 3)[mask > 0]
            np.testing.assert_allclose(rows, cache.transpose(0, 2, 1, 3)[mask > 0], atol=TOLERANCE)
        past = present


def test_the_committed_graph_is_what_gpt_fused_writes(
    generator: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tools/gpt_fused.py reads back its own graph and writes it again, byte for byte:
    the committed file is its output, and the builder's."""
    monkeypatch.syspath_prepend(str(TOOLS))
    import gpt_fused

    committed = (generator.dir / "model.onnx").read_bytes()
    assert gpt_fused.fuse(committed, generator.heads) == committed


# --- the builder (needs the build extra) ----------------------------------------------


def load_builder(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    pytest.importorskip("torch", reason="the generator builder needs the build extra (torch)")
    monkeypatch.syspath_prepend(str(TOOLS))  # its sibling gpt_fused
    spec = importlib.util.spec_from_file_location("p2p_tools_gpt", TOOLS / "gpt.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_builder_writes_a_generator_that_passes_these_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpt = load_builder(monkeypatch)
    tiny = gpt.GptSpec(
        "tiny-gpt",
        "A tiny test generator",
        vocab_size=300,
        context=48,
        layers=2,
        heads=2,
        d_model=16,
        steps=3,
        batch=2,
        learning_rate=1e-3,
        warmup=1,
    )
    corpus = gpt.load_corpus()
    small = gpt.Corpus(corpus.train[:20], corpus.validation[:2], (), ())
    (built,) = gpt.build_generators(tmp_path, [tiny], corpus=small)  # checks its own export
    g = Generator(tmp_path / "tiny-gpt")
    card = read_model_card(g.dir)

    assert (card.task_type, card.max_input_length) == ("text-generation", 48)
    assert 0.0 < card.accuracy == pytest.approx(built.accuracy, abs=1e-4)
    assert g.tokenizer.get_vocab_size() == 300
    prompt = g.prompt("Return the")
    tokens, cached = greedy_with_cache(g, prompt, 10)
    full, _ = g.run(*one_row(prompt + tokens))
    np.testing.assert_allclose(cached, full[0, len(prompt) - 1 : -1], rtol=0, atol=TOLERANCE)
