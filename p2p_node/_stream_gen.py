"""The generate protocol: one `GenerateRequest` on a stream, answered by a stream of
`GeneratedPiece` frames and one `GenerateSummary` (or an `ErrorReply`) before the
node closes it.

A node that gets a request it may place (`forward`) is its coordinator: it
selects a model for a task, ranks the peers serving the model with the
orchestrator's placement strategy, and runs the generation on the first that
takes it, itself without a network hop or another peer through a stream of its
own whose frames it relays. A peer that refuses (overloaded, unreachable, shut
down) before its first token is passed over for the next; after it, its error
ends the generation.

Hanging up is how a client stops a generation: a stream reset, or closed, while
the generation runs cancels it on every node it passed through, and the
executing node's session ends and frees its cache at once.

Callers keep one stream per peer for all their generations
(`GENERATE_PIPE_PROTOCOL`, `/2.0.0`): each generation is an exchange on it,
tagged as on the pipelined job protocols (`_pipeline`), its frames REPLY frames
of its exchange, a hang-up a CANCEL (a reset stream hangs up all of them). A
generation then costs no stream opening (a round trip of multistream-select,
~2-3 ms per hop, most of the time to first token), and the frames of all the
generations that share a node's decode steps go out in one write per step,
not one per generation (`FrameWriter`). `/1.0.0`, one generation per stream,
is still served, and spoken to a peer that does not speak `/2.0.0`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from typing import TYPE_CHECKING

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from scheduler import ErrorCode, JobError

from . import _codec
from ._channel import TRANSPORT_ERRORS, Bytes, Channel, only_transport_errors
from ._decoder import Sampling
from ._errors import unwrap_single_errors
from ._framing import FrameError, Kind, Tagged
from ._messages import (
    ErrorReply,
    GeneratedPiece,
    GenerateRequest,
    GenerateSummary,
    Reply,
    WireError,
)
from ._pipeline import FrameWriter, KeptPipe
from ._serve import RequestReader

if TYPE_CHECKING:
    from ._node import Node
    from ._rpc import Rpc

logger = logging.getLogger(__name__)

GENERATE_PROTOCOL = TProtocol("/p2p-node/generate/1.0.0")
GENERATE_PIPE_PROTOCOL = TProtocol("/p2p-node/generate/2.0.0")  # kept, many generations
REQUEST_WAIT_S = 10.0  # for the request, once a stream is open
MAX_CANDIDATES = 4  # peers tried for one generation before its first token

Send = Callable[[bytes], Awaitable[None]]


class _HungUp(Exception):
    """The other end of a stream left (or spoke out of turn) while we answered it."""


# --- serving ----------------------------------------------------------------------------


async def serve_generate(node: Node, stream: INetStream) -> None:
    """Answer one generate request on `stream`, then close it (reset it if the caller
    hung up or broke the protocol)."""
    peer = str(stream.muxed_conn.peer_id)
    channel = Channel(stream, node.config.max_request_bytes)
    try:
        with trio.fail_after(REQUEST_WAIT_S):
            payload = await channel.receive()
        with unwrap_single_errors():
            async with _until_hang_up(channel):
                await _answer(node, payload, peer, channel.send)
    except (_HungUp, trio.TooSlowError, FrameError, *TRANSPORT_ERRORS) as error:
        logger.debug("generate stream from %s ended: %r", peer, error)
        await channel.discard()
    else:
        await channel.close()


async def _answer(node: Node, payload: bytes, peer: str, send: Send) -> None:
    started = time.perf_counter()
    try:
        request = _codec.decode_request(payload)
        if not isinstance(request, GenerateRequest):
            raise WireError(
                ErrorCode.MALFORMED_MESSAGE,
                f"{GENERATE_PROTOCOL} takes GenerateRequest, not {type(request).__name__}",
            )
        with trio.move_on_after(request.timeout_ms / 1000) as timer:
            if request.forward:
                node.admission.admit_job(peer, trio.current_time())
                await coordinate(node, request, send)
            else:
                await _admit_placed(node, peer)
                await run_here(node, request, send, started)
        if timer.cancelled_caught:
            raise JobError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"generation {request.job_id} did not finish within {request.timeout_ms} ms",
            )
    except JobError as error:
        await send(_codec.encode(ErrorReply.from_error(error, node.peer_id)))
    except TRANSPORT_ERRORS:
        raise  # the stream is gone: nothing to answer on
    except Exception:  # a bug: the caller still gets an answer, the node goes on
        logger.exception("generation for %s failed", peer)
        reply = ErrorReply(ErrorCode.INTERNAL, "internal error; see the node's log", node.peer_id)
        await send(_codec.encode(reply))


async def serve_generate_pipe(node: Node, stream: INetStream) -> None:
    """Answer the generations a caller sends on its kept stream, each as it runs,
    until the caller leaves (every generation on it then ends) or the stream idles
    with none running. A generation the caller cancels ends alone. Bytes that
    cannot be split into frames end the stream, with a GOAWAY that says why.

    Each generation holds an inbound slot while it runs (`max_concurrent_inbound`),
    as a stream of `/1.0.0` does; past the limit it is answered OVERLOADED."""
    peer = str(stream.muxed_conn.peer_id)
    writer = FrameWriter(stream)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            async with trio.open_nursery() as work:  # cancelled, with the work, on a hang-up
                why = await _read_pipe(node, stream, writer, work, peer)
            if why is not None:
                writer.send(Tagged(Kind.GOAWAY, 0, _codec.encode(why)).encode())
            await writer.flush()
            nursery.cancel_scope.cancel()
    except Exception as error:
        if not only_transport_errors(error):  # a bug: log it, drop the stream, go on
            logger.exception("generate stream from %s failed", peer)
        else:
            logger.debug("generate stream from %s ended: %r", peer, error)
        await _reset(stream)
    else:
        with trio.CancelScope(shield=True), trio.move_on_after(1), suppress(*TRANSPORT_ERRORS):
            await stream.close()


async def _read_pipe(
    node: Node, stream: INetStream, writer: FrameWriter, work: trio.Nursery, peer: str
) -> ErrorReply | None:
    """Read requests and start their generations until the stream idles with none
    running (None) or cannot be read further (why). Transport errors raise."""
    generations = _Generations(node, writer, work, peer)
    limit = node.config.max_request_bytes
    reader = RequestReader(generations, writer, limit, Bytes())
    return await reader.run(stream)


class _Generations:
    """A generate pipe's requests, as its reader sees them (`PipeRequests`). Each holds
    an inbound slot while it runs; none waits for others to be answered (no
    groups: a generation may run for minutes)."""

    group = 0
    protocol = GENERATE_PIPE_PROTOCOL

    def __init__(self, node: Node, writer: FrameWriter, work: trio.Nursery, peer: str) -> None:
        self.node = node
        self.peer_id = node.peer_id
        self.writer = writer
        self.work = work
        self.peer = peer

    def admit(self) -> ErrorReply | None:
        full = self.node.server.take_slot(GENERATE_PIPE_PROTOCOL, self.peer)
        return None if full is None else ErrorReply(ErrorCode.OVERLOADED, full, self.peer_id)

    def start(self, frame: Tagged, working: dict[int, trio.CancelScope], alone: bool) -> None:
        self.work.start_soon(_answer_exchange, self.node, frame, self.writer, working, self.peer)

    def too_large(self, error: FrameError) -> ErrorReply:
        limit = self.node.config.max_request_bytes
        why = f"a generate request over this node's limit of {limit} bytes (max_request_bytes)"
        return ErrorReply(ErrorCode.MESSAGE_TOO_LARGE, f"{why}: {error}", self.peer_id)

    def encode(self, reply: ErrorReply) -> bytes:
        return _codec.encode(reply)


async def _answer_exchange(
    node: Node,
    request: Tagged,
    writer: FrameWriter,
    running: dict[int, trio.CancelScope],
    peer: str,
) -> None:
    """One generation of a kept stream, its frames tagged with its exchange."""
    exchange = request.exchange

    first = True

    async def send(frame: bytes) -> None:
        # The first piece of the stream's only generation is written at once, in
        # this task: the round the writer's task takes to wake is time to first
        # token (0.3-0.4 ms of the critical path's CPU here). Not the later pieces:
        # those that come while one is written go out together in the next frame,
        # and written each at once they went one token a frame, for more in all.
        nonlocal first
        tagged = Tagged(Kind.REPLY, exchange, frame).encode()
        if first and len(running) == 1 and writer.idle:
            await writer.send_now(tagged)
        else:
            await writer.write(tagged)
        first = False

    try:
        with running[exchange]:
            await _answer(node, request.body, peer, send)
    finally:
        del running[exchange]
        node.server.release_slot()


async def _admit_placed(node: Node, sender: str) -> None:
    """A generation placed here: from a peer of the network, or an allowed client."""
    if sender in node.view.snapshot().peers or node.admission.allows(sender):
        return
    with trio.move_on_after(node.config.gossip.liveness_ttl):  # its record may be on its way
        await node.view.wait_until(lambda view: sender in view.peers)
        return
    raise node.admission.unauthorized(sender, "run generations")


async def run_here(node: Node, request: GenerateRequest, send: Send, started: float) -> None:
    """Run `request` on this node's generations, sending each piece, then the summary."""
    sampling = Sampling(request.temperature, request.top_k, request.top_p, request.seed)
    ttft_ms = None
    try:
        async with node.generations.open_session(
            request.model_id, request.prompt, request.max_tokens, sampling
        ) as generation:
            # What was made while the last frame went out goes in one frame.
            while pieces := await generation.next_pieces():
                await send(_codec.encode(GeneratedPiece(pieces.tokens, pieces.text)))
                if ttft_ms is None:
                    ttft_ms = (time.perf_counter() - started) * 1e3
                    # A session is load while it runs: tell peers (after the first
                    # frame, which the record's signing and sending would delay), and
                    # again when it ends.
                    node.gossip.changed()
            total_ms = (time.perf_counter() - started) * 1e3
            summary = GenerateSummary(
                request.job_id,
                request.model_id,
                generation.text,
                generation.tokens,
                generation.finish,
                node.peer_id,
                total_ms if ttft_ms is None else ttft_ms,
                total_ms,
            )
    finally:
        node.gossip.changed()
    await send(_codec.encode(summary))


async def coordinate(node: Node, request: GenerateRequest, send: Send) -> None:
    """Choose the model and the peer for `request`, and have it run there."""
    model_id = request.model_id
    if request.task is not None:
        chosen = node.selector.rank_models(
            request.task, request.selection or node.config.selection, request.context
        )
        model_id = chosen.best
    if node.chains.prefers_chain(model_id):  # served as stages: see p2p_node/_chain.py
        chained = replace(request, model_id=model_id, task=None, selection=None, context={})
        await node.chains.serve_generation(chained, send)
        return
    strategy = request.strategy or node.config.strategy
    placement = node.orchestrator.placement(model_id, strategy)
    if not placement.candidates:
        reasons = "; ".join(f"{e.peer_id}: {e.reason}" for e in placement.excluded[:4])
        raise JobError(
            ErrorCode.NO_CAPABLE_PEER,
            f"no peer generates with model {model_id}" + (f" ({reasons})" if reasons else ""),
        )
    placed = replace(
        request, model_id=model_id, task=None, selection=None, context={}, forward=False
    )
    deadline = trio.current_time() + request.timeout_ms / 1000
    error: JobError | None = None
    for candidate in placement.candidates[:MAX_CANDIDATES]:
        left_ms = max(1, round((deadline - trio.current_time()) * 1000))
        attempt = replace(placed, timeout_ms=left_ms)
        tried = _Relay(send)
        try:
            if candidate.peer_id == node.peer_id:
                await run_here(node, attempt, tried.send, time.perf_counter())
            else:
                await _run_on_peer(node, candidate.peer_id, attempt, tried)
            return
        except JobError as failure:
            if tried.pieces or not failure.code.retryable:
                raise
            logger.info("generation %s: %s; trying the next peer", request.job_id, failure)
            error = failure
    assert error is not None
    raise error


class _Relay:
    """Passes frames on to the client, counting the pieces among them."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.pieces = 0

    async def send(self, frame: bytes) -> None:
        self.pieces += 1
        await self._send(frame)


async def _run_on_peer(node: Node, peer_id: str, request: GenerateRequest, relay: _Relay) -> None:
    """Relay the frames `peer_id` answers `request` with; its error is raised."""
    async with open_frames(
        node.generate_pipes, peer_id, request, node.config.dial_timeout
    ) as frames:
        while True:
            frame = await frames.receive()
            reply = _read_reply(frame, peer_id)
            if isinstance(reply, ErrorReply):
                frames.ended = True
                raise reply.to_error()
            frames.ended = isinstance(reply, GenerateSummary)
            await relay.send(frame)
            if frames.ended:
                return


def _read_reply(frame: bytes, peer_id: str) -> Reply:
    try:
        reply = _codec.decode_reply(frame)
    except WireError as error:
        raise JobError(error.code, f"bad generate frame: {error.message}", peer=peer_id) from None
    if not isinstance(reply, GeneratedPiece | GenerateSummary | ErrorReply):
        raise JobError(
            ErrorCode.MALFORMED_MESSAGE,
            f"expected a generate frame, got a {type(reply).__name__}",
            peer=peer_id,
        )
    return reply


@asynccontextmanager
async def _until_hang_up(channel: Channel) -> AsyncIterator[None]:
    """Run the body while reading `channel`: anything read (the caller may send
    nothing more), or its end, cancels the body and raises _HungUp."""
    hung_up = False

    async def watch(scope: trio.CancelScope) -> None:
        nonlocal hung_up
        try:
            await channel.fill()
        except (FrameError, *TRANSPORT_ERRORS):
            pass
        hung_up = True
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, nursery.cancel_scope)
        yield
        nursery.cancel_scope.cancel()
    if hung_up:
        raise _HungUp("the caller hung up")


# --- calling ----------------------------------------------------------------------------


class Frames:
    """The frames of one generation, as its caller reads them: on a kept stream
    (an exchange of a `GeneratePipe`) or on a stream of its own (`/1.0.0`).
    `ended` once its summary or error came: leaving then is no hang-up."""

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self.ended = False

    async def receive(self) -> bytes:
        """The next frame. Raises JobError when the stream breaks."""
        raise NotImplementedError


class _ChannelFrames(Frames):
    def __init__(self, channel: Channel, peer_id: str) -> None:
        super().__init__(peer_id)
        self.channel = channel

    async def receive(self) -> bytes:
        try:
            return await self.channel.receive()
        except (FrameError, *TRANSPORT_ERRORS) as error:
            raise JobError(
                ErrorCode.PEER_UNREACHABLE, f"generate stream broke: {error!r}", peer=self.peer_id
            ) from None


class _Exchange(Frames):
    def __init__(self, pipe: GeneratePipe, number: int) -> None:
        super().__init__(pipe.peer_id)
        self._pipe = pipe
        self.number = number
        # Unbounded, so that one slow reader never holds up the others' frames; the
        # executing node makes at most BUFFERED_TOKENS more than the caller took.
        self.send, self._receive = trio.open_memory_channel[bytes](math.inf)

    async def receive(self) -> bytes:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:  # the pipe failed (and said why)
            assert self._pipe.failure is not None
            raise self._pipe.failure from None


class GeneratePipe(KeptPipe[_Exchange]):
    """A caller's kept generate stream to one peer, carrying any number of
    generations at once, each an exchange (see the module's docstring)."""

    FRAME = "generate frame"
    STREAM = "generate stream"

    @asynccontextmanager
    async def exchange(self, payload: bytes) -> AsyncIterator[Frames]:
        """Send `payload` (an encoded GenerateRequest); yields its frames. Leaving
        before they ended cancels the generation. Raises JobError."""
        if self.failure is not None:
            raise self.failure
        number, self._next = self._next, self._next + 1
        exchange = self._open[number] = _Exchange(self, number)
        sent = False
        try:
            frame = Tagged(Kind.REQUEST, number, payload).encode()
            # Alone, it is written at once, in this task, not a round later by the
            # writer's. But alone only once the generations started with it (a
            # client's 16 at once, or a burst a node forwards) have come here too,
            # a checkpoint later: written at once, the first of 16 went alone, and
            # its peer prefilled it alone and stepped it alone while the other 15
            # came, 22 steps ahead of them ever after (their batches padded to its
            # cache): 84 steps where 63 do, and 8% fewer tokens/s (bench.text).
            await trio.lowlevel.checkpoint()
            if self.failure is not None:  # the stream failed meanwhile
                raise self.failure
            sent = True
            if len(self._open) == 1:
                await self._writer.send_now(frame)
            else:
                self._writer.send(frame)
            yield exchange
        finally:
            self.last_used = trio.current_time()
            del self._open[number]
            if sent and not exchange.ended and self.failure is None:  # a hang-up
                self._writer.send(Tagged(Kind.CANCEL, number, b"").encode())

    def _reply(self, exchange: int, body: bytes) -> None:
        frames = self._open.get(exchange)
        if frames is not None:  # else its caller left meanwhile
            frames.send.send_nowait(body)

    def _refuse(self, exchange: int, error: JobError) -> None:
        self._reply(exchange, _codec.encode(ErrorReply(error.code, error.message, self.peer_id)))

    def _end_all(self) -> None:
        for frames in self._open.values():
            frames.send.close()


class GeneratePipes:
    """The kept generate streams of one caller (a client, or a node that forwards
    generations), one per peer, opened when first needed."""

    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc
        self.max_reply_bytes = rpc.limits.max_reply_bytes

    async def pipe(self, peer_id: str, timeout: float) -> GeneratePipe | None:
        """The kept stream to `peer_id`; None if it speaks only `/1.0.0`. Raises JobError."""

        async def open_pipe() -> GeneratePipe | None:
            if not self._rpc.speaks(peer_id, GENERATE_PIPE_PROTOCOL):
                return None
            try:
                stream = await self._rpc.open_stream(peer_id, GENERATE_PIPE_PROTOCOL, timeout)
            except JobError:
                if not self._rpc.speaks(peer_id, GENERATE_PIPE_PROTOCOL):
                    logger.info("%s does not speak %s", peer_id, GENERATE_PIPE_PROTOCOL)
                    return None
                raise
            return GeneratePipe(stream, self.max_reply_bytes, peer_id)

        return await self._rpc.pipes.get((peer_id, GENERATE_PIPE_PROTOCOL), open_pipe)

    async def open_stream(self, peer_id: str, timeout: float) -> INetStream:
        return await self._rpc.open_stream(peer_id, GENERATE_PROTOCOL, timeout)


@asynccontextmanager
async def open_frames(
    pipes: GeneratePipes, peer_id: str, request: GenerateRequest, timeout: float
) -> AsyncIterator[Frames]:
    """Send `request` to `peer_id`, on its kept stream where it has one; yields the
    generation's frames. Leaving before they ended hangs up. Raises JobError."""
    payload = _codec.encode(request)
    pipe = await pipes.pipe(peer_id, timeout)
    if pipe is not None:
        async with pipe.exchange(payload) as frames:
            yield frames
        return
    stream = await pipes.open_stream(peer_id, timeout)
    channel = Channel(stream, pipes.max_reply_bytes)
    own = _ChannelFrames(channel, peer_id)
    try:
        try:
            await channel.send(payload)
        except TRANSPORT_ERRORS as error:
            raise JobError(
                ErrorCode.PEER_UNREACHABLE, f"generate stream broke: {error!r}", peer=peer_id
            ) from None
        yield own
    finally:
        await (channel.close() if own.ended else channel.discard())


async def _reset(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1), suppress(*TRANSPORT_ERRORS):
        await stream.reset()


class GenerationStream:
    """A generation's frames, as a caller reads them from the node it asked.

    Iterate for the text pieces as they come; `summary` holds the end (with this
    caller's own time to first token and total time), `tokens` the token ids and
    `pieces` their texts.
    Leaving `open_generation`'s context before the end hangs up: the generation
    stops wherever it runs, and its cache is freed.
    """

    def __init__(self, frames: Frames, started: float) -> None:
        self._frames = frames
        self._peer_id = frames.peer_id
        self._started = started
        self._first: float | None = None
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.summary: GenerateSummary | None = None

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> str:
        piece = await self.next_piece()
        if piece is None:
            raise StopAsyncIteration
        return piece.text

    async def next_piece(self) -> GeneratedPiece | None:
        """The next piece, or None after the summary. Raises JobError."""
        if self.summary is not None:
            return None
        frame = await self._frames.receive()
        reply = _read_reply(frame, self._peer_id)
        now = time.perf_counter()
        if isinstance(reply, ErrorReply):
            self._frames.ended = True
            raise reply.to_error()
        if isinstance(reply, GenerateSummary):
            self._frames.ended = True
            first = self._first if self._first is not None else now
            self.summary = replace(
                reply,
                ttft_ms=(first - self._started) * 1e3,
                total_ms=(now - self._started) * 1e3,
            )
            return None
        assert isinstance(reply, GeneratedPiece)
        if self._first is None:
            self._first = now
        self.tokens.extend(reply.tokens)
        self.pieces.append(reply.text)
        return reply

    async def text(self) -> str:
        """Read to the end; the whole generated text."""
        async for _ in self:
            pass
        assert self.summary is not None
        return self.summary.text


@asynccontextmanager
async def open_generation(
    pipes: GeneratePipes, peer_id: str, request: GenerateRequest, timeout: float
) -> AsyncIterator[GenerationStream]:
    """Send `request` to `peer_id`; yields its frames. Raises JobError."""
    started = time.perf_counter()
    async with open_frames(pipes, peer_id, request, timeout) as frames:
        yield GenerationStream(frames, started)
