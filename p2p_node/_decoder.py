"""A served decoder's text side: its layout (from the `[text]` table of its model.toml),
its tokenizer, and how the next token is chosen from its logits.

The table is model.toml's, which the repository has already checked. Sampling
is greedy at temperature 0; otherwise top-k, then top-p, over the tempered
softmax, drawing one number per token from a `numpy.random.Generator`: the
same seed gives the same tokens on any node.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from scheduler import ErrorCode, JobError

from ._repository import ModelCard, RepositoryError

FLOAT_BYTES = 4
# Hugging Face Optimum's decoder layout: layer i's cache comes in as
# `past_key_values.{i}.key` and `.value`, and goes out, a position longer, as
# `present.{i}.key` and `.value`.
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."

Array = np.ndarray[Any, Any]


# --- the model's text side -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecoderLayout:
    """What the `[text.decoder]` table says: the cache's shape and the special tokens."""

    layers: int
    heads: int
    head_dim: int
    vocab_size: int
    eos_token_id: int
    max_tokens: int  # the context window: prompt and generated tokens together

    @property
    def bytes_per_token(self) -> int:
        """Cache memory per token of one session: a key and a value per layer."""
        return 2 * self.layers * self.heads * self.head_dim * FLOAT_BYTES


@functools.cache
def past_names(layers: int) -> tuple[str, ...]:
    """The cache inputs of a decoder of `layers` layers, each layer's key then value
    (made once: a decode step names them all)."""
    return tuple(f"{PAST_PREFIX}{i}.{kv}" for i in range(layers) for kv in ("key", "value"))


@functools.cache
def present_names(layers: int) -> tuple[str, ...]:
    """Its cache outputs, in the same order."""
    return tuple(f"{PRESENT_PREFIX}{i}.{kv}" for i in range(layers) for kv in ("key", "value"))


@functools.cache
def step_outputs(layers: int) -> tuple[str, ...]:
    """What a prefill or decode step asks for: the logits, then `present_names`."""
    return ("logits", *present_names(layers))


@dataclass(frozen=True, slots=True)
class TextGenerator:
    """A served decoder: its id, layout and tokenizer."""

    model_id: str
    layout: DecoderLayout
    tokenizer: Tokenizer


def read_text_table(card: ModelCard) -> dict[str, Any] | None:
    """The `[text]` table of `card`'s model.toml, or None."""
    model_dir = card.onnx_path.parent
    for path in (model_dir / "model.toml",):
        if not path.is_file():
            continue
        try:
            with path.open("rb") as f:
                table = tomllib.load(f).get("text")
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise RepositoryError(f"{path}: cannot read its [text] table: {error}") from None
        if table is not None:
            if not isinstance(table, dict):
                raise RepositoryError(f"{path}: text must be a table")
            return table
    return None


def load_text_generator(card: ModelCard) -> TextGenerator | None:
    """`card`'s generator if its `[text]` table says `postprocess = "generate"`, else None.
    RepositoryError names the file and the field at fault."""
    table = read_text_table(card)
    if table is None or table.get("postprocess") != "generate":
        return None
    where = f"{card.onnx_path.parent}: [text]"
    decoder = table.get("decoder")
    if not isinstance(decoder, dict):
        raise RepositoryError(f"{where} needs a [text.decoder] table for postprocess generate")
    values = {}
    for name in ("layers", "heads", "head_dim", "vocab_size", "eos_token_id"):
        value = decoder.get(name)
        if type(value) is not int or value < (0 if name == "eos_token_id" else 1):
            raise RepositoryError(f"{where}.decoder: {name} must be a positive integer")
        values[name] = value
    max_tokens = table.get("max_tokens", card.max_input_length)
    if type(max_tokens) is not int or max_tokens < 2:
        raise RepositoryError(f"{where}: max_tokens must be an integer >= 2")
    tokenizer_file = table.get("tokenizer", "tokenizer.json")
    if not isinstance(tokenizer_file, str) or "/" in tokenizer_file:
        raise RepositoryError(f"{where}: tokenizer must be a file name in the model's directory")
    path = card.onnx_path.parent / tokenizer_file
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises its own exception types
        raise RepositoryError(f"{path}: not a tokenizer.json: {error}") from None
    return TextGenerator(card.id, DecoderLayout(**values, max_tokens=max_tokens), tokenizer)


# --- sampling ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sampling:
    """Greedy at `temperature` 0; else the `top_k` most likely tokens (0: all), of
    those the fewest whose probabilities add up to `top_p`, drawn with `seed`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < float("inf"):
            raise JobError(ErrorCode.INVALID_INPUT, f"temperature must be >= 0: {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise JobError(ErrorCode.INVALID_INPUT, "top_k must be >= 0 and top_p in (0, 1]")


def choose_token(logits: Array, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token from one row of logits. Draws exactly one number from `rng`
    when sampling, so that a seed gives the same tokens whatever came before."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    order = np.argsort(-scaled, kind="stable")
    if sampling.top_k:
        order = order[: sampling.top_k]
    chosen = scaled[order]
    probs = np.exp(chosen - chosen[0])
    probs /= probs.sum()
    if sampling.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1
        order, probs = order[:keep], probs[:keep]
    cumulative = np.cumsum(probs)
    drawn = rng.random() * cumulative[-1]
    index = min(int(np.searchsorted(cumulative, drawn, side="right")), len(order) - 1)
    return int(order[index])
