"""A message's large tensor bytes in and out of msgpack without msgpack's copies.

msgpack copies every bin it packs into its own buffer, and every bin it unpacks
into a fresh bytes object. For a 16 MiB request that was, on the sender, the
tensor copied into a buffer and that buffer copied out; on the receiver, the
tensor copied out of the frame: each a fresh 16 MiB that pays a page fault per
4 KiB on first touch (a third of a client's CPU per bulk request, a sixth of a
node's). Here the bytes msgpack would give are built around them instead:

- `pack_large`: the message is packed with a small placeholder for each large bin,
  and the pieces around the placeholders are given with the bins' own bytes
  between them, never copied: the writer sends them as they are. Joined, they
  are msgpack's bytes, byte for byte.
- `unpack_large`: the large bins are found by walking the message's structure (not
  its bytes), msgpack unpacks the message with a small extension in their
  place, and each comes back as a read-only view of the payload, which the
  tensor built on it keeps alive.

Only a bin of at least `LARGE_BYTES` that is the value of a "data" key (a
tensor's bytes; no other field of a message has that name) is handled so. A
payload the walk cannot read to its end, with an extension of its own, or with
more than `WALK_ITEMS` items, is unpacked by msgpack whole, as any other: its
errors are msgpack's, and a message of a million tiny items costs no more than
it did.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

LARGE_BYTES = 64 * 1024
WALK_ITEMS = 4096
_HOLE = 42  # the extension code of a large bin's placeholder in `unpack_large`
_KEY = b"\xa4data"  # "data" as a msgpack str
_BIN32 = b"\xc6"
# Placeholders in `pack_large`: bins of 16 bytes, 14 of them random per process, unlike
# anything a message holds by chance; `pack_large` checks each occurs once anyway.
_MARK = os.urandom(14)

Unpack = Callable[..., Any]
Buffer = bytes | memoryview  # a message's piece; a memoryview of bytes ("B"): len is bytes


def pack_large(body: dict[str, Any], large: list[dict[str, Any]]) -> list[Buffer] | None:
    """msgpack's bytes of `body` (bins as `use_bin_type`) in pieces, each large bin's
    data one of them as it is, where `large` are the maps in it whose "data" is at
    least LARGE_BYTES; None if a placeholder is not found exactly once (then pack
    it as usual). Takes the maps' data for the time it packs, and puts it back."""
    datas = [wire["data"] for wire in large]
    marks = [b"\xc4\x10" + _MARK + i.to_bytes(2, "big") for i in range(len(large))]
    try:
        for wire, mark in zip(large, marks, strict=True):
            wire["data"] = mark[2:]
        packed: bytes = msgpack.packb(body, use_bin_type=True)
    finally:
        for wire, data in zip(large, datas, strict=True):
            wire["data"] = data
    spots = []
    for mark, data in zip(marks, datas, strict=True):
        at = packed.find(mark)
        if at < 0 or packed.find(mark, at + 1) >= 0:
            return None
        spots.append((at, data))
    spots.sort(key=lambda spot: spot[0])
    parts: list[Buffer] = []
    done = 0
    for at, data in spots:  # each bin's head with the bytes before it, then its data
        parts += (packed[done:at] + _BIN32 + len(data).to_bytes(4, "big"), data)
        done = at + 18
    parts.append(packed[done:])
    return parts


def size_of(parts: Sequence[Buffer]) -> int:
    """The bytes of a message's pieces."""
    return sum(len(part) for part in parts)


def joined(parts: Sequence[Buffer]) -> bytes:
    """The bytes of `parts`, without a copy when that is one bytes already."""
    if len(parts) == 1 and isinstance(parts[0], bytes):
        return parts[0]
    return b"".join(parts)


def unpack_large(payload: bytes, unpack: Unpack, **options: Any) -> Any:
    """`unpack(payload, **options)` (msgpack.unpackb's), with its large tensor bins
    as read-only views of `payload`. `options`' ext_hook gets any extension but
    the placeholders."""
    holes = _large_bins(payload)
    if not holes:
        return unpack(payload, **options)
    view = memoryview(payload)
    views = [view[start:end] for _, start, end in holes]
    parts: list[bytes] = []
    done = 0
    for i, (head, _, end) in enumerate(holes):
        parts += (payload[done:head], b"\xd6" + bytes((_HOLE,)) + i.to_bytes(4, "big"))
        done = end
    parts.append(payload[done:])
    hook = options.pop("ext_hook")

    def ext_hook(code: int, data: bytes) -> object:
        if code == _HOLE and len(data) == 4:
            return views[int.from_bytes(data, "big")]
        return hook(code, data)

    return unpack(b"".join(parts), ext_hook=ext_hook, **options)


_FIXED = {0xC0: 1, 0xC2: 1, 0xC3: 1, 0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}
_FIXED.update({0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9})
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}  # bin, str: length bytes
_COUNTED = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # array, map
_UINT = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I")}


def _large_bins(payload: bytes) -> list[tuple[int, int, int]]:
    """(bin's first byte, its data's first, its end) for each large tensor bin of
    `payload`; [] if none, or if the walk cannot tell (see the module)."""
    holes: list[tuple[int, int, int]] = []
    end = len(payload)
    if end < LARGE_BYTES:
        return holes
    at = 0
    # per open container: [items left, a map?, its last key was "data"?]
    stack: list[list[Any]] = [[1, False, False]]
    for _ in range(WALK_ITEMS):
        while stack and not stack[-1][0]:
            stack.pop()
        if not stack:
            return holes if at == end else []
        if at >= end:
            return []
        top = stack[-1]
        top[0] -= 1
        is_key = top[1] and top[0] % 2 == 1  # a map of n pairs holds 2n items, key first
        data_value, top[2] = top[2], False
        first = at
        byte = payload[at]
        at += 1
        if byte <= 0x7F or byte >= 0xE0:
            continue
        if byte <= 0x8F:
            stack.append([2 * (byte & 0x0F), True, False])
        elif byte <= 0x9F:
            stack.append([byte & 0x0F, False, False])
        elif byte <= 0xBF:
            at += byte & 0x1F
            top[2] = is_key and payload[first:at] == _KEY
        elif (size := _FIXED.get(byte)) is not None:
            at += size - 1
        elif (width := _SIZED.get(byte)) is not None:
            if at + width > end:
                return []
            (length,) = _UINT[width].unpack_from(payload, at)
            at += width
            start, at = at, at + length
            if byte <= 0xC6 and data_value and length >= LARGE_BYTES and at <= end:
                holes.append((first, start, at))
        elif (counted := _COUNTED.get(byte)) is not None:
            width, per = counted
            if at + width > end:
                return []
            (count,) = _UINT[width].unpack_from(payload, at)
            at += width
            stack.append([per * count, per == 2, False])
        else:  # an extension, or 0xc1, which msgpack never writes
            return []
    return []
