"""A tensor's straight decoding path takes and refuses what the checked path does.

`_codec._tensor_from_wire` decodes a well-formed tensor without the checked path's
calls (`_checked_tensor`), and sends anything else there: on any raw value, both
must give the same array or the same refusal."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip import TENSOR_DTYPES
from gossip._model import SchemaError
from p2p_node import _codec

DTYPES = sorted(TENSOR_DTYPES)


def _outcome(decode: Any, raw: object) -> tuple[str, Any]:
    try:
        array = decode("x", raw)
    except SchemaError as error:
        return "refused", str(error)
    return "array", (array.dtype.str, array.shape, array.tobytes())


def _well_formed(dtype: str, dims: list[int]) -> dict[str, Any]:
    size = int(np.prod(dims)) * np.dtype(dtype).itemsize
    return {
        "dtype": dtype,
        "shape": list(dims),
        "data": bytes(range(256)) * (size // 256) + bytes(size % 256),
    }


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2**31 + 1),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=16),
    st.sampled_from(DTYPES),
    st.lists(st.integers(-1, 4), max_size=9),
    st.lists(st.booleans(), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    dims=st.lists(st.integers(0, 4), max_size=4),
    changes=st.dictionaries(
        st.sampled_from(["dtype", "shape", "data", "extra"]), _values, max_size=2
    ),
    drop=st.sets(st.sampled_from(["dtype", "shape", "data"]), max_size=1),
)
def test_the_straight_path_agrees_with_the_checked_one(
    dtype: str, dims: list[int], changes: dict[str, Any], drop: set[str]
) -> None:
    raw = _well_formed(dtype, dims)
    raw.update(changes)
    for key in drop:
        raw.pop(key, None)
    straight = _outcome(_codec._tensor_from_wire, raw)
    assert straight == _outcome(_codec._checked_tensor, raw)


@pytest.mark.parametrize(
    "raw",
    [
        [],
        "tensor",
        {"dtype": ["float32"], "shape": [1], "data": b"\0" * 4},  # unhashable dtype
        {"dtype": "float32", "shape": [True], "data": b"\0" * 4},  # a bool is no dim
        {"dtype": "float32", "shape": [2**31], "data": b""},
        {"dtype": "float32", "shape": [2**31, 0], "data": b""},  # sizes right, a dim too big
        {"dtype": "float32", "shape": [-1, -1], "data": b"\0" * 4},  # sizes right, dims < 0
        {"dtype": "float32", "shape": [1] * 9, "data": b"\0" * 4},  # rank over the limit
        {"dtype": "float32", "shape": (1,), "data": b"\0" * 4},
        {"dtype": "float32", "shape": [1], "data": bytearray(4)},
        {"dtype": "float32", "shape": [2], "data": b"\0" * 4},
        {"dtype": "object", "shape": [1], "data": b"\0" * 8},
    ],
)
def test_a_malformed_tensor_is_refused_with_the_checked_paths_reason(raw: object) -> None:
    refused = _outcome(_codec._tensor_from_wire, raw)
    assert refused[0] == "refused"
    assert refused == _outcome(_codec._checked_tensor, raw)


def test_a_well_formed_tensor_is_a_view_of_the_wire_bytes() -> None:
    raw = _well_formed("float32", [2, 3])
    array = _codec._tensor_from_wire("x", raw)
    assert array.shape == (2, 3) and array.dtype == np.dtype("<f4")
    assert array.base is raw["data"] or array.base.base is raw["data"]  # no copy
