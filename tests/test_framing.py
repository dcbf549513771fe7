"""Varint frames: pure splitting of a byte stream, fed in arbitrary pieces."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.utils.varint import encode_uvarint

from p2p_node import _framing, _large
from p2p_node._framing import FrameBuffer, FrameError, Kind, Tagged, TaggedBuffer, encode_frame


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16384, 70000])
def test_prefix_matches_libp2p_varint(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert encode_frame(payload) == encode_uvarint(size) + payload


@pytest.mark.parametrize("n", [0, 1, 127, 128, 255, 16383, 16384, 2**21 - 1, 2**21, 2**40])
def test_a_varint_is_libp2ps_on_both_sides_of_the_short_forms(n: int) -> None:
    assert _framing.encode_varint(n) == encode_uvarint(n)


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


# --- tagged frames of pipelined streams ---------------------------------------------------


def _split(stream: bytes, cuts: list[int], buffer: TaggedBuffer) -> list[Tagged | FrameError]:
    """Feed `stream` in pieces of `cuts`; every frame or too-large error, in order."""
    out: list[Tagged | FrameError] = []
    position = 0
    for cut in [*cuts, len(stream)]:
        buffer.feed(stream[position : position + cut])
        position += cut
        while True:
            try:
                frame = buffer.next_frame()
            except FrameError as error:
                assert error.too_large
                out.append(error)
                continue
            if frame is None:
                break
            out.append(frame)
    return out


tagged = st.builds(
    Tagged,
    st.sampled_from(Kind),
    st.integers(min_value=0, max_value=2**40),
    st.binary(max_size=300),
)


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(tagged, max_size=8),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=40),
)
def test_tagged_frames_come_back_whole_however_the_bytes_arrive(
    frames: list[Tagged], cuts: list[int]
) -> None:
    stream = b"".join(f.encode() for f in frames)
    buffer = TaggedBuffer(max_body=1024)
    assert _split(stream, cuts, buffer) == frames
    assert len(buffer) == 0


def test_a_tagged_frame_is_kind_then_id_then_length_then_body() -> None:
    assert Tagged(Kind.REPLY, 300, b"ab").encode() == b"\x01" + encode_uvarint(300) + b"\x02ab"
    assert Tagged(Kind.CANCEL, 5, b"").encode() == b"\x02\x05\x00"
    assert [k.value for k in Kind] == [0, 1, 2, 3]  # on the wire: never renumber


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=700), max_size=20))
def test_an_oversize_body_is_refused_by_its_id_and_skipped_not_held(cuts: list[int]) -> None:
    before = Tagged(Kind.REQUEST, 1, b"first")
    big = Tagged(Kind.REQUEST, 2, b"x" * 2000)
    after = Tagged(Kind.REQUEST, 3, b"last")
    buffer = TaggedBuffer(max_body=100)
    out = _split(before.encode() + big.encode() + after.encode(), cuts, buffer)
    assert out[0] == before and out[2] == after
    error = out[1]
    assert isinstance(error, FrameError)
    assert (error.too_large, error.exchange, error.length) == (True, 2, 2000)
    assert len(out) == 3


def test_a_body_longer_than_what_is_held_is_never_buffered() -> None:
    buffer = TaggedBuffer(max_body=100)
    buffer.feed(Tagged(Kind.REQUEST, 9, b"x" * 100_000).encode()[:5000])
    with pytest.raises(FrameError) as caught:
        buffer.next_frame()
    assert caught.value.remaining == 100_000 - (5000 - 5)  # header: kind, id, 3-byte length
    assert len(buffer) == 0
    buffer.feed(b"x" * 60_000)  # more of the refused body: dropped as it comes
    assert len(buffer) == 0 and buffer.next_frame() is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x07\x01\x00", "unknown frame kind 7"),
        (b"\x00" + b"\xff" * 10, "varint longer than 9 bytes"),
        (b"\x00\x01" + b"\xff" * 10, "varint longer than 9 bytes"),
    ],
)
def test_unsplittable_tagged_bytes_raise(data: bytes, message: str) -> None:
    buffer = TaggedBuffer(max_body=100)
    buffer.feed(data)
    with pytest.raises(FrameError, match=message) as caught:
        buffer.next_frame()
    assert not caught.value.too_large


def test_an_incomplete_tagged_frame_waits() -> None:
    encoded = Tagged(Kind.REQUEST, 200, b"body").encode()
    buffer = TaggedBuffer(max_body=100)
    for byte in encoded[:-1]:
        buffer.feed(bytes([byte]))
        assert buffer.next_frame() is None
    buffer.feed(encoded[-1:])
    assert buffer.next_frame() == Tagged(Kind.REQUEST, 200, b"body")


@pytest.mark.parametrize("seed", range(20))
def test_large_bodies_collected_in_pieces_come_back_whole(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_framing, "COLLECT_ABOVE", 16)  # collect nearly every body
    rng = random.Random(seed)
    frames = [
        Tagged(rng.choice(list(Kind)), rng.randrange(1000), rng.randbytes(rng.randrange(200)))
        for _ in range(rng.randrange(1, 8))
    ]
    stream = b"".join(f.encode() for f in frames)
    cuts = [rng.randrange(1, 90) for _ in range(60)]
    buffer = TaggedBuffer(max_body=150)
    out = _split(stream, cuts, buffer)
    expected: list[Tagged | tuple[int, int]] = [
        f if len(f.body) <= 150 else (f.exchange, len(f.body)) for f in frames
    ]
    assert [o if isinstance(o, Tagged) else (o.exchange, o.length) for o in out] == expected
    assert len(buffer) == 0


def test_bytes_held_between_whole_frames_can_be_taken_back_to_read_again() -> None:
    first = Tagged(Kind.REQUEST, 1, b"one").encode()
    second = Tagged(Kind.CANCEL, 2, b"").encode()
    third = Tagged(Kind.REQUEST, 3, b"three").encode()
    buffer = TaggedBuffer(max_body=64)
    assert buffer.idle
    buffer.feed(first + second + third[:4])
    assert not buffer.idle
    assert buffer.next_frame_of((Kind.REQUEST,)) == Tagged(Kind.REQUEST, 1, b"one")
    assert buffer.next_frame_of((Kind.REQUEST,)) is False  # a CANCEL: not taken
    left = buffer.take_back()
    assert left == second + third[:4] and buffer.idle
    again = TaggedBuffer(max_body=64)
    again.feed(left + third[4:])
    assert [again.next_frame(), again.next_frame(), again.next_frame()] == [
        Tagged(Kind.CANCEL, 2, b""),
        Tagged(Kind.REQUEST, 3, b"three"),
        None,
    ]


def test_the_middle_of_a_large_body_can_be_fed_alone_but_not_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_framing, "COLLECT_ABOVE", 16)
    frame = Tagged(Kind.REQUEST, 9, bytes(range(100))).encode()
    after = Tagged(Kind.CANCEL, 10, b"").encode()
    buffer = TaggedBuffer(max_body=200)
    assert not buffer.feed_body(frame[:10])  # no body being collected yet
    buffer.feed(frame[:10])
    assert buffer.next_frame() is None  # collecting from now on
    assert buffer.feed_body(frame[10:50])  # more body, short of its end
    assert not buffer.feed_body(frame[50:])  # its end: for feed and next_frame
    assert not buffer.feed_body(frame[50:] + after)
    buffer.feed(frame[50:] + after)
    assert [buffer.next_frame(), buffer.next_frame()] == [
        Tagged(Kind.REQUEST, 9, bytes(range(100))),
        Tagged(Kind.CANCEL, 10, b""),
    ]
    skipping = TaggedBuffer(max_body=4)
    skipping.feed(Tagged(Kind.REQUEST, 1, bytes(100)).encode()[:6])
    with pytest.raises(FrameError):
        skipping.next_frame()
    assert not skipping.feed_body(b"\0")  # a body being dropped is not collected


def test_a_buffer_skipping_a_refused_body_is_not_idle() -> None:
    buffer = TaggedBuffer(max_body=4)
    buffer.feed(Tagged(Kind.REQUEST, 1, b"0123456789").encode()[:6])
    with pytest.raises(FrameError):
        buffer.next_frame()
    assert len(buffer) == 0 and not buffer.idle  # four bytes of the body still to drop


def test_a_frame_that_cannot_be_read_is_left_for_next_frame_to_refuse() -> None:
    buffer = TaggedBuffer(max_body=4)
    buffer.feed(bytes([200, 1, 0]))
    assert buffer.next_frame_of(tuple(Kind)) is False
    with pytest.raises(FrameError, match="unknown frame kind 200"):
        buffer.next_frame()


def test_an_oversize_body_is_refused_whatever_kinds_are_asked_for() -> None:
    buffer = TaggedBuffer(max_body=4)
    buffer.feed(Tagged(Kind.REPLY, 7, b"0123456789").encode())
    with pytest.raises(FrameError) as refused:
        buffer.next_frame_of((Kind.REPLY,))
    assert refused.value.too_large and refused.value.exchange == 7


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([0, 5, 1000, (1 << 20) + 1]), min_size=1, max_size=6),
    in_parts=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_frames_with_large_bodies_are_written_as_their_bytes_without_copying_the_bodies(
    sizes: list[int], in_parts: list[bool]
) -> None:
    """A writer's writes of frames from `tagged_parts` are the frames' bytes, in order;
    each body above PARTS_ABOVE, or piece above it of a body given in pieces (a
    message with a large tensor: `_codec.encode_parts`), is one of the writes
    itself (not copied), and the small frames, heads and pieces between them
    share one write."""
    bodies = [bytes([i]) * size for i, size in enumerate(sizes)]
    given: list[list[_large.Buffer]] = []
    large: list[_large.Buffer] = []  # what must be written as it is
    for body, split in zip(bodies, in_parts, strict=False):
        if split:  # a small piece, the rest as a view, and a small piece again
            pieces = [body[:3], memoryview(body)[3:-2], body[-2:]]
            given.append(pieces)
            large += [piece for piece in pieces if len(piece) > _framing.PARTS_ABOVE]
        else:  # one piece
            given.append([body])
            large += [body] if len(body) > _framing.PARTS_ABOVE else []
    frames = [_framing.tagged_parts(Kind.REPLY, i + 1, body) for i, body in enumerate(given)]
    writes = _framing.frame_writes(frames)
    expected = b"".join(Tagged(Kind.REPLY, i + 1, body).encode() for i, body in enumerate(bodies))
    assert b"".join(writes) == expected
    assert [w for w in writes if any(w is piece for piece in large)] == large
    assert len(writes) <= 2 * len(large) + 1
    buffer = TaggedBuffer(1 << 24)
    for write in writes:
        buffer.feed(write)
    got = [buffer.next_frame() for _ in bodies]
    assert [(t.exchange, t.body) for t in got if t] == [(i + 1, b) for i, b in enumerate(bodies)]
