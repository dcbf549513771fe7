"""Wire messages of every p2p-node protocol: values and a strict codec.

Pure: bytes in, values out (or a `WireError`), no trio, no libp2p. Every message
is a msgpack map with a version `v` and a `kind`; decoders reject unknown
versions, missing or extra fields, wrong types and oversize tensors. Tensors are
`{"dtype", "shape", "data"}` read back with `numpy.frombuffer`: no copies and
never pickle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack
import numpy as np

from gossip import (
    MAX_RANK,
    TENSOR_DTYPES,
    ModelDescriptor,
    PeerRecord,
    RecordError,
    SchemaError,
    check_text,
    decode_record,
    descriptor_from_wire,
    descriptor_to_wire,
    encode_record,
    expect_list,
    expect_map,
)
from scheduler import (
    NO_REQUIREMENTS,
    Candidate,
    DistributionStrategy,
    ErrorCode,
    Excluded,
    GpuNeed,
    InferenceResult,
    JobError,
    Placement,
    Requirements,
    Tensors,
)
from selection import (
    MAX_CONTEXT_KEYS,
    MAX_CONTEXT_TEXT,
    AdvancedModelSelectionStrategy,
    LeftOut,
    RankedModel,
    Selection,
)

VERSION = 1
MAX_TENSORS = 64
MAX_ID_LENGTH = 128
MAX_MESSAGE_LENGTH = 4096
MAX_TIMEOUT_MS = 3_600_000
MAX_DIM = 2**31 - 1
MAX_LIST_LENGTH = 64

ContextValue = str | int | float


class WireError(JobError):
    """Bytes that are not a valid message of this protocol version."""


@dataclass(frozen=True, slots=True)
class RunRequest:
    """Run `model_id` on `inputs`. Sent on both the job and the infer protocol.

    A job may name a `task` type instead (with `model_id` empty): the coordinator
    selects the model with `selection` (a strategy name; None: its default) in
    `context`, then places it. The infer protocol always names a model.
    """

    job_id: str
    model_id: str
    inputs: Tensors
    timeout_ms: int
    strategy: DistributionStrategy | None = None  # None: the coordinator's default
    requirements: Requirements = NO_REQUIREMENTS
    task: str | None = None
    selection: str | None = None
    context: Mapping[str, ContextValue] = field(default_factory=dict)
    hedge: bool = False  # also ask a second peer if the first is slower than its p95
    outputs: tuple[str, ...] = ()  # the outputs wanted (a model's only); () for all


@dataclass(frozen=True, slots=True)
class ErrorReply:
    code: ErrorCode
    message: str
    peer: str
    retry_after: float | None = None  # seconds; on the wire only when set

    @classmethod
    def from_error(cls, error: JobError, peer: str) -> ErrorReply:
        return cls(error.code, error.message, error.peer or peer, error.retry_after)

    def to_error(self) -> JobError:
        return JobError(
            self.code, self.message, peer=self.peer or None, retry_after=self.retry_after
        )


@dataclass(frozen=True, slots=True)
class ModelsRequest:
    pass


@dataclass(frozen=True, slots=True)
class ModelsReply:
    peer_id: str
    models: tuple[ModelDescriptor, ...]


@dataclass(frozen=True, slots=True)
class PeersRequest:
    pass


@dataclass(frozen=True, slots=True)
class PeerReport:
    """One entry of a node's view, as `p2p-node peers` shows it."""

    record: PeerRecord
    age_s: float  # since the record arrived
    state: str  # "alive" or "suspect"


@dataclass(frozen=True, slots=True)
class PeersReply:
    peer_id: str
    peers: tuple[PeerReport, ...]


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """How busy are you now? A coordinator's probe just before it places a request."""


@dataclass(frozen=True, slots=True)
class LoadReply:
    peer_id: str
    in_flight: int  # requests running
    queue_length: int  # requests admitted and waiting for a worker

    @property
    def load(self) -> int:
        return self.in_flight + self.queue_length


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """The records I hold, as their signed GossipSub messages; send me yours.
    Exchanged once when two peers connect, so neither waits for a refresh."""

    messages: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class SyncReply:
    messages: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class PlaceRequest:
    """Where would `model_id` run now? Answered with a ranking; nothing runs."""

    model_id: str
    strategy: DistributionStrategy
    requirements: Requirements = NO_REQUIREMENTS


@dataclass(frozen=True, slots=True)
class PlaceReply:
    peer_id: str
    placement: Placement


@dataclass(frozen=True, slots=True)
class SelectRequest:
    """How would the node select models for `task` in `context`? Nothing runs."""

    task: str
    strategy: str
    context: Mapping[str, ContextValue] = field(default_factory=dict)
    k: int | None = None


@dataclass(frozen=True, slots=True)
class Learned:
    """What the node's tracker learned of one model in one context bucket."""

    model_id: str
    bucket: str
    runs: int
    failures: int
    latency_ms: float | None
    success_rate: float
    quality: float | None
    quality_weight: float


@dataclass(frozen=True, slots=True)
class SelectReply:
    peer_id: str
    selection: Selection
    learned: tuple[Learned, ...]


@dataclass(frozen=True, slots=True)
class FeedbackRequest:
    """A quality score in [0, 1] for a job the receiving node coordinated."""

    job_id: str
    score: float


@dataclass(frozen=True, slots=True)
class FeedbackReply:
    peer_id: str
    job_id: str
    model_ids: tuple[str, ...]  # the models the score was credited to


Request = (
    RunRequest
    | ModelsRequest
    | PeersRequest
    | PlaceRequest
    | SelectRequest
    | FeedbackRequest
    | LoadRequest
    | SyncRequest
)
Reply = (
    InferenceResult
    | LoadReply
    | SyncReply
    | ModelsReply
    | PeersReply
    | PlaceReply
    | SelectReply
    | FeedbackReply
    | ErrorReply
)


# --- encoding --------------------------------------------------------------------------


def encode(message: Request | Reply) -> bytes:
    body: dict[str, Any]
    match message:
        case RunRequest():
            body = {
                "kind": "run",
                "job_id": message.job_id,
                "model_id": message.model_id,
                "inputs": _tensors_to_wire(message.inputs),
                "timeout_ms": message.timeout_ms,
                "strategy": message.strategy and str(message.strategy),
                "requires": _requirements_to_wire(message.requirements),
                "task": message.task,
                "selection": message.selection,
                "context": dict(message.context),
                "hedge": message.hedge,
            }
            if message.outputs:  # on the wire only when set
                body["outputs"] = list(message.outputs)
        case SelectRequest():
            body = {
                "kind": "select?",
                "task": message.task,
                "strategy": message.strategy,
                "context": dict(message.context),
                "k": message.k,
            }
        case SelectReply():
            chosen = message.selection
            body = {
                "kind": "select",
                "peer_id": message.peer_id,
                "task": chosen.task_type,
                "strategy": str(chosen.strategy),
                "bucket": chosen.bucket,
                "ranked": [[r.model_id, r.score, list(r.reasons)] for r in chosen.ranked],
                "excluded": [[x.model_id, x.reason] for x in chosen.excluded],
                "learned": [
                    [
                        x.model_id,
                        x.bucket,
                        x.runs,
                        x.failures,
                        x.latency_ms,
                        x.success_rate,
                        x.quality,
                        x.quality_weight,
                    ]
                    for x in message.learned
                ],
            }
        case FeedbackRequest():
            body = {"kind": "feedback", "job_id": message.job_id, "score": float(message.score)}
        case FeedbackReply():
            body = {
                "kind": "feedback!",
                "peer_id": message.peer_id,
                "job_id": message.job_id,
                "models": list(message.model_ids),
            }
        case PlaceRequest():
            body = {
                "kind": "place?",
                "model_id": message.model_id,
                "strategy": str(message.strategy),
                "requires": _requirements_to_wire(message.requirements),
            }
        case PlaceReply():
            body = {
                "kind": "place",
                "peer_id": message.peer_id,
                "model_id": message.placement.model_id,
                "candidates": [
                    [c.peer_id, c.score, c.reason] for c in message.placement.candidates
                ],
                "excluded": [[e.peer_id, e.reason] for e in message.placement.excluded],
            }
        case InferenceResult():
            body = {
                "kind": "result",
                "job_id": message.job_id,
                "model_id": message.model_id,
                "outputs": _tensors_to_wire(message.outputs),
                "executor": message.executor,
                "queue_ms": float(message.queue_ms),
                "compute_ms": float(message.compute_ms),
                "route": [[model, rows] for model, rows in message.route],
            }
            if message.load is not None:
                body["load"] = message.load
        case LoadRequest():
            body = {"kind": "load?"}
        case SyncRequest():
            body = {"kind": "sync?", "messages": list(message.messages)}
        case SyncReply():
            body = {"kind": "sync", "messages": list(message.messages)}
        case LoadReply():
            body = {
                "kind": "load",
                "peer_id": message.peer_id,
                "in_flight": message.in_flight,
                "queue_length": message.queue_length,
            }
        case ErrorReply():
            body = {
                "kind": "error",
                "code": int(message.code),
                "message": message.message[:MAX_MESSAGE_LENGTH],
                "peer": message.peer,
            }
            if message.retry_after is not None:
                body["retry_after"] = float(message.retry_after)
        case ModelsRequest():
            body = {"kind": "models?"}
        case PeersRequest():
            body = {"kind": "peers?"}
        case PeersReply():
            body = {
                "kind": "peers",
                "peer_id": message.peer_id,
                "peers": [
                    {"record": encode_record(p.record), "age_s": p.age_s, "state": p.state}
                    for p in message.peers
                ],
            }
        case ModelsReply():
            body = {
                "kind": "models",
                "peer_id": message.peer_id,
                "models": [descriptor_to_wire(m) for m in message.models],
            }
    body["v"] = VERSION
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def _tensors_to_wire(tensors: Tensors) -> dict[str, Any]:
    wire = {}
    for name, array in tensors.items():
        array = np.asarray(array)
        if array.dtype.name not in TENSOR_DTYPES:
            raise JobError(
                ErrorCode.INVALID_INPUT,
                f"tensor {name!r} has dtype {array.dtype.name}; "
                f"supported: {', '.join(sorted(TENSOR_DTYPES))}",
            )
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        wire[name] = {
            "dtype": array.dtype.name,
            "shape": list(array.shape),
            "data": np.ascontiguousarray(little).tobytes(),
        }
    return wire


# --- decoding --------------------------------------------------------------------------

_REQUEST_KINDS = {
    "run": RunRequest,
    "models?": ModelsRequest,
    "peers?": PeersRequest,
    "place?": PlaceRequest,
    "select?": SelectRequest,
    "feedback": FeedbackRequest,
    "load?": LoadRequest,
    "sync?": SyncRequest,
}
_REPLY_KINDS = {
    "result": InferenceResult,
    "error": ErrorReply,
    "models": ModelsReply,
    "peers": PeersReply,
    "place": PlaceReply,
    "select": SelectReply,
    "feedback!": FeedbackReply,
    "load": LoadReply,
    "sync": SyncReply,
}
_KEYS = {
    "run": frozenset(
        {
            "v",
            "kind",
            "job_id",
            "model_id",
            "inputs",
            "timeout_ms",
            "strategy",
            "requires",
            "task",
            "selection",
            "context",
            "hedge",
        }
    ),
    "select?": frozenset({"v", "kind", "task", "strategy", "context", "k"}),
    "select": frozenset(
        {"v", "kind", "peer_id", "task", "strategy", "bucket", "ranked", "excluded", "learned"}
    ),
    "feedback": frozenset({"v", "kind", "job_id", "score"}),
    "feedback!": frozenset({"v", "kind", "peer_id", "job_id", "models"}),
    "place?": frozenset({"v", "kind", "model_id", "strategy", "requires"}),
    "place": frozenset({"v", "kind", "peer_id", "model_id", "candidates", "excluded"}),
    "result": frozenset(
        {
            "v",
            "kind",
            "job_id",
            "model_id",
            "outputs",
            "executor",
            "queue_ms",
            "compute_ms",
            "route",
        }
    ),
    "error": frozenset({"v", "kind", "code", "message", "peer"}),
    "models?": frozenset({"v", "kind"}),
    "models": frozenset({"v", "kind", "peer_id", "models"}),
    "peers?": frozenset({"v", "kind"}),
    "peers": frozenset({"v", "kind", "peer_id", "peers"}),
    "load?": frozenset({"v", "kind"}),
    "sync?": frozenset({"v", "kind", "messages"}),
    "sync": frozenset({"v", "kind", "messages"}),
    "load": frozenset({"v", "kind", "peer_id", "in_flight", "queue_length"}),
}
# Fields a message may leave out (older peers never send them).
_OPTIONAL_KEYS = {
    "error": frozenset({"retry_after"}),
    "result": frozenset({"load"}),
    "run": frozenset({"outputs"}),
}
MAX_LOAD = 2**31 - 1
_PEER_REPORT_KEYS = frozenset({"record", "age_s", "state"})
MAX_PEERS = 100_000
_TENSOR_KEYS = frozenset({"dtype", "shape", "data"})


def decode_request(payload: bytes) -> Request:
    """Decode a request; raises `WireError` on anything but a valid one."""
    return cast(Request, _decode(payload, _REQUEST_KINDS))  # its kind picked its type


def decode_reply(payload: bytes) -> Reply:
    """Decode a reply; raises `WireError` on anything but a valid one."""
    return cast(Reply, _decode(payload, _REPLY_KINDS))  # its kind picked its type


def _decode(payload: bytes, kinds: Mapping[str, type]) -> Request | Reply:
    try:
        raw = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext
        )
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
        keys = _KEYS[kind] | (_OPTIONAL_KEYS.get(kind, frozenset()) & raw.keys())
        fields = expect_map(raw, keys, f"{kind!r} message")
        message: Request | Reply = _BUILDERS[kind](fields)
        return message
    except SchemaError as error:
        raise WireError(ErrorCode.MALFORMED_MESSAGE, str(error)) from None


def _no_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _run_request(f: Mapping[str, Any]) -> RunRequest:
    timeout_ms = _int(f["timeout_ms"], "timeout_ms")
    if not 0 < timeout_ms <= MAX_TIMEOUT_MS:
        raise SchemaError(f"timeout_ms must be in (0, {MAX_TIMEOUT_MS}], got {timeout_ms}")
    task = None if f["task"] is None else _text(f["task"], "task")
    model_id = _text(f["model_id"], "model_id", allow_empty=task is not None)
    if task is not None and model_id:
        raise SchemaError("a run request names a model_id or a task, not both")
    selection = None if f["selection"] is None else _text(f["selection"], "selection")
    outputs = _output_names(f["outputs"]) if "outputs" in f else ()
    if task is not None and outputs:
        raise SchemaError("outputs go with a model_id; a task job answers its model's outputs")
    return RunRequest(
        job_id=_text(f["job_id"], "job_id"),
        model_id=model_id,
        inputs=_tensors_from_wire(f["inputs"]),
        timeout_ms=timeout_ms,
        strategy=None if f["strategy"] is None else _strategy(f["strategy"]),
        requirements=_requirements_from_wire(f["requires"]),
        task=task,
        selection=selection,
        context=_context(f["context"]),
        hedge=_bool(f["hedge"], "hedge"),
        outputs=outputs,
    )


def _output_names(raw: object) -> tuple[str, ...]:
    if type(raw) is not list or not 0 < len(raw) <= MAX_TENSORS:
        raise SchemaError(f"outputs must be a list of 1 to {MAX_TENSORS} output names")
    names = tuple(_text(name, "output name") for name in raw)
    if len(set(names)) != len(names):
        raise SchemaError(f"outputs names one output twice: {list(names)}")
    return names


def _bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise SchemaError(f"{what} must be true or false, got {type(value).__name__}")
    return value


def _context(raw: object) -> dict[str, ContextValue]:
    """A selection context: a small map of short names to short strings or numbers.
    What the keys mean is the selection layer's to check."""
    if not isinstance(raw, dict):
        raise SchemaError(f"context must be a map, got {type(raw).__name__}")
    if len(raw) > MAX_CONTEXT_KEYS:
        raise SchemaError(f"context: {len(raw)} keys > limit {MAX_CONTEXT_KEYS}")
    out: dict[str, ContextValue] = {}
    for key, value in raw.items():
        name = _text(key, "context key", MAX_CONTEXT_TEXT)
        if isinstance(value, str):
            out[name] = _text(value, f"context {name}", MAX_CONTEXT_TEXT)
        elif type(value) is int:
            out[name] = value
        else:
            out[name] = _number(value, f"context {name}")
    return out


def _select_request(f: Mapping[str, Any]) -> SelectRequest:
    k = f["k"]
    if k is not None and (type(k) is not int or not 1 <= k <= MAX_LIST_LENGTH):
        raise SchemaError(f"k must be an integer in [1, {MAX_LIST_LENGTH}] or nil, got {k!r}")
    return SelectRequest(
        task=_text(f["task"], "task"),
        strategy=_text(f["strategy"], "strategy"),
        context=_context(f["context"]),
        k=k,
    )


def _select_reply(f: Mapping[str, Any]) -> SelectReply:
    try:
        strategy = AdvancedModelSelectionStrategy(_text(f["strategy"], "strategy"))
    except ValueError:
        raise SchemaError(f"unknown selection strategy {f['strategy']!r}") from None
    ranked = []
    for raw in expect_list(f["ranked"], "ranked", MAX_LIST_LENGTH * 4):
        model, score, reasons = _triple(raw, "ranked model")
        texts = expect_list(reasons, "reasons", 16)
        ranked.append(
            RankedModel(
                _text(model, "model_id"),
                _number(score, "score"),
                tuple(_text(t, "reason", MAX_MESSAGE_LENGTH) for t in texts),
            )
        )
    excluded = []
    for raw in expect_list(f["excluded"], "excluded", MAX_LIST_LENGTH * 4):
        if not isinstance(raw, list) or len(raw) != 2:
            raise SchemaError("an excluded entry must be [model_id, reason]")
        excluded.append(
            LeftOut(_text(raw[0], "model_id"), _text(raw[1], "reason", MAX_MESSAGE_LENGTH))
        )
    learned = []
    for raw in expect_list(f["learned"], "learned", 4096):
        if not isinstance(raw, list) or len(raw) != 8:
            raise SchemaError("a learned entry must be a list of 8")
        model, bucket, runs, failures, latency, success, quality, weight = raw
        learned.append(
            Learned(
                _text(model, "model_id"),
                _text(bucket, "bucket"),
                _int(runs, "runs"),
                _int(failures, "failures"),
                None if latency is None else _millis(latency, "latency_ms"),
                _millis(success, "success_rate"),
                None if quality is None else _millis(quality, "quality"),
                _millis(weight, "quality_weight"),
            )
        )
    selection = Selection(
        strategy,
        _text(f["task"], "task"),
        _text(f["bucket"], "bucket"),
        tuple(ranked),
        tuple(excluded),
    )
    return SelectReply(_text(f["peer_id"], "peer_id"), selection, tuple(learned))


def _feedback_request(f: Mapping[str, Any]) -> FeedbackRequest:
    score = _number(f["score"], "score")
    if not 0.0 <= score <= 1.0:
        raise SchemaError(f"score must be in [0, 1], got {score}")
    return FeedbackRequest(_text(f["job_id"], "job_id"), score)


def _feedback_reply(f: Mapping[str, Any]) -> FeedbackReply:
    models = expect_list(f["models"], "models", MAX_LIST_LENGTH)
    return FeedbackReply(
        _text(f["peer_id"], "peer_id"),
        _text(f["job_id"], "job_id"),
        tuple(_text(m, "model_id") for m in models),
    )


def _place_request(f: Mapping[str, Any]) -> PlaceRequest:
    return PlaceRequest(
        model_id=_text(f["model_id"], "model_id"),
        strategy=_strategy(f["strategy"]),
        requirements=_requirements_from_wire(f["requires"]),
    )


def _place_reply(f: Mapping[str, Any]) -> PlaceReply:
    candidates = []
    for raw in expect_list(f["candidates"], "candidates", MAX_PEERS):
        peer, score, reason = _triple(raw, "candidate")
        candidates.append(
            Candidate(
                _text(peer, "peer"),
                _number(score, "score"),
                _text(reason, "reason", MAX_MESSAGE_LENGTH),
            )
        )
    excluded = []
    for raw in expect_list(f["excluded"], "excluded", MAX_PEERS):
        if not isinstance(raw, list) or len(raw) != 2:
            raise SchemaError("an excluded entry must be [peer, reason]")
        excluded.append(
            Excluded(_text(raw[0], "peer"), _text(raw[1], "reason", MAX_MESSAGE_LENGTH))
        )
    placement = Placement(_text(f["model_id"], "model_id"), tuple(candidates), tuple(excluded))
    return PlaceReply(_text(f["peer_id"], "peer_id"), placement)


def _triple(raw: object, what: str) -> list[Any]:
    if not isinstance(raw, list) or len(raw) != 3:
        raise SchemaError(f"a {what} must be a list of 3")
    return raw


def _strategy(raw: object) -> DistributionStrategy:
    try:
        return DistributionStrategy(_text(raw, "strategy"))
    except ValueError:
        known = ", ".join(s.value for s in DistributionStrategy)
        raise SchemaError(f"unknown strategy {raw!r}; known: {known}") from None


_REQUIREMENT_KEYS = frozenset({"min_memory_mb", "gpu", "provider"})


def _requirements_to_wire(needs: Requirements) -> dict[str, Any]:
    return {"min_memory_mb": needs.min_memory_mb, "gpu": str(needs.gpu), "provider": needs.provider}


def _requirements_from_wire(raw: object) -> Requirements:
    f = expect_map(raw, _REQUIREMENT_KEYS, "requirements")
    memory = _int(f["min_memory_mb"], "min_memory_mb")
    if memory < 0:
        raise SchemaError("min_memory_mb must be >= 0")
    try:
        gpu = GpuNeed(f["gpu"])
    except ValueError:
        raise SchemaError(
            f"gpu must be one of any, preferred, required; got {f['gpu']!r}"
        ) from None
    provider = f["provider"]
    if provider is not None:
        provider = _text(provider, "provider")
    return Requirements(min_memory_mb=memory, gpu=gpu, provider=provider)


def _number(value: object, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise SchemaError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _run_reply(f: Mapping[str, Any]) -> InferenceResult:
    return InferenceResult(
        job_id=_text(f["job_id"], "job_id"),
        model_id=_text(f["model_id"], "model_id"),
        outputs=_tensors_from_wire(f["outputs"]),
        executor=_text(f["executor"], "executor"),
        queue_ms=_millis(f["queue_ms"], "queue_ms"),
        compute_ms=_millis(f["compute_ms"], "compute_ms"),
        route=tuple(_route(r) for r in expect_list(f["route"], "route")),
        load=_count(f["load"], "load") if "load" in f else None,
    )


def _count(raw: object, what: str) -> int:
    value = _int(raw, what)
    if not 0 <= value <= MAX_LOAD:
        raise SchemaError(f"{what} must be in [0, {MAX_LOAD}], got {value}")
    return value


def _load_reply(f: Mapping[str, Any]) -> LoadReply:
    return LoadReply(
        _text(f["peer_id"], "peer_id"),
        _count(f["in_flight"], "in_flight"),
        _count(f["queue_length"], "queue_length"),
    )


def _signed_messages(raw: object) -> tuple[bytes, ...]:
    messages = expect_list(raw, "messages", MAX_PEERS)
    if not all(isinstance(m, bytes) for m in messages):
        raise SchemaError("messages must be a list of bytes")
    return tuple(messages)


def _route(raw: object) -> tuple[str, int]:
    if not isinstance(raw, list) or len(raw) != 2:
        raise SchemaError("a route entry must be [model_id, rows]")
    rows = _int(raw[1], "route rows")
    if rows < 0:
        raise SchemaError("route rows must be >= 0")
    return _text(raw[0], "model_id"), rows


def _error_reply(f: Mapping[str, Any]) -> ErrorReply:
    raw_code = _int(f["code"], "code")
    try:
        code = ErrorCode(raw_code)
    except ValueError:
        # A newer peer may know codes we do not: keep the message, call it internal.
        code = ErrorCode.INTERNAL
    message = _text(f["message"], "message", MAX_MESSAGE_LENGTH, allow_empty=True)
    retry_after = _millis(f["retry_after"], "retry_after") if "retry_after" in f else None
    return ErrorReply(code, message, _text(f["peer"], "peer", allow_empty=True), retry_after)


def _models_reply(f: Mapping[str, Any]) -> ModelsReply:
    models = tuple(descriptor_from_wire(m) for m in expect_list(f["models"], "models", 1024))
    return ModelsReply(_text(f["peer_id"], "peer_id"), models)


def _peers_reply(f: Mapping[str, Any]) -> PeersReply:
    reports = []
    for raw in expect_list(f["peers"], "peers", MAX_PEERS):
        entry = expect_map(raw, _PEER_REPORT_KEYS, "peer report")
        if not isinstance(entry["record"], bytes) or entry["state"] not in ("alive", "suspect"):
            raise SchemaError("peer report: record must be bytes, state alive or suspect")
        try:
            record = decode_record(entry["record"])
        except RecordError as error:
            raise SchemaError(f"peer report: {error}") from None
        reports.append(PeerReport(record, _millis(entry["age_s"], "age_s"), entry["state"]))
    return PeersReply(_text(f["peer_id"], "peer_id"), tuple(reports))


_BUILDERS: Mapping[str, Any] = {
    "run": _run_request,
    "result": _run_reply,
    "error": _error_reply,
    "models?": lambda f: ModelsRequest(),
    "models": _models_reply,
    "peers?": lambda f: PeersRequest(),
    "peers": _peers_reply,
    "place?": _place_request,
    "place": _place_reply,
    "select?": _select_request,
    "select": _select_reply,
    "feedback": _feedback_request,
    "feedback!": _feedback_reply,
    "load?": lambda f: LoadRequest(),
    "load": _load_reply,
    "sync?": lambda f: SyncRequest(_signed_messages(f["messages"])),
    "sync": lambda f: SyncReply(_signed_messages(f["messages"])),
}


def _tensors_from_wire(raw: object) -> dict[str, np.ndarray[Any, Any]]:
    if not isinstance(raw, dict):
        raise SchemaError(f"tensors must be a map of name to tensor, got {type(raw).__name__}")
    if len(raw) > MAX_TENSORS:
        raise SchemaError(f"{len(raw)} tensors > limit {MAX_TENSORS}")
    return {
        _text(name, "tensor name", allow_empty=True): _tensor_from_wire(name, t)
        for name, t in raw.items()
    }


def _tensor_from_wire(name: str, raw: object) -> np.ndarray[Any, Any]:
    f = expect_map(raw, _TENSOR_KEYS, f"tensor {name!r}")
    dtype_name, shape, data = f["dtype"], f["shape"], f["data"]
    if type(dtype_name) is not str or dtype_name not in TENSOR_DTYPES:
        raise SchemaError(f"tensor {name!r}: unsupported dtype {dtype_name!r}")
    dims = expect_list(shape, f"tensor {name!r} shape", MAX_RANK)
    if any(type(d) is not int or not 0 <= d <= MAX_DIM for d in dims):
        raise SchemaError(f"tensor {name!r}: dims must be ints in [0, {MAX_DIM}], got {dims}")
    if not isinstance(data, bytes):
        raise SchemaError(f"tensor {name!r}: data must be bytes")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    expected = math.prod(dims) * dtype.itemsize
    if expected != len(data):
        raise SchemaError(
            f"tensor {name!r}: {dtype_name} {dims} needs {expected} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(dims)


def _text(
    value: object, what: str, limit: int = MAX_ID_LENGTH, *, allow_empty: bool = False
) -> str:
    return check_text(what, value, limit, allow_empty=allow_empty)


def _int(value: object, what: str) -> int:
    if type(value) is not int:
        raise SchemaError(f"{what} must be an integer, got {type(value).__name__}")
    return value


def _millis(value: object, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise SchemaError(f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise SchemaError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)
