"""The model repository on disk: `<root>/<model_id>/model.onnx` + `model.toml`."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any


class RepositoryError(ValueError):
    """A model directory or its model.toml is unusable; the message names the file."""


TEXT_FEATURES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
TEXT_POSTPROCESS = ("mean_pool_normalize", "labels", "generate")


@dataclass(frozen=True, slots=True)
class TextSpec:
    """How a model takes text: the `[text]` table of its model.toml.

    `inputs` pairs each graph input with the tokenizer output that feeds it
    (one of TEXT_FEATURES), in the table's order. The tokenizer file is not
    read here: whoever runs the model loads it.
    """

    tokenizer_path: Path
    max_tokens: int
    truncation: bool
    inputs: tuple[tuple[str, str], ...]
    postprocess: str

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        features = [feature for _, feature in self.inputs]
        unknown = sorted(set(features) - set(TEXT_FEATURES))
        if unknown:
            raise ValueError(
                f"inputs name unknown tokenizer outputs {unknown}; known: {TEXT_FEATURES}"
            )
        if "input_ids" not in features:
            raise ValueError("inputs must feed input_ids to a graph input")
        if len(set(features)) != len(features):
            raise ValueError(f"inputs feed a tokenizer output twice: {features}")
        if self.postprocess not in TEXT_POSTPROCESS:
            raise ValueError(f"postprocess {self.postprocess!r} is not one of {TEXT_POSTPROCESS}")


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
}
_TEXT_FIELDS: dict[str, type] = {
    "tokenizer": str,
    "max_tokens": int,
    "truncation": bool,
    "inputs": dict,
    "postprocess": str,
}
_TEXT_OPTIONAL = frozenset({"truncation"})


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
    )


def _text_spec(path: Path, table: dict[str, Any]) -> TextSpec:
    missing = sorted(set(_TEXT_FIELDS) - _TEXT_OPTIONAL - set(table))
    unknown = sorted(set(table) - set(_TEXT_FIELDS))
    if missing or unknown:
        raise RepositoryError(f"{path}: [text] missing fields {missing}, unknown fields {unknown}")
    for name, kind in _TEXT_FIELDS.items():
        value = table.get(name)
        if name in table and (
            not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        ):
            raise RepositoryError(
                f"{path}: [text] {name} has the wrong type {type(value).__name__}"
            )
    inputs = table["inputs"]
    if not all(isinstance(feature, str) for feature in inputs.values()):
        raise RepositoryError(f"{path}: [text] inputs must map graph inputs to strings")
    tokenizer = path.parent / table["tokenizer"]
    if tokenizer.parent != path.parent or not tokenizer.is_file():
        raise RepositoryError(
            f"{path}: [text] tokenizer {table['tokenizer']!r} must be a file beside model.toml"
        )
    try:
        return TextSpec(
            tokenizer_path=tokenizer,
            max_tokens=table["max_tokens"],
            truncation=table.get("truncation", False),
            inputs=tuple(inputs.items()),
            postprocess=table["postprocess"],
        )
    except ValueError as error:
        raise RepositoryError(f"{path}: [text] {error}") from None


def _memory_mb(path: Path, value: float | None) -> float | None:
    if value is not None and not 0 < value < float("inf"):
        raise RepositoryError(f"{path}: memory_mb must be a positive number, got {value}")
    return None if value is None else float(value)


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
