"""A reply decoded to be passed on encodes to the bytes it came as; nothing else does."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import msgpack
import numpy as np
import pytest

from p2p_node import _codec
from scheduler import InferenceResult


@pytest.fixture(autouse=True)
def _nothing_kept() -> Iterator[None]:
    """Each test starts and ends with no reply held to be passed on."""
    _codec._PASSED.clear()
    yield
    _codec._PASSED.clear()


def _result_bytes(load: int = 3) -> bytes:
    """A result as another encoder might send it: same values, keys in another order."""
    result = InferenceResult(
        "a" * 32, "digits-mlp", {"label": np.arange(2, dtype=np.int64)}, "peer", 0.5, 1.0, load=load
    )
    body = msgpack.unpackb(_codec.encode(result))
    return msgpack.packb(dict(reversed(list(body.items()))), use_bin_type=True)


def test_a_reply_passed_on_encodes_to_the_bytes_it_came_as_once() -> None:
    payload = _result_bytes()
    reply = _codec.decode_reply(payload, pass_on=True)
    assert _codec.encode(reply) is payload
    again = _codec.encode(reply)  # passed on once: then encoded as any other
    assert again != payload and _codec.decode_reply(again).load == reply.load


def test_a_changed_or_plain_reply_is_encoded_afresh() -> None:
    payload = _result_bytes()
    changed = replace(_codec.decode_reply(payload, pass_on=True), load=7)
    assert _codec.decode_reply(_codec.encode(changed)).load == 7
    plain = _codec.decode_reply(payload)
    assert _codec.encode(plain) != payload


def test_replies_never_passed_on_age_out() -> None:
    kept = [
        _codec.decode_reply(_result_bytes(i), pass_on=True) for i in range(_codec.PASS_KEEP + 10)
    ]
    assert len(_codec._PASSED) <= _codec.PASS_KEEP
    assert _codec.encode(kept[0]) != _result_bytes(0)  # the oldest aged out
    assert _codec.encode(kept[-1]) == _result_bytes(_codec.PASS_KEEP + 9)  # the newest kept
