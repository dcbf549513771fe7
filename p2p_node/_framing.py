"""Varint length-prefixed frames, as libp2p's msgio writes them. Pure: no I/O.

`FrameBuffer` collects bytes as they arrive and hands out whole frames, so a
reader can pull 64 KiB at a time instead of a byte at a time for each varint.
"""

from __future__ import annotations

MAX_VARINT_BYTES = 9  # enough for any length below 2**63


class FrameError(ValueError):
    """The byte stream cannot be split into frames: a bad prefix or an oversize frame.

    For an oversize frame, `length` is its declared length and `remaining` how
    many of its bytes have not arrived yet (a reader may skip them).
    """

    def __init__(
        self, message: str, *, too_large: bool = False, length: int = 0, remaining: int = 0
    ) -> None:
        super().__init__(message)
        self.too_large = too_large
        self.length = length
        self.remaining = remaining


def encode_frame(payload: bytes) -> bytes:
    """`payload` behind its unsigned LEB128 length."""
    n = len(payload)
    prefix = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            prefix.append(byte | 0x80)
        else:
            prefix.append(byte)
            return bytes(prefix) + payload


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
            frame = bytes(self._buffer[i + 1 : end])
            del self._buffer[:end]
            return frame
        if len(self._buffer) >= MAX_VARINT_BYTES:
            raise FrameError(f"frame length prefix longer than {MAX_VARINT_BYTES} bytes")
        return None
