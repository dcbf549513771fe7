"""What a caller tells the selector about a job: its input, its language, its weights.

A context arrives as a plain mapping (from the API, the wire, or `--context
key=value` on the command line) and is parsed once, strictly, into a frozen
`SelectionContext`. Unknown keys and bad values are INVALID_SELECTION errors
that name what is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from scheduler import ErrorCode, JobError

MAX_CONTEXT_KEYS = 16
MAX_CONTEXT_TEXT = 64


@dataclass(frozen=True, slots=True)
class Weights:
    """How much MULTI_OBJECTIVE cares about each objective. Non-negative, not all zero;
    only their ratios matter."""

    accuracy: float = 0.6
    latency: float = 0.2
    cost: float = 0.2

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in values.items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise _invalid(f"weight {name} must be a finite number >= 0, got {value!r}")
        if not any(values.values()):
            raise _invalid(
                "the weights are all zero; give at least one of "
                "accuracy_weight, latency_weight, cost_weight a positive value"
            )

    def normalised(self) -> tuple[float, float, float]:
        total = self.accuracy + self.latency + self.cost
        return self.accuracy / total, self.latency / total, self.cost / total


@dataclass(frozen=True, slots=True)
class SelectionContext:
    """Facts about one job and the caller's preferences. Every field is optional."""

    input_length: int | None = None  # e.g. features per row, tokens; checked against models
    language: str | None = None
    modality: str | None = None  # "image", "tabular", "text": the task type's first word
    subtype: str | None = None  # SPECIALIZED matches it against the models' subtypes
    max_latency_ms: float | None = None
    weights: Weights = field(default_factory=Weights)
    cost_penalty: float = 0.05  # lambda in ADAPTIVE's reward = quality - lambda x cost
    confidence: float = 0.9  # HYBRID escalates answers less confident than this
    # a text longer than every window may run, truncated, on the model with the largest
    truncate: bool = False

    def __post_init__(self) -> None:
        if self.input_length is not None and self.input_length < 0:
            raise _invalid(f"input_length must be >= 0, got {self.input_length}")
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise _invalid(f"max_latency_ms must be > 0, got {self.max_latency_ms}")
        if not (math.isfinite(self.cost_penalty) and self.cost_penalty >= 0):
            raise _invalid(f"cost_penalty must be a finite number >= 0, got {self.cost_penalty}")
        if not 0.0 <= self.confidence <= 1.0:
            raise _invalid(f"confidence must be in [0, 1], got {self.confidence}")

    @classmethod
    def parse(cls, raw: Mapping[str, object] | SelectionContext | None) -> SelectionContext:
        """From a mapping of the keys in CONTEXT_KEYS. Values may be strings (as typed on
        a command line) or the natural type."""
        if raw is None:
            return cls()
        if isinstance(raw, SelectionContext):
            return raw
        if len(raw) > MAX_CONTEXT_KEYS:
            raise _invalid(f"{len(raw)} context keys > limit {MAX_CONTEXT_KEYS}")
        unknown = sorted(str(k) for k in raw if k not in CONTEXT_KEYS)
        if unknown:
            raise _invalid(f"unknown context keys {unknown}; known keys are {sorted(CONTEXT_KEYS)}")
        values: dict[str, object] = {}
        weights: dict[str, float] = {}
        for key, value in raw.items():
            kind = CONTEXT_KEYS[key]
            if kind is _WEIGHT:
                weights[key.removesuffix("_weight")] = _float(key, value)
            elif kind is int:
                values[key] = _int(key, value)
            elif kind is float:
                values[key] = _float(key, value)
            elif kind is bool:
                values[key] = _bool(key, value)
            else:
                values[key] = _text(key, value)
        if weights:  # weights not given count as zero: say what you care about
            values["weights"] = Weights(
                **{name: weights.get(name, 0.0) for name in ("accuracy", "latency", "cost")}
            )
        return cls(**values)  # type: ignore[arg-type]  # keys and types checked above

    def bucket(self) -> str:
        """The context bucket the tracker learns in: input length band and language.

        Bands are powers of two (`len<=64`), so nearby lengths share evidence.
        """
        parts = []
        if self.input_length is not None:
            parts.append(f"len<={_band(self.input_length)}")
        if self.language is not None:
            parts.append(f"lang={self.language}")
        return ",".join(parts) or "*"

    def to_wire(self) -> dict[str, object]:
        """The mapping `parse` reads back, with only the fields that differ from defaults."""
        default = SelectionContext()
        out: dict[str, object] = {}
        for name in ("input_length", "language", "modality", "subtype", "max_latency_ms"):
            if getattr(self, name) != getattr(default, name):
                out[name] = getattr(self, name)
        for name in ("cost_penalty", "confidence"):
            if getattr(self, name) != getattr(default, name):
                out[name] = getattr(self, name)
        if self.truncate:
            out["truncate"] = "true"  # a context on the wire holds no bools
        if self.weights != default.weights:
            for name in ("accuracy", "latency", "cost"):
                out[f"{name}_weight"] = getattr(self.weights, name)
        return out


DEFAULT_CONTEXT = SelectionContext()

_WEIGHT = object()
CONTEXT_KEYS: Mapping[str, object] = {
    "input_length": int,
    "language": str,
    "modality": str,
    "subtype": str,
    "max_latency_ms": float,
    "accuracy_weight": _WEIGHT,
    "latency_weight": _WEIGHT,
    "cost_weight": _WEIGHT,
    "cost_penalty": float,
    "confidence": float,
    "truncate": bool,
}


def modality_of(task_type: str) -> str:
    """`image-classification` -> `image`: the convention bundled models follow."""
    return task_type.split("-", 1)[0]


def _band(length: int) -> int:
    band = 1
    while band < length:
        band *= 2
    return band


def _invalid(message: str) -> JobError:
    return JobError(ErrorCode.INVALID_SELECTION, message)


def _int(key: str, value: object) -> int:
    if isinstance(value, bool):
        raise _invalid(f"{key} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise _invalid(f"{key} must be an integer, got {value!r}")


def _float(key: str, value: object) -> float:
    if isinstance(value, bool):
        raise _invalid(f"{key} must be a number, got {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise _invalid(f"{key} must be a number, got {value!r}") from None
    else:
        raise _invalid(f"{key} must be a number, got {value!r}")
    if not math.isfinite(number):
        raise _invalid(f"{key} must be finite, got {value!r}")
    return number


_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})


def _bool(key: str, value: object) -> bool:
    """True or False, 1 or 0, or their words (a context on the wire holds no bools)."""
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise _invalid(f"{key} must be true or false, got {value!r}")


def _text(key: str, value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CONTEXT_TEXT:
        raise _invalid(f"{key} must be a string of 1 to {MAX_CONTEXT_TEXT} characters")
    return value
