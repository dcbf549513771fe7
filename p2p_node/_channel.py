"""One libp2p stream carrying varint-framed messages, and what both ends of an exchange
share: the size limits, and what a broken or vanished peer looks like from a stream."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.network.stream.exceptions import StreamError

from ._errors import leaves
from ._framing import FrameBuffer, encode_frame

# The most a stream read asks for: more than a yamux receive window (16 MiB) holds,
# so that a read takes everything buffered. py-libp2p then clears its stream
# buffer; a read of less cuts it from the front, and the muxer's next append
# moved what was left: with a grown window, a quarter of a node's CPU taking a
# 16 MiB request went to those moves. A read returns only what has arrived.
READ_CHUNK = 32 * 1024 * 1024
SKIP_CHUNK = 64 * 1024  # what `skip` drops per read
SEND_TIMEOUT_S = 30.0
# A caller drops a kept stream idle this long; a server closes one idle longer
# (_serve.SERVER_IDLE_S), so a caller never reuses a stream the server is closing.
CLIENT_IDLE_S = 30.0

TRANSPORT_ERRORS = (
    StreamError,
    StreamFailure,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
    EOFError,
)


def only_transport_errors(error: BaseException) -> bool:
    """Whether `error`, or every error in its group, says the stream or connection
    ended (the reader and the writer of one stream may both see its reset)."""
    return all(isinstance(leaf, TRANSPORT_ERRORS) for leaf in leaves(error))


@dataclass(frozen=True, slots=True)
class MessageLimits:
    """The largest messages, in bytes, both ways.

    Requests may be at most `max_request_bytes`, or `request_limits[protocol]`
    for the protocols it names: a caller sends none larger, and a server refuses
    a larger one as soon as its length prefix arrives. Replies may be at most
    `max_reply_bytes`.
    """

    max_request_bytes: int
    max_reply_bytes: int
    request_limits: Mapping[TProtocol, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = [self.max_request_bytes, self.max_reply_bytes, *self.request_limits.values()]
        if not all(isinstance(n, int) and n > 0 for n in sizes):
            raise ValueError(f"message limits must be positive byte counts, got {self}")

    def request_limit(self, protocol: TProtocol) -> int:
        """The largest request, in bytes, sent or taken on `protocol`."""
        return self.request_limits.get(protocol, self.max_request_bytes)


class Bytes:
    """Frame bytes one side of one protocol has sent and received, in plain ints."""

    __slots__ = ("received", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0


class Traffic:
    """Bytes per protocol, for the metrics (read when they are scraped)."""

    def __init__(self) -> None:
        self.by_protocol: dict[TProtocol, Bytes] = {}

    def of(self, protocol: TProtocol) -> Bytes:
        counts = self.by_protocol.get(protocol)
        if counts is None:
            counts = self.by_protocol[protocol] = Bytes()
        return counts


class SendTimedOut(trio.BrokenResourceError):
    """A frame could not be written by the deadline: the peer is not reading."""


class Channel:
    """One libp2p stream carrying frames, with what has been read but not consumed."""

    def __init__(self, stream: INetStream, max_frame: int, counts: Bytes | None = None) -> None:
        self.stream = stream
        self.frames = FrameBuffer(max_frame)
        self.idle_since = trio.current_time()
        self._counts = counts or Bytes()  # where the bytes it moves are counted

    @property
    def connection_closing(self) -> bool:
        closing = getattr(getattr(self.stream, "muxed_conn", None), "event_shutting_down", None)
        return closing is not None and closing.is_set()

    async def send(self, payload: bytes) -> None:
        """Write one frame, shielded from cancellation.

        py-libp2p writes each muxer frame to the Noise channel in the caller's
        task: a write cancelled halfway leaves a partial Noise message on the TCP
        connection, the peer fails to decrypt it ("Failed authentication of
        message") and the whole connection dies. So a frame, once started, is
        finished; a cancellation takes effect right after. Bounded by the caller's
        deadline (and SEND_TIMEOUT_S), so that a peer that stops reading cannot hold
        us past it: then the frame is cut, and the stream is done for.
        """
        limit = min(trio.current_effective_deadline(), trio.current_time() + SEND_TIMEOUT_S)
        frame = encode_frame(payload)
        self._counts.sent += len(frame)
        with trio.CancelScope(shield=True):
            with trio.move_on_at(limit) as stuck:
                await self.stream.write(frame)
        if stuck.cancelled_caught:
            raise SendTimedOut("the peer did not take the message in time")

    async def receive(self) -> bytes:
        """The next frame. Raises EOFError-like transport errors when the peer hangs up."""
        while (frame := self.frames.next_frame()) is None:
            await self.fill()
        return frame

    async def skip(self, count: int, within: float) -> bool:
        """Read and drop `count` bytes (the rest of a refused frame), in constant
        memory; False if the peer hung up or took longer than `within` s."""
        with trio.move_on_after(within):
            while count > 0:
                try:
                    data = await self.stream.read(min(SKIP_CHUNK, count))
                except TRANSPORT_ERRORS:
                    return False
                if not data:
                    return False
                self._counts.received += len(data)
                count -= len(data)
            return True
        return False

    async def fill(self) -> None:
        data = await self.stream.read(READ_CHUNK)
        if not data:
            raise EOFError("stream closed by the peer")
        self._counts.received += len(data)
        self.frames.feed(data)

    async def close(self) -> None:
        """Close our side gracefully, so that what we wrote is still read."""
        with trio.CancelScope(shield=True), trio.move_on_after(1), suppress(*TRANSPORT_ERRORS):
            await self.stream.close()

    async def discard(self) -> None:
        """Reset the stream; it is never used again. Safe to call while cancelled."""
        with trio.CancelScope(shield=True), trio.move_on_after(1), suppress(*TRANSPORT_ERRORS):
            await self.stream.reset()
