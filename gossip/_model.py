"""What a node says about a model it serves: plain values and their wire form.

A `ModelDescriptor` travels inside every gossip record (gossip/_record.py) and in
replies to `models` queries (p2p_node's codec), so it lives in the lowest layer,
with the checks both share. No I/O here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# numpy dtype names a tensor may carry. Anything else is refused at the edge.
TENSOR_DTYPES = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    }
)
MAX_ID_LENGTH = 128
MAX_TEXT_LENGTH = 1024
MAX_LIST_LENGTH = 64
MAX_RANK = 8


class SchemaError(ValueError):
    """A value does not have the shape this protocol version expects."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One declared input or output of a model. `None` in `shape` is a dynamic dim."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    def __post_init__(self) -> None:
        check_text("tensor name", self.name, MAX_ID_LENGTH)
        if type(self.dtype) is not str or self.dtype not in TENSOR_DTYPES:
            raise SchemaError(f"tensor {self.name!r}: unsupported dtype {self.dtype!r}")
        if type(self.shape) is not tuple or len(self.shape) > MAX_RANK:
            raise SchemaError(f"tensor {self.name!r}: rank {len(self.shape)} > {MAX_RANK}")
        for dim in self.shape:
            if dim is not None and (type(dim) is not int or dim < 0):
                raise SchemaError(f"tensor {self.name!r}: bad dimension {dim!r}")

    def describe(self) -> str:
        """`input float32 [N, 64]`: how error messages and the CLI show a spec."""
        dims = ", ".join("N" if d is None else str(d) for d in self.shape)
        return f"{self.name} {self.dtype} [{dims}]"


@dataclass(frozen=True, slots=True)
class ModelDescriptor:
    """A model as its serving node announces it. `sha256` is the content id."""

    id: str
    version: str
    sha256: str
    task_type: str
    subtypes: tuple[str, ...]
    languages: tuple[str, ...]
    max_input_length: int
    accuracy: float
    cost: float
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        check_text("model id", self.id, MAX_ID_LENGTH)
        check_text("version", self.version, MAX_ID_LENGTH)
        check_text("task_type", self.task_type, MAX_ID_LENGTH)
        check_text("description", self.description, MAX_TEXT_LENGTH, allow_empty=True)
        if type(self.sha256) is not str or not _SHA256_HEX(self.sha256):
            raise SchemaError(f"model {self.id!r}: sha256 must be 64 lowercase hex digits")
        for label, items in (("subtypes", self.subtypes), ("languages", self.languages)):
            if len(items) > MAX_LIST_LENGTH:
                raise SchemaError(f"model {self.id!r}: too many {label}")
            for item in items:
                check_text(label, item, MAX_ID_LENGTH)
        if type(self.max_input_length) is not int or self.max_input_length < 0:
            raise SchemaError(f"model {self.id!r}: max_input_length must be an int >= 0")
        if not (_is_number(self.accuracy) and 0.0 <= self.accuracy <= 1.0):
            raise SchemaError(f"model {self.id!r}: accuracy must be in [0, 1]")
        if not (_is_number(self.cost) and self.cost >= 0.0):
            raise SchemaError(f"model {self.id!r}: cost must be a number >= 0")
        if not self.inputs or len(self.inputs) > MAX_LIST_LENGTH:
            raise SchemaError(f"model {self.id!r}: needs 1 to {MAX_LIST_LENGTH} inputs")
        if len(self.outputs) > MAX_LIST_LENGTH:
            raise SchemaError(f"model {self.id!r}: too many outputs")


_SHA256_HEX = re.compile(r"[0-9a-f]{64}").fullmatch


def _is_number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


def check_text(label: str, value: object, limit: int, *, allow_empty: bool = False) -> str:
    """`value` if it is a string of at most `limit` characters (and not empty, unless
    allowed); a SchemaError naming `label` otherwise. Shared by every schema here."""
    if type(value) is not str:
        raise SchemaError(f"{label} must be a string, got {type(value).__name__}")
    if len(value) > limit or (not value and not allow_empty):
        raise SchemaError(f"{label} must be {0 if allow_empty else 1} to {limit} characters")
    return value


# --- wire form: msgpack-ready maps with exactly these keys ---------------------------

_SPEC_KEYS = frozenset({"name", "dtype", "shape"})
_DESCRIPTOR_KEYS = frozenset(
    {
        "id",
        "version",
        "sha256",
        "task_type",
        "subtypes",
        "languages",
        "max_input_length",
        "accuracy",
        "cost",
        "description",
        "inputs",
        "outputs",
    }
)


def spec_to_wire(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape)}


def spec_from_wire(raw: object) -> TensorSpec:
    fields = expect_map(raw, _SPEC_KEYS, "tensor spec")
    shape = expect_list(fields["shape"], "tensor spec shape")
    return TensorSpec(fields["name"], fields["dtype"], tuple(shape))


def descriptor_to_wire(model: ModelDescriptor) -> dict[str, Any]:
    return {
        "id": model.id,
        "version": model.version,
        "sha256": model.sha256,
        "task_type": model.task_type,
        "subtypes": list(model.subtypes),
        "languages": list(model.languages),
        "max_input_length": model.max_input_length,
        "accuracy": model.accuracy,
        "cost": model.cost,
        "description": model.description,
        "inputs": [spec_to_wire(s) for s in model.inputs],
        "outputs": [spec_to_wire(s) for s in model.outputs],
    }


def descriptor_from_wire(raw: object) -> ModelDescriptor:
    f = expect_map(raw, _DESCRIPTOR_KEYS, "model descriptor")
    return ModelDescriptor(
        id=f["id"],
        version=f["version"],
        sha256=f["sha256"],
        task_type=f["task_type"],
        subtypes=tuple(expect_list(f["subtypes"], "subtypes")),
        languages=tuple(expect_list(f["languages"], "languages")),
        max_input_length=f["max_input_length"],
        accuracy=f["accuracy"],
        cost=f["cost"],
        description=f["description"],
        inputs=tuple(spec_from_wire(s) for s in expect_list(f["inputs"], "inputs")),
        outputs=tuple(spec_from_wire(s) for s in expect_list(f["outputs"], "outputs")),
    )


def expect_map(raw: object, keys: frozenset[str], what: str) -> Mapping[str, Any]:
    """`raw` as a map with exactly `keys`; anything missing or extra is a SchemaError."""
    if not isinstance(raw, dict):
        raise SchemaError(f"{what} must be a map, got {type(raw).__name__}")
    present = set(raw)
    if present != keys:
        missing = sorted(str(k) for k in keys - present)
        unknown = sorted(str(k) for k in present - keys)
        raise SchemaError(f"{what}: missing fields {missing}, unknown fields {unknown}")
    return raw


def expect_list(raw: object, what: str, limit: int = MAX_LIST_LENGTH) -> list[Any]:
    if not isinstance(raw, list):
        raise SchemaError(f"{what} must be a list, got {type(raw).__name__}")
    if len(raw) > limit:
        raise SchemaError(f"{what}: {len(raw)} items > limit {limit}")
    return raw
