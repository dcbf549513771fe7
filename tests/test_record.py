"""Gossip records: values, round trips, and every way a received record can be refused."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip import ModelDescriptor, SchemaError, TensorSpec
from gossip import _record as record_module
from gossip._record import (
    MAX_ADDRS,
    MAX_BOOT_ID_LENGTH,
    MAX_GPUS,
    MAX_INTERVAL,
    MAX_RECORD_BYTES,
    RECORD_VERSION,
    Capabilities,
    GpuInfo,
    Load,
    ModelEntry,
    ModelPerformance,
    PeerRecord,
    RecordError,
    Rejection,
    check_record,
    decode_record,
    encode_record,
    is_newer,
)

PEER = "12D3KooWHk8nKDdwHeEmiPmMVpZcAa1Mzv6gKhhb5pzW4v6XWbWY"
OTHER_PEER = "12D3KooWRkGLz4YbVmrsWK75VjFTs8Uj3VKAEQ6YTH4LNapCBgFi"

# --- realistic values ------------------------------------------------------------------

# (id, task type, subtypes, features, classes, accuracy, cost, description)
_BUNDLED = [
    ("cancer-forest", "tabular-classification", ("binary", "medical"), 30, 2, 0.9474, 1.37,
     "Random forest (101 trees, depth <= 8) on the Wisconsin breast-cancer features; "
     "94.7% held-out accuracy."),
    ("cancer-logreg", "tabular-classification", ("binary", "medical"), 30, 2, 0.9591, 1.0,
     "Standardised logistic regression on the Wisconsin breast-cancer features; "
     "95.9% held-out accuracy."),
    ("cancer-mlp", "tabular-classification", ("binary", "medical"), 30, 2, 0.9649, 1.84,
     "Standardised multi-layer perceptron (32-16) on the Wisconsin breast-cancer features; "
     "96.5% held-out accuracy."),
    ("digits-forest", "image-classification", ("digits",), 64, 10, 0.9722, 2.16,
     "Random forest (61 trees, depth <= 12) on 8x8 handwritten digits; "
     "97.2% held-out accuracy."),
    ("digits-logreg", "image-classification", ("digits",), 64, 10, 0.9704, 1.0,
     "Multinomial logistic regression on 8x8 handwritten digits; 97.0% held-out accuracy."),
    ("digits-mlp", "image-classification", ("digits",), 64, 10, 0.9778, 1.07,
     "Multi-layer perceptron (64-32) on 8x8 handwritten digits; 97.8% held-out accuracy."),
    ("digits-svm", "image-classification", ("digits",), 64, 10, 0.9944, 17.87,
     "RBF-kernel SVM with sigmoid-calibrated probabilities on 8x8 handwritten digits; "
     "99.4% held-out accuracy."),
]  # fmt: skip


def _descriptor(
    model_id: str,
    task_type: str = "image-classification",
    subtypes: tuple[str, ...] = ("digits",),
    features: int = 64,
    classes: int = 10,
    accuracy: float = 0.97,
    cost: float = 1.0,
    description: str = "",
) -> ModelDescriptor:
    return ModelDescriptor(
        id=model_id,
        version="1.0.0",
        sha256=hashlib.sha256(model_id.encode()).hexdigest(),
        task_type=task_type,
        subtypes=subtypes,
        languages=(),
        max_input_length=features,
        accuracy=accuracy,
        cost=cost,
        description=description,
        inputs=(TensorSpec("input", "float32", (None, features)),),
        outputs=(
            TensorSpec("label", "int64", (None,)),
            TensorSpec("probabilities", "float32", (None, classes)),
        ),
    )


BUNDLED_MODELS = tuple(
    ModelEntry(_descriptor(*row), loaded=index % 2 == 0) for index, row in enumerate(_BUNDLED)
)

GPUS = (GpuInfo("NVIDIA H200", 143_771), GpuInfo("NVIDIA GeForce RTX 4090", 24_564))

CAPABILITIES = Capabilities(
    cpu_count=16,
    cpu_model="AMD EPYC 9654 96-Core Processor",
    memory_mb=131_072,
    gpus=GPUS,
    providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
)

LOAD = Load(
    in_flight=3,
    queue_length=5,
    cpu_percent=37.5,
    memory_available_mb=98_304,
    gpu_utilization=(81.0, 12.5),
)

PERFORMANCE = tuple(
    ModelPerformance(row[0], latency_ms=0.25 + i, success_rate=1.0 - i / 100, samples=100 * i)
    for i, row in enumerate(_BUNDLED)
)


def _record(**changes: Any) -> PeerRecord:
    fields: dict[str, Any] = {
        "peer_id": PEER,
        "boot_id": "3f9c1a0e5b7d4c2a",
        "seq": 41,
        "issued_at": 1_717_171_717.125,
        "interval": 1.0,
        "addrs": ("/ip4/192.168.1.20/tcp/4001", "/ip6/::1/tcp/4001"),
        "capabilities": CAPABILITIES,
        "models": BUNDLED_MODELS,
        "load": LOAD,
        "performance": PERFORMANCE,
    }
    fields.update(changes)
    return PeerRecord(**fields)


REALISTIC = _record()
BARE = _record(
    addrs=(),
    capabilities=Capabilities(1, "", 512, gpus=(), providers=("CPUExecutionProvider",)),
    models=(),
    load=Load(0, 0, 0.0, 256, gpu_utilization=()),
    performance=(),
    seq=0,
    issued_at=0.0,
)


def _wire(record: PeerRecord = REALISTIC) -> dict[str, Any]:
    wire: dict[str, Any] = msgpack.unpackb(encode_record(record))
    return wire


def _pack(body: object) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def _rejects(data: bytes, reason: Rejection = Rejection.MALFORMED) -> RecordError:
    with pytest.raises(RecordError) as caught:
        decode_record(data)
    assert caught.value.reason is reason, caught.value
    return caught.value


# --- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("record", [REALISTIC, BARE], ids=["realistic", "bare"])
def test_record_round_trips(record: PeerRecord) -> None:
    assert decode_record(encode_record(record)) == record


def test_realistic_record_is_well_under_the_size_limit() -> None:
    size = len(encode_record(REALISTIC))
    assert len(REALISTIC.models) == 7
    assert size < MAX_RECORD_BYTES // 3, size


def test_encode_refuses_an_oversize_record() -> None:
    models = tuple(ModelEntry(_descriptor(f"model-{i}"), loaded=False) for i in range(200))
    with pytest.raises(RecordError) as caught:
        encode_record(_record(models=models, performance=()))
    assert caught.value.reason is Rejection.OVERSIZE
    assert str(PEER) in str(caught.value)


def test_wire_keys_are_the_documented_ones() -> None:
    wire = _wire()
    assert set(wire) == {
        "v", "peer", "boot", "seq", "at", "interval", "addrs", "caps", "models", "load", "perf",
        "gone",
    }  # fmt: skip
    assert wire["v"] == RECORD_VERSION
    assert set(wire["caps"]) == {"cpus", "cpu_model", "mem_mb", "gpus", "providers"}
    assert set(wire["load"]) == {"in_flight", "queue", "cpu_pct", "mem_avail_mb", "gpu_util"}
    assert set(wire["models"][0]) == {"model", "loaded"}
    assert set(wire["perf"][0]) == {"model", "latency_ms", "success_rate", "samples"}


def test_model_lookup() -> None:
    entry = REALISTIC.model("digits-mlp")
    assert entry is not None and entry.descriptor.id == "digits-mlp"
    assert REALISTIC.serves("cancer-forest")
    assert not REALISTIC.serves("no-such-model")
    assert REALISTIC.model("no-such-model") is None
    assert not BARE.serves("digits-mlp")


def test_integers_for_float_fields_become_floats() -> None:
    record = _record(issued_at=5, interval=2, load=dataclasses.replace(LOAD, cpu_percent=50))
    assert type(record.issued_at) is float and type(record.interval) is float
    assert type(record.load.cpu_percent) is float
    assert decode_record(encode_record(record)) == record


# --- values refuse bad fields ----------------------------------------------------------

_BAD_VALUES: dict[str, Any] = {
    "bool-seq": lambda: _record(seq=True),
    "negative-seq": lambda: _record(seq=-1),
    "huge-seq": lambda: _record(seq=2**64),
    "float-seq": lambda: _record(seq=1.0),
    "empty-peer": lambda: _record(peer_id=""),
    "bytes-peer": lambda: _record(peer_id=PEER.encode()),
    "empty-boot": lambda: _record(boot_id=""),
    "long-boot": lambda: _record(boot_id="b" * (MAX_BOOT_ID_LENGTH + 1)),
    "nan-issued-at": lambda: _record(issued_at=math.nan),
    "negative-issued-at": lambda: _record(issued_at=-1.0),
    "huge-int-issued-at": lambda: _record(issued_at=10**400),
    "zero-interval": lambda: _record(interval=0.0),
    "inf-interval": lambda: _record(interval=math.inf),
    "long-interval": lambda: _record(interval=MAX_INTERVAL + 1),
    "addrs-list": lambda: _record(addrs=["/ip4/1.2.3.4/tcp/1"]),
    "too-many-addrs": lambda: _record(addrs=("/ip4/1.2.3.4/tcp/1",) * (MAX_ADDRS + 1)),
    "addr-not-multiaddr": lambda: _record(addrs=("1.2.3.4:4001",)),
    "capabilities-dict": lambda: _record(capabilities={}),
    "duplicate-models": lambda: _record(models=BUNDLED_MODELS + BUNDLED_MODELS[:1]),
    "duplicate-performance": lambda: _record(performance=PERFORMANCE + PERFORMANCE[:1]),
    "gpu-utilization-mismatch": lambda: _record(
        load=dataclasses.replace(LOAD, gpu_utilization=(1.0,))
    ),
    "negative-cpus": lambda: dataclasses.replace(CAPABILITIES, cpu_count=-1),
    "bool-memory": lambda: dataclasses.replace(CAPABILITIES, memory_mb=False),
    "too-many-gpus": lambda: dataclasses.replace(CAPABILITIES, gpus=GPUS * MAX_GPUS),
    "gpu-float-memory": lambda: GpuInfo("gpu", 1.5),
    "gpu-empty-name": lambda: GpuInfo("", 1),
    "provider-not-str": lambda: dataclasses.replace(CAPABILITIES, providers=(1,)),
    "long-cpu-model": lambda: dataclasses.replace(CAPABILITIES, cpu_model="x" * 257),
    "loaded-int": lambda: ModelEntry(BUNDLED_MODELS[0].descriptor, loaded=1),
    "entry-without-descriptor": lambda: ModelEntry("digits-mlp", loaded=True),
    "sha256-upper": lambda: _bundled_descriptor(sha256="A" * 64),
    "sha256-short": lambda: _bundled_descriptor(sha256="a" * 63),
    "sha256-newline": lambda: _bundled_descriptor(sha256="a" * 64 + "\n"),
    "sha256-not-hex": lambda: _bundled_descriptor(sha256="g" * 64),
    "nan-cpu": lambda: dataclasses.replace(LOAD, cpu_percent=math.nan),
    "cpu-over-100": lambda: dataclasses.replace(LOAD, cpu_percent=100.5),
    "negative-queue": lambda: dataclasses.replace(LOAD, queue_length=-3),
    "str-in-flight": lambda: dataclasses.replace(LOAD, in_flight="3"),
    "bool-gpu-util": lambda: dataclasses.replace(LOAD, gpu_utilization=(True, 1.0)),
    "success-over-1": lambda: ModelPerformance("m", 1.0, 1.01, 3),
    "inf-latency": lambda: ModelPerformance("m", math.inf, 1.0, 3),
    "negative-samples": lambda: ModelPerformance("m", 1.0, 1.0, -1),
}


def _bundled_descriptor(**changes: Any) -> Any:
    return dataclasses.replace(BUNDLED_MODELS[0].descriptor, **changes)


@pytest.mark.parametrize("build", _BAD_VALUES.values(), ids=_BAD_VALUES.keys())
def test_values_refuse_bad_fields(build: Any) -> None:
    with pytest.raises(SchemaError):
        build()


# --- decode: bytes that are not a record -----------------------------------------------

_GARBAGE = {
    "empty": b"",
    "reserved-byte": b"\xc1",
    "text": b"hello, gossip",
    "nil": _pack(None),
    "list": _pack([1, 2, 3]),
    "int": _pack(RECORD_VERSION),
    "str": _pack("record"),
    "bin": _pack(b"\x00" * 32),
    "trailing-data": encode_record(REALISTIC) + b"\x00",
    "int-map-key": _pack({1: 2}),
    "exactly-max-bytes-of-nil": b"\xc0" * MAX_RECORD_BYTES,
}


@pytest.mark.parametrize("data", _GARBAGE.values(), ids=_GARBAGE.keys())
def test_garbage_is_malformed(data: bytes) -> None:
    _rejects(data)


def test_every_truncation_is_malformed() -> None:
    data = encode_record(REALISTIC)
    for end in range(len(data)):
        _rejects(data[:end])


_OVERSIZE = {
    "zeros": b"\x00" * (MAX_RECORD_BYTES + 1),
    "valid-record-padded": encode_record(REALISTIC) + b"\xc0" * MAX_RECORD_BYTES,
    "valid-msgpack": _pack(
        {**_wire(), "models": _wire()["models"] * 40}  # schema-valid shape, too big
    ),
    "huge": b"\x91" * (10 * MAX_RECORD_BYTES),
}


@pytest.mark.parametrize("data", _OVERSIZE.values(), ids=_OVERSIZE.keys())
def test_more_than_max_bytes_is_oversize(data: bytes) -> None:
    assert len(data) > MAX_RECORD_BYTES
    _rejects(data, Rejection.OVERSIZE)


_BAD_VERSIONS = {"zero": 0, "two": 2, "bool": True, "float": 1.0, "str": "1", "nil": None}


@pytest.mark.parametrize("version", _BAD_VERSIONS.values(), ids=_BAD_VERSIONS.keys())
def test_wrong_version_is_malformed(version: object) -> None:
    error = _rejects(_pack({**_wire(), "v": version}))
    assert "version" in str(error)


def test_missing_version_is_malformed() -> None:
    body = _wire()
    del body["v"]
    _rejects(_pack(body))


# --- decode: schema failures at every depth --------------------------------------------

_DELETE = object()


def _mutated(path: tuple[str | int, ...], value: object) -> bytes:
    body = copy.deepcopy(_wire())
    target: Any = body
    for step in path[:-1]:
        target = target[step]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return _pack(body)


_MISSING_KEYS = {
    "record-peer": ("peer",),
    "record-perf": ("perf",),
    "caps-gpus": ("caps", "gpus"),
    "gpu-name": ("caps", "gpus", 1, "mem_mb"),
    "load-queue": ("load", "queue"),
    "entry-loaded": ("models", 3, "loaded"),
    "descriptor-sha256": ("models", 0, "model", "sha256"),
    "tensor-shape": ("models", 0, "model", "inputs", 0, "shape"),
    "perf-samples": ("perf", 6, "samples"),
}


@pytest.mark.parametrize("path", _MISSING_KEYS.values(), ids=_MISSING_KEYS.keys())
def test_missing_key_is_malformed(path: tuple[str | int, ...]) -> None:
    _rejects(_mutated(path, _DELETE))


_UNKNOWN_KEYS = {
    "record": ("signature",),
    "caps": ("caps", "tpus"),
    "gpu": ("caps", "gpus", 0, "uuid"),
    "load": ("load", "disk"),
    "entry": ("models", 0, "pinned"),
    "descriptor": ("models", 0, "model", "license"),
    "perf": ("perf", 0, "p99_ms"),
}


@pytest.mark.parametrize("path", _UNKNOWN_KEYS.values(), ids=_UNKNOWN_KEYS.keys())
def test_unknown_key_is_malformed(path: tuple[str | int, ...]) -> None:
    _rejects(_mutated(path, 1))


_WRONG_VALUES: dict[str, tuple[tuple[str | int, ...], object]] = {
    "peer-bytes": (("peer",), PEER.encode()),
    "boot-too-long": (("boot",), "b" * (MAX_BOOT_ID_LENGTH + 1)),
    "seq-negative": (("seq",), -1),
    "seq-bool": (("seq",), True),
    "seq-float": (("seq",), 41.0),
    "at-str": (("at",), "now"),
    "at-nan": (("at",), math.nan),
    "interval-zero": (("interval",), 0.0),
    "interval-inf": (("interval",), math.inf),
    "addrs-map": (("addrs",), {"a": "/ip4/1.2.3.4"}),
    "addrs-too-many": (("addrs",), ["/ip4/1.2.3.4/tcp/1"] * (MAX_ADDRS + 1)),
    "addr-int": (("addrs", 0), 4001),
    "caps-list": (("caps",), []),
    "cpus-bool": (("caps", "cpus"), True),
    "gpu-memory-float": (("caps", "gpus", 0, "mem_mb"), 1024.0),
    "gpu-not-map": (("caps", "gpus", 0), "NVIDIA H200"),
    "provider-nil": (("caps", "providers", 0), None),
    "load-in-flight-str": (("load", "in_flight"), "3"),
    "load-cpu-nan": (("load", "cpu_pct"), math.nan),
    "load-cpu-bool": (("load", "cpu_pct"), False),
    "load-gpu-util-count": (("load", "gpu_util"), [1.0]),
    "load-gpu-util-negative": (("load", "gpu_util", 0), -0.5),
    "entry-loaded-int": (("models", 0, "loaded"), 1),
    "models-not-list": (("models",), {"digits-mlp": True}),
    "models-duplicate": (("models", 1), _wire()["models"][0]),
    "descriptor-accuracy-bool": (("models", 0, "model", "accuracy"), True),
    "descriptor-dtype": (("models", 0, "model", "inputs", 0, "dtype"), "object"),
    "descriptor-dim-float": (("models", 0, "model", "inputs", 0, "shape", 1), 64.0),
    "perf-success-over-1": (("perf", 0, "success_rate"), 1.5),
    "perf-latency-inf": (("perf", 0, "latency_ms"), math.inf),
    "perf-samples-bool": (("perf", 0, "samples"), True),
    "perf-model-empty": (("perf", 0, "model"), ""),
}


@pytest.mark.parametrize(("path", "value"), _WRONG_VALUES.values(), ids=_WRONG_VALUES.keys())
def test_wrong_value_is_malformed(path: tuple[str | int, ...], value: object) -> None:
    _rejects(_mutated(path, value))


def test_a_model_entry_seen_before_is_reused_and_its_lookalikes_are_still_checked() -> None:
    first = decode_record(encode_record(REALISTIC))
    later = dataclasses.replace(REALISTIC, seq=REALISTIC.seq + 1)  # other bytes, same models
    again = decode_record(encode_record(later))
    assert again == later
    assert all(a is b for a, b in zip(first.models, again.models, strict=True))  # kept
    # Entries that equal a kept one in Python (1 == 1.0 == True) are other bytes:
    _rejects(_mutated(("models", 0, "loaded"), 1))
    _rejects(_mutated(("models", 0, "model", "inputs", 0, "shape", 1), 64.0))


def test_a_record_decoded_before_is_kept_by_its_bytes_and_bad_bytes_never_are() -> None:
    data = encode_record(_record(seq=7_001))
    assert decode_record(data) is decode_record(bytes(bytearray(data)))  # equal bytes
    bad = data[:-1]
    kept = record_module._decode_record.cache_info().currsize
    for _ in range(2):  # refused each time, and not kept
        with pytest.raises(RecordError):
            decode_record(bad)
    assert record_module._decode_record.cache_info().currsize == kept


def test_the_records_kept_are_the_latest_few() -> None:
    first = encode_record(_record(seq=8_000))
    kept = decode_record(first)
    for seq in range(8_001, 8_001 + record_module.DECODED_KEPT):
        decode_record(encode_record(_record(seq=seq)))
    assert record_module._decode_record.cache_info().currsize == record_module.DECODED_KEPT
    again = decode_record(first)  # fell out: decoded afresh, to an equal record
    assert again == kept and again is not kept


_EXT = {
    "ext-field": _mutated(("boot",), msgpack.ExtType(5, b"boot")),
    "ext-top": _pack(msgpack.ExtType(1, b"")),
    "timestamp-field": _mutated(("at",), msgpack.Timestamp(1_717_171_717, 0)),
    "timestamp-in-list": _mutated(("load", "gpu_util", 0), msgpack.Timestamp(1, 0)),
    # fixext 1 of type -1: a timestamp with a body no timestamp has
    "bad-timestamp": _mutated(("at",), "<ts>").replace(_pack("<ts>"), b"\xd4\xff\x00"),
}


@pytest.mark.parametrize("data", _EXT.values(), ids=_EXT.keys())
def test_ext_types_are_malformed(data: bytes) -> None:
    _rejects(data)


_NESTED = {
    "top": b"\x91" * 10_000 + b"\xc0",
    "in-field": _pack({**{k: v for k, v in _wire().items() if k != "addrs"}, "addrs": []})[:-1]
    + b"\x91" * 5_000
    + b"\x90",
    "maps": b"\x81\xa1v" * 3_000 + b"\xc0",
}


@pytest.mark.parametrize("data", _NESTED.values(), ids=_NESTED.keys())
def test_deeply_nested_msgpack_is_malformed(data: bytes) -> None:
    assert len(data) <= MAX_RECORD_BYTES
    _rejects(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_decode_or_raise_record_error(data: bytes) -> None:
    try:
        decode_record(data)
    except RecordError as error:
        assert error.reason in (Rejection.MALFORMED, Rejection.OVERSIZE)


_VALID = encode_record(REALISTIC)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(_VALID) - 1), st.integers(0, 255))
def test_single_byte_mutations_decode_or_raise_record_error(index: int, byte: int) -> None:
    data = _VALID[:index] + bytes([byte]) + _VALID[index + 1 :]
    try:
        record = decode_record(data)
    except RecordError as error:
        assert error.reason is Rejection.MALFORMED
    else:
        assert decode_record(encode_record(record)) == record


_percent = st.floats(0.0, 100.0)
_count = st.integers(0, 2**63 - 1)


@st.composite
def _records(draw: st.DrawFn) -> PeerRecord:
    gpus = tuple(
        GpuInfo(name, memory)
        for name, memory in draw(
            st.lists(st.tuples(st.text(min_size=1, max_size=40), _count), max_size=MAX_GPUS)
        )
    )
    models = draw(st.lists(st.sampled_from(BUNDLED_MODELS), unique=True, max_size=7))
    return _record(
        boot_id=draw(st.text(min_size=1, max_size=MAX_BOOT_ID_LENGTH)),
        seq=draw(_count),
        issued_at=draw(st.floats(0.0, 1e12)),
        interval=draw(st.floats(1e-3, MAX_INTERVAL)),
        capabilities=Capabilities(
            draw(_count), draw(st.text(max_size=256)), draw(_count), gpus, ("CPUExecutionProvider",)
        ),
        models=tuple(models),
        load=Load(
            draw(_count),
            draw(_count),
            draw(_percent),
            draw(_count),
            tuple(draw(_percent) for _ in gpus),
        ),
        performance=tuple(
            ModelPerformance(m.descriptor.id, draw(st.floats(0.0, 1e9)), draw(st.floats(0, 1)), 1)
            for m in models
        ),
    )


@settings(max_examples=200, deadline=None)
@given(_records())
def test_generated_records_round_trip(record: PeerRecord) -> None:
    assert decode_record(encode_record(record)) == record


# --- check_record and is_newer ---------------------------------------------------------

_LATER = REALISTIC.issued_at + 10.0
_EARLIER = REALISTIC.issued_at - 10.0

_ACCEPTED: dict[str, tuple[PeerRecord, PeerRecord | None]] = {
    "first-record": (REALISTIC, None),
    "next-seq": (_record(seq=42), REALISTIC),
    "seq-jump": (_record(seq=10_000, issued_at=_EARLIER), REALISTIC),
    "new-boot-later-lower-seq": (_record(boot_id="new", seq=0, issued_at=_LATER), REALISTIC),
}


@pytest.mark.parametrize(("record", "previous"), _ACCEPTED.values(), ids=_ACCEPTED.keys())
def test_check_record_accepts(record: PeerRecord, previous: PeerRecord | None) -> None:
    assert check_record(encode_record(record), PEER, previous) == record
    if previous is not None:
        assert is_newer(record, previous)


_REPLAYED: dict[str, PeerRecord] = {
    "same-seq": REALISTIC,
    "same-seq-later-time": _record(issued_at=_LATER),
    "lower-seq": _record(seq=40, issued_at=_LATER),
    "new-boot-earlier": _record(boot_id="old", seq=1_000, issued_at=_EARLIER),
    "new-boot-same-time": _record(boot_id="other", seq=1_000),
}


@pytest.mark.parametrize("record", _REPLAYED.values(), ids=_REPLAYED.keys())
def test_check_record_refuses_replays(record: PeerRecord) -> None:
    assert not is_newer(record, REALISTIC)
    with pytest.raises(RecordError) as caught:
        check_record(encode_record(record), PEER, REALISTIC)
    assert caught.value.reason is Rejection.REPLAYED
    assert PEER in str(caught.value)


@pytest.mark.parametrize("previous", [None, REALISTIC], ids=["first", "replayed-too"])
def test_check_record_refuses_a_record_signed_by_another_peer(
    previous: PeerRecord | None,
) -> None:
    with pytest.raises(RecordError) as caught:
        check_record(encode_record(REALISTIC), OTHER_PEER, previous)
    assert caught.value.reason is Rejection.FORGED
    assert PEER in str(caught.value) and OTHER_PEER in str(caught.value)


def test_check_record_passes_decode_errors_through() -> None:
    with pytest.raises(RecordError) as caught:
        check_record(b"\xc1", PEER, None)
    assert caught.value.reason is Rejection.MALFORMED


def test_record_error_carries_reason_and_message() -> None:
    error = RecordError(Rejection.OVERSIZE, "too big")
    assert isinstance(error, ValueError)
    assert error.reason is Rejection.OVERSIZE
    assert str(error) == "too big"
    assert [r.value for r in Rejection] == ["forged", "replayed", "oversize", "malformed"]


def test_departures_round_trip() -> None:
    from gossip import Departure, decode_record, encode_record

    record = _record(departed=(Departure("12D3KooWgone", "boot-a", 7), Departure("peer2", "b", 0)))
    assert decode_record(encode_record(record)) == record


@pytest.mark.parametrize(
    "departed",
    [
        pytest.param(tuple(("x", "b", 1) for _ in range(2)), id="not-departure-values"),
        pytest.param(
            tuple(__import__("gossip").Departure(f"p{i}", "b", i) for i in range(33)), id="too-many"
        ),
    ],
)
def test_bad_departures_are_refused(departed: tuple[Any, ...]) -> None:
    with pytest.raises(SchemaError):
        _record(departed=departed)


@pytest.mark.parametrize("seq", [-1, True, 1.5], ids=["negative", "bool", "float"])
def test_a_departure_needs_a_sequence_number(seq: object) -> None:
    from gossip import Departure

    with pytest.raises(SchemaError):
        Departure("peer", "boot", seq)  # type: ignore[arg-type]
