"""Build the bundled text generators: small GPTs trained on Python's own documentation.

Each generator is a decoder-only transformer (GPT-2 layout: learned token and
position embeddings, pre-norm blocks, tied output embedding) trained from
scratch on English text that ships with Python itself, so the build needs no
download:

- ``pydoc_data.topics``: the language reference topics ``help()`` shows
  (about 465k characters);
- the docstrings of the standard library's modules, classes and functions,
  read with ``ast`` from the source files (test packages left out).

Each document (one topic, or one module's docstrings) goes whole to training
or to validation, by a seeded shuffle. The tokenizer (``tokenizers``, byte-level
BPE, so any UTF-8 text encodes) is trained on the training documents only.

The graph is exported in the layout of Hugging Face Optimum's decoder exports,
so a node serves it the way it would serve an exported GPT-2::

    inputs   input_ids                int64   [batch, seq]
             attention_mask           int64   [batch, past + seq]
             position_ids             int64   [batch, seq]
             past_key_values.{i}.key  float32 [batch, heads, past, head_dim]
             past_key_values.{i}.value
    outputs  logits                   float32 [batch, seq, vocab]
             present.{i}.key          float32 [batch, heads, past + seq, head_dim]
             present.{i}.value

One graph serves prefill (past 0) and decode (seq 1). Attention honours
``attention_mask`` over past and new positions, so sessions of different
lengths can share a batch, left-padded. ``position_ids`` index the position
embedding and must lie in ``[0, context)``. The export uses the TorchScript
exporter (``dynamo=False``): the newer exporter fixes the sequence length
from the example ``input_ids``. The export is then written again with
onnxruntime's fused attention (``tools/gpt_fused.py``: the same weights, inputs
and outputs, a decode step 1.2-1.3x faster), and that graph is the one checked
against torch and shipped.

Requires the ``build`` extra (torch) plus tokenizers and onnxruntime.
Run: ``python tools/build_models.py --only generators``.
"""

from __future__ import annotations

import ast
import io
import json
import math
import pydoc_data.topics
import random
import sys
import sysconfig
import time
import tomllib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import onnxruntime as ort
import torch
from gpt_fused import decode_latency_us, fuse
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from torch.nn import functional

SEED = 0
VERSION = "1.0.0"
VALIDATION_FRACTION = 0.05
EOT = "<|endoftext|>"  # id 0: separates documents, starts every prompt, ends a generation
OPSET = 17
# One thread: on a shared 2-core machine a second one mostly spins waiting for the first.
TRAIN_THREADS = 1
MAX_ONNX_BYTES = 30 * 1024 * 1024
MASKED = torch.finfo(torch.float32).min  # finite, so a fully padded row stays finite
EXPORT_CHECK_TOLERANCE = 1e-4
SKIPPED_STDLIB_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "lib2to3"})


@dataclass(frozen=True)
class GptSpec:
    """One generator: its size, its tokenizer and how long to train it."""

    model_id: str
    summary: str  # description prefix
    vocab_size: int  # byte-level BPE: 256 bytes, EOT, then merges
    context: int
    layers: int
    heads: int
    d_model: int
    steps: int
    batch: int
    learning_rate: float
    warmup: int = 100

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


GPT_SPECS: tuple[GptSpec, ...] = (
    GptSpec(
        "pydoc-gpt-small",
        "BPE GPT (4 layers, d 128, context 256 tokens, 512-token vocabulary) trained on "
        "Python's documentation",
        vocab_size=512,
        context=256,
        layers=4,
        heads=4,
        d_model=128,
        steps=500,
        batch=16,
        learning_rate=3e-3,
        warmup=50,
    ),
    GptSpec(
        "pydoc-gpt-large",
        "BPE GPT (4 layers, d 192, context 1024 tokens, 1024-token vocabulary) trained on "
        "Python's documentation",
        vocab_size=1024,
        context=1024,
        layers=4,
        heads=6,
        d_model=192,
        steps=500,
        batch=2,
        learning_rate=2e-3,
        warmup=50,
    ),
)


# --------------------------------------------------------------------------- text


def pydoc_topics() -> list[tuple[str, str]]:
    """The language reference topics, as (name, text)."""
    topics: dict[str, str] = pydoc_data.topics.topics
    return [(f"topic:{name}", text) for name, text in sorted(topics.items())]


def stdlib_docstrings() -> list[tuple[str, str]]:
    """Per standard-library module, its docstrings joined by blank lines, as (name, text)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(lib.rglob("*.py")):
        parts = path.relative_to(lib).parts
        if any(p in SKIPPED_STDLIB_PARTS or p.startswith("test") for p in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are templates or in other encodings
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docs = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds)]
        text = "\n\n".join(d for d in docs if d)
        if text:
            documents.append(("module:" + "/".join(parts), text))
    return documents


@dataclass(frozen=True)
class Corpus:
    """The documents, split whole into training and validation by a seeded shuffle."""

    train: tuple[str, ...]
    validation: tuple[str, ...]
    train_names: tuple[str, ...] = field(repr=False)
    validation_names: tuple[str, ...] = field(repr=False)


def load_corpus() -> Corpus:
    documents = pydoc_topics() + stdlib_docstrings()
    order = list(range(len(documents)))
    random.Random(SEED).shuffle(order)
    n_validation = max(1, round(VALIDATION_FRACTION * len(documents)))
    validation = sorted(order[:n_validation])
    train = sorted(order[n_validation:])
    return Corpus(
        train=tuple(documents[i][1] for i in train),
        validation=tuple(documents[i][1] for i in validation),
        train_names=tuple(documents[i][0] for i in train),
        validation_names=tuple(documents[i][0] for i in validation),
    )


# ---------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer with EOT as id 0, prepended to every encoding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.token_to_id(EOT) != 0 or tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, EOT not id 0")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, 0)]
    )
    return tokenizer


def token_stream(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """All texts as one int64 stream, each document preceded by EOT."""
    encodings = tokenizer.encode_batch(list(texts))  # the post-processor adds the EOT
    return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encodings])


# -------------------------------------------------------------------------- model


class Attention(nn.Module):
    def __init__(self, spec: GptSpec) -> None:
        super().__init__()
        self.heads, self.head_dim = spec.heads, spec.head_dim
        self.qkv = nn.Linear(spec.d_model, 3 * spec.d_model)
        self.proj = nn.Linear(spec.d_model, spec.d_model)

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor | None, past: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`allowed` [batch, 1, seq, past + seq] says which keys each query sees;
        None means plain causal attention with no past (training)."""
        batch, seq, d_model = x.shape
        q, k, v = (
            t.reshape(batch, seq, self.heads, self.head_dim).transpose(1, 2)
            for t in self.qkv(x).split(d_model, dim=2)
        )
        if allowed is None:
            out = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
            scores = (q @ k.transpose(2, 3)) * (1.0 / math.sqrt(self.head_dim))
            out = scores.masked_fill(~allowed, MASKED).softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(batch, seq, d_model)
        return self.proj(out), k, v


class Block(nn.Module):
    def __init__(self, spec: GptSpec) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(spec.d_model)
        self.attention = Attention(spec)
        self.ln2 = nn.LayerNorm(spec.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(spec.d_model, 4 * spec.d_model),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * spec.d_model, spec.d_model),
        )

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor | None, past: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attended, k, v = self.attention(self.ln1(x), allowed, past)
        x = x + attended
        return x + self.mlp(self.ln2(x)), k, v


class Gpt(nn.Module):
    """GPT-2's shape, small: learned positions, pre-norm blocks, tied output embedding."""

    def __init__(self, spec: GptSpec) -> None:
        super().__init__()
        self.spec = spec
        self.token_embedding = nn.Embedding(spec.vocab_size, spec.d_model)
        self.position_embedding = nn.Embedding(spec.context, spec.d_model)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.layers))
        self.ln_f = nn.LayerNorm(spec.d_model)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: residual projections scaled by depth
            for proj in (block.attention.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * spec.layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Logits [batch, seq, vocab] and each layer's (key, value) over past + seq.

        With no attention_mask (training): causal attention over `input_ids`
        alone, positions 0..seq-1. With one: keys are the past then the new
        tokens, a key is seen where its mask is 1 and it is not after the query.
        """
        seq = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device)[None, :]
        x = self.token_embedding(input_ids) + self.position_embedding(position_ids)
        allowed = None if attention_mask is None else self.allowed(attention_mask, seq)
        if not past:
            empty = x.new_zeros(x.shape[0], self.spec.heads, 0, self.spec.head_dim)
            past = [(empty, empty)] * self.spec.layers
        presents = []
        for block, layer_past in zip(self.blocks, past, strict=True):
            x, k, v = block(x, allowed, layer_past)
            presents.append((k, v))
        logits = self.ln_f(x) @ self.token_embedding.weight.T
        return logits, presents

    @staticmethod
    def allowed(attention_mask: torch.Tensor, seq: torch.Tensor | int) -> torch.Tensor:
        """[batch, 1, seq, total]: the new tokens are the last `seq` of `total`."""
        total = attention_mask.shape[1]
        key_index = torch.arange(total, device=attention_mask.device)
        query_index = torch.arange(seq, device=attention_mask.device) + (total - seq)
        causal = key_index[None, :] <= query_index[:, None]
        return causal[None, None, :, :] & (attention_mask[:, None, None, :] > 0)


class OptimumLayout(nn.Module):
    """The model with flat arguments and results, in Optimum's order, for export."""

    def __init__(self, model: Gpt) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past_flat: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        logits, presents = self.model(input_ids, attention_mask, position_ids, past)
        return (logits, *(t for kv in presents for t in kv))


def input_names(layers: int) -> list[str]:
    kv = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *kv]


def output_names(layers: int) -> list[str]:
    kv = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return ["logits", *kv]


# ----------------------------------------------------------------------- training


def windows(stream: torch.Tensor, length: int, batch: int, rng: torch.Generator) -> torch.Tensor:
    """`batch` random windows of `length` tokens from `stream`."""
    starts = torch.randint(0, len(stream) - length, (batch,), generator=rng)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def learning_rate(spec: GptSpec, step: int) -> float:
    """Linear warmup, then cosine decay to a tenth."""
    if step < spec.warmup:
        return spec.learning_rate * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(spec: GptSpec, stream: np.ndarray, log: TextIO | None = None) -> Gpt:
    """A model trained for `spec.steps` steps on random windows of `stream`."""
    torch.manual_seed(SEED)
    model = Gpt(spec)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    others = [p for n, p in model.named_parameters() if p.dim() < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
        lr=spec.learning_rate,
        betas=(0.9, 0.95),
    )
    data = torch.from_numpy(stream)
    rng = torch.Generator().manual_seed(SEED)
    started = time.monotonic()
    model.train()
    for step in range(spec.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(spec, step)
        chunk = windows(data, spec.context + 1, spec.batch, rng)
        logits, _ = model(chunk[:, :-1])
        loss = functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if log is not None and (step % 50 == 0 or step == spec.steps - 1):
            elapsed = time.monotonic() - started
            print(f"{spec.model_id} step {step} loss {loss.item():.4f} {elapsed:.0f}s", file=log)
            log.flush()
    model.eval()
    return model


@dataclass(frozen=True)
class Validation:
    nats: float  # summed over the predicted tokens
    tokens: int
    bytes: int  # the UTF-8 bytes those tokens stand for (EOT: none)

    @property
    def nats_per_token(self) -> float:
        return self.nats / self.tokens

    @property
    def nats_per_byte(self) -> float:
        """Comparable across tokenizers, unlike nats per token."""
        return self.nats / self.bytes


def token_bytes(tokenizer: Tokenizer) -> np.ndarray:
    """Bytes per token id: byte-level tokens spell one byte per character."""
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, index in tokenizer.get_vocab().items():
        lengths[index] = 0 if token == EOT else len(token)
    return lengths


@torch.no_grad()
def validate(model: Gpt, stream: np.ndarray, lengths: np.ndarray) -> Validation:
    """Loss over `stream` cut into back-to-back windows of the context length.

    Every token but the first of each window is predicted (from the tokens
    before it in its window).
    """
    context = model.spec.context
    data = torch.from_numpy(stream)
    nats, tokens, n_bytes = 0.0, 0, 0
    for start in range(0, len(data) - 1, context):
        chunk = data[start : start + context + 1][None, :]
        logits, _ = model(chunk[:, :-1])
        targets = chunk[0, 1:]
        nats += functional.cross_entropy(logits[0], targets, reduction="sum").item()
        tokens += len(targets)
        n_bytes += int(lengths[targets.numpy()].sum())
    return Validation(nats, tokens, n_bytes)


# ------------------------------------------------------------------------- export


def export_onnx(model: Gpt) -> bytes:
    """The model as an ONNX graph in Optimum's decoder layout, dynamic in batch,
    sequence and past length (traced with a past of 3 and a sequence of 5)."""
    spec = model.spec
    batch, seq, past = 2, 5, 3
    example = (
        torch.zeros(batch, seq, dtype=torch.int64),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq)[None, :].repeat(batch, 1),
        *(torch.zeros(batch, spec.heads, past, spec.head_dim) for _ in range(2 * spec.layers)),
    )
    names_in, names_out = input_names(spec.layers), output_names(spec.layers)
    dynamic: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    for name in names_in[3:]:
        dynamic[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in names_out[1:]:
        dynamic[name] = {0: "batch_size", 2: "past_sequence_length + sequence_length"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated, and chosen: see the module docstring.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # The one value traced to a constant is the model's width, where q, k, v split.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            OptimumLayout(model),
            example,
            buffer,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    return buffer.getvalue()


def make_session(onnx_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def empty_past(spec: GptSpec, batch: int) -> dict[str, np.ndarray]:
    shape = (batch, spec.heads, 0, spec.head_dim)
    return {name: np.zeros(shape, np.float32) for name in input_names(spec.layers)[3:]}


@torch.no_grad()
def check_export(model: Gpt, session: ort.InferenceSession, stream: np.ndarray) -> None:
    """Fail unless onnxruntime gives torch's logits: a prefill of several lengths
    (past 0), then a decode step on its cache, with a left-padded row (compared
    where its mask keeps it)."""
    spec = model.spec
    for seq in (1, 7, spec.context):
        ids = np.stack([stream[:seq], stream[seq : 2 * seq]])
        mask = np.ones_like(ids)
        mask[1, : seq // 2] = 0  # row 1 is left-padded
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        got = session.run(None, {**feeds, **empty_past(spec, 2)})
        torch_logits, _ = model(*(torch.from_numpy(feeds[k]) for k in feeds))
        kept = mask > 0  # a padded position's logits mean nothing (and differ: fused)
        compare(f"{spec.model_id} prefill of {seq}", got[0][kept], torch_logits.numpy()[kept])
        if seq < spec.context:
            step = {
                "input_ids": ids[:, -1:],
                "attention_mask": np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1),
                "position_ids": positions[:, -1:] + 1,
            }
            past = dict(zip(input_names(spec.layers)[3:], got[1:], strict=True))
            decoded = session.run(None, {**step, **past})
            tensors = [torch.from_numpy(t) for t in got[1:]]
            kv = list(zip(tensors[::2], tensors[1::2], strict=True))
            torch_step, _ = model(*(torch.from_numpy(step[k]) for k in step), kv)
            compare(f"{spec.model_id} decode after {seq}", decoded[0], torch_step.numpy())


def compare(what: str, got: np.ndarray, want: np.ndarray) -> None:
    error = float(np.max(np.abs(got - want)))
    if got.shape != want.shape or not error <= EXPORT_CHECK_TOLERANCE:
        raise RuntimeError(f"{what}: onnxruntime differs from torch by {error:.2e}")


# ----------------------------------------------------------------------- sampling


def generate(
    session: ort.InferenceSession,
    spec: GptSpec,
    prompt_ids: Sequence[int],
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> list[int]:
    """Token ids after `prompt_ids`: one prefill, then one decode step per token
    on the cache; greedy at temperature 0. Stops at EOT or the context's end."""
    rng = np.random.default_rng(seed)
    names = input_names(spec.layers)[3:]
    ids = np.asarray([prompt_ids], dtype=np.int64)
    feeds: dict[str, np.ndarray] = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None, :],
        **empty_past(spec, 1),
    }
    out: list[int] = []
    length = ids.shape[1]
    while len(out) < max_tokens and length < spec.context:
        logits, *presents = session.run(None, feeds)
        token = pick(logits[0, -1], temperature, top_k, rng)
        if token == 0:
            break
        out.append(token)
        feeds = {
            "input_ids": np.asarray([[token]], dtype=np.int64),
            "attention_mask": np.ones((1, length + 1), dtype=np.int64),
            "position_ids": np.asarray([[length]], dtype=np.int64),
            **dict(zip(names, presents, strict=True)),
        }
        length += 1
    return out


def pick(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if 0 < top_k < len(scaled):
        scaled[scaled < np.sort(scaled)[-top_k]] = -np.inf
    probs = np.exp(scaled - scaled.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


SAMPLE_PROMPTS = ("The import statement", "A class definition", "Return a list of")
SAMPLE_TOKENS_BYTES = 240  # about this many bytes of each sample


def samples(session: ort.InferenceSession, spec: GptSpec, tokenizer: Tokenizer) -> list[str]:
    """README samples: each prompt greedy, then sampled (temperature 0.8, top-k 40)."""
    n = round(SAMPLE_TOKENS_BYTES / 2.5)  # these tokenizers average 2 to 3 bytes a token
    lines = []
    for k, prompt in enumerate(SAMPLE_PROMPTS):
        prompt_ids = tokenizer.encode(prompt).ids
        for how, temperature in (("greedy", 0.0), ("temperature 0.8, top-k 40", 0.8)):
            if k == 2 and temperature == 0:
                continue
            ids = generate(session, spec, prompt_ids, n, temperature, 40, seed=SEED + k)
            text = tokenizer.decode(prompt_ids + ids)
            lines.append(f"**{how}**, prompt `{prompt}`:\n\n```text\n{text}\n```\n")
    return lines


# ------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class BuiltGenerator:
    spec: GptSpec
    tokenizer: Tokenizer
    onnx_bytes: bytes
    parameters: int
    corpus: Corpus
    train_tokens: int
    validation: Validation
    train_seconds: float
    decode_us: float = float("nan")  # filled in by measure()
    samples: tuple[str, ...] = ()

    @property
    def accuracy(self) -> float:
        """The geometric-mean probability given to each held-out byte."""
        return math.exp(-self.validation.nats_per_byte)


def text_table(spec: GptSpec) -> dict[str, Any]:
    """The [text] table of model.toml: the tokenizer and the decoder layout."""
    return {
        "tokenizer": "tokenizer.json",
        "max_tokens": spec.context,
        "truncation": False,
        "postprocess": "generate",
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
        },
        "decoder": {
            "layers": spec.layers,
            "heads": spec.heads,
            "head_dim": spec.head_dim,
            "vocab_size": spec.vocab_size,
            "bos_token_id": 0,  # the tokenizer's post-processor already puts it first
            "eos_token_id": 0,
            "pad_token_id": 0,
        },
    }


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # the values here are ASCII: a JSON string is a TOML string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_table(name: str, table: dict[str, Any]) -> str:
    """`[name]` with its plain keys, then its sub-tables as `[name.key]`."""
    lines = [f"[{name}]"] if name else []
    lines += [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for key, sub in table.items():
        if isinstance(sub, dict):
            lines += ["", toml_table(f"{name}.{key}" if name else key, sub).rstrip("\n")]
    return "\n".join(lines) + "\n"


def model_toml(b: BuiltGenerator, cost: float) -> str:
    spec, v = b.spec, b.validation
    meta: dict[str, Any] = {
        "id": spec.model_id,
        "version": VERSION,
        "task_type": "text-generation",
        "subtypes": ["causal-lm"],
        "languages": ["en"],
        "max_input_length": spec.context,
        "accuracy": round(b.accuracy, 4),
        "cost": round(cost, 2),
        "latency_us": round(b.decode_us, 1),
        "description": f"{spec.summary}; validation {v.nats_per_byte:.3f} nats per byte "
        f"({v.nats_per_token:.3f} per token).",
        "training": {
            "dataset": "pydoc_data.topics + standard-library docstrings",
            "python_version": sys.version.split()[0],
            "train_documents": len(b.corpus.train),
            "validation_documents": len(b.corpus.validation),
            "validation_tokens": v.tokens,
            "validation_bytes": v.bytes,
            "validation_nats_per_token": round(v.nats_per_token, 4),
            "validation_nats_per_byte": round(v.nats_per_byte, 4),
            "parameters": b.parameters,
            "steps": spec.steps,
            "batch": spec.batch,
            "learning_rate": spec.learning_rate,
            "train_seconds": round(b.train_seconds),
            "seed": SEED,
            "torch_version": torch.__version__,
        },
    }
    meta["text"] = text_table(spec)
    return toml_table("", meta)


def readme(b: BuiltGenerator) -> str:
    spec, v = b.spec, b.validation
    tokenizer_line = f"byte-level BPE, {spec.vocab_size} tokens with `<|endoftext|>` (id 0)"
    train_bytes = sum(len(t.encode()) for t in b.corpus.train)
    kv_bytes = 2 * spec.layers * spec.heads * spec.head_dim * 4
    sample_text = "\n".join(b.samples)
    return f"""# {spec.model_id}

{spec.summary}. A toy: trained from scratch for {b.train_seconds / 60:.0f} minutes on one
thread of a shared CPU, it writes documentation-flavoured English and Python,
not facts. It is here to exercise tokenized text, KV-cache sessions and batched
decoding with a real graph.

| | |
|-|-|
| layers, heads, d_model, head_dim | {spec.layers}, {spec.heads}, {spec.d_model}, {spec.head_dim} |
| context | {spec.context} tokens (`max_input_length`; position ids lie below it) |
| parameters | {b.parameters:,} |
| tokenizer | {tokenizer_line}, which `encode` puts first and which ends a text |
| KV cache | {kv_bytes:,} bytes per token of each sequence |
| decode step | {b.decode_us:.0f} us, batch 1, past {spec.context // 2}, one thread (`latency_us`) |

## Data and loss

Python {sys.version.split()[0]}'s `pydoc_data.topics` (the reference topics that
`help()` shows) and the docstrings of its standard library, one document per
topic or module. A seeded shuffle puts whole documents in training
({len(b.corpus.train)} documents, {train_bytes:,} bytes) or in validation
({len(b.corpus.validation)} documents). The tokenizer is trained on the training
documents only. Training: {spec.steps} steps of {spec.batch} random windows of
{spec.context} tokens ({spec.steps * spec.batch * spec.context:,} tokens seen, from
{b.train_tokens:,} training tokens), AdamW, cosine schedule from {spec.learning_rate}.

Validation, {v.tokens:,} tokens standing for {v.bytes:,} bytes, in back-to-back
windows of the context: **{v.nats_per_token:.3f} nats per token, {v.nats_per_byte:.3f}
nats per byte** ({v.nats_per_byte / math.log(2):.3f} bits per byte). `accuracy` in
`model.toml` is exp(-nats per byte) = {b.accuracy:.4f}, the geometric-mean
probability the model gives each held-out byte: unlike a per-token figure, it
compares models with different tokenizers. `cost` is `latency_us` relative to
the fastest bundled generator's.

## Graph

Hugging Face Optimum's decoder layout: inputs `input_ids`, `attention_mask`
(over past and new tokens), `position_ids`, `past_key_values.{{i}}.key/value`
[batch, {spec.heads}, past, {spec.head_dim}]; outputs `logits` [batch, seq,
{spec.vocab_size}] and `present.{{i}}.key/value` [batch, {spec.heads}, past + seq,
{spec.head_dim}], for i in 0..{spec.layers - 1}. One graph for prefill (past 0) and
decode (seq 1). Sessions of different lengths share a batch left-padded: mask 0
on the padding, any position id there.

Each block's attention is one onnxruntime `MultiHeadAttention` node
(`com.microsoft`, with `unidirectional`), and the MLP's GELU one `FastGelu`
(`tools/gpt_fused.py`): the TorchScript export's forty-odd nodes per block ran
a decode step 1.2-1.3x slower at batch 1 and 1.15-1.25x at batch 16. The
outputs agree with the export's within 1e-5 wherever the mask keeps a position.

## Samples

{sample_text}
Greedy, and sampled at temperature 0.8 from the top 40 tokens with numpy's
`default_rng` seeded 0, 1, 2 in prompt order; one prefill, then one decode step
per token on the cache, with onnxruntime and this directory's files. To print
them again:

```
python tools/gpt.py --samples {spec.model_id}
```

Rebuild with `python tools/build_models.py --only generators` (the `build`
extra).
"""


def write_generator(out: Path, b: BuiltGenerator, cost: float) -> None:
    """Write the model's files, then read model.toml back as a check."""
    model_dir = out / b.spec.model_id
    model_dir.mkdir(parents=True, exist_ok=True)
    text = model_toml(b, cost)
    if tomllib.loads(text)["max_input_length"] != b.spec.context:
        raise RuntimeError(f"{b.spec.model_id}: model.toml does not round-trip")
    (model_dir / "model.onnx").write_bytes(b.onnx_bytes)
    b.tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "model.toml").write_text(text, encoding="utf-8")
    (model_dir / "README.md").write_text(readme(b), encoding="utf-8")


# --------------------------------------------------------------------------- main


def build_generator(spec: GptSpec, corpus: Corpus, log: TextIO) -> BuiltGenerator:
    """Tokenizer, training, validation, export and its check, for one generator."""
    tokenizer = train_tokenizer(corpus.train, spec.vocab_size)
    train_stream = token_stream(tokenizer, corpus.train)
    validation_stream = token_stream(tokenizer, corpus.validation)
    started = time.monotonic()
    model = train(spec, train_stream, log)
    train_seconds = time.monotonic() - started
    validation = validate(model, validation_stream, token_bytes(tokenizer))
    print(f"{spec.model_id}: validation {validation}", file=log)
    onnx_bytes = fuse(export_onnx(model), spec.heads)
    if len(onnx_bytes) > MAX_ONNX_BYTES:
        raise RuntimeError(f"{spec.model_id}: model.onnx is {len(onnx_bytes)} bytes")
    check_export(model, make_session(onnx_bytes), validation_stream)
    parameters = sum(p.numel() for p in model.parameters())
    return BuiltGenerator(
        spec, tokenizer, onnx_bytes, parameters, corpus, len(train_stream), validation,
        train_seconds,
    )  # fmt: skip


def finish(b: BuiltGenerator) -> BuiltGenerator:
    """Measure the decode step and draw the README samples from the ONNX graph."""
    session = make_session(b.onnx_bytes)
    spec = b.spec
    decode_us = decode_latency_us(
        b.onnx_bytes, spec.layers, spec.heads, spec.head_dim, spec.context // 2
    )
    drawn = tuple(samples(session, b.spec, b.tokenizer))
    return BuiltGenerator(**{**b.__dict__, "decode_us": decode_us, "samples": drawn})


def build_generators(
    out: Path,
    specs: Sequence[GptSpec] = GPT_SPECS,
    log: TextIO | None = None,
    corpus: Corpus | None = None,
) -> list[BuiltGenerator]:
    """Build, check and write every generator in `specs` under `out`."""
    log = log or sys.stdout
    torch.set_num_threads(TRAIN_THREADS)
    corpus = corpus or load_corpus()
    built: list[BuiltGenerator] = []
    for spec in specs:
        built.append(finish(build_generator(spec, corpus, log)))
        write_generator(out, built[-1], 1.0)  # kept if a later model's build is stopped
    fastest = min(b.decode_us for b in built)
    for b in built:
        write_generator(out, b, b.decode_us / fastest)
        print(
            f"{b.spec.model_id}: {b.validation.nats_per_byte:.3f} nats/byte, "
            f"{b.decode_us:.0f} us/step, {len(b.onnx_bytes) / 2**20:.1f} MiB",
            file=log,
        )
    return built


def print_samples(models_dir: Path, model_id: str) -> None:
    """The README samples again, from the committed files."""
    spec = next(s for s in GPT_SPECS if s.model_id == model_id)
    model_dir = models_dir / model_id
    session = make_session((model_dir / "model.onnx").read_bytes())
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    print("\n".join(samples(session, spec, tokenizer)))


def main(argv: list[str] | None = None) -> None:
    import argparse

    default_out = Path(__file__).resolve().parent.parent / "p2p_node" / "bundled_models"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--samples", metavar="MODEL_ID", help="print a model's README samples")
    args = parser.parse_args(argv)
    if args.samples:
        print_samples(args.out, args.samples)
    else:
        build_generators(args.out)


if __name__ == "__main__":
    main()
