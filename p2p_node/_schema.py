"""What each field of a wire message may hold, declared beside the field, and the check.

A message field is `Annotated` with its bound: `Text`, `Int`, `Number`, `Items`,
`Row`, `TensorMap` or `ContextMap`; `Key` when the wire names it differently;
`SPARSE` when it goes on the wire only when it differs from its default (older
peers reject fields they do not know); `SPREAD` when a value's own fields sit in
the message's map. Bools, bytes, enums and dataclasses need no bound: their type
is their check. Values that other layers own (the scheduler's InferenceResult, the
selection's Learned, ...) cannot import these markers: `declare` gives their
bounds from here.

`schema(cls)` reads a class's fields and type hints once into a table; `check`
runs the table over a value. A message checks itself when it is built, as h11
checks its events, and raises `InvalidMessage` (INVALID_INPUT) where it is built.
The codec builds what it decodes through the same checks and reports a failure
as a `WireError` MALFORMED_MESSAGE: the peer's fault. Pure: no I/O, no msgpack.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeAlias, cast

from gossip._model import SchemaError, check_text
from scheduler import ErrorCode, JobError
from selection import MAX_CONTEXT_KEYS, MAX_CONTEXT_TEXT

MAX_ID_LENGTH = 128
MAX_TENSORS = 64


class WireError(JobError):
    """Bytes that are not a valid message of this protocol version: a peer's fault
    (MALFORMED_MESSAGE, UNSUPPORTED_VERSION)."""


class InvalidMessage(WireError):
    """A message built here with a value its protocol cannot carry: the fault of
    whoever built it, raised where it was built, with code INVALID_INPUT (the code
    a caller's unsendable tensor gets too). Never sent: the codec reports the same
    check failing on a peer's bytes as MALFORMED_MESSAGE."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INVALID_INPUT, message)


# --- bounds ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Text:
    """A string of 1 to `max` characters (0 to `max` if `empty`). A `cut` text is
    cut to `max` when sent instead of refused when built (an error's message)."""

    max: int = MAX_ID_LENGTH
    empty: bool = False
    cut: bool = False
    label: str | None = None


@dataclass(frozen=True, slots=True)
class Int:
    """An integer in [lo, hi] (never a bool)."""

    lo: int
    hi: int
    label: str | None = None


@dataclass(frozen=True, slots=True)
class Number:
    """A finite number in [lo, hi]; a float on the wire."""

    lo: float = -math.inf
    hi: float = math.inf
    label: str | None = None


@dataclass(frozen=True, slots=True)
class Items:
    """A tuple of `min_len` to `max_len` items, a list on the wire. `of` bounds each
    item when its type needs a bound (text, numbers, fixed tuples)."""

    max_len: int
    of: Bound | None = None
    min_len: int = 0
    label: str | None = None


@dataclass(frozen=True, slots=True)
class Row:
    """A fixed tuple such as `tuple[str, int]`, a list on the wire; one bound per item."""

    of: tuple[Bound | None, ...]
    label: str | None = None


@dataclass(frozen=True, slots=True)
class TensorMap:
    """Named tensors: at most MAX_TENSORS, each name at most MAX_ID_LENGTH characters."""


@dataclass(frozen=True, slots=True)
class ContextMap:
    """A selection context: a small map of short names to short strings or numbers.
    What the keys mean is the selection layer's to check."""


@dataclass(frozen=True, slots=True)
class Key:
    """The field's name on the wire, where it is not the attribute's."""

    name: str


@dataclass(frozen=True, slots=True)
class OrElse:
    """An enum value this node does not know (a newer peer's) reads as `value`."""

    value: enum.Enum


class _Flag(enum.Enum):
    SPARSE = "on the wire only when it differs from its default"
    SPREAD = "its fields sit in the parent's map"


SPARSE = _Flag.SPARSE
SPREAD = _Flag.SPREAD

Bound: TypeAlias = Text | Int | Number | Items | Row | TensorMap | ContextMap
Marker: TypeAlias = Bound | Key | OrElse | _Flag
_BOUNDS = (Text, Int, Number, Items, Row, TensorMap, ContextMap)
Check = Callable[[Any], None]  # raises SchemaError

# --- one value's spec ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spec:
    """What one value (a field, an item of a list) holds: its type without `None`
    (`optional`: None allowed too), its bound, and the check both build."""

    type: Any
    label: str
    optional: bool
    bound: Bound | None
    or_else: enum.Enum | None
    items: tuple[Spec, ...]  # an Items' item spec, or a Row's one per position
    check: Check
    check_set: Check  # `check` but for None, which it refuses


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    key: str  # its name on the wire
    spec: Spec
    default: Any  # dataclasses.MISSING if none
    sparse: bool
    spread: bool


@dataclass(frozen=True, slots=True)
class Schema:
    """A dataclass as the wire sees it: a map of its fields (or, for a `row`, a list
    of them in order). `checks_itself`: its `__post_init__` calls `check`; the codec
    checks the fields of any other class before it builds one."""

    cls: type
    label: str
    fields: tuple[Field, ...]
    row: bool
    checks_itself: bool
    check_fields: Check  # every field's check, but of a field left at its (valid) default


@dataclass(frozen=True, slots=True)
class _Declared:
    row: bool
    order: tuple[str, ...] | None
    markers: Mapping[str, tuple[Marker, ...]]
    local: tuple[str, ...] = ()


_DECLARED: dict[type, _Declared] = {}
_SCHEMAS: dict[type, Schema] = {}


def declare(
    cls: type,
    *,
    row: bool = False,
    order: tuple[str, ...] | None = None,
    local: tuple[str, ...] = (),
    **markers: Marker | tuple[Marker, ...],
) -> None:
    """Give the wire bounds of a dataclass another layer owns, which cannot import
    these markers. `row`: on the wire as a list of its fields; `order`: the order
    of its fields on the wire, where it is not theirs; `local`: fields that stay
    off the wire (a decoded value gets their defaults)."""
    by_field = {k: v if isinstance(v, tuple) else (v,) for k, v in markers.items()}
    _DECLARED[cls] = _Declared(row, order, by_field, local)


def schema(cls: type) -> Schema:
    """`cls`'s table, read from its fields and type hints on first use."""
    found = _SCHEMAS.get(cls)
    if found is None:
        found = _SCHEMAS[cls] = _read_schema(cls)
    return found


def check(value: object) -> None:
    """Raise InvalidMessage if a field of `value` is out of its bounds."""
    try:
        schema(type(value)).check_fields(value)
    except SchemaError as error:
        raise InvalidMessage(str(error)) from None


def invalid(message: str) -> InvalidMessage:
    """The error for a rule across fields, from a message's `__post_init__`."""
    return InvalidMessage(message)


def compile_function(name: str, lines: list[str], namespace: dict[str, Any]) -> Any:
    """The function `def name(...)` of `lines`, with `namespace` as its globals.

    Made once per message class, as `dataclasses` makes `__init__`: a straight line
    per field runs several times faster than a loop over a table, and checks and
    codec run for every message. The source holds declared names only, never a
    peer's bytes.
    """
    exec("\n".join(lines), namespace)
    return namespace[name]


def _read_schema(cls: type) -> Schema:
    declared = _DECLARED.get(cls, _Declared(False, None, {}))
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = []
    by_name = {f.name: f for f in dataclasses.fields(cls) if f.name not in declared.local}
    for name in declared.order or tuple(by_name):
        f = by_name.pop(name)
        hint = hints[f.name]
        markers: tuple[Any, ...] = declared.markers.get(f.name, ())
        if typing.get_origin(hint) is Annotated:
            hint, *extra = typing.get_args(hint)
            markers += tuple(extra)
        key = next((m.name for m in markers if isinstance(m, Key)), f.name)
        default = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        fields.append(
            Field(
                f.name,
                key,
                _spec(hint, markers, f.name),
                default,
                SPARSE in markers,
                SPREAD in markers,
            )
        )
    if by_name:
        raise TypeError(f"{cls.__name__}: the wire order leaves out {sorted(by_name)}")
    checks_itself = cls not in _DECLARED
    table = tuple(fields)
    check_fields = _compile_checks(cls, table)
    return Schema(cls, _words(cls.__name__), table, declared.row, checks_itself, check_fields)


def _compile_checks(cls: type, fields: tuple[Field, ...]) -> Check:
    """`check_fields(value)`: each field's check, after a quick test that lets the
    common valid value through without a call (the check says what is wrong)."""
    namespace: dict[str, Any] = {}
    lines = ["def check_fields(value):", "    pass"]
    for i, f in enumerate(fields):
        namespace[f"check{i}"] = f.spec.check
        namespace[f"default{i}"] = _valid_default(cls, f)
        quick = _quick_test(f.spec, f"{i}", namespace)
        lines.append(f"    v = value.{f.name}")
        unless = f" and not ({quick})" if quick else ""
        lines.append(f"    if v is not default{i}{unless}: check{i}(v)")
    return cast(Check, compile_function("check_fields", lines, namespace))


def _quick_test(spec: Spec, suffix: str, namespace: dict[str, Any]) -> str | None:
    """An expression of `v`, true only for a value `spec.check` takes (not always
    for every such value: the check decides the rest)."""
    test: str
    match spec.bound:
        case Text(max=limit, empty=empty, cut=False) if spec.type is str:
            test = f"type(v) is str and {0 if empty else 1} <= len(v) <= {limit}"
        case Int(lo=lo, hi=hi) if spec.type is int:
            test = f"type(v) is int and {lo} <= v <= {hi}"
        case Number(lo=lo, hi=hi):
            namespace[f"lo{suffix}"], namespace[f"hi{suffix}"] = lo, hi
            test = f"type(v) is float and lo{suffix} <= v <= hi{suffix} and v - v == 0.0"
        case None if spec.type is bool:
            test = "type(v) is bool"
        case _:
            return None
    return f"v is None or ({test})" if spec.optional else test


_NO_DEFAULT = object()


def _valid_default(cls: type, field: Field) -> object:
    """`field`'s default, once checked (a sparse one is never checked: it is never
    sent); a value no field holds if it has none or makes a new one each time."""
    default = field.default
    if field.sparse and default not in (None, ()):
        raise TypeError(f"{cls.__name__}.{field.name}: a sparse field's default is None or ()")
    if default is dataclasses.MISSING or type(default) in (dict, list, set):
        return _NO_DEFAULT
    if not field.sparse:
        try:
            field.spec.check(default)
        except SchemaError as error:
            raise TypeError(
                f"{cls.__name__}.{field.name}: default out of bounds: {error}"
            ) from None
    return default


def _words(name: str) -> str:
    """`RankedModel` -> `ranked model`."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()


def _spec(hint: Any, markers: tuple[Any, ...], label: str) -> Spec:
    bound = next((m for m in markers if isinstance(m, _BOUNDS)), None)
    or_else = next((m.value for m in markers if isinstance(m, OrElse)), None)
    if isinstance(bound, Text | Int | Number | Items | Row) and bound.label:
        label = bound.label
    optional = False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{label}: one type or None, got {hint}")
        hint, optional = rest[0], True
    items = _item_specs(hint, bound, label)
    check_set = _check_for(hint, bound, label, items)
    if not optional:
        return Spec(hint, label, optional, bound, or_else, items, check_set, check_set)

    def check_or_none(value: object) -> None:
        if value is not None:
            check_set(value)

    return Spec(hint, label, optional, bound, or_else, items, check_or_none, check_set)


def _item_specs(hint: Any, bound: Bound | None, label: str) -> tuple[Spec, ...]:
    if typing.get_origin(hint) is not tuple:
        return ()
    args = typing.get_args(hint)
    if isinstance(bound, Items) and len(args) == 2 and args[1] is Ellipsis:
        return (_spec(args[0], () if bound.of is None else (bound.of,), label),)
    if isinstance(bound, Row) and len(bound.of) == len(args):
        return tuple(
            _spec(a, () if b is None else (b,), f"{label} item")
            for a, b in zip(args, bound.of, strict=True)
        )
    raise TypeError(f"{label}: {hint} needs an Items or a Row bound that fits it")


def _check_for(hint: Any, bound: Bound | None, label: str, items: tuple[Spec, ...]) -> Check:
    """The check of one value of type `hint` (not None) within `bound`."""
    match bound:
        case Text(max=limit, empty=empty, cut=cut) if hint is str:
            if cut:  # any length when built; the codec cuts it when it sends it
                limit = sys.maxsize
            return _text_check(label, limit, empty)
        case Int(lo=lo, hi=hi) if hint is int:
            return _int_check(label, lo, hi)
        case Number(lo=lo, hi=hi) if hint is float:
            return _number_check(label, lo, hi)
        case Items(max_len=hi, min_len=lo):
            return _items_check(label, lo, hi, items[0].check)
        case Row():
            return _row_check(label, tuple(s.check for s in items))
        case TensorMap():
            return _check_tensor_names
        case ContextMap():
            return _check_context
        case None if hint is bool:
            return _bool_check(label)
        case None if hint is bytes:
            return _bytes_check(label)
        case None if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return _instance_check(label, hint)
        case None if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return _dataclass_check(label, hint)
    raise TypeError(f"{label}: no bound {bound} fits {hint}; declare one beside the field")


def _text_check(label: str, limit: int, empty: bool) -> Check:
    least = 0 if empty else 1

    def check(value: object) -> None:
        if type(value) is not str or not least <= len(value) <= limit:
            check_text(label, value, limit, allow_empty=empty)  # says what is wrong

    return check


def _int_check(label: str, lo: int, hi: int) -> Check:
    def check_int(value: object) -> None:
        if type(value) is not int:
            raise SchemaError(f"{label} must be an integer, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise SchemaError(f"{label} must be in [{lo}, {hi}], got {value}")

    return check_int


def _number_check(label: str, lo: float, hi: float) -> Check:
    def check(value: object) -> None:
        if type(value) is not float or not lo <= value <= hi or not math.isfinite(value):
            _check_number(label, value, lo, hi)

    return check


def _check_number(label: str, value: Any, lo: float, hi: float) -> None:
    if type(value) is not float and (
        isinstance(value, bool) or not isinstance(value, numbers.Real)
    ):
        raise SchemaError(f"{label} must be a finite number, got {value!r}")
    if not math.isfinite(value):
        raise SchemaError(f"{label} must be a finite number, got {value!r}")
    if not lo <= float(value) <= hi:
        within = f">= {lo:g}" if hi == math.inf else f"in [{lo:g}, {hi:g}]"
        raise SchemaError(f"{label} must be a finite number {within}, got {value!r}")


def _items_check(label: str, lo: int, hi: int, item: Check) -> Check:
    def check_items(value: object) -> None:
        if type(value) is not tuple:
            raise SchemaError(f"{label} must be a tuple, got {type(value).__name__}")
        if not lo <= len(value) <= hi:
            raise SchemaError(f"{label} must be a list of {lo} to {hi} items, got {len(value)}")
        for one in value:
            item(one)

    return check_items


def _row_check(label: str, checks: tuple[Check, ...]) -> Check:
    def check_row(value: object) -> None:
        if type(value) is not tuple or len(value) != len(checks):
            raise SchemaError(f"{label} must be a tuple of {len(checks)}, got {value!r}")
        for one, item in zip(checks, value, strict=True):
            one(item)

    return check_row


def _bool_check(label: str) -> Check:
    def check_bool(value: object) -> None:
        if type(value) is not bool:
            raise SchemaError(f"{label} must be true or false, got {type(value).__name__}")

    return check_bool


def _bytes_check(label: str) -> Check:
    def check_bytes(value: object) -> None:
        if not isinstance(value, bytes):
            raise SchemaError(f"{label} must be bytes, got {type(value).__name__}")

    return check_bytes


def _instance_check(label: str, cls: type) -> Check:
    def check_instance(value: object) -> None:
        if not isinstance(value, cls):
            raise SchemaError(f"{label} must be a {cls.__name__}, got {type(value).__name__}")

    return check_instance


def _dataclass_check(label: str, cls: type) -> Check:
    """Its type; and the fields of one whose bounds are declared here. Any other
    dataclass (a message, a PeerRecord, a ModelDescriptor) checks itself."""
    is_one = _instance_check(label, cls)

    def check_dataclass(value: object) -> None:
        is_one(value)
        if cls in _DECLARED:
            schema(cls).check_fields(value)

    return check_dataclass


def _check_tensor_names(value: object) -> None:
    if type(value) is not dict and not isinstance(value, Mapping):
        raise SchemaError(f"tensors must be a map of name to tensor, got {type(value).__name__}")
    if len(value) > MAX_TENSORS:
        raise SchemaError(f"{len(value)} tensors > limit {MAX_TENSORS}")
    for name in value:
        check_text("tensor name", name, MAX_ID_LENGTH, allow_empty=True)


def _check_context(value: object) -> None:
    if type(value) is not dict and not isinstance(value, Mapping):
        raise SchemaError(f"context must be a map, got {type(value).__name__}")
    if len(value) > MAX_CONTEXT_KEYS:
        raise SchemaError(f"context: {len(value)} keys > limit {MAX_CONTEXT_KEYS}")
    for key, item in value.items():
        name = check_text("context key", key, MAX_CONTEXT_TEXT)
        if isinstance(item, str):
            check_text(f"context {name}", item, MAX_CONTEXT_TEXT)
        elif type(item) is not int:
            _check_number(f"context {name}", item, -math.inf, math.inf)
