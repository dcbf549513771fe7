"""The model repository on disk: `<root>/<model_id>/model.onnx` + `model.toml`."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from ._schema import MAX_ID_LENGTH


class RepositoryError(ValueError):
    """A model directory or its model.toml is unusable; the message names the file."""


MAX_LABEL_LENGTH = MAX_ID_LENGTH  # a result's labels cross the wire as ids do
TOKENIZER_OUTPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_TEXT_KEYS = frozenset({"tokenizer", "max_tokens", "truncation", "postprocess", "inputs", "labels"})
_READ_ELSEWHERE = frozenset({"decoder"})  # generation's own table


class Postprocess(StrEnum):
    MEAN_POOL_NORMALIZE = "mean_pool_normalize"
    LABELS = "labels"
    GENERATE = "generate"


@dataclass(frozen=True, slots=True)
class TextSpec:
    """A model's `[text]` table. `inputs` pairs each graph input with the tokenizer
    output it takes (one of TOKENIZER_OUTPUTS). Field names as the `minilm` branch's
    TextSpec in `_repository`, plus `labels`: one of the two is to go."""

    tokenizer_path: Path  # a file beside model.toml
    max_tokens: int
    truncation: bool
    inputs: tuple[tuple[str, str], ...]  # (graph input, tokenizer output), in table order
    postprocess: Postprocess
    labels: tuple[str, ...] = ()  # postprocess "labels": the name of each class


@dataclass(frozen=True, slots=True)
class StageSpec:
    """A model.toml's `[stage]` table: this model is stage `index` (0-based) of `k` of
    model `parent`; it takes `inputs` (`boundary_in` from the stages before it) and
    returns `outputs` (`boundary_out` for the stages after it)."""

    parent: str
    index: int
    k: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    boundary_in: tuple[str, ...]
    boundary_out: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What model.toml says about a model, plus where its ONNX file is."""

    id: str
    version: str
    task_type: str
    subtypes: tuple[str, ...]
    languages: tuple[str, ...]
    max_input_length: int
    accuracy: float
    cost: float
    description: str
    onnx_path: Path
    sha256: str
    memory_mb: float | None = None  # what it takes loaded, when model.toml says
    text: TextSpec | None = None  # a text model's [text] table; None: tensors only
    # Dynamic batching (see p2p_node/_batching.py): the most rows the executor merges
    # into one run of this model (None: the node's max_batch_rows; 1: never merged),
    # and how long a run may wait for more requests to merge (0: never waits).
    max_batch_rows: int | None = None
    max_batch_wait_us: float = 0.0
    stage: StageSpec | None = None  # a stage of a larger model (see p2p_node/_shard.py)

    @property
    def memory_bytes(self) -> int:
        """What this model counts against a memory budget: `memory_mb` from its
        model.toml, else the size of its directory's files (model.onnx and any
        external weights) as a proxy."""
        if self.memory_mb is not None:
            return round(self.memory_mb * (1 << 20))
        model_dir = self.onnx_path.parent
        return sum(f.stat().st_size for f in model_dir.iterdir() if f.name != "model.toml")


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "version": str,
    "task_type": str,
    "max_input_length": int,
    "accuracy": (int, float),
    "cost": (int, float),
}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "subtypes": list,
    "languages": list,
    "description": str,
    "latency_us": (int, float),
    "training": dict,
    "memory_mb": (int, float),
    "text": dict,
    "max_batch_rows": int,
    "max_batch_wait_us": (int, float),
    "stage": dict,
}
MAX_BATCH_WAIT_US = 1_000_000  # a longer wait for company is surely a typo


def bundled_models_dir() -> Path:
    """The example models that ship inside the package."""
    return Path(str(resources.files("p2p_node") / "bundled_models"))


def read_repository(root: Path, only: frozenset[str] | None = None) -> tuple[ModelCard, ...]:
    """Every model under `root` (or only the ids in `only`), sorted by id."""
    if not root.is_dir():
        raise RepositoryError(f"model directory {root} does not exist")
    cards = [
        read_model_card(d)
        for d in sorted(root.iterdir())
        if (d / "model.toml").is_file() and (only is None or d.name in only)
    ]
    if only is not None:
        missing = only - {c.id for c in cards}
        if missing:
            raise RepositoryError(f"{root} has no models {sorted(missing)}")
    return tuple(cards)


def read_model_card(model_dir: Path) -> ModelCard:
    toml_path = model_dir / "model.toml"
    onnx_path = model_dir / "model.onnx"
    try:
        with toml_path.open("rb") as f:
            meta = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise RepositoryError(f"{toml_path} is not valid TOML: {error}") from None
    _check_fields(toml_path, meta)
    if meta["id"] != model_dir.name:
        raise RepositoryError(
            f"{toml_path}: id {meta['id']!r} must match its directory name {model_dir.name!r}"
        )
    if not onnx_path.is_file():
        raise RepositoryError(f"{model_dir} has model.toml but no model.onnx")
    return ModelCard(
        id=meta["id"],
        version=meta["version"],
        task_type=meta["task_type"],
        subtypes=tuple(meta.get("subtypes", ())),
        languages=tuple(meta.get("languages", ())),
        max_input_length=meta["max_input_length"],
        accuracy=float(meta["accuracy"]),
        cost=float(meta["cost"]),
        description=meta.get("description", ""),
        onnx_path=onnx_path,
        sha256=_sha256(onnx_path),
        memory_mb=_memory_mb(toml_path, meta.get("memory_mb")),
        text=_text_spec(toml_path, meta["text"]) if "text" in meta else None,
        **_batching(toml_path, meta),
        stage=_stage_spec(toml_path, meta["stage"]) if "stage" in meta else None,
    )


def _stage_spec(path: Path, table: dict[str, Any]) -> StageSpec:
    names = ("inputs", "outputs", "boundary_in", "boundary_out")
    parent, index, k = table.get("parent"), table.get("index"), table.get("k")
    if (
        not isinstance(parent, str)
        or not 0 < len(parent) <= MAX_ID_LENGTH
        or type(k) is not int
        or type(index) is not int
        or not 0 <= index < k
        or not all(
            isinstance(table.get(n), list) and all(isinstance(x, str) for x in table[n])
            for n in names
        )
    ):
        raise RepositoryError(
            f"{path}: [stage] needs parent (a model id), index in [0, k), k, "
            f"and lists of tensor names {list(names)}"
        )
    lists = {n: tuple(table[n]) for n in names}
    return StageSpec(parent=parent, index=index, k=k, **lists)


def _text_spec(path: Path, table: object) -> TextSpec:
    spec = parse_text_spec(path, table)
    if not spec.tokenizer_path.is_file():
        raise RepositoryError(f"{path}: [text] tokenizer {spec.tokenizer_path.name!r} is missing")
    return spec


def parse_text_spec(path: Path, table: object) -> TextSpec:
    def bad(what: str) -> RepositoryError:
        return RepositoryError(f"{path}: [text] {what}")

    if not isinstance(table, dict):
        raise bad("must be a table")
    unknown = sorted(set(table) - _TEXT_KEYS - _READ_ELSEWHERE)
    missing = sorted({"tokenizer", "max_tokens", "postprocess", "inputs"} - set(table))
    if unknown or missing:
        raise bad(f"has unknown fields {unknown}, lacks fields {missing}")
    tokenizer, max_tokens = table["tokenizer"], table["max_tokens"]
    truncation = table.get("truncation", False)
    if not isinstance(tokenizer, str) or not tokenizer or Path(tokenizer).name != tokenizer:
        raise bad(f"tokenizer must be a file name in the model's directory, got {tokenizer!r}")
    if type(max_tokens) is not int or max_tokens < 1:
        raise bad(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if type(truncation) is not bool:
        raise bad(f"truncation must be true or false, got {truncation!r}")
    try:
        postprocess = Postprocess(table["postprocess"])
    except ValueError:
        raise bad(
            f"postprocess must be one of {[p.value for p in Postprocess]}, "
            f"got {table['postprocess']!r}"
        ) from None
    inputs = table["inputs"]
    if (
        not isinstance(inputs, dict)
        or not inputs
        or not all(isinstance(v, str) and v in TOKENIZER_OUTPUTS for v in inputs.values())
        or "input_ids" not in inputs.values()
    ):
        raise bad(
            f"inputs must give each graph input one of the tokenizer outputs "
            f"{list(TOKENIZER_OUTPUTS)}, input_ids among them; got {inputs!r}"
        )
    if len(set(inputs.values())) != len(inputs):
        raise bad(f"inputs feed a tokenizer output twice: {list(inputs.values())}")
    labels = table.get("labels", [])
    if not isinstance(labels, list) or not all(
        isinstance(x, str) and 0 < len(x) <= MAX_LABEL_LENGTH for x in labels
    ):
        raise bad(f"labels must be a list of names of 1 to {MAX_LABEL_LENGTH} characters")
    if (postprocess is Postprocess.LABELS) != bool(labels):
        raise bad('labels go with postprocess = "labels", and it needs them')
    return TextSpec(
        path.parent / tokenizer,
        max_tokens,
        truncation,
        tuple(inputs.items()),
        postprocess,
        tuple(labels),
    )


def _memory_mb(path: Path, value: float | None) -> float | None:
    if value is not None and not 0 < value < float("inf"):
        raise RepositoryError(f"{path}: memory_mb must be a positive number, got {value}")
    return None if value is None else float(value)


def _batching(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """`max_batch_rows` and `max_batch_wait_us`, checked, for the ModelCard."""
    rows, wait_us = meta.get("max_batch_rows"), meta.get("max_batch_wait_us", 0)
    if rows is not None and rows < 1:
        raise RepositoryError(f"{path}: max_batch_rows must be >= 1 (1: never merged), got {rows}")
    if not 0 <= wait_us <= MAX_BATCH_WAIT_US:
        raise RepositoryError(
            f"{path}: max_batch_wait_us must be 0 to {MAX_BATCH_WAIT_US:,} microseconds, "
            f"got {wait_us}"
        )
    return {"max_batch_rows": rows, "max_batch_wait_us": float(wait_us)}


def _check_fields(path: Path, meta: dict[str, Any]) -> None:
    missing = sorted(set(_REQUIRED) - set(meta))
    unknown = sorted(set(meta) - set(_REQUIRED) - set(_OPTIONAL))
    if missing or unknown:
        raise RepositoryError(f"{path}: missing fields {missing}, unknown fields {unknown}")
    for name, kind in {**_REQUIRED, **_OPTIONAL}.items():
        value = meta.get(name)
        if name in meta and (not isinstance(value, kind) or isinstance(value, bool)):
            raise RepositoryError(f"{path}: {name} has the wrong type {type(meta[name]).__name__}")
    for name in ("subtypes", "languages"):
        if not all(isinstance(item, str) for item in meta.get(name, ())):
            raise RepositoryError(f"{path}: {name} must be a list of strings")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
