"""Large tensors are packed without a copy of their own bytes, into the same bytes
as a small one's path writes, and read back the same."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from gossip import TENSOR_DTYPES
from p2p_node import _codec
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
