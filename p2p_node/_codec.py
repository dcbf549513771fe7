"""The msgpack codec of every wire message, derived from the messages' own fields.

Pure: bytes in, values out (or a `WireError`), no trio, no libp2p. Every message
is a msgpack map with a version `v`, a `kind` (one registration per message, at
the end of this module) and one key per field. The converters of a message are
read once, at registration, from its dataclass fields, type hints and bounds
(`_schema`). Decoding rejects unknown versions, missing or extra fields, wrong
types and oversize values, and builds each message through the checks its own
construction runs. Tensors are `{"dtype", "shape", "data"}` read back with
`numpy.frombuffer`: no copies and never pickle.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, cast

import msgpack
import numpy as np

from gossip import (
    MAX_RANK,
    TENSOR_DTYPES,
    ModelDescriptor,
    PeerRecord,
    RecordError,
    decode_record,
    encode_record,
)
from gossip._model import (
    SchemaError,
    check_text,
    descriptor_from_wire,
    descriptor_to_wire,
    expect_list,
    expect_map,
)
from scheduler import ErrorCode, InferenceResult, JobError, Tensors

from ._large import LARGE_BYTES, Buffer, joined, pack_large, unpack_large
from ._messages import (
    MAX_ID_LENGTH,
    MAX_TENSORS,
    VERSION,
    DigestReply,
    DigestRequest,
    ErrorReply,
    FeedbackReply,
    FeedbackRequest,
    GeneratedPiece,
    GenerateRequest,
    GenerateSummary,
    InvalidMessage,
    LoadReply,
    LoadRequest,
    ModelsReply,
    ModelsRequest,
    PeersReply,
    PeersRequest,
    PlaceReply,
    PlaceRequest,
    Reply,
    Request,
    Response,
    RunRequest,
    SelectReply,
    SelectRequest,
    StatsReply,
    StatsRequest,
    SyncReply,
    SyncRequest,
    WireError,
)
from ._schema import (
    ContextMap,
    Field,
    Items,
    Number,
    Row,
    Spec,
    TensorMap,
    Text,
    compile_function,
    schema,
)

MAX_DIM = 2**31 - 1
# A tensor this large goes to msgpack as a view of the array, not a copy of its bytes,
# and its bytes are not copied by msgpack either way (`_large`).
LARGE_TENSOR_BYTES = LARGE_BYTES
_ENVELOPE = frozenset({"v", "kind"})
# Replies decoded to be passed on as they came (a result a node forwarded a job for,
# on its way back to the job's client), by id, with their bytes: `encode` gives
# those bytes again, not encoding the same values a second time. Small ones only,
# the newest PASS_KEEP; one never passed on (failed over, replaced) just ages out.
PASS_KEEP = 1024
PASS_MAX_BYTES = 4096
_PASSED: dict[int, tuple[object, bytes]] = {}

ToWire = Callable[[Any], Any]
FromWire = Callable[[Any], Any]


def encode(message: Request | Reply) -> bytes:
    """The message's bytes. Raises JobError INVALID_INPUT for a tensor of a dtype the
    wire cannot carry."""
    return joined(encode_parts(message))


def encode_parts(message: Request | Reply) -> list[Buffer]:
    """The message's bytes, in pieces: one, or for a message with large tensors the
    pieces between them and each tensor's own bytes, not copied (`pack_large`).
    Whoever writes them reads the tensors then: they must not change meanwhile.
    Raises as `encode`."""
    if _PASSED:
        passed = _PASSED.pop(id(message), None)
        if passed is not None and passed[0] is message:  # held, so its id is its own
            return [passed[1]]
    kind, shape = _KIND_OF[type(message)]
    body: dict[str, Any] = {"kind": kind}
    shape.put(message, body)
    body["v"] = VERSION
    large = [
        wire
        for key in shape.tensor_keys
        for wire in (body.get(key) or {}).values()
        if len(wire["data"]) >= LARGE_TENSOR_BYTES
    ]
    packed = pack_large(body, large) if large else None
    if packed is None:
        return [msgpack.packb(body, use_bin_type=True)]
    return packed


def decode_request(payload: bytes) -> Request:
    """Decode a request; raises `WireError` on anything but a valid one."""
    return cast(Request, _decode(payload, _REQUESTS))  # its kind picked its type


def decode_reply(payload: bytes, *, pass_on: bool = False) -> Reply:
    """Decode a reply; raises `WireError` on anything but a valid one. With `pass_on`,
    encoding the reply itself (not a copy or a changed one) gives `payload` back."""
    reply = cast(Reply, _decode(payload, _REPLIES))  # its kind picked its type
    if pass_on and len(payload) <= PASS_MAX_BYTES:
        if len(_PASSED) >= PASS_KEEP:
            del _PASSED[next(iter(_PASSED))]
        _PASSED[id(reply)] = (reply, payload)
    return reply


def _decode(payload: bytes, kinds: Mapping[str, _Shape]) -> object:
    try:
        if len(payload) < LARGE_TENSOR_BYTES:  # nearly every message: no walk, no kwargs dict
            raw = msgpack.unpackb(
                payload, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext
            )
        else:
            raw = unpack_large(payload, _unpack, ext_hook=_no_ext)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as error:
        raise WireError(ErrorCode.MALFORMED_MESSAGE, f"not a msgpack message: {error}") from None
    if not isinstance(raw, dict):
        raise WireError(ErrorCode.MALFORMED_MESSAGE, "message must be a msgpack map")
    version = raw.get("v")
    if type(version) is not int or version != VERSION:
        raise WireError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"message version {version!r} is not supported; this node speaks {VERSION}",
        )
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        raise WireError(
            ErrorCode.MALFORMED_MESSAGE,
            f"unexpected message kind {kind!r}; expected one of {sorted(kinds)}",
        )
    try:
        shape = kinds[kind]
        return shape.take(raw, shape.message)
    except (SchemaError, InvalidMessage) as error:  # the checks a message is built with
        message = error.message if isinstance(error, InvalidMessage) else str(error)
        raise WireError(ErrorCode.MALFORMED_MESSAGE, message) from None


_unpack = functools.partial(msgpack.unpackb, raw=False, strict_map_key=True, use_list=True)


def _no_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not allowed")


# --- a dataclass on the wire -----------------------------------------------------------


class _Shape:
    """A dataclass's wire form: a map of its fields by their keys (a `row`: a list
    of them in order), each with its converters, read once from its schema."""

    def __init__(self, cls: type, envelope: frozenset[str] = frozenset()) -> None:
        table = schema(cls)
        self.cls = cls
        self.label = table.label
        self.message = self.label  # what a message of this shape is called in errors
        self.row = table.row
        self.checks = None if table.checks_itself else table.check_fields
        self.names = [f.name for f in table.fields]
        self.unset = {f.name: f.default for f in table.fields if f.sparse}
        self.keys: frozenset[str] = envelope
        self.sparse: frozenset[str] = frozenset()
        self.converters: list[tuple[ToWire | None, FromWire | None]] = []
        self.tensor_keys: tuple[str, ...] = ()  # the keys of its tensor maps, spread ones too
        # the source of `put(value, body)` and `take(raw)`: a line or two per field
        namespace: dict[str, Any] = {"build": self._build}
        put = ["def put(value, body):", "    pass"]
        take = ["def take(raw):", "    values = {}"]
        for i, f in enumerate(table.fields):
            self._add(f, f"{i}", namespace, put, take)
        take.append("    return build(values)")
        self.put: Callable[[object, dict[str, Any]], None] = compile_function(
            "put", put, dict(namespace)
        )
        self.take_fields: Callable[[dict[str, Any]], object] = compile_function(
            "take", take, dict(namespace)
        )

    def _add(
        self, f: Field, i: str, namespace: dict[str, Any], put: list[str], take: list[str]
    ) -> None:
        """Field `f`'s lines in `put` and `take`, with what they call in `namespace`."""
        get, key, name = f"value.{f.name}", repr(f.key), repr(f.name)
        if f.spread:  # its fields sit in our map
            inner = _Shape(f.spec.type)
            namespace[f"put{i}"], namespace[f"take{i}"] = inner.put, inner.take_fields
            put.append(f"    put{i}({get}, body)")
            take.append(f"    values[{name}] = take{i}(raw)")
            self.keys |= inner.keys
            self.tensor_keys += inner.tensor_keys
            return
        if isinstance(f.spec.bound, TensorMap):
            self.tensor_keys += (f.key,)
        if f.sparse:  # on the wire only when set: never None there
            to_wire, from_wire = _plain_converters(f.spec)
            from_wire = _then_check(from_wire, f.spec.check_set)
        else:
            to_wire, from_wire = _converters(f.spec)
        self.converters.append((to_wire, from_wire))
        namespace[f"to{i}"], namespace[f"from{i}"] = to_wire, from_wire
        out = get if to_wire is None else f"to{i}({get})"
        back = f"raw[{key}]" if from_wire is None else f"from{i}(raw[{key}])"
        if f.sparse:
            namespace[f"unset{i}"] = f.default
            put.append(f"    v = {get}")
            put.append(f"    if v is not unset{i} and v != unset{i}: body[{key}] = {out}")
            take.append(f"    if {key} in raw: values[{name}] = {back}")
            self.sparse |= {f.key}
        else:
            put.append(f"    body[{key}] = {out}")
            take.append(f"    values[{name}] = {back}")
            self.keys |= {f.key}

    def take(self, raw: dict[str, Any], label: str) -> object:
        """The value `raw` holds: exactly this shape's keys (and any sparse ones)."""
        present = raw.keys()
        if present != self.keys and not (
            self.sparse and self.keys <= present and present - self.keys <= self.sparse
        ):
            expect_map(raw, self.keys | (self.sparse & present), label)  # says what is wrong
        return self.take_fields(raw)

    def to_map(self, value: object) -> dict[str, Any]:
        body: dict[str, Any] = {}
        self.put(value, body)
        return body

    def from_map(self, raw: object, label: str) -> object:
        if not isinstance(raw, dict):
            raise SchemaError(f"{label} must be a map, got {type(raw).__name__}")
        return self.take(raw, label)

    def to_row(self, value: object) -> list[Any]:
        return [
            item if to_wire is None else to_wire(item)
            for item, (to_wire, _) in zip(
                (getattr(value, name) for name in self.names), self.converters, strict=True
            )
        ]

    def from_row(self, raw: object) -> object:
        if type(raw) is not list or len(raw) != len(self.names):
            names = ", ".join(self.names)
            raise SchemaError(f"{self.label} entries must be lists of {len(self.names)}: [{names}]")
        values = {
            name: item if from_wire is None else from_wire(item)
            for item, name, (_, from_wire) in zip(raw, self.names, self.converters, strict=True)
        }
        return self._build(values)

    def _build(self, values: dict[str, Any]) -> object:
        if self.checks is not None:  # another layer's value: check it before it is built
            self.checks(_Fields({**self.unset, **values}))
        return self.cls(**values)


class _Fields:
    """Values by name, read as attributes: what a check reads before the value is built."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


# --- one value on the wire ----------------------------------------------------------------


def _converters(spec: Spec) -> tuple[ToWire | None, FromWire | None]:
    """How a value of `spec` goes to the wire and comes back (None: as it is). What
    comes back is checked where the value is built, not here."""
    to_wire, from_wire = _plain_converters(spec)
    if not spec.optional:
        return to_wire, from_wire
    return _or_none(to_wire), _or_none(from_wire)


def _then_check(from_wire: FromWire | None, check: Callable[[Any], None]) -> FromWire:
    def checked(raw: object) -> object:
        value = raw if from_wire is None else from_wire(raw)
        check(value)
        return value

    return checked


def _or_none(convert: Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
    if convert is None:
        return None
    return lambda value: None if value is None else convert(value)


def _plain_converters(spec: Spec) -> tuple[ToWire | None, FromWire | None]:
    match spec.bound:
        case Text(cut=True, max=limit, empty=empty):
            label = spec.label
            return lambda text: text[:limit], lambda raw: check_text(
                label, raw, limit, allow_empty=empty
            )
        case Number():
            return float, _float_from_wire
        case Items(min_len=lo, max_len=hi):
            return _items_converters(spec.label, lo, hi, spec.items[0])
        case Row():
            return _row_converters(spec.label, spec.items)
        case TensorMap():
            return _tensors_to_wire, _tensors_from_wire
        case ContextMap():
            return dict, None
    cls = spec.type
    if isinstance(cls, type) and issubclass(cls, enum.Enum):
        return None, _enum_from_wire(cls, spec.label, spec.or_else)  # msgpack packs its value
    if cls in _VALUES:
        return _VALUES[cls]
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        shape = _Shape(cls)
        if shape.row:
            return shape.to_row, shape.from_row
        return shape.to_map, lambda raw: shape.from_map(raw, shape.label)
    return None, None  # text, integers, bools and bytes travel as they are


def _float_from_wire(raw: object) -> object:
    return float(raw) if type(raw) is int else raw


def _items_converters(
    label: str, lo: int, hi: int, item: Spec
) -> tuple[ToWire | None, FromWire | None]:
    item_to, item_from = _converters(item)

    def from_wire(raw: object) -> tuple[Any, ...]:
        if type(raw) is not list:
            raise SchemaError(f"{label} must be a list, got {type(raw).__name__}")
        if not lo <= len(raw) <= hi:
            raise SchemaError(f"{label} must be a list of {lo} to {hi} items, got {len(raw)}")
        return tuple(raw) if item_from is None else tuple(map(item_from, raw))

    if item_to is None:
        return None, from_wire  # msgpack packs a tuple as a list
    return (lambda items: [item_to(x) for x in items]), from_wire


def _row_converters(label: str, items: tuple[Spec, ...]) -> tuple[ToWire | None, FromWire | None]:
    converters = [_converters(item) for item in items]

    def to_wire(row: tuple[Any, ...]) -> list[Any]:
        return [x if to is None else to(x) for x, (to, _) in zip(row, converters, strict=True)]

    def from_wire(raw: object) -> tuple[Any, ...]:
        if type(raw) is not list or len(raw) != len(items):
            raise SchemaError(f"a {label} entry must be a list of {len(items)}")
        return tuple(
            x if back is None else back(x) for x, (_, back) in zip(raw, converters, strict=True)
        )

    return to_wire, from_wire


def _enum_from_wire(cls: type[enum.Enum], label: str, or_else: enum.Enum | None) -> FromWire:
    base = int if issubclass(cls, int) else str
    known = ", ".join(str(member.value) for member in cls)

    def from_wire(raw: object) -> enum.Enum:
        if type(raw) is base:
            try:
                return cls(raw)
            except ValueError:
                if or_else is not None:
                    return or_else
        elif base is int:
            raise SchemaError(f"{label} must be an integer, got {type(raw).__name__}")
        raise SchemaError(f"unknown {label} {raw!r}: {label} must be one of {known}")

    return from_wire


def _record_from_wire(raw: object) -> PeerRecord:
    if not isinstance(raw, bytes):
        raise SchemaError(f"record must be bytes, got {type(raw).__name__}")
    try:
        return decode_record(raw)
    except RecordError as error:
        raise SchemaError(f"peer report: {error}") from None


# Values that other layers encode themselves.
_VALUES: dict[type, tuple[ToWire, FromWire]] = {
    PeerRecord: (encode_record, _record_from_wire),
    ModelDescriptor: (descriptor_to_wire, descriptor_from_wire),
}

# --- tensors ---------------------------------------------------------------------------

_TENSOR_KEYS = frozenset({"dtype", "shape", "data"})


# The wire's dtypes by numpy dtype (either byte order), and back, little-endian:
# numpy's `dtype.name` is computed in Python on every read (a tenth of encoding a
# small job).
_WIRE_NAMES: dict[np.dtype[Any], str] = {}
for _name in TENSOR_DTYPES:
    _WIRE_NAMES[np.dtype(_name).newbyteorder("<")] = _name
    _WIRE_NAMES[np.dtype(_name).newbyteorder(">")] = _name
_LITTLE: dict[str, np.dtype[Any]] = {
    _name: np.dtype(_name).newbyteorder("<") for _name in TENSOR_DTYPES
}


def _tensors_to_wire(tensors: Tensors) -> dict[str, Any]:
    wire = {}
    for name, array in tensors.items():
        array = np.asarray(array)
        dtype_name = _WIRE_NAMES.get(array.dtype)
        if dtype_name is None:
            raise JobError(
                ErrorCode.INVALID_INPUT,
                f"tensor {name!r} has dtype {array.dtype.name}; "
                f"supported: {', '.join(sorted(TENSOR_DTYPES))}",
            )
        little = _LITTLE[dtype_name]
        if array.dtype != little:
            array = array.astype(little)
        if array.nbytes >= LARGE_TENSOR_BYTES and array.flags.c_contiguous:
            data: bytes | memoryview = array.data.cast("B")  # no copy: packed at once
        else:
            data = array.tobytes()  # C order, whatever the array's own
        wire[name] = {"dtype": dtype_name, "shape": list(array.shape), "data": data}
    return wire


def _tensors_from_wire(raw: object) -> dict[str, np.ndarray[Any, Any]]:
    if not isinstance(raw, dict):
        raise SchemaError(f"tensors must be a map of name to tensor, got {type(raw).__name__}")
    if len(raw) > MAX_TENSORS:
        raise SchemaError(f"{len(raw)} tensors > limit {MAX_TENSORS}")
    tensors = {}
    for name, t in raw.items():
        if type(name) is not str or len(name) > MAX_ID_LENGTH:
            check_text("tensor name", name, MAX_ID_LENGTH, allow_empty=True)  # says why
        tensors[name] = _tensor_from_wire(name, t)
    return tensors


def _tensor_from_wire(name: str, raw: object) -> np.ndarray[Any, Any]:
    """The tensor `raw` holds. A well-formed one takes the straight path below, with
    the same checks as `_checked_tensor` but no label built and no call per check
    (a third of decoding a small job's reply); anything else goes there to be
    refused with its reason."""
    if type(raw) is dict and raw.keys() == _TENSOR_KEYS:
        dtype_name = raw["dtype"]
        dtype = _LITTLE.get(dtype_name) if type(dtype_name) is str else None
        dims, data = raw["shape"], raw["data"]
        if dtype is not None and type(dims) is list and len(dims) <= MAX_RANK:
            size = dtype.itemsize
            for d in dims:
                if type(d) is not int or not 0 <= d <= MAX_DIM:
                    break
                size *= d
            else:
                if (type(data) is bytes or type(data) is memoryview) and size == len(data) and size:
                    # what frombuffer(...).reshape(dims) gives (read-only, a view of
                    # `data`), in one call, not two
                    return np.ndarray(dims, dtype, data)
    return _checked_tensor(name, raw)


def _checked_tensor(name: str, raw: object) -> np.ndarray[Any, Any]:
    f = expect_map(raw, _TENSOR_KEYS, f"tensor {name!r}")
    dtype_name, shape, data = f["dtype"], f["shape"], f["data"]
    if type(dtype_name) is not str or dtype_name not in TENSOR_DTYPES:
        raise SchemaError(f"tensor {name!r}: unsupported dtype {dtype_name!r}")
    dims = expect_list(shape, f"tensor {name!r} shape", MAX_RANK)
    if any(type(d) is not int or not 0 <= d <= MAX_DIM for d in dims):
        raise SchemaError(f"tensor {name!r}: dims must be ints in [0, {MAX_DIM}], got {dims}")
    if not isinstance(data, bytes | memoryview):  # a view: a large one (`unpack_large`)
        raise SchemaError(f"tensor {name!r}: data must be bytes")
    dtype = _LITTLE[dtype_name]
    expected = math.prod(dims) * dtype.itemsize
    if expected != len(data):
        raise SchemaError(
            f"tensor {name!r}: {dtype_name} {dims} needs {expected} bytes, got {len(data)}"
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(dims)
    except ValueError as error:  # empty, but the other dims' product past what numpy holds
        raise SchemaError(f"tensor {name!r}: {dtype_name} {dims}: {error}") from None


# --- the registry: one line per message --------------------------------------------------

_REQUESTS: dict[str, _Shape] = {}
_REPLIES: dict[str, _Shape] = {}
_KIND_OF: dict[type, tuple[str, _Shape]] = {}


def register(kind: str, cls: type[Request | Response] | type[InferenceResult]) -> None:
    """Put `cls` on the wire as `kind`: a request or a reply, by its base class."""
    shape = _Shape(cls, _ENVELOPE)
    shape.message = f"{kind!r} message"  # built once, not per message decoded
    (_REQUESTS if issubclass(cls, Request) else _REPLIES)[kind] = shape
    _KIND_OF[cls] = (kind, shape)


register("run", RunRequest)
register("models?", ModelsRequest)
register("peers?", PeersRequest)
register("place?", PlaceRequest)
register("select?", SelectRequest)
register("feedback", FeedbackRequest)
register("load?", LoadRequest)
register("sync?", SyncRequest)
register("result", InferenceResult)
register("error", ErrorReply)
register("models", ModelsReply)
register("peers", PeersReply)
register("place", PlaceReply)
register("select", SelectReply)
register("feedback!", FeedbackReply)
register("load", LoadReply)
register("sync", SyncReply)
register("stats?", StatsRequest)
register("stats", StatsReply)
register("generate", GenerateRequest)
register("piece", GeneratedPiece)
register("generated", GenerateSummary)
register("digest?", DigestRequest)
register("digest", DigestReply)
