"""Varint length-prefixed frames, as libp2p's msgio writes them, and the tagged
frames of pipelined streams. Pure: no I/O.

`FrameBuffer` collects bytes as they arrive and hands out whole frames, so a
reader can pull 64 KiB at a time instead of a byte at a time for each varint.

A pipelined stream (`_pipeline`) carries many exchanges at once. Each of its
messages is a `Tagged`: a kind byte, the exchange's id (varint), the body's
length (varint), then the body. The id comes before the length so that a
reader refusing an oversize body still knows whose it was, and skips just that
body: the stream stays in step and the other exchanges on it go on.
`TaggedBuffer` splits a byte stream into them.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

from ._large import Buffer, joined, size_of  # the pieces a body may come in

MAX_VARINT_BYTES = 9  # enough for any length below 2**63
COLLECT_ABOVE = 256 * 1024  # a TaggedBuffer collects a body larger than this in pieces


class FrameError(ValueError):
    """The byte stream cannot be split into frames: a bad prefix or an oversize frame.

    For an oversize frame, `length` is its declared length and `remaining` how
    many of its bytes have not arrived yet (a reader may skip them); on a
    pipelined stream, `exchange` is the id of the exchange it belongs to.
    """

    def __init__(
        self,
        message: str,
        *,
        too_large: bool = False,
        length: int = 0,
        remaining: int = 0,
        exchange: int = 0,
    ) -> None:
        super().__init__(message)
        self.too_large = too_large
        self.length = length
        self.remaining = remaining
        self.exchange = exchange


def encode_frame(payload: bytes) -> bytes:
    """`payload` behind its unsigned LEB128 length."""
    return encode_varint(len(payload)) + payload


class FrameBuffer:
    """Bytes received so far, and the frames they complete."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def __len__(self) -> int:
        return len(self._buffer)

    def next_frame(self) -> bytes | None:
        """The next whole frame, or None until more bytes arrive.

        Raises FrameError on a malformed length or one above `max_frame`, as soon
        as the length is known (before the body is buffered); what arrived of an
        oversize frame is dropped, and the error says how much more is to come.
        """
        length = 0
        for i, byte in enumerate(self._buffer[:MAX_VARINT_BYTES]):
            length |= (byte & 0x7F) << (7 * i)
            if byte & 0x80:
                continue
            if length > self.max_frame:
                remaining = max(0, i + 1 + length - len(self._buffer))
                del self._buffer[: i + 1 + length]
                raise FrameError(
                    f"frame of {length} bytes exceeds the limit of {self.max_frame}",
                    too_large=True,
                    length=length,
                    remaining=remaining,
                )
            end = i + 1 + length
            if len(self._buffer) < end:
                return None
            with memoryview(self._buffer) as view:  # one copy, not two
                frame = bytes(view[i + 1 : end])
            del self._buffer[:end]
            return frame
        if len(self._buffer) >= MAX_VARINT_BYTES:
            raise FrameError(f"frame length prefix longer than {MAX_VARINT_BYTES} bytes")
        return None


def encode_varint(n: int) -> bytes:
    """`n` (>= 0) as unsigned LEB128."""
    if n < 0x4000:  # an exchange id, a small body's length: no loop (every frame has two)
        return _ONE_BYTE[n] if n < 0x80 else bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if not n:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def _read_varint(buffer: bytearray, start: int) -> tuple[int, int] | None:
    """(value, index after it) of the varint at `start`, or None until it is whole.
    Raises FrameError past MAX_VARINT_BYTES."""
    value = 0
    for i in range(MAX_VARINT_BYTES):
        if start + i >= len(buffer):
            return None
        byte = buffer[start + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, start + i + 1
    raise FrameError(f"varint longer than {MAX_VARINT_BYTES} bytes")


class Kind(IntEnum):
    """What a tagged frame is. Numbers are on the wire: never reuse one."""

    REQUEST = 0  # caller -> server: body is an encoded request
    REPLY = 1  # server -> caller: body is the encoded reply to request `exchange`
    CANCEL = 2  # caller -> server: the caller left exchange `exchange`; empty body
    GOAWAY = 3  # server -> caller: no more requests are read; body is an encoded ErrorReply
    # that answers every exchange still unanswered


_KINDS = tuple(sorted(Kind))  # by number
assert [kind.value for kind in _KINDS] == list(range(len(_KINDS)))  # numbered 0, 1, ...


@dataclass(frozen=True, slots=True)
class Tagged:
    kind: Kind
    exchange: int  # the caller's id for the exchange; 0 in a GOAWAY
    body: bytes

    def encode(self) -> bytes:
        return tagged_frame(self.kind, self.exchange, self.body)


def tagged_frame(kind: Kind, exchange: int, body: bytes) -> bytes:
    """`Tagged(kind, exchange, body).encode()` without building the frozen dataclass
    (a request's frame on a caller, a reply's on a server: one per job each)."""
    return _head(kind, exchange, len(body)) + body


def _head(kind: Kind, exchange: int, size: int) -> bytes:
    return bytes((kind,)) + encode_varint(exchange) + encode_varint(size)


# A body this large goes to a writer beside its frame's head, not copied after it;
# so does a piece of a body this large (a large tensor's bytes: `_codec.encode_parts`).
PARTS_ABOVE = 1 << 20

# A frame as a writer takes it: its bytes, or its head and its (large) body's pieces.
Frame = bytes | tuple[bytes, Sequence[Buffer]]


def tagged_parts(kind: Kind, exchange: int, body: Sequence[Buffer]) -> Frame:
    """`tagged_frame` of a body given in pieces (a message's: `_codec.encode_parts`),
    but a body above PARTS_ABOVE stays apart from its head, in its pieces: copying
    16 MiB behind a few bytes of head took a client 2.2-2.9 ms (and the page
    faults of a fresh 16 MiB) before its first byte went out, and joining a
    message's tensors into its bytes as much again."""
    size = size_of(body)
    if size <= PARTS_ABOVE:
        return tagged_frame(kind, exchange, joined(body))
    return _head(kind, exchange, size), body


def frame_writes(frames: list[Frame]) -> list[Buffer]:
    """What to write for `frames`, in order: each piece above PARTS_ABOVE of a large
    body as it is, and what lies between (small frames, heads, small pieces) joined."""
    first = frames[0]
    if len(frames) == 1 and isinstance(first, bytes):
        return [first]  # (the common case, at once)
    writes: list[Buffer] = []
    small: list[Buffer] = []
    for frame in frames:
        if isinstance(frame, bytes):
            small.append(frame)
            continue
        head, parts = frame
        small.append(head)
        for part in parts:
            if len(part) > PARTS_ABOVE:
                if small:
                    writes.append(joined(small))
                    small = []
                writes.append(part)
            else:
                small.append(part)
    if small:
        writes.append(joined(small))
    return writes


class TaggedBuffer:
    """Bytes received so far on a pipelined stream, and the tagged frames they complete.

    A body above `max_body` raises FrameError(too_large=True, exchange=...) as
    soon as its length is known; the buffer then drops that body's bytes as they
    arrive, never holding them, and goes on with the next frame. Any other
    FrameError (an unknown kind, an overlong varint) means the stream cannot be
    split any further.

    A large body is collected as the pieces that bring it and joined once when
    it is whole: appending 64 KiB reads to one buffer reallocated and copied a
    16 MiB body many times over (a fifth of a node's CPU taking bulk requests).
    """

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self._buffer = bytearray()  # bytes not split into frames yet
        self._skip = 0  # bytes of a refused body still to drop
        self._head: tuple[Kind, int] | None = None  # of the large body being collected
        self._pieces: list[bytes] = []  # what has come of that body
        self._missing = 0  # and how much of it is still to come

    def feed(self, data: bytes) -> None:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        if self._missing:
            piece = data[: self._missing]
            self._pieces.append(piece)
            self._missing -= len(piece)
            data = data[len(piece) :]
        self._buffer += data

    def feed_body(self, data: bytes) -> bool:
        """Feed `data` if it lies inside the large body being collected, short of its
        end, and say so; else hold nothing of it. What a body's end completes is
        for the reader that splits frames; its middle can only be more body."""
        if self._skip or len(data) >= self._missing:  # _missing is 0 unless collecting
            return False
        self._pieces.append(data)
        self._missing -= len(data)
        return True

    def __len__(self) -> int:
        return len(self._buffer) + sum(len(piece) for piece in self._pieces)

    @property
    def idle(self) -> bool:
        """Nothing held: no bytes of a frame, no body being skipped or collected."""
        return not self._buffer and not self._skip and self._head is None

    def next_frame_of(self, kinds: Container[Kind]) -> Tagged | Literal[False] | None:
        """`next_frame`, if that is one of `kinds`: False, and nothing taken, when the
        next frame is of another kind or cannot be read. An oversize body raises
        FrameError(too_large) as in `next_frame`."""
        buffer = self._buffer
        if (
            self._head is None
            and buffer
            and (buffer[0] >= len(_KINDS) or _KINDS[buffer[0]] not in kinds)
        ):
            return False
        try:
            return self.next_frame()
        except FrameError as error:
            if error.too_large:
                raise
            return False

    def take_back(self) -> bytes:
        """The bytes held, which no frame was taken from yet; the buffer is then empty.
        Only between whole frames: not while a body is skipped or collected."""
        assert not self._skip and self._head is None
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def next_frame(self) -> Tagged | None:
        """The next whole frame, or None until more bytes arrive."""
        if self._head is not None:
            if self._missing:
                return None
            head, self._head = self._head, None
            body, self._pieces = b"".join(self._pieces), []
            return Tagged(head[0], head[1], body)
        if not self._buffer:
            return None
        first = self._buffer[0]
        if first >= len(_KINDS):
            raise FrameError(f"unknown frame kind {first}")
        kind = _KINDS[first]  # a tuple's item, not Kind(first)'s enum lookup per frame
        exchange = _read_varint(self._buffer, 1)
        if exchange is None:
            return None
        length = _read_varint(self._buffer, exchange[1])
        if length is None:
            return None
        size, start = length
        held = len(self._buffer) - start
        if size > self.max_body:
            self._skip = max(0, size - held)
            del self._buffer[: start + min(size, held)]
            raise FrameError(
                f"frame of {size} bytes exceeds the limit of {self.max_body}",
                too_large=True,
                length=size,
                remaining=self._skip,
                exchange=exchange[0],
            )
        if held < size:
            if size > COLLECT_ABOVE:  # collect it in pieces from now on
                self._head = (kind, exchange[0])
                with memoryview(self._buffer) as view:
                    self._pieces = [bytes(view[start:])]
                self._missing = size - held
                del self._buffer[:]
            return None
        with memoryview(self._buffer) as view:  # one copy, not two
            body = bytes(view[start : start + size])
        del self._buffer[: start + size]
        return Tagged(kind, exchange[0], body)
