"""Varint frames: pure splitting of a byte stream, fed in arbitrary pieces."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.utils.varint import encode_uvarint

from p2p_node._framing import FrameBuffer, FrameError, encode_frame


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16384, 70000])
def test_prefix_matches_libp2p_varint(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert encode_frame(payload) == encode_uvarint(size) + payload


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(st.binary(max_size=600), max_size=8),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=40),
)
def test_frames_come_back_whole_however_the_bytes_arrive(frames: list[bytes], cuts) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    buffer = FrameBuffer(max_frame=1024)
    received = []
    position = 0
    for cut in [*cuts, len(stream)]:
        buffer.feed(stream[position : position + cut])
        position += cut
        while (frame := buffer.next_frame()) is not None:
            received.append(frame)
    assert received == frames
    assert len(buffer) == 0


def test_an_oversize_frame_is_refused_before_its_body_arrives() -> None:
    buffer = FrameBuffer(max_frame=100)
    buffer.feed(encode_frame(bytes(101))[:2])
    with pytest.raises(FrameError) as caught:
        buffer.next_frame()
    assert caught.value.too_large
    assert "101 bytes exceeds the limit of 100" in str(caught.value)


def test_a_huge_declared_length_is_refused() -> None:
    buffer = FrameBuffer(max_frame=1 << 20)
    buffer.feed(b"\xff" * 8 + b"\x7f")
    with pytest.raises(FrameError) as caught:
        buffer.next_frame()
    assert caught.value.too_large


def test_a_length_prefix_that_never_ends_is_malformed() -> None:
    buffer = FrameBuffer(max_frame=1 << 20)
    buffer.feed(b"\x80" * 9)
    with pytest.raises(FrameError) as caught:
        buffer.next_frame()
    assert not caught.value.too_large


def test_an_incomplete_prefix_waits_for_more() -> None:
    buffer = FrameBuffer(max_frame=1 << 20)
    buffer.feed(b"\x80\x80")
    assert buffer.next_frame() is None
    buffer.feed(b"\x00")
    assert buffer.next_frame() == b""


def test_an_oversize_frame_is_dropped_and_says_how_much_is_still_to_come() -> None:
    frames = FrameBuffer(max_frame=10)
    frames.feed(encode_frame(b"x" * 100)[:30])  # a 1-byte prefix and 29 bytes of body
    with pytest.raises(FrameError) as caught:
        frames.next_frame()
    assert (caught.value.length, caught.value.remaining) == (100, 71)
    assert len(frames) == 0  # nothing of it is held
