"""Large tensors are packed without a copy of their own bytes, into the same bytes
as a small one's path writes, and read back the same."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest

from gossip import TENSOR_DTYPES
from p2p_node import ErrorCode, _codec, _large
from p2p_node._codec import WireError, _no_ext
from p2p_node._messages import RunRequest
from scheduler import InferenceResult

ROWS = 40_000  # with 3 columns, above LARGE_TENSOR_BYTES for every dtype


def _array(dtype: str, order: str = "C") -> np.ndarray:
    values = np.arange(ROWS * 3).reshape(ROWS, 3) % 120
    return np.asarray(values.astype(dtype), order=order)


def _as_small_path_packs(message: RunRequest | InferenceResult) -> bytes:
    """What the codec wrote before: every tensor's bytes copied, then one packb."""
    kind, shape = _codec._KIND_OF[type(message)]
    body = {"kind": kind}
    shape.put(message, body)
    body["v"] = 1
    for key in shape.tensor_keys:
        for tensor in body[key].values():
            tensor["data"] = bytes(tensor["data"])
    return msgpack.packb(body, use_bin_type=True)


def _request(**inputs: np.ndarray) -> RunRequest:
    return RunRequest(job_id="j", model_id="m", inputs=inputs, timeout_ms=1000)


@pytest.mark.parametrize("dtype", sorted(TENSOR_DTYPES))
def test_a_large_tensor_of_every_dtype_encodes_to_the_same_bytes_and_back(dtype: str) -> None:
    array = _array(dtype)
    assert array.nbytes >= _codec.LARGE_TENSOR_BYTES
    request = _request(input=array, small=array[:2])
    payload = _codec.encode(request)
    assert isinstance(payload, bytes)
    assert payload == _as_small_path_packs(request)
    decoded = _codec.decode_request(payload)
    assert isinstance(decoded, RunRequest)
    np.testing.assert_array_equal(decoded.inputs["input"], array)
    np.testing.assert_array_equal(decoded.inputs["small"], array[:2])


@pytest.mark.parametrize(
    "array",
    [
        pytest.param(_array("float32", order="F"), id="fortran-order"),
        pytest.param(_array("float32")[::2], id="strided"),
        pytest.param(_array("int64").astype(">i8"), id="big-endian"),
    ],
)
def test_a_large_tensor_not_in_c_order_or_little_endian_goes_in_c_order(
    array: np.ndarray,
) -> None:
    result = InferenceResult("j", "m", {"out": array}, executor="p", queue_ms=0.0, compute_ms=1.0)
    payload = _codec.encode(result)
    reply = _codec.decode_reply(payload)
    assert isinstance(reply, InferenceResult)
    np.testing.assert_array_equal(reply.outputs["out"], array)
    assert reply.outputs["out"].dtype == array.dtype.newbyteorder("<")


def test_a_large_tensor_is_read_from_the_array_not_copied_first() -> None:
    large, small = _array("float32"), _array("float32")[:2]
    wire = _codec._tensors_to_wire({"large": large, "small": small})
    assert np.shares_memory(np.frombuffer(wire["large"]["data"], np.float32), large)
    assert isinstance(wire["small"]["data"], bytes)  # a small one is copied, as before


def test_a_large_tensor_is_decoded_as_a_view_of_the_message_not_a_copy() -> None:
    array = _array("float32")
    payload = _codec.encode(_request(input=array, small=array[:2]))
    decoded = _codec.decode_request(payload)
    assert isinstance(decoded, RunRequest)
    out = decoded.inputs["input"]
    np.testing.assert_array_equal(out, array)
    assert np.shares_memory(out, np.frombuffer(payload, np.uint8))
    assert not out.flags.writeable  # as a tensor read from msgpack's bytes is
    assert not np.shares_memory(decoded.inputs["small"], np.frombuffer(payload, np.uint8))


def _body(rng: np.random.Generator) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A message-shaped map with some tensors above LARGE_BYTES among other values."""
    tensors: dict[str, Any] = {}
    large = []
    for i in range(int(rng.integers(1, 5))):
        size = int(rng.choice([10, _large.LARGE_BYTES - 1, _large.LARGE_BYTES, 200_000]))
        wire = {"dtype": "uint8", "shape": [size], "data": rng.bytes(size)}
        tensors[f"t{i}"] = wire
        if size >= _large.LARGE_BYTES:
            large.append(wire)
    body = {
        "kind": "run",
        "inputs": tensors,
        "notes": ["x" * int(rng.integers(0, 300)), -1, 2**40, 1.5, None, True, {"data": b"y"}],
        "blob": rng.bytes(int(rng.integers(0, 100_000))),  # a large bin, but not a "data"
        "v": 1,
    }
    return body, large


@pytest.mark.parametrize("seed", range(10))
def test_large_bins_pack_to_msgpacks_bytes_and_unpack_to_views_of_them(seed: int) -> None:
    body, large = _body(np.random.default_rng(seed))
    expected = msgpack.packb(body, use_bin_type=True)
    datas = [wire["data"] for wire in large]
    parts = _large.pack_large(body, large) if large else [expected]
    assert parts is not None and b"".join(parts) == expected
    assert [part for part in parts if any(part is data for data in datas)] == datas  # uncopied
    assert msgpack.packb(body, use_bin_type=True) == expected  # the data was put back
    unpacked = _large.unpack_large(expected, msgpack.unpackb, raw=False, ext_hook=_no_ext)
    views = [t["data"] for t in unpacked["inputs"].values() if isinstance(t["data"], memoryview)]
    assert len(views) == len(large) and all(view.obj is expected for view in views)
    assert isinstance(unpacked["blob"], bytes)
    as_bytes = {name: {**t, "data": bytes(t["data"])} for name, t in unpacked["inputs"].items()}
    assert {**unpacked, "inputs": as_bytes} == msgpack.unpackb(expected, raw=False)


def test_a_placeholder_found_elsewhere_in_the_message_packs_it_as_usual() -> None:
    wire = {"dtype": "uint8", "shape": [70_000], "data": bytes(70_000)}
    body = {"inputs": {"t": wire}, "notes": [_large._MARK + bytes(2)]}  # the placeholder's bytes
    assert _large.pack_large(body, [wire]) is None
    assert wire["data"] == bytes(70_000)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda p: p[:-1], id="cut-short"),
        pytest.param(lambda p: p + b"\xc0", id="a-value-after-the-end"),
        pytest.param(
            lambda p: p.replace(b"\xc6" + (480_000).to_bytes(4, "big"), b"\xc6\x00\x08\x00\x00"),
            id="a-bin-past-the-end",
        ),
    ],
)
def test_a_large_message_that_is_not_whole_is_refused_as_msgpack_refuses_it(
    payload: Callable[[bytes], bytes],
) -> None:
    good = _codec.encode(_request(input=_array("float32")))
    with pytest.raises(WireError) as refused:
        _codec.decode_request(payload(good))
    assert refused.value.code is ErrorCode.MALFORMED_MESSAGE


def test_a_walk_that_cannot_tell_leaves_the_message_to_msgpack_whole() -> None:
    data = bytes(_large.LARGE_BYTES)
    with_ext = msgpack.packb({"data": data, "x": msgpack.ExtType(5, b"e")}, use_bin_type=True)
    with pytest.raises(ValueError, match="extension type 5"):
        _large.unpack_large(with_ext, msgpack.unpackb, ext_hook=_no_ext)
    many = msgpack.packb({"data": data, "x": list(range(_large.WALK_ITEMS))}, use_bin_type=True)
    assert type(_large.unpack_large(many, msgpack.unpackb, ext_hook=_no_ext)["data"]) is bytes
    walked = msgpack.packb({"data": data, "x": list(range(10))}, use_bin_type=True)
    assert (
        type(_large.unpack_large(walked, msgpack.unpackb, ext_hook=_no_ext)["data"]) is memoryview
    )
