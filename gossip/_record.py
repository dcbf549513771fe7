"""The record each node publishes over GossipSub: values, a strict codec, validation.

Pure: no trio, no libp2p. A record says who the publisher is (peer id, boot id,
seq), what it can do (capabilities, models) and how busy it is (load, observed
performance). `encode_record` and `decode_record` turn it into a msgpack map and
back, refusing anything oversize, unknown, missing or of the wrong type;
`check_record` is what the topic validator runs on every message.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgpack

from ._model import (
    MAX_ID_LENGTH,
    ModelDescriptor,
    SchemaError,
    check_text,
    descriptor_from_wire,
    descriptor_to_wire,
    expect_list,
    expect_map,
)

RECORD_VERSION = 1
MAX_RECORD_BYTES = 16 * 1024
MAX_BOOT_ID_LENGTH = 64
MAX_ADDRS = 16
MAX_ADDR_LENGTH = 256
MAX_GPUS = 16
MAX_PROVIDERS = 16
MAX_CPU_MODEL_LENGTH = 256
# Models and performance entries are bounded in practice by MAX_RECORD_BYTES; this
# count limit only keeps a hostile list from being walked item by item.
MAX_MODELS = 256
MAX_DEPARTED = 32
MAX_KEPT_ENTRIES = 1024  # decoded model entries kept, by wire form (see _entry_from_wire)
MAX_INTERVAL = 3600.0
MAX_INT = 2**63 - 1


# --- values ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GpuInfo:
    name: str
    memory_mb: int

    def __post_init__(self) -> None:
        check_text("gpu name", self.name, MAX_ID_LENGTH)
        _check_int(f"gpu {self.name!r} memory_mb", self.memory_mb)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the machine has. `gpus` is empty when it has none."""

    cpu_count: int
    cpu_model: str
    memory_mb: int
    gpus: tuple[GpuInfo, ...]
    providers: tuple[str, ...]  # onnxruntime execution providers

    def __post_init__(self) -> None:
        _check_int("cpu_count", self.cpu_count)
        check_text("cpu_model", self.cpu_model, MAX_CPU_MODEL_LENGTH, allow_empty=True)
        _check_int("memory_mb", self.memory_mb)
        _check_items("gpus", self.gpus, GpuInfo, MAX_GPUS)
        _check_items("providers", self.providers, str, MAX_PROVIDERS)
        for provider in self.providers:
            check_text("provider", provider, MAX_ID_LENGTH)


MAX_STAGES = 64


@dataclass(frozen=True, slots=True)
class StageOf:
    """The model is stage `index` (0-based) of `k` of model `parent` (see p2p_node/_shard)."""

    parent: str
    index: int
    k: int

    def __post_init__(self) -> None:
        check_text("stage parent", self.parent, MAX_ID_LENGTH)
        _check_int("stage index", self.index)
        _check_int("stage k", self.k)
        if not self.index < self.k <= MAX_STAGES:
            raise SchemaError(f"stage index {self.index} of k {self.k}: need index < k <= 64")


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A model the node serves: `loaded` in memory, or only on disk (loaded on first use).
    `stage`: it is a stage of a larger model (the descriptor's sha256 is the stage's)."""

    descriptor: ModelDescriptor
    loaded: bool
    stage: StageOf | None = None

    def __post_init__(self) -> None:
        if type(self.descriptor) is not ModelDescriptor:
            raise SchemaError(f"model entry needs a ModelDescriptor, got {_name(self.descriptor)}")
        if type(self.loaded) is not bool:
            raise SchemaError(f"model {self.descriptor.id!r}: loaded must be a bool")
        if self.stage is not None and type(self.stage) is not StageOf:
            raise SchemaError(f"model {self.descriptor.id!r}: stage must be a StageOf")


@dataclass(frozen=True, slots=True)
class Load:
    """How busy the node is now. Percentages are in [0, 100], one per GPU."""

    in_flight: int  # requests running
    queue_length: int  # requests admitted and waiting to run
    cpu_percent: float
    memory_available_mb: int
    gpu_utilization: tuple[float, ...]

    def __post_init__(self) -> None:
        _check_int("in_flight", self.in_flight)
        _check_int("queue_length", self.queue_length)
        _set(self, "cpu_percent", _check_float("cpu_percent", self.cpu_percent, 0.0, 100.0))
        _check_int("memory_available_mb", self.memory_available_mb)
        _check_items("gpu_utilization", self.gpu_utilization, (int, float), MAX_GPUS)
        utilization = tuple(
            _check_float("gpu_utilization", u, 0.0, 100.0) for u in self.gpu_utilization
        )
        _set(self, "gpu_utilization", utilization)


@dataclass(frozen=True, slots=True)
class ModelPerformance:
    """What the node observed running one model: EWMA latency, success rate in [0, 1]."""

    model_id: str
    latency_ms: float
    success_rate: float
    samples: int

    def __post_init__(self) -> None:
        check_text("performance model_id", self.model_id, MAX_ID_LENGTH)
        latency = _check_float(f"{self.model_id!r} latency_ms", self.latency_ms, 0.0, math.inf)
        success = _check_float(f"{self.model_id!r} success_rate", self.success_rate, 0.0, 1.0)
        _set(self, "latency_ms", latency)
        _set(self, "success_rate", success)
        _check_int(f"{self.model_id!r} samples", self.samples)


@dataclass(frozen=True, slots=True)
class Departure:
    """A peer the publisher saw disconnect after its record (boot_id, seq).

    Receivers drop that peer if this is still its newest record: a killed node
    leaves every view as fast as its neighbours' next record, not after a ttl.
    """

    peer_id: str
    boot_id: str
    seq: int

    def __post_init__(self) -> None:
        check_text("departed peer_id", self.peer_id, MAX_ID_LENGTH)
        check_text("departed boot_id", self.boot_id, MAX_BOOT_ID_LENGTH)
        _check_int("departed seq", self.seq)


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """One announcement of a node. Newer means a higher `seq` within one `boot_id`."""

    peer_id: str
    boot_id: str
    seq: int
    issued_at: float
    interval: float
    addrs: tuple[str, ...]
    capabilities: Capabilities
    models: tuple[ModelEntry, ...]
    load: Load
    performance: tuple[ModelPerformance, ...]
    departed: tuple[Departure, ...] = ()

    def __post_init__(self) -> None:
        check_text("peer_id", self.peer_id, MAX_ID_LENGTH)
        check_text("boot_id", self.boot_id, MAX_BOOT_ID_LENGTH)
        _check_int("seq", self.seq)
        _set(self, "issued_at", _check_float("issued_at", self.issued_at, 0.0, math.inf))
        _set(self, "interval", _check_float("interval", self.interval, 0.0, MAX_INTERVAL))
        if self.interval == 0:
            raise SchemaError("interval must be > 0 seconds")
        _check_items("addrs", self.addrs, str, MAX_ADDRS)
        for addr in self.addrs:
            check_text("addr", addr, MAX_ADDR_LENGTH)
            if not addr.startswith("/"):
                raise SchemaError(f"addr {addr!r} is not a multiaddr")
        if type(self.capabilities) is not Capabilities:
            raise SchemaError(f"capabilities must be Capabilities, got {_name(self.capabilities)}")
        if type(self.load) is not Load:
            raise SchemaError(f"load must be Load, got {_name(self.load)}")
        if len(self.load.gpu_utilization) != len(self.capabilities.gpus):
            raise SchemaError(
                f"{len(self.load.gpu_utilization)} gpu_utilization values "
                f"for {len(self.capabilities.gpus)} gpus"
            )
        _check_items("models", self.models, ModelEntry, MAX_MODELS)
        _check_unique("models", [m.descriptor.id for m in self.models])
        _check_items("performance", self.performance, ModelPerformance, MAX_MODELS)
        _check_unique("performance", [p.model_id for p in self.performance])
        _check_items("departed", self.departed, Departure, MAX_DEPARTED)

    def model(self, model_id: str) -> ModelEntry | None:
        """The entry for `model_id`, or None when this node does not announce it."""
        for entry in self.models:
            if entry.descriptor.id == model_id:
                return entry
        return None

    def serves(self, model_id: str) -> bool:
        """Whether the node announces `model_id`, loaded or on disk."""
        return self.model(model_id) is not None


def _name(value: object) -> str:
    return type(value).__name__


def _check_int(label: str, value: object) -> None:
    if type(value) is not int:
        raise SchemaError(f"{label} must be an integer, got {_name(value)}")
    if not 0 <= value <= MAX_INT:
        raise SchemaError(f"{label} must be in [0, {MAX_INT}], got {value}")


def _check_float(label: str, value: object, low: float, high: float) -> float:
    """`value` as a float; ints are accepted (and converted), bools are not."""
    if type(value) is not float and type(value) is not int:
        raise SchemaError(f"{label} must be a number, got {_name(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise SchemaError(f"{label} is out of range") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise SchemaError(f"{label} must be a finite number in [{low}, {high}], got {value!r}")
    return number


def _set(value: object, field: str, new: object) -> None:
    object.__setattr__(value, field, new)  # normalising a frozen field in __post_init__


def _check_items(label: str, value: object, item_type: type | tuple[type, ...], limit: int) -> None:
    if type(value) is not tuple:
        raise SchemaError(f"{label} must be a tuple, got {_name(value)}")
    if len(value) > limit:
        raise SchemaError(f"{label}: {len(value)} items > limit {limit}")
    types = item_type if isinstance(item_type, tuple) else (item_type,)
    for item in value:
        if type(item) not in types:
            raise SchemaError(f"{label}: item of type {_name(item)} is not allowed")


def _check_unique(label: str, ids: list[str]) -> None:
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        raise SchemaError(f"{label}: model ids appear more than once: {duplicates}")


# --- errors ----------------------------------------------------------------------------


class Rejection(StrEnum):
    """Why a received record was refused; the topic validator counts these."""

    FORGED = "forged"  # the record's peer_id is not the message signer
    REPLAYED = "replayed"  # not newer than what we already accepted from that peer
    OVERSIZE = "oversize"  # more than MAX_RECORD_BYTES
    MALFORMED = "malformed"  # not msgpack, wrong version, or schema failure


class RecordError(ValueError):
    """A record that cannot be sent or accepted; `reason` says which rule it broke."""

    def __init__(self, reason: Rejection, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# --- encoding --------------------------------------------------------------------------


def encode_record(record: PeerRecord) -> bytes:
    """The wire form of `record`; RecordError(OVERSIZE) past MAX_RECORD_BYTES."""
    body = {
        "v": RECORD_VERSION,
        "peer": record.peer_id,
        "boot": record.boot_id,
        "seq": record.seq,
        "at": record.issued_at,
        "interval": record.interval,
        "addrs": list(record.addrs),
        "caps": _capabilities_to_wire(record.capabilities),
        "models": [_entry_to_wire(m) for m in record.models],
        "load": _load_to_wire(record.load),
        "perf": [_performance_to_wire(p) for p in record.performance],
        "gone": [{"peer": d.peer_id, "boot": d.boot_id, "seq": d.seq} for d in record.departed],
    }
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    if len(packed) > MAX_RECORD_BYTES:
        raise RecordError(
            Rejection.OVERSIZE,
            f"record of {record.peer_id} is {len(packed)} bytes > {MAX_RECORD_BYTES}; "
            f"announce fewer models ({len(record.models)}) or shorter descriptions",
        )
    return packed


def _entry_to_wire(entry: ModelEntry) -> dict[str, Any]:
    wire = {"model": descriptor_to_wire(entry.descriptor), "loaded": entry.loaded}
    if entry.stage is not None:  # optional: records without stages keep their bytes
        wire["stage"] = [entry.stage.parent, entry.stage.index, entry.stage.k]
    return wire


def _capabilities_to_wire(caps: Capabilities) -> dict[str, Any]:
    return {
        "cpus": caps.cpu_count,
        "cpu_model": caps.cpu_model,
        "mem_mb": caps.memory_mb,
        "gpus": [{"name": g.name, "mem_mb": g.memory_mb} for g in caps.gpus],
        "providers": list(caps.providers),
    }


def _load_to_wire(load: Load) -> dict[str, Any]:
    return {
        "in_flight": load.in_flight,
        "queue": load.queue_length,
        "cpu_pct": load.cpu_percent,
        "mem_avail_mb": load.memory_available_mb,
        "gpu_util": list(load.gpu_utilization),
    }


def _performance_to_wire(perf: ModelPerformance) -> dict[str, Any]:
    return {
        "model": perf.model_id,
        "latency_ms": perf.latency_ms,
        "success_rate": perf.success_rate,
        "samples": perf.samples,
    }


# --- decoding --------------------------------------------------------------------------

_RECORD_KEYS = frozenset(
    {
        "v",
        "peer",
        "boot",
        "seq",
        "at",
        "interval",
        "addrs",
        "caps",
        "models",
        "load",
        "perf",
        "gone",
    }
)
_CAPS_KEYS = frozenset({"cpus", "cpu_model", "mem_mb", "gpus", "providers"})
_GPU_KEYS = frozenset({"name", "mem_mb"})
_ENTRY_KEYS = frozenset({"model", "loaded"})
_STAGE_ENTRY_KEYS = _ENTRY_KEYS | {"stage"}
_LOAD_KEYS = frozenset({"in_flight", "queue", "cpu_pct", "mem_avail_mb", "gpu_util"})
_PERF_KEYS = frozenset({"model", "latency_ms", "success_rate", "samples"})
_GONE_KEYS = frozenset({"peer", "boot", "seq"})


DECODED_KEPT = 1024  # records whose decoding a process keeps (~7 KB each, and the record)


def decode_record(data: bytes) -> PeerRecord:
    """The record in `data`; RecordError(OVERSIZE or MALFORMED) for anything else.

    The last `DECODED_KEPT` records decoded in this process are kept by their bytes
    (decoding is pure and records are immutable, as for model entries below), so a
    record is decoded once however many times it comes: by GossipSub and by syncs,
    and, where one process runs many nodes (the test harness, 100 per process), at
    each of them. When a healed partition sends ~13,000 records across 200 such
    nodes, decoding each once per node was, with its signature checks, a third of
    the heal. Bytes that raise are never kept."""
    return _decode_record(data)


@functools.lru_cache(maxsize=DECODED_KEPT)
def _decode_record(data: bytes) -> PeerRecord:
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(
            Rejection.OVERSIZE, f"record of {len(data)} bytes > limit {MAX_RECORD_BYTES}"
        )
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as error:
        detail = str(error) or _name(error)  # StackError (too deeply nested) has no text
        raise RecordError(Rejection.MALFORMED, f"record is not msgpack: {detail}") from None
    if not isinstance(raw, dict):
        raise RecordError(Rejection.MALFORMED, f"record must be a map, got {_name(raw)}")
    version = raw.get("v")
    if type(version) is not int or version != RECORD_VERSION:
        raise RecordError(
            Rejection.MALFORMED,
            f"record version {version!r} is not supported; this node reads {RECORD_VERSION}",
        )
    try:
        return _record_from_wire(raw)
    except (SchemaError, TypeError, ValueError) as error:
        raise RecordError(Rejection.MALFORMED, f"bad record: {error}") from None


def _no_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _record_from_wire(raw: object) -> PeerRecord:
    f = expect_map(raw, _RECORD_KEYS, "record")
    return PeerRecord(
        peer_id=f["peer"],
        boot_id=f["boot"],
        seq=f["seq"],
        issued_at=f["at"],
        interval=f["interval"],
        addrs=tuple(expect_list(f["addrs"], "addrs", MAX_ADDRS)),
        capabilities=_capabilities_from_wire(f["caps"]),
        models=tuple(_entry_from_wire(m) for m in expect_list(f["models"], "models", MAX_MODELS)),
        load=_load_from_wire(f["load"]),
        performance=tuple(
            _performance_from_wire(p) for p in expect_list(f["perf"], "perf", MAX_MODELS)
        ),
        departed=tuple(
            _departure_from_wire(d) for d in expect_list(f["gone"], "gone", MAX_DEPARTED)
        ),
    )


def _departure_from_wire(raw: object) -> Departure:
    f = expect_map(raw, _GONE_KEYS, "departure")
    return Departure(peer_id=f["peer"], boot_id=f["boot"], seq=f["seq"])


def _capabilities_from_wire(raw: object) -> Capabilities:
    f = expect_map(raw, _CAPS_KEYS, "capabilities")
    gpus = expect_list(f["gpus"], "gpus", MAX_GPUS)
    return Capabilities(
        cpu_count=f["cpus"],
        cpu_model=f["cpu_model"],
        memory_mb=f["mem_mb"],
        gpus=tuple(_gpu_from_wire(g) for g in gpus),
        providers=tuple(expect_list(f["providers"], "providers", MAX_PROVIDERS)),
    )


def _gpu_from_wire(raw: object) -> GpuInfo:
    f = expect_map(raw, _GPU_KEYS, "gpu")
    return GpuInfo(name=f["name"], memory_mb=f["mem_mb"])


def _entry_from_wire(raw: object) -> ModelEntry:
    # A peer announces the same models in record after record, and checking a
    # descriptor is most of a record's decoding. Decoding is pure, so the same
    # bytes always give the same entry: those seen lately are kept, by their
    # exact wire form (msgpack tells 1 from 1.0 and from True).
    return _entry_from_packed(msgpack.packb(raw))


@functools.lru_cache(maxsize=MAX_KEPT_ENTRIES)
def _entry_from_packed(packed: bytes) -> ModelEntry:
    raw = msgpack.unpackb(packed, raw=False)
    keys = _STAGE_ENTRY_KEYS if isinstance(raw, dict) and "stage" in raw else _ENTRY_KEYS
    f = expect_map(raw, keys, "model entry")
    stage = None
    if "stage" in f:
        parts = expect_list(f["stage"], "stage", 3)
        if len(parts) != 3:
            raise SchemaError("stage is [parent, index, k]")
        stage = StageOf(*parts)
    return ModelEntry(descriptor=descriptor_from_wire(f["model"]), loaded=f["loaded"], stage=stage)


def _load_from_wire(raw: object) -> Load:
    f = expect_map(raw, _LOAD_KEYS, "load")
    return Load(
        in_flight=f["in_flight"],
        queue_length=f["queue"],
        cpu_percent=f["cpu_pct"],
        memory_available_mb=f["mem_avail_mb"],
        gpu_utilization=tuple(expect_list(f["gpu_util"], "gpu_util", MAX_GPUS)),
    )


def _performance_from_wire(raw: object) -> ModelPerformance:
    f = expect_map(raw, _PERF_KEYS, "performance")
    return ModelPerformance(
        model_id=f["model"],
        latency_ms=f["latency_ms"],
        success_rate=f["success_rate"],
        samples=f["samples"],
    )


# --- validation ------------------------------------------------------------------------


def is_newer(record: PeerRecord, previous: PeerRecord) -> bool:
    """Whether `record` supersedes `previous` from the same peer.

    Within one boot the seq decides; a restarted process (new boot id) starts its
    seq again, so across boots the publisher's issued_at decides.
    """
    if record.boot_id == previous.boot_id:
        return record.seq > previous.seq
    return record.issued_at > previous.issued_at


DigestEntry = tuple[str, str, int, float]  # peer id, boot id, seq, issued at


def digest_entry(record: PeerRecord) -> DigestEntry:
    """What a digest says of a record: enough to tell which of two is newer."""
    return (record.peer_id, record.boot_id, record.seq, record.issued_at)


def is_newer_than_entry(record: PeerRecord, entry: DigestEntry) -> bool:
    """Whether `record` supersedes the record a digest entry names (as `is_newer`)."""
    _, boot_id, seq, issued_at = entry
    if record.boot_id == boot_id:
        return record.seq > seq
    return record.issued_at > issued_at


def is_entry_newer(entry: DigestEntry, record: PeerRecord) -> bool:
    """Whether the record a digest entry names supersedes `record` (as `is_newer`)."""
    _, boot_id, seq, issued_at = entry
    if record.boot_id == boot_id:
        return seq > record.seq
    return issued_at > record.issued_at


def check_record(data: bytes, signer: str, previous: PeerRecord | None) -> PeerRecord:
    """Decode and accept a record signed by `signer`, or raise RecordError saying why not.

    `previous` is the last record accepted from `signer`, or None.
    """
    record = decode_record(data)
    if record.peer_id != signer:
        raise RecordError(
            Rejection.FORGED,
            f"record claims peer {record.peer_id} but the message was signed by {signer}",
        )
    if previous is not None and not is_newer(record, previous):
        raise RecordError(
            Rejection.REPLAYED,
            f"record of {signer} (boot {record.boot_id}, seq {record.seq}) is not newer "
            f"than the accepted one (boot {previous.boot_id}, seq {previous.seq})",
        )
    return record
