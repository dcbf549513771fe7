"""Answering peers' requests: one varint-framed request and one framed reply at a time
on each stream a peer opens, for as long as the peer keeps the stream (see _rpc);
or, on a pipelined protocol (see _pipeline), every request a stream brings at
once, each answered when it is done.

Every failure, the peer's or ours, becomes an `ErrorReply`; nothing a peer sends
ends more than its own stream, and on a pipelined stream a request that cannot
be taken (oversize, not a request, past the inbound limit) ends only itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any, Protocol, TypeVar

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from scheduler import ErrorCode, JobError

from . import _codec, _libp2p
from ._batching import COMPANY_EXPECTED
from ._channel import (
    READ_CHUNK,
    SEND_TIMEOUT_S,
    TRANSPORT_ERRORS,
    Bytes,
    Channel,
    MessageLimits,
    Traffic,
    only_transport_errors,
)
from ._framing import FrameError, Kind, Tagged, TaggedBuffer, tagged_parts
from ._large import Buffer, joined, size_of
from ._messages import ErrorReply, Reply, Request, WireError
from ._pipeline import PIPELINED, FrameWriter

logger = logging.getLogger(__name__)

# A server closes a kept stream idle this long; a caller drops one idle for less
# (_channel.CLIENT_IDLE_S), so it never reuses a stream the server is closing.
SERVER_IDLE_S = 60.0
# After refusing an oversize request, how long we read and drop the rest of it so
# that the caller, still writing, gets to read the refusal (then the stream is reset).
SKIP_OVERSIZE_S = 10.0

# A pipelined stream's requests go to work in groups of at most GROUP_REQUESTS: past
# that many in flight, the next waits until they are all answered and the answers
# written, or for GROUP_ROUNDS scheduling rounds (so a slow request holds up the
# rest for no longer). Thirty-two requests that come in one read, all started at once, were
# answered in one write after all of them were done: the caller sat idle while the
# node worked, then the node while the caller read the answers and sent the next
# ones, one core busy of two. In groups, the caller takes one group's answers
# while the node works on the next (bench.overhead at c=32, alternated: 5,200 ->
# 6,000 jobs/s local, 2,800 -> 3,800 forwarded).
GROUP_REQUESTS = 16
GROUP_ROUNDS = 8

R = TypeVar("R", bound=Request)
_AnyHandler = Callable[[Any, str], Awaitable[Reply]]


async def _let_group_out(working: dict[int, trio.CancelScope], writer: FrameWriter) -> None:
    """Wait until every request in `working` is answered and its answer written, or
    GROUP_ROUNDS rounds."""
    for _ in range(GROUP_ROUNDS):
        await trio.lowlevel.checkpoint()
        if not working and writer.idle:
            return


class _InboundSession:
    """What the reader of an inbound stream tells the task answering it."""

    def __init__(self) -> None:
        self.work = trio.CancelScope()
        self.hung_up = False

    def hang_up(self) -> None:
        self.hung_up = True
        self.work.cancel()


class PipeRequests(Protocol):
    """What the requests of one pipelined stream are to the `RequestReader` that reads
    them: how each is admitted, started and refused. The server's infer-like
    protocols and the generate pipe differ only here."""

    peer_id: str  # this node's, for its refusals
    peer: str  # the caller's
    protocol: TProtocol  # the stream's, for the log
    group: int  # requests in flight before the next waits for their answers; 0: no groups

    def admit(self) -> ErrorReply | None:
        """Take what a request holds while it runs (its inbound slot); or why not."""
        ...

    def start(self, frame: Tagged, working: dict[int, trio.CancelScope], alone: bool) -> None:
        """Start answering `frame`, whose cancel scope is `working[frame.exchange]`.
        `alone`: nothing else is in flight on the stream, nor behind it."""
        ...

    def too_large(self, error: FrameError) -> ErrorReply:
        """The answer to a request over the stream's limit."""
        ...

    def encode(self, reply: ErrorReply) -> bytes:
        """A refusal's bytes."""
        ...


class RequestReader:
    """What reads one pipelined stream's requests: the frames that came, the requests
    in flight (each with its cancel scope), and what starts their work.

    While it waits for its next read, data that arrives is given to it at once in
    the connection's reader task (`_libp2p.tap`, `on_data`), which saves the
    scheduling round a read takes to wake; what it cannot handle there (a
    request that must wait for its group, anything that is not a request or a
    cancel) it gives back, and its read takes it.
    """

    def __init__(
        self,
        requests: PipeRequests,
        writer: FrameWriter,
        max_body: int,
        counts: Bytes,
    ) -> None:
        self.requests = requests
        self.writer = writer
        self.frames = TaggedBuffer(max_body)
        self.working: dict[int, trio.CancelScope] = {}
        self.counts = counts
        self.waiting = False  # its read waits, nothing buffered (set by _libp2p)
        self.last_data = trio.current_time()
        self._reading = trio.CancelScope()  # the read in progress
        self._broken: Exception | None = None  # what on_data raised

    async def run(self, stream: INetStream) -> ErrorReply | None:
        """Read requests and start their work until the stream idles with nothing in
        flight (None) or cannot be read further (why). Transport errors raise.
        Data that arrives while it waits is taken as it comes (`_libp2p.tap`)."""
        tapped = _libp2p.tap(stream, self)
        try:
            return await self._run(stream)
        finally:
            if tapped:
                _libp2p.untap(stream)

    async def _run(self, stream: INetStream) -> ErrorReply | None:
        frames, working = self.frames, self.working
        while True:
            with trio.move_on_after(SERVER_IDLE_S) as idle:
                self._reading = idle
                data = await stream.read(READ_CHUNK)
            if self._broken is not None:
                raise self._broken
            if idle.cancelled_caught:
                if working or trio.current_time() - self.last_data < SERVER_IDLE_S:
                    continue
                return None
            if not data:
                raise EOFError("the caller closed the stream")
            self.last_data = trio.current_time()
            self.counts.received += len(data)
            frames.feed(data)
            waited = False
            while (why := self.take(waited=waited)) is True:
                await _let_group_out(working, self.writer)
                waited = True
            if why is not False:
                return why

    def on_data(self, data: bytes) -> bytes | None:
        """Data that came while the reader waits for it (see the class)."""
        frames = self.frames
        if not frames.idle:  # a frame in part, a body skipped or collected: the reader's,
            if not frames.feed_body(data):  # but for more of a large body, short of its end
                return data
            self.last_data = trio.current_time()
            self.counts.received += len(data)
            return None
        self.last_data = trio.current_time()
        frames.feed(data)
        try:
            if self.take(tapped=True) is False:
                self.counts.received += len(data)
                return None
        except Exception as error:  # a bug: the reader raises it, as if it had read this
            self._broken = error
            self._reading.cancel()
            return None
        left = frames.take_back()
        self.counts.received += len(data) - len(left)
        return left

    def take(self, *, tapped: bool = False, waited: bool = False) -> ErrorReply | bool:
        """Handle the whole frames buffered: False once none is left, True when the
        next request must wait until its group is out (`_let_group_out`; `waited`:
        the next has waited), or why the stream cannot be read further. `tapped`:
        also True before anything but a request or a cancel, which the reader
        handles."""
        frames, working, requests = self.frames, self.working, self.requests
        group = requests.group
        while True:
            if group and len(working) >= group and len(frames) and not waited:
                return True
            waited = False
            try:
                frame = frames.next_frame_of(_TAPPED_KINDS) if tapped else frames.next_frame()
            except FrameError as error:
                if not error.too_large:
                    logger.info(
                        "unreadable %s stream from %s: %s", requests.protocol, requests.peer, error
                    )
                    return ErrorReply(ErrorCode.MALFORMED_MESSAGE, str(error), requests.peer_id)
                self._answer(error.exchange, requests.too_large(error))
                continue
            if frame is None:
                return False
            if frame is False:
                return True
            if frame.kind is Kind.CANCEL:
                if (scope := working.get(frame.exchange)) is not None:
                    scope.cancel()
            elif frame.kind is not Kind.REQUEST:
                why = f"a caller sent a {frame.kind.name} frame"
                return ErrorReply(ErrorCode.MALFORMED_MESSAGE, why, requests.peer_id)
            elif (refused := self._refusal(frame.exchange)) is not None:
                self._answer(frame.exchange, refused)
            else:
                # Alone: nothing else in flight on the stream, nor behind it in this read.
                alone = not working and not len(frames)
                working[frame.exchange] = trio.CancelScope()
                requests.start(frame, working, alone)

    def _refusal(self, exchange: int) -> ErrorReply | None:
        """Why a request for `exchange` is refused before it runs (its id is already in
        flight, or it cannot take what a request holds), or None: it is admitted."""
        if exchange in self.working:
            why = f"exchange {exchange} is already in flight on this stream"
            return ErrorReply(ErrorCode.MALFORMED_MESSAGE, why, self.requests.peer_id)
        return self.requests.admit()

    def _answer(self, exchange: int, reply: ErrorReply) -> None:
        """Answer `exchange` with `reply` without running it."""
        self.writer.send(Tagged(Kind.REPLY, exchange, self.requests.encode(reply)).encode())


_TAPPED_KINDS = (Kind.REQUEST, Kind.CANCEL)


class _ServedRequests:
    """A server's pipelined protocol, as its streams' readers see it (`PipeRequests`)."""

    group = GROUP_REQUESTS

    def __init__(
        self,
        server: Server,
        writer: FrameWriter,
        work: trio.Nursery,
        peer: str,
        protocol: TProtocol,
    ) -> None:
        self.server = server
        self.peer_id = server.peer_id
        self.writer = writer
        self.work = work
        self.peer = peer
        self.protocol = protocol

    def admit(self) -> ErrorReply | None:
        return self.server._admit()

    def start(self, frame: Tagged, working: dict[int, trio.CancelScope], alone: bool) -> None:
        server, writer, peer, protocol = self.server, self.writer, self.peer, self.protocol
        self.work.start_soon(server._answer_tagged, frame, writer, working, peer, protocol, alone)

    def too_large(self, error: FrameError) -> ErrorReply:
        return self.server._too_large(error, self.peer, self.protocol)

    def encode(self, reply: ErrorReply) -> bytes:
        return self.server._encode_reply(reply)


class Server:
    """Answers peers' requests on one libp2p host.

    Each protocol takes the request types its handlers were registered for
    (`serve`); any other request, or bytes that are no request, is answered
    MALFORMED_MESSAGE before a handler sees it. Sizes are bounded by `limits`:
    an oversize request is refused as soon as its length prefix arrives. At most
    `max_concurrent_inbound` streams opened by peers, and requests in flight on
    pipelined streams, are served at once (idle kept streams included); past it
    a new stream, or a new request on a pipelined one, is answered OVERLOADED.

    A protocol in `_pipeline.PIPELINED` is served both ways: one exchange at a
    time on its own id, and pipelined on its pipelined id.
    """

    def __init__(self, host: IHost, limits: MessageLimits, *, max_concurrent_inbound: int) -> None:
        self.host = host
        self.peer_id = str(host.get_id())
        self.limits = limits
        self._max_inbound = max_concurrent_inbound
        self._inbound_slots = trio.Semaphore(max_concurrent_inbound)
        self._handlers: dict[TProtocol, dict[type, _AnyHandler]] = {}
        self._answering = 0
        self.traffic = Traffic()  # bytes of the requests and replies, per protocol
        self._closing = False
        self._all_answered = trio.Event()

    @property
    def in_flight(self) -> int:
        """Requests being answered: from their arrival until their reply is sent."""
        return self._answering

    def serve(
        self,
        protocol: TProtocol,
        kind: type[R],
        handler: Callable[[R, str], Awaitable[Reply]],
    ) -> None:
        """Answer requests of type `kind` on `protocol` with `handler(request, sender)`.

        A protocol may take several kinds, each with its handler. A handler's
        JobError becomes the ErrorReply it describes; any other error, INTERNAL.
        """
        handlers = self._handlers.get(protocol)
        if handlers is None:
            handlers = self._handlers[protocol] = {}
            self.host.set_stream_handler(protocol, self._stream_handler(protocol))
            if protocol in PIPELINED:
                self.host.set_stream_handler(
                    PIPELINED[protocol], self._stream_handler(protocol, pipelined=True)
                )
        if kind in handlers:
            raise ValueError(f"{protocol} already has a handler for {kind.__name__}")
        handlers[kind] = handler

    def serve_stream(
        self, protocol: TProtocol, handler: Callable[[INetStream], Awaitable[None]]
    ) -> None:
        """Serve `protocol` with `handler(stream)`, which speaks it on its own (the
        generate protocol), counted under `max_concurrent_inbound` as the streams
        of `serve` are: past it, a new stream is answered OVERLOADED and closed."""

        async def on_stream(stream: INetStream) -> None:
            if not self._take_inbound(protocol, str(stream.muxed_conn.peer_id)):
                channel = Channel(stream, self.limits.request_limit(protocol))
                await self._refuse(channel, self._inbound_full(), pipelined=False)
                return
            try:
                await handler(stream)
            finally:
                self._inbound_slots.release()

        self.host.set_stream_handler(protocol, on_stream)

    def take_slot(self, protocol: TProtocol, peer: str) -> str | None:
        """Take an inbound slot for one exchange that a handler of its own serves (a
        generation on a kept generate stream): None, or why it is refused. Give it
        back with `release_slot`."""
        return None if self._take_inbound(protocol, peer) else self._inbound_full()

    def release_slot(self) -> None:
        self._inbound_slots.release()

    def _take_inbound(self, protocol: TProtocol, peer: str) -> bool:
        try:
            self._inbound_slots.acquire_nowait()
        except trio.WouldBlock:
            logger.info("refused a %s stream from %s: inbound streams full", protocol, peer)
            return False
        return True

    def _inbound_full(self) -> str:
        return (
            "too many open streams to this node: it serves at most "
            f"{self._max_inbound} streams from peers at once (max_concurrent_inbound); "
            "try again shortly"
        )

    async def drain(self, grace: float) -> int:
        """Answer new requests SHUTTING_DOWN; wait up to `grace` s for the others.

        Returns how many were still unanswered.
        """
        self._closing = True
        if self._answering == 0:
            self._all_answered.set()
        with trio.move_on_after(grace):
            await self._all_answered.wait()
        return self._answering

    def _stream_handler(
        self, protocol: TProtocol, *, pipelined: bool = False
    ) -> Callable[[INetStream], Awaitable[None]]:
        serve = self._serve_pipelined if pipelined else self._serve_channel

        async def on_stream(stream: INetStream) -> None:
            wire = PIPELINED[protocol] if pipelined else protocol  # bytes counted by wire id
            channel = Channel(stream, self.limits.request_limit(protocol), self.traffic.of(wire))
            peer = str(stream.muxed_conn.peer_id)
            if not self._take_inbound(protocol, peer):
                await self._refuse(channel, self._inbound_full(), pipelined=pipelined)
                return
            try:
                await serve(channel, peer, protocol)
            except Exception as error:
                if only_transport_errors(error):  # the caller left: reset, closed, gone
                    logger.debug("stream from %s for %s ended: %r", peer, protocol, error)
                else:
                    # A node never crashes on what a peer sends: log the bug, drop the stream.
                    logger.exception("serving %s to %s failed", protocol, peer)
                await channel.discard()
            else:
                await channel.close()
            finally:
                self._inbound_slots.release()

        return on_stream

    async def _serve_channel(self, channel: Channel, peer: str, protocol: TProtocol) -> None:
        """Answer the requests on one stream in order, until the caller leaves or idles.

        A reader task reads the stream all along: it is waiting for the next
        request anyway, so it also sees a hang-up (reset, close, a cancelled
        caller) while a request is being answered, and cancels that work.
        """
        session = _InboundSession()
        send, receive = trio.open_memory_channel[bytes | FrameError](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_requests, channel, send, session)
            while True:
                with trio.move_on_after(SERVER_IDLE_S):
                    try:
                        payload = await receive.receive()
                    except trio.EndOfChannel:
                        break
                    if isinstance(payload, FrameError):
                        # The stream cannot be resynchronised: answer once, then drop it.
                        await self._refuse_frame(channel, payload, peer, protocol)
                        break
                    if not await self._answer(channel, payload, peer, protocol, session):
                        break
                    continue
                break  # idle too long
            nursery.cancel_scope.cancel()

    async def _serve_pipelined(self, channel: Channel, peer: str, protocol: TProtocol) -> None:
        """Answer every request on a pipelined stream as it is done, until the caller
        leaves (every request in flight is then cancelled) or idles.

        A request the caller cancels is cancelled alone, and gets no reply. Bytes
        that cannot be split into frames end the stream: what is in flight is
        answered, then a GOAWAY says why.
        """
        writer = FrameWriter(channel.stream, self.traffic.of(PIPELINED[protocol]))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                async with trio.open_nursery() as work:  # cancelled, with the work, on a hang-up
                    why = await self._read_pipelined(channel.stream, writer, work, peer, protocol)
                if why is not None:
                    writer.send(Tagged(Kind.GOAWAY, 0, self._encode_reply(why)).encode())
                await writer.flush()
                nursery.cancel_scope.cancel()
        finally:
            writer.drop()  # replies never written free their requests' slots now

    async def _read_pipelined(
        self,
        stream: INetStream,
        writer: FrameWriter,
        work: trio.Nursery,
        peer: str,
        protocol: TProtocol,
    ) -> ErrorReply | None:
        """Read requests and start their work until the stream idles with nothing in
        flight (None) or cannot be read further (why). Transport errors raise."""
        reader = RequestReader(
            _ServedRequests(self, writer, work, peer, protocol),
            writer,
            self.limits.request_limit(protocol),
            self.traffic.of(PIPELINED[protocol]),
        )
        return await reader.run(stream)

    def _admit(self) -> ErrorReply | None:
        """Take an inbound slot for a pipelined request; or why it is refused."""
        try:
            self._inbound_slots.acquire_nowait()
        except trio.WouldBlock:
            why = (
                "too many requests in flight to this node: it serves at most "
                f"{self._max_inbound} streams and requests from peers at once "
                "(max_concurrent_inbound); try again shortly"
            )
            return ErrorReply(ErrorCode.OVERLOADED, why, self.peer_id)
        return None

    async def _answer_tagged(
        self,
        request: Tagged,
        writer: FrameWriter,
        working: dict[int, trio.CancelScope],
        peer: str,
        protocol: TProtocol,
        alone: bool,
    ) -> None:
        """Answer one pipelined request, unless its caller cancels it first.

        The task ends once its reply is queued; the request holds its inbound slot
        (and counts as in flight, for `drain`) until the writer has written the
        reply, or failed to. A request that came `alone` runs its model without
        waiting a round for others to merge with (`COMPANY_EXPECTED`)."""
        self._answering += 1
        queued = False
        if alone:
            COMPANY_EXPECTED.set(False)  # in this task's own context
        try:
            reply: Reply
            if self._closing:
                reply = ErrorReply(
                    ErrorCode.SHUTTING_DOWN, "this node is shutting down", self.peer_id
                )
            else:
                with working[request.exchange] as scope:
                    reply = await self._dispatch(request.body, peer, protocol)
                if scope.cancelled_caught:
                    return
            del working[request.exchange]  # the exchange id is free again
            frame = tagged_parts(Kind.REPLY, request.exchange, self._encode_reply_parts(reply))
            queued = True
            if working:  # others will answer soon: share the writer's next write
                writer.send(frame, self._answered)
            else:
                await writer.send_now(frame, self._answered)
        finally:
            if not queued:
                working.pop(request.exchange, None)
                self._answered()

    def _answered(self) -> None:
        """A pipelined request is done with: its reply written, or never to be."""
        self._inbound_slots.release()
        self._answering -= 1
        if self._closing and self._answering == 0:
            self._all_answered.set()

    async def _refuse_frame(
        self, channel: Channel, error: FrameError, peer: str, protocol: TProtocol
    ) -> None:
        """Answer a request we cannot read. An oversize one gets MESSAGE_TOO_LARGE as
        soon as its length is known; its body is then read and dropped, never held,
        so that a caller still writing it finishes and reads the answer."""
        if not error.too_large:
            reply = ErrorReply(ErrorCode.MALFORMED_MESSAGE, str(error), self.peer_id)
            await self._send_reply(channel, reply)
            return
        await self._send_reply(channel, self._too_large(error, peer, protocol))
        if not await channel.skip(error.remaining, SKIP_OVERSIZE_S):
            await channel.discard()

    def _too_large(self, error: FrameError, peer: str, protocol: TProtocol) -> ErrorReply:
        limit = self.limits.request_limit(protocol)
        logger.info(
            "refused a %s request of %d bytes from %s (limit %d)",
            protocol,
            error.length,
            peer,
            limit,
        )
        message = (
            f"a {protocol} request of {error.length} bytes exceeds this node's limit of "
            f"{limit} bytes for that protocol"
        )
        return ErrorReply(ErrorCode.MESSAGE_TOO_LARGE, message, self.peer_id)

    async def _answer(
        self,
        channel: Channel,
        payload: bytes,
        peer: str,
        protocol: TProtocol,
        session: _InboundSession,
    ) -> bool:
        """Answer one request; False if the caller hung up before its reply."""
        self._answering += 1
        try:
            reply: Reply
            if self._closing:
                reply = ErrorReply(
                    ErrorCode.SHUTTING_DOWN, "this node is shutting down", self.peer_id
                )
            else:
                with trio.CancelScope() as session.work:
                    reply = await self._dispatch(payload, peer, protocol)
                if session.hung_up:
                    return False
            await self._send_reply(channel, reply)
            return True
        finally:
            self._answering -= 1
            if self._closing and self._answering == 0:
                self._all_answered.set()

    async def _read_requests(
        self,
        channel: Channel,
        requests: trio.MemorySendChannel[bytes | FrameError],
        session: _InboundSession,
    ) -> None:
        async with requests:
            try:
                while True:
                    await requests.send(await channel.receive())
            except FrameError as error:
                await requests.send(error)
            except TRANSPORT_ERRORS:
                session.hang_up()

    async def _dispatch(self, payload: bytes, peer: str, protocol: TProtocol) -> Reply:
        try:
            request = _codec.decode_request(payload)
        except WireError as error:
            logger.info("malformed %s request from %s: %s", protocol, peer, error.message)
            return ErrorReply.from_error(error, self.peer_id)
        handlers = self._handlers[protocol]
        handler = handlers.get(type(request))
        if handler is None:
            takes = " and ".join(sorted(kind.__name__ for kind in handlers))
            message = f"{protocol} takes {takes} requests, not {type(request).__name__}"
            logger.info("malformed %s request from %s: %s", protocol, peer, message)
            return ErrorReply(ErrorCode.MALFORMED_MESSAGE, message, self.peer_id)
        try:
            return await handler(request, peer)
        except JobError as error:
            return ErrorReply.from_error(error, self.peer_id)
        except Exception:
            logger.exception("handler for %s failed on a request from %s", protocol, peer)
            return ErrorReply(
                ErrorCode.INTERNAL, "internal error; see the node's log", self.peer_id
            )

    async def _send_reply(self, channel: Channel, reply: Reply) -> None:
        await channel.send(self._encode_reply(reply))

    def _encode_reply(self, reply: Reply) -> bytes:
        return joined(self._encode_reply_parts(reply))

    def _encode_reply_parts(self, reply: Reply) -> list[Buffer]:
        """`reply`'s pieces (`_codec.encode_parts`), or MESSAGE_TOO_LARGE's past the
        reply limit."""
        parts = _codec.encode_parts(reply)
        size, limit = size_of(parts), self.limits.max_reply_bytes
        if size > limit:
            message = f"reply of {size} bytes exceeds the limit of {limit}"
            return [_codec.encode(ErrorReply(ErrorCode.MESSAGE_TOO_LARGE, message, self.peer_id))]
        return parts

    async def _refuse(self, channel: Channel, why: str, *, pipelined: bool) -> None:
        reply = ErrorReply(ErrorCode.OVERLOADED, why, self.peer_id)
        with suppress(*TRANSPORT_ERRORS):
            if pipelined:  # a GOAWAY answers whatever the caller sent on it
                with trio.CancelScope(shield=True), trio.move_on_after(SEND_TIMEOUT_S):
                    await channel.stream.write(
                        Tagged(Kind.GOAWAY, 0, self._encode_reply(reply)).encode()
                    )
            else:
                await self._send_reply(channel, reply)
        await channel.close()
