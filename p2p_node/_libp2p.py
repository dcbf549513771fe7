"""Every change this project makes to py-libp2p's own code, in one place.

Written against py-libp2p 0.8.1 (`LIBP2P_VERSION`). Each patch says why it
exists, and checks, as it is applied, that what it replaces or relies on still
has the shape it was written for: a py-libp2p that renamed or reshaped one
raises `Libp2pChanged` when the first host is built, instead of running
unpatched or half patched. After an upgrade, read each patch against the new
code, then move `LIBP2P_VERSION`.

Nothing here is applied on import: `apply_to_process` (yamux, process wide,
idempotent) and the per-host patches are applied by `_host.new_libp2p_host`.
The pubsub subclasses check the methods they override when one is built.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import linecache
import logging
import socket
import struct
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any, Protocol
from weakref import WeakKeyDictionary

import multiaddr
import trio
from cryptography.exceptions import InvalidTag
from google.protobuf.message import DecodeError
from libp2p.abc import IHost, INetStream
from libp2p.io import msgio
from libp2p.io import trio as libp2p_trio_io
from libp2p.io import utils as libp2p_io_utils
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.stream.net_stream import NetStream
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise import io as noise_io
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamError, MuxedStreamReset
from libp2p.stream_muxer.yamux import yamux
from libp2p.transport.exceptions import SecurityUpgradeFailure
from libp2p.transport.upgrader import TransportUpgrader
from noise.backends.default.ciphers import CryptographyCipher
from noise.connection import NoiseConnection
from noise.constants import MAX_MESSAGE_LEN, MAX_NONCE
from noise.exceptions import NoiseInvalidMessage, NoiseMaxNonceError

from ._errors import leaves
from ._psk import PreSharedKey

logger = logging.getLogger(__name__)

LIBP2P_VERSION = "0.8.1"  # the py-libp2p every patch here was written against and read with

ADDRS_TTL_S = 5.0  # how long a host's addresses are reused (see cache_addrs)
TCP_RTO_MAX_MS = 44  # Linux 6.15+ (uapi/linux/tcp.h): a socket's cap on its retransmission timer
RTO_MAX_MS = 1000  # our cap (the least Linux takes; its own is 120 s), see bound_retransmission
MAX_WARNED_ADDRESSES = 4096  # refused addresses remembered, to warn once for each

PeerGate = Callable[[str], bool]  # peer id -> whether this host keeps a connection with it


# py-libp2p's own functions that a patch replaced, by name (tests put them back).
REPLACED: dict[str, Any] = {}


class Libp2pChanged(RuntimeError):
    """py-libp2p changed under a patch: something it replaces or relies on is gone or reshaped."""


def _expect(patch: str, holds: bool, what: str) -> None:
    if not holds:
        raise Libp2pChanged(
            f"patch {patch!r} no longer fits py-libp2p: {what}. It was written against "
            f"py-libp2p {LIBP2P_VERSION}, this is {version('libp2p')}; "
            "read the patch in p2p_node/_libp2p.py against the new code"
        )


def _shape(function: Any) -> str:
    """A function's parameters as written, without annotations: '(self, *, n=0)'."""
    signature = inspect.signature(function)
    bare = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=bare, return_annotation=inspect.Signature.empty))


def _expect_shape(patch: str, owner: object, name: str, shape: str, *, is_async: bool) -> None:
    function = getattr(owner, name, None)
    where = f"{getattr(owner, '__name__', type(owner).__name__)}.{name}"
    _expect(patch, callable(function), f"{where} is gone")
    _expect(patch, _shape(function) == shape, f"{where} is now {_shape(function)}, not {shape}")
    _expect(
        patch,
        inspect.iscoroutinefunction(function) == is_async,
        f"{where} is {'no longer' if is_async else 'now'} a coroutine function",
    )


def _expect_uses(patch: str, function: Any, *names: str) -> None:
    """`function`'s own code refers to every one of `names` (attributes or globals)."""
    code = getattr(inspect.unwrap(function), "__code__", None)
    used = set(code.co_names) if code is not None else set()
    missing = [n for n in names if n not in used]
    _expect(patch, not missing, f"{function.__qualname__} no longer uses {', '.join(missing)}")


# --- process wide: yamux --------------------------------------------------------------


def _yamux_frames_fit_one_noise_message() -> None:
    """py-libp2p cuts stream data into yamux frames of 64 KiB, header included, and a
    Noise message carries at most 65,519 bytes: every full frame went out as two
    Noise messages, the second of 29 bytes, each paying the whole per-message cost
    of both ends (bench: about a tenth of the CPU a client and a node spend moving
    a float32 batch). This only shapes what we send; any yamux peer takes frames
    of any size up to its window."""
    patch = "yamux frames fit one Noise message"
    size = getattr(yamux, "MAX_MESSAGE_SIZE", None)
    plaintext = getattr(noise_io, "MAX_PLAINTEXT_LENGTH", None)
    _expect(patch, isinstance(size, int), "yamux.MAX_MESSAGE_SIZE is gone")
    _expect(patch, isinstance(plaintext, int), "noise io.MAX_PLAINTEXT_LENGTH is gone")
    # YamuxStream.write reads the module global on each call, so setting it works.
    _expect_uses(patch, yamux.YamuxStream.write, "MAX_MESSAGE_SIZE")
    yamux.MAX_MESSAGE_SIZE = min(yamux.MAX_MESSAGE_SIZE, noise_io.MAX_PLAINTEXT_LENGTH)


async def _window_update_when_half_read(self: yamux.YamuxStream, *, bytes_read: int = 0) -> None:
    """Credit the sender only once half of the receive window has been read.

    py-libp2p's own policy sends a WINDOW_UPDATE after nearly every read, and a
    GossipSub RPC takes two or three reads (its varint length is read a byte at
    a time): a node sent five to ten updates, each a Noise message the peer
    must read, for every record it received. This is go-yamux's rule, which
    py-libp2p's docstring claims: a sender blocks only at an empty window, and
    by then everything it sent was read, which is at least half, so an update
    always comes.
    """
    delta = 0
    async with self.window_lock:
        self._pending_recv_release += max(0, bytes_read)
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        if _half_read(self, buffered):
            delta = self._grow_to_delta(buffered) + _grow_target(self, buffered)
            self._pending_recv_release = 0
    if delta > 0:
        await self.send_window_update(delta, skip_lock=True)


def _half_read(stream: yamux.YamuxStream, buffered: int) -> bool:
    """Whether `stream`'s reader has taken half its receive window since the last
    credit, with `buffered` bytes still unread."""
    unread = stream.recv_window + buffered
    return stream.target_recv_window - unread >= max(stream._grow_threshold(), 1)


AUTOTUNE_MIN_RTT_S = 0.005  # the round trip a window update is timed against, at least


def _grow_target(self: yamux.YamuxStream, buffered: int) -> int:
    """py-libp2p 0.8.1's `_apply_autotune_epoch` (go-yamux's rule: double the receive
    window when updates come within 4 round trips, up to 16 MiB), with the round
    trip taken as at least AUTOTUNE_MIN_RTT_S.

    py-libp2p times updates against the ping round trip, a fraction of a
    millisecond on loopback or a LAN, while an update's real round trip includes
    both ends' processing: a 256 KiB window never grew, and a 16 MiB request
    through one hop waited for 128 window updates in turn (bench.overhead: the
    request's write took 110 ms, both ends mostly idle). Returns the extra
    credit to send.
    """
    rtt = max(self._effective_rtt(), AUTOTUNE_MIN_RTT_S)
    now = trio.current_time()
    if self.epoch_start > 0 and now - self.epoch_start >= rtt * 4:
        self.epoch_start = now
        return 0
    extra = 0
    target = min(self.target_recv_window * 2, yamux.MAX_WINDOW_SIZE)
    if target > self.target_recv_window:
        self.target_recv_window = target
        grow = target - (self.recv_window + buffered)
        if grow > 0:
            self.recv_window += grow
            extra = grow
    self.epoch_start = now
    return extra


def _yamux_credits_once_half_read() -> None:
    patch = "yamux window update once half read"
    stream = yamux.YamuxStream
    if stream._auto_tune_and_send_window_update is _window_update_when_half_read:
        return
    _expect_shape(
        patch, stream, "_auto_tune_and_send_window_update", "(self, *, bytes_read=0)", is_async=True
    )
    _expect_uses(patch, stream.read, "_auto_tune_and_send_window_update")  # its one caller
    _expect_shape(patch, stream, "_grow_threshold", "(self)", is_async=False)
    _expect_shape(patch, stream, "_grow_to_delta", "(self, buffered)", is_async=False)
    _expect_shape(patch, stream, "_effective_rtt", "(self)", is_async=False)
    _expect(
        patch, isinstance(getattr(yamux, "MAX_WINDOW_SIZE", None), int), "MAX_WINDOW_SIZE is gone"
    )
    _expect_shape(
        patch, stream, "send_window_update", "(self, increment, skip_lock=False)", is_async=True
    )
    _expect_uses(
        patch,
        stream.__init__,
        "window_lock",
        "_pending_recv_release",
        "target_recv_window",
        "recv_window",
        "conn",
        "stream_id",
        "epoch_start",
    )
    _expect_uses(patch, yamux.Yamux.__init__, "stream_buffers")
    stream._auto_tune_and_send_window_update = _window_update_when_half_read  # type: ignore[method-assign]


WINDOW_WAIT_S = 5.0  # py-libp2p's own bound on waiting for send window
CLOSED_RECHECK_S = 0.05  # a writer waiting for window looks this often whether the stream closed


class _SendWindow:
    """`YamuxStream.send_window`, stored as before, that wakes the writer waiting for
    window as soon as it grows (every way it grows assigns it: `+=`)."""

    def __get__(self, stream: Any, owner: Any = None) -> Any:
        if stream is None:
            return self
        return stream.__dict__["_p2p_send_window"]

    def __set__(self, stream: Any, value: int) -> None:
        held = stream.__dict__
        grew = value > held.get("_p2p_send_window", 0)
        held["_p2p_send_window"] = value
        if grew and (waiting := held.pop("_p2p_window_grew", None)) is not None:
            waiting.set()


async def _until_window(stream: yamux.YamuxStream) -> None:
    """Until `stream` has send window again, or is closed; raises after WINDOW_WAIT_S."""
    with trio.move_on_after(WINDOW_WAIT_S):
        while True:
            async with stream.window_lock:
                if stream.send_window > 0 or stream.closed:
                    return
                grew = stream.__dict__.setdefault("_p2p_window_grew", trio.Event())
            with trio.move_on_after(CLOSED_RECHECK_S):
                await grew.wait()
    raise MuxedStreamError(f"Timed out waiting for window update after {WINDOW_WAIT_S:g} seconds.")


async def _write_woken_by_window(self: yamux.YamuxStream, data: bytes) -> None:
    """py-libp2p 0.8.1's `YamuxStream.write`, but a writer out of send window waits
    for the window update itself instead of polling every 10 ms (and writes no
    debug strings per frame).

    A 16 MiB request fills a 256 KiB window 64 times; the receiver credits it as
    it reads, but py-libp2p's writer only looked again after `trio.sleep(0.01)`:
    a bulk request spent most of its time asleep (bench.overhead: 16 MiB through
    one hop moved at 4% of raw TCP, the node's CPU mostly idle).
    """
    if self.send_closed:
        raise MuxedStreamError("Stream is closed for sending")
    total = len(data)
    view = memoryview(data)  # each frame's chunk is copied once, into the frame
    sent = 0
    while sent < total:
        frame: bytes | None = None
        while frame is None:
            async with _write_lock_of(self):
                if self.send_closed:
                    raise MuxedStreamError("Stream is closed for sending")
                async with self.window_lock:
                    if self.closed:
                        raise MuxedStreamError("Stream is closed")
                    if self.send_window > 0:
                        size = min(
                            self.send_window,
                            yamux.MAX_MESSAGE_SIZE - yamux.HEADER_SIZE,
                            total - sent,
                        )
                        self.send_window -= size
                        header = struct.pack(
                            yamux.YAMUX_HEADER_FORMAT, 0, yamux.TYPE_DATA, 0, self.stream_id, size
                        )
                        frame = header + view[sent : sent + size]
            if frame is None:
                await _until_window(self)
        await self.conn._write_frame(frame)
        sent += len(frame) - yamux.HEADER_SIZE


async def _write_frame_quietly(self: yamux.Yamux, data: bytes) -> None:
    """py-libp2p 0.8.1's `Yamux._write_frame` without its per-frame debug line, which
    unpacked the header and formatted a string for every frame whether or not
    debug logging was on (a few percent of a node's CPU at thousands of jobs a
    second), and without its checkpoint after the write: the socket write that
    sends it is one already (a scheduling round per frame)."""
    async with self._write_lock:
        await self.secured_conn.write(data)


def _yamux_writers_wait_for_window() -> None:
    patch = "yamux writers wake on window update"
    stream = yamux.YamuxStream
    if stream.write is _write_woken_by_window:
        return
    _expect_shape(patch, stream, "write", "(self, data)", is_async=True)
    _expect_uses(
        patch,
        stream.write,
        "send_closed",
        "rw_lock",
        "write_lock",
        "window_lock",
        "closed",
        "send_window",
        "MAX_MESSAGE_SIZE",
        "HEADER_SIZE",
        "YAMUX_HEADER_FORMAT",
        "TYPE_DATA",
        "stream_id",
        "_write_frame",
    )
    _expect_uses(patch, stream.__init__, "send_window", "window_lock", "rw_lock", "closed")
    for name, kind in (("HEADER_SIZE", int), ("TYPE_DATA", int), ("YAMUX_HEADER_FORMAT", str)):
        _expect(patch, isinstance(getattr(yamux, name, None), kind), f"yamux.{name} is gone")
    _expect(
        patch,
        isinstance(vars(stream).get("send_window", _SendWindow()), _SendWindow),
        "YamuxStream.send_window is a class attribute",
    )
    _expect_shape(patch, yamux.Yamux, "_write_frame", "(self, data)", is_async=True)
    _expect_uses(patch, yamux.Yamux._write_frame, "_write_lock", "secured_conn")
    _expect_uses(patch, yamux.Yamux.__init__, "_write_lock", "secured_conn")
    REPLACED["YamuxStream.write"] = stream.write
    stream.send_window = _SendWindow()  # type: ignore[assignment]
    stream.write = _write_woken_by_window  # type: ignore[method-assign]
    yamux.Yamux._write_frame = _write_frame_quietly  # type: ignore[method-assign]


# --- process wide: fewer scheduling rounds and copies per message -------------------------


class QuickLock:
    """A `trio.Lock` whose acquire yields only when it must wait.

    `async with trio.Lock()` is a checkpoint even when the lock is free: the task
    goes to the back of the run queue for a whole scheduling round (an epoll
    call and a pass over every runnable task). py-libp2p takes four to six such
    locks for every message it writes or reads (the TCP stream's read and write
    locks, yamux's connection write lock, a stream's window and write locks),
    which made a small message cost about a dozen rounds: two hosts in one
    process passed a 600-byte message back and forth in ~500 us. These locks
    guard only the ordering of writes and bookkeeping; none relies on the
    checkpoint, and every path through them reaches a socket call, which is one.
    Contended, it waits (fairly) as trio.Lock does.

    Nor does it keep trio.Lock's bookkeeping of which task holds it (a parking-lot
    "breaker" registered and dropped on every acquire and release, about 5% of
    the CPU of a ping-pong between two hosts): a free lock is a flag. Release
    hands the lock straight to the first waiter, as trio.Lock does, so a woken
    waiter owns it and one that is cancelled while waiting never does.
    """

    __slots__ = ("_held", "_waiting")

    def __init__(self) -> None:
        self._held = False
        self._waiting = trio.lowlevel.ParkingLot()

    async def acquire(self) -> None:
        if not self._held:
            self._held = True
            return
        await self._waiting.park()  # woken by release, which hands the lock over

    def acquire_nowait(self) -> None:
        if self._held:
            raise trio.WouldBlock
        self._held = True

    def release(self) -> None:
        if not self._held:
            raise RuntimeError("release of a QuickLock that is not held")
        if self._waiting:  # the first waiter, woken, holds it now
            self._waiting.unpark()
        else:
            self._held = False

    def locked(self) -> bool:
        return self._held

    def statistics(self) -> Any:
        return self._waiting.statistics()

    async def __aenter__(self) -> None:
        if not self._held:
            self._held = True
            return
        await self._waiting.park()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()


def _write_lock_of(stream: yamux.YamuxStream) -> QuickLock:
    """The lock a stream's frames are written under (it replaces py-libp2p's
    `rw_lock`, which only its `write`, replaced here, takes: for writing)."""
    lock: QuickLock | None = stream.__dict__.get("_p2p_write_lock")
    if lock is None:
        lock = stream.__dict__["_p2p_write_lock"] = QuickLock()
    return lock


# Locks swapped for QuickLocks as each object is built: (class, attributes).
_QUICK_LOCKS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (yamux.Yamux, ("_write_lock", "streams_lock")),
    (yamux.YamuxStream, ("window_lock",)),
    (libp2p_trio_io.TrioTCPStream, ("read_lock", "write_lock")),
    # A stream's state, checked on every read and write: a round each (with
    # QuickLock's release not calling unpark when none waits, ping-pong went
    # from 172 to 223 us of CPU a round trip to 138 to 143). No await within it.
    (NetStream, ("_state_lock",)),
)


def _quick_locks() -> None:
    patch = "locks that do not yield when free"
    for owner, names in _QUICK_LOCKS:
        init = vars(owner)["__init__"]
        if getattr(init, "_p2p_quick", False):
            continue
        _expect_uses(patch, init, *names)

        def quick_init(
            self: Any, *args: Any, __init: Any = init, __names: Any = names, **kwargs: Any
        ) -> None:
            __init(self, *args, **kwargs)
            for name in __names:
                if isinstance(getattr(self, name, None), trio.Lock):
                    setattr(self, name, QuickLock())

        quick_init._p2p_quick = True  # type: ignore[attr-defined]
        quick_init.__wrapped__ = init  # type: ignore[attr-defined]
        REPLACED[f"{owner.__name__}.__init__"] = init
        owner.__init__ = quick_init  # type: ignore[misc]


RECEIVE_BYTES = 64 * 1024  # what one socket read asks for, for Noise messages
_NOISE_LENGTH = noise_io.SIZE_NOISE_MESSAGE_LEN


class _Inbox:
    """Bytes read from a connection but not yet decrypted: whole Noise messages,
    and the start of the next; and how to read more (`_receive`)."""

    __slots__ = ("data", "drained", "opener", "sock", "start", "unyielded")

    def __init__(self, conn: Any, opener: _Opener) -> None:
        self.data = bytearray()
        self.opener = opener
        self.start = 0  # where the first message not yet taken begins
        self.sock = _tcp_socket_of(conn)  # None: read through `conn` as py-libp2p does
        self.drained = True  # the last read took less than it asked: the kernel had no more
        self.unyielded = 0  # reads in a row that found data at once


_CLOSED_ERRNOS = {errno.EBADF, errno.ENOTSOCK}  # as trio's SocketStream: closed here, not broken
DIRECT_READS_PER_YIELD = 16  # reads that find data at once before one scheduling round


def _tcp_socket_of(conn: Any) -> Any:
    """The trio socket under a plain TCP libp2p connection, else None."""
    if type(conn) is not RawConnection or type(conn.stream) is not libp2p_trio_io.TrioTCPStream:
        return None
    stream = conn.stream.stream
    if not isinstance(stream, trio.SocketStream):
        return None
    sock = stream.socket
    return sock if isinstance(getattr(sock, "_sock", None), socket.socket) else None


async def _receive(inbox: _Inbox, conn: Any, size: int) -> bytes:
    """Up to `size` bytes from the connection: what py-libp2p's `RawConnection.read`
    -> `TrioTCPStream.read` -> trio's `receive_some` returns, with its errors.

    trio's receive_some first tries the socket, and when that finds nothing
    (always, for a message that answers ours) waits for it to be readable and
    tries again; when it does find data it spends a scheduling round after.
    Here, after a read that emptied the kernel's buffer, the next one waits
    first: one recv a message, not two, and no extra round (bench.transport's
    ping-pong: 107 to 131 us of CPU a round trip, 126 to 137 before). After a
    read that filled `size`, the next tries at once, taking a scheduling round
    only every DIRECT_READS_PER_YIELD reads so that a fast sender cannot hold
    the loop.
    """
    sock = inbox.sock
    if sock is None:
        piece: bytes = await conn.read(size)
        return piece
    try:
        if inbox.drained or inbox.unyielded >= DIRECT_READS_PER_YIELD:
            inbox.unyielded = 0
            if inbox.drained:
                await trio.lowlevel.wait_readable(sock)
            else:
                await trio.lowlevel.checkpoint()
        while True:
            try:
                piece = sock._sock.recv(size)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
    except trio.ClosedResourceError:  # closed here while waiting
        return b""
    except OSError as error:
        if error.errno in _CLOSED_ERRNOS:
            return b""
        raise ConnectionClosedError(
            f"TCP connection reset by remote peer: {error}", transport="tcp"
        ) from error
    inbox.drained = len(piece) < size
    inbox.unyielded += 1
    return piece


async def _read_noise_message(
    self: noise_io.NoiseTransportReadWriter, prefix_encoded: bool = False
) -> bytes:
    """py-libp2p 0.8.1's `NoiseTransportReadWriter.read_msg`, reading the connection
    in large pieces instead of exactly each message's 2-byte length, then its body.

    Two socket reads per message (each a scheduling round, and more for a body
    the kernel hands over in parts), through `read_exactly`'s buffer copies,
    were most of what a message cost to receive; a 16 MiB request came as 256
    messages and 512 reads. Now one read takes whatever has arrived, up to
    RECEIVE_BYTES, and the messages in it are decrypted in turn without another.
    Only the transport phase reads ahead: after the handshake, nothing else
    reads this connection.
    """
    conn = self.read_writer.read_write_closer
    inbox: _Inbox | None = self.__dict__.get("_p2p_inbox")
    if inbox is None:  # the first read: the handshake is done
        inbox = self.__dict__["_p2p_inbox"] = _Inbox(conn, _Opener.of(self))
    data = inbox.data
    while True:
        start = inbox.start
        held = len(data) - start
        if held >= _NOISE_LENGTH:
            size = int.from_bytes(data[start : start + _NOISE_LENGTH], "big")
            end = start + _NOISE_LENGTH + size
            if len(data) >= end:
                in_place = inbox.opener.in_place and not prefix_encoded
                with memoryview(data) as view:
                    if in_place:  # opened where it lies (None: it failed authentication)
                        plain = inbox.opener.open(view[start + _NOISE_LENGTH : end])
                    else:  # one copy of the message, not two
                        message = bytes(view[start + _NOISE_LENGTH : end])
                if end == len(data):
                    data.clear()
                    inbox.start = 0
                else:
                    inbox.start = end
                if in_place:
                    if plain is None:
                        raise NoiseInvalidMessage("Failed authentication of message")
                    return plain
                if prefix_encoded:
                    message = message[len(self.prefix) :]
                return self.decrypt(message)
            wanted = end - len(data)
        else:
            wanted = _NOISE_LENGTH - held
        if start:  # keep only the unread part before reading more
            del data[:start]
            inbox.start = 0
        piece = await _receive(inbox, conn, max(wanted, RECEIVE_BYTES))
        if not piece:
            got = len(data)
            raise IncompleteReadError(
                f"connection closed with {got} bytes of a Noise message read",
                expected_bytes=got + wanted,
                received_bytes=got,
            )
        data += piece


async def _read_session(self: SecureSession, n: int | None = None) -> bytes:
    """py-libp2p 0.8.1's `SecureSession.read`: the next `n` bytes of plaintext (or
    what remains of the last message, or the next message, when `n` is None),
    without its BytesIO buffer. It copied each message in and out again, and
    returned exact reads through two more copies: a yamux frame's header and
    body, read separately, cost four copies of each 64 KiB message. Here the
    last message is kept as it is with how far it was read (`_p2p_at`), and a
    read that takes all of it takes the object itself."""
    if n == 0:
        return b""
    held = self.__dict__
    rest: bytes = held.get("_p2p_rest", b"")
    at: int = held.get("_p2p_at", 0)
    if at >= len(rest):
        rest, at = await self.conn.read_msg(), 0
        if not rest:
            raise ConnectionClosedError("Connection closed")
    left = len(rest) - at
    if n is None or n == left:
        held["_p2p_rest"], held["_p2p_at"] = b"", 0
        return rest[at:] if at else rest
    if n < left:
        held["_p2p_rest"], held["_p2p_at"] = rest, at + n
        return rest[at : at + n]
    parts = [rest[at:]]
    got = left
    held["_p2p_rest"], held["_p2p_at"] = b"", 0
    while got < n:
        message = await self.conn.read_msg()
        if not message:
            return b"".join(parts)  # closed part way: what arrived, as before
        if got + len(message) > n:
            held["_p2p_rest"], held["_p2p_at"] = message, n - got
            message = message[: n - got]
        parts.append(message)
        got += len(message)
    return b"".join(parts)


def _held_by(session: Any, n: int) -> memoryview | bytes | None:
    """The next `n` bytes of plaintext if `session` (a SecureSession read by
    `_read_session`) holds them already, taken; else None and nothing taken.
    Yamux's reader takes a frame's header and body this way, with no await, no
    timeout scope and no copy: py-libp2p reads a DATA body under `fail_after`,
    a cancel scope and a context manager per frame (8% of a ping-pong's CPU),
    when with frames fitting one Noise message (`_yamux_frames_fit_one_noise_message`)
    the body came in the message that held its header."""
    held = session.__dict__
    rest: bytes = held.get("_p2p_rest", b"")
    at: int = held.get("_p2p_at", 0)
    end = at + n
    if end > len(rest):
        return None
    if end == len(rest):
        held["_p2p_rest"], held["_p2p_at"] = b"", 0
    else:
        held["_p2p_at"] = end
    if n <= _SMALL_BODY:
        return rest[at:end]
    return memoryview(rest)[at:end]


_SMALL_BODY = 4096  # a body up to this is taken as bytes; above, as a view (no copy)


async def _read_exactly(reader: Any, n: int, retry_count: int = 100) -> bytes:
    """py-libp2p 0.8.1's `read_exactly`, which copied every read twice (into a
    bytearray, then out as bytes) even when the first read returned all `n`.
    After a short first read, the original goes on (its loop and its errors)."""
    data: bytes = await reader.read(n)
    if len(data) == n:
        return data
    rest: bytes = await REPLACED["read_exactly"](_Replay(reader, data), n, retry_count)
    return rest


class _Replay:
    """`reader`, whose next read returns `first` (bytes already read from it)."""

    def __init__(self, reader: Any, first: bytes) -> None:
        self._reader = reader
        self._first: bytes | None = first

    async def read(self, n: int | None = None) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        data: bytes = await self._reader.read(n)
        return data

    def __getattr__(self, name: str) -> Any:  # conn_state, for the error message
        return getattr(self._reader, name)


def _noise_reads_in_bulk() -> None:
    patch = "Noise and secure-session reads in bulk"
    reader = noise_io.NoiseTransportReadWriter
    if reader.read_msg is _read_noise_message:
        return
    _expect_shape(patch, reader, "read_msg", "(self, prefix_encoded=False)", is_async=True)
    _expect_uses(patch, noise_io.BaseNoiseMsgReadWriter.__init__, "read_writer")
    _expect(
        patch,
        _NOISE_LENGTH == 2 == noise_io.NoisePacketReadWriter.size_len_bytes
        and noise_io.BYTE_ORDER == "big",
        "Noise messages no longer have a 2-byte big-endian length",
    )
    _expect_uses(patch, noise_io.BaseNoiseMsgReadWriter.read_msg, "read_writer", "decrypt")
    # What `_receive` does in their place, over plain TCP:
    _expect_uses(patch, RawConnection.read, "stream", "read")
    _expect_uses(
        patch,
        libp2p_trio_io.TrioTCPStream.read,
        "receive_some",
        "BrokenResourceError",
        "ClosedResourceError",
    )
    _expect_uses(patch, libp2p_trio_io.TrioTCPStream.__init__, "stream")
    _expect_shape(patch, SecureSession, "read", "(self, n=None)", is_async=True)
    _expect_uses(patch, SecureSession.read, "conn", "read_msg", "_drain")
    _expect_shape(patch, SecureSession, "_drain", "(self, n)", is_async=False)
    _expect_shape(
        patch, libp2p_io_utils, "read_exactly", "(reader, n, retry_count=100)", is_async=True
    )
    _expect(
        patch,
        vars(yamux).get("read_exactly") is libp2p_io_utils.read_exactly,
        "yamux has its own read_exactly",
    )
    REPLACED["NoiseTransportReadWriter.read_msg"] = reader.read_msg
    REPLACED["SecureSession.read"] = SecureSession.read
    REPLACED["read_exactly"] = libp2p_io_utils.read_exactly
    reader.read_msg = _read_noise_message  # type: ignore[method-assign,assignment]
    SecureSession.read = _read_session  # type: ignore[method-assign]
    vars(yamux)["read_exactly"] = _read_exactly


async def _write_noise_message(
    self: noise_io.NoiseTransportReadWriter, msg: bytes, prefix_encoded: bool = False
) -> None:
    """py-libp2p 0.8.1's `write_msg` for a message that fits one Noise message:
    sealed, its 2-byte length put before it, and written, without the three
    calls of its msgio layer between. Longer ones, and the handshake's prefixed
    ones, go through py-libp2p's own."""
    if prefix_encoded or len(msg) > noise_io.MAX_PLAINTEXT_LENGTH:
        await REPLACED["NoiseTransportReadWriter.write_msg"](self, msg, prefix_encoded)
        return
    # A cancellation is taken before the message is sealed, never after: sealing
    # spends a nonce, and a sealed message not sent breaks the connection for every
    # stream on it (the peer's next decryption fails). The TCP write checked for
    # cancellation again, after sealing: under load a caller's deadline fell in
    # between (test_rpc's calls cut short by their deadline, 1 failure in a suite).
    await trio.lowlevel.checkpoint_if_cancelled()
    sealer: _Sealer | None = self.__dict__.get("_p2p_sealer")
    if sealer is None:
        sealer = self.__dict__["_p2p_sealer"] = _Sealer.of(self)
    frame = sealer.seal(msg)
    tcp = self.read_writer.read_write_closer
    if isinstance(tcp, libp2p_trio_io.TrioTCPStream):
        await _tcp_send(tcp, frame, sealed=True)
    else:  # another transport may keep what it is given: not the sealer's buffer
        await tcp.write(bytes(frame))


class _InPlace:
    """One direction of a connection's Noise cipher, used without the noise library's
    calls where its cipher is cryptography's and can seal in place (`state`: the
    noise library's cipher state, whose nonce count is kept; None: it cannot)."""

    __slots__ = ("_aead", "_nonce", "_state", "in_place")

    def __init__(self, state: Any = None) -> None:
        self.in_place = state is not None
        self._state = state
        if state is not None:
            self._aead = state.cipher.cipher
            self._nonce = state.cipher.format_nonce


class _Sealer(_InPlace):
    """Seals a connection's outgoing Noise messages behind their 2-byte length.

    py-libp2p's path (`encrypt`, through the noise library's connection, cipher
    state and cipher) gives a fresh ciphertext, which the length is then put
    before in another fresh copy. Where the cipher can seal in place
    (cryptography's `encrypt_into`), a message is sealed straight into the
    connection's own buffer, behind its length: about 6 us less per 64 KiB
    message here (40 against 46), with the noise library's calls. The buffer is
    used again for the next message: the connection's writes are one at a time
    (yamux's write lock, held from sealing until the socket took the message).
    The nonce is counted as the noise library counts it, in its cipher state.
    """

    __slots__ = ("_view", "_writer")

    def __init__(self, writer: noise_io.NoiseTransportReadWriter, state: Any = None) -> None:
        super().__init__(state)  # None: sealed by py-libp2p's own encrypt
        self._writer = writer
        # Grown to the largest message sent so far (a 64 KiB Noise message at most):
        # most of a swarm's connections only ever carry small ones.
        self._view = memoryview(bytearray(_SEAL_FIRST_BYTES if state is not None else 0))

    @classmethod
    def of(cls, writer: noise_io.NoiseTransportReadWriter) -> _Sealer:
        """A sealer for `writer`'s connection, in place where its cipher can."""
        return cls(writer, _cipher_state(writer, "cipher_state_encrypt"))

    def seal(self, msg: bytes) -> bytes | memoryview:
        """`msg` sealed behind its length; a view of the buffer until the next seal."""
        state = self._state
        if state is None or state.n >= MAX_NONCE:  # (py-libp2p's raises at the last)
            sealed = self._writer.encrypt(msg)
            return len(sealed).to_bytes(_NOISE_LENGTH, "big") + sealed
        size = len(msg) + _NOISE_TAG
        if _NOISE_LENGTH + size > len(self._view):
            grown = min(max(2 * len(self._view), _NOISE_LENGTH + size), _SEAL_MAX_BYTES)
            self._view = memoryview(bytearray(grown))
        frame = self._view[: _NOISE_LENGTH + size]
        frame[:_NOISE_LENGTH] = size.to_bytes(_NOISE_LENGTH, "big")
        self._aead.encrypt_into(self._nonce(state.n), msg, None, frame[_NOISE_LENGTH:])
        state.n += 1
        return frame


class _Opener(_InPlace):
    """Opens a connection's incoming Noise messages where they lie in its buffer.

    py-libp2p's path copies each message out of the buffer, then opens the copy
    through the noise library's connection, cipher state and cipher. Where the
    cipher is cryptography's (which opens any buffer), a message is opened as a
    view of the buffer, with the nonce counted in the noise library's cipher
    state as it counts it, and a message that fails authentication read past,
    then refused with the noise library's error for it.
    """

    __slots__ = ()

    @classmethod
    def of(cls, reader: noise_io.NoiseTransportReadWriter) -> _Opener:
        """An opener for `reader`'s connection, in place where its cipher can."""
        return cls(_cipher_state(reader, "cipher_state_decrypt"))

    def open(self, sealed: memoryview) -> bytes | None:
        """The message `sealed`, or None if it fails authentication (its nonce is
        then not spent, as the noise library has it)."""
        state = self._state
        if state.n >= MAX_NONCE:
            raise NoiseMaxNonceError("Nonce has depleted!")
        try:
            plain: bytes = self._aead.decrypt(self._nonce(state.n), sealed, None)
        except InvalidTag:
            return None
        state.n += 1
        return plain


def _cipher_state(writer: noise_io.NoiseTransportReadWriter, which: str) -> Any:
    """The noise library's cipher state `which` of a connection whose handshake is done,
    if its cipher is cryptography's and can seal in place; else None."""
    noise = getattr(writer, "noise_state", None)
    state = getattr(getattr(noise, "noise_protocol", None), which, None)
    cipher = getattr(state, "cipher", None)
    if (
        isinstance(noise, NoiseConnection)
        and noise.handshake_finished
        and isinstance(cipher, CryptographyCipher)
        and state is not None
        and state.has_key()
        and isinstance(state.n, int)
        and callable(getattr(cipher.cipher, "encrypt_into", None))
    ):
        return state
    return None


_NOISE_TAG = 16  # ChaCha20-Poly1305's and AES-GCM's tag
_SEAL_FIRST_BYTES = 4096  # a sealer's buffer to begin with
_SEAL_MAX_BYTES = _NOISE_LENGTH + MAX_MESSAGE_LEN  # and at most (a Noise message, tag included)


# Whole writes (the socket took all of it at once) before one takes a scheduling
# round, counted across the process: see `_tcp_write`.
DIRECT_WRITES_PER_YIELD = 16
_unyielded_writes = 0


async def _tcp_write(self: libp2p_trio_io.TrioTCPStream, data: bytes) -> None:
    await _tcp_send(self, data, sealed=False)


async def _tcp_send(
    self: libp2p_trio_io.TrioTCPStream, data: bytes | memoryview, *, sealed: bool
) -> None:
    """py-libp2p 0.8.1's `TrioTCPStream.write`, sending straight on the socket.

    trio's `send_all` wraps each send in a conflict detector, two context
    managers that translate errors, memoryviews and a helper that tries the
    send and falls back to waiting (with `_write_noise_message`, bench.transport's
    ping-pong took 95 to 99 us of CPU a round trip, 107 to 131 before). Here
    the send is tried once, after trio's first checkpoint (a cancellation is
    raised before anything is sent), and whatever it did not take goes through
    trio's `send_all` as before. A send the socket took whole spends no
    scheduling round after it, but one in DIRECT_WRITES_PER_YIELD does (so a
    task that writes in a loop still lets the others run): that round was one
    of the four a forwarded job cost the executor per job, and two of its entry
    node's eight (a round is a pass of trio's loop and an epoll call). Errors
    read as py-libp2p's: a socket closed here is a silent no-op, a broken one
    is a ConnectionClosedError.

    `sealed` data (a Noise message, its nonce spent) is not cancelled before its
    first byte is sent, nor while it waits for the lock: see `_write_noise_message`.
    """
    stream = self.stream
    sock = stream.socket if isinstance(stream, trio.SocketStream) else None
    raw = getattr(sock, "_sock", None)
    if not isinstance(raw, socket.socket) or not data or sock.did_shutdown_SHUT_WR:
        await REPLACED["TrioTCPStream.write"](self, data)
        return
    try:
        self.write_lock.acquire_nowait()  # free: no cancel scope on the way
    except trio.WouldBlock:
        with trio.CancelScope(shield=sealed):
            await self.write_lock.acquire()
    try:
        if not sealed:
            await trio.lowlevel.checkpoint_if_cancelled()
        try:
            try:
                sent = raw.send(data)
            except BlockingIOError:
                sent = 0
        except OSError as error:
            if error.errno in _CLOSED_ERRNOS:
                return
            raise ConnectionClosedError(
                f"TCP connection reset by remote peer: {error}", transport="tcp"
            ) from error
        if sent == len(data):
            global _unyielded_writes
            _unyielded_writes += 1
            if _unyielded_writes >= DIRECT_WRITES_PER_YIELD:
                _unyielded_writes = 0
                await trio.lowlevel.cancel_shielded_checkpoint()
            return
        try:
            await stream.send_all(memoryview(data)[sent:])
        except trio.BrokenResourceError as error:
            raise ConnectionClosedError(
                f"TCP connection reset by remote peer: {error}", transport="tcp"
            ) from error
        except trio.ClosedResourceError:
            return
    finally:
        self.write_lock.release()


def _direct_writes() -> None:
    patch = "Noise and TCP writes direct"
    writer, tcp = noise_io.NoiseTransportReadWriter, libp2p_trio_io.TrioTCPStream
    if tcp.write is _tcp_write:
        return
    _expect_shape(patch, writer, "write_msg", "(self, msg, prefix_encoded=False)", is_async=True)
    _expect_uses(patch, writer.write_msg, "encrypt", "read_writer", "write_msg", "prefix")
    _expect_uses(patch, msgio.BaseMsgReadWriter.write_msg, "encode_msg", "read_write_closer")
    _expect_uses(patch, msgio.FixedSizeLenMsgReadWriter.encode_msg, "encode_msg_with_length")
    _expect(
        patch,
        isinstance(getattr(noise_io, "MAX_PLAINTEXT_LENGTH", None), int),
        "noise io.MAX_PLAINTEXT_LENGTH is gone",
    )
    _expect_shape(patch, tcp, "write", "(self, data)", is_async=True)
    _expect_uses(
        patch, tcp.write, "write_lock", "send_all", "BrokenResourceError", "ClosedResourceError"
    )
    _expect_uses(patch, tcp.__init__, "stream", "write_lock")
    REPLACED["NoiseTransportReadWriter.write_msg"] = writer.write_msg
    REPLACED["TrioTCPStream.write"] = tcp.write
    writer.write_msg = _write_noise_message  # type: ignore[method-assign,assignment]
    tcp.write = _tcp_write  # type: ignore[method-assign]


_TUNING: dict[tuple[str, str], str] = {}  # PY_YAMUX_* settings read, by (name, default)


def _yamux_setting(name: str, default: str = "") -> str:
    """py-libp2p 0.8.1's `_py_yamux_env`, reading each PY_YAMUX_* variable once.

    yamux reads its tuning variables from the environment on every frame it
    takes or sends (the DATA body timeout, the window rules): about three
    environment lookups a message. They are the perf harness's knobs, set before
    a process starts; here they are read the first time they are asked for.
    """
    key = (name, default)
    value = _TUNING.get(key)
    if value is None:
        value = _TUNING[key] = REPLACED["_py_yamux_env"](name, default)
    return value


def _yamux_settings_read_once() -> None:
    patch = "yamux settings read once"
    if vars(yamux).get("_py_yamux_env") is _yamux_setting:
        return
    _expect_shape(patch, yamux, "_py_yamux_env", "(name, default='')", is_async=False)
    _expect_uses(patch, yamux._yamux_data_read_timeout, "_py_yamux_env")
    REPLACED["_py_yamux_env"] = vars(yamux)["_py_yamux_env"]
    vars(yamux)["_py_yamux_env"] = _yamux_setting


# --- process wide: yamux's reader -------------------------------------------------------

_YAMUX_HEADER = struct.Struct(yamux.YAMUX_HEADER_FORMAT)
# sha256 of py-libp2p 0.8.1's `Yamux.handle_incoming` source, which `_handle_incoming`
# copies branch for branch: any change to it must be read into the copy.
_HANDLE_INCOMING_SHA256 = "ad15ff6943feac206c7abfbf77f2142a64bb5edbe9085e3ccdda371736abdc7b"


def _buffer(self: yamux.Yamux, stream: yamux.YamuxStream, data: Any, *, taps: bool = True) -> int:
    """`data` arrived for `stream` (its lock held): taken from its receive window (a
    peer that overran it is logged and the window floored at 0, as py-libp2p
    does), then given to the stream's tap, if it has one and nothing is buffered
    before it (see `tap`); what the tap leaves is buffered and its reader woken.
    Returns how many bytes the tap took, which count as read."""
    stream_id = stream.stream_id
    stream.recv_window -= len(data)
    if stream.recv_window < 0:
        logger.warning(
            "Stream %d: peer exceeded receive window by %d bytes", stream_id, -stream.recv_window
        )
        stream.recv_window = 0
    buffer = self.stream_buffers[stream_id]
    taken = 0
    consumer = _TAPS.get(stream) if taps else None
    if consumer is not None and consumer.waiting and not buffer and not stream.reset_received:
        left = consumer.on_data(data)
        if left is None:
            return len(data)
        taken = len(data) - len(left)
        data = left
    buffer.extend(data)
    self.stream_events[stream_id].set()
    return taken


class Tap(Protocol):
    """A consumer of a stream's data as it arrives (see `tap`)."""

    # Set by `_read_stream` while the consumer's read waits with nothing buffered:
    # data is given to `on_data` only then.
    waiting: bool

    def on_data(self, data: bytes) -> bytes | None:
        """Take `data`; return None, or the bytes from the first one not taken."""
        ...


# The streams whose data goes straight to a consumer as it arrives (see `tap`).
_TAPS: WeakKeyDictionary[yamux.YamuxStream, Tap] = WeakKeyDictionary()


def tap(stream: Any, consumer: Tap) -> bool:
    """Have `consumer.on_data(data)` take the data that arrives on `stream` (a
    NetStream over our yamux) while the consumer waits for its next read of it,
    in the connection's reader task, as it arrives. False if the stream is not
    one (it is read as usual then).

    `on_data` runs synchronously, with the connection's stream lock held: it
    must not block. It returns None when it took all of `data`, or the bytes
    from the first one it did not take: those are buffered for the consumer's
    read as before. It is given data only while the consumer's read waits with
    nothing buffered (`waiting`), so the stream's bytes reach the consumer in
    order either way. The
    bytes it takes count as read for the stream's receive window. End of
    stream and reset still reach the consumer's read.

    A stream's reader wakes in the scheduling round after its data arrives; a
    consumer that takes a message at once saves that round, a pass of trio's
    loop for every message.
    """
    muxed = getattr(stream, "muxed_stream", None)
    ours = yamux.Yamux.handle_incoming is _handle_incoming  # patched: it calls _buffer
    if not (ours and isinstance(muxed, yamux.YamuxStream)):
        return False
    _TAPS[muxed] = consumer
    return True


def untap(stream: Any) -> None:
    muxed = getattr(stream, "muxed_stream", None)
    if isinstance(muxed, yamux.YamuxStream):
        _TAPS.pop(muxed, None)


async def _credit_taken(stream: yamux.YamuxStream, taken: int) -> None:
    """Bytes a tap took count as read: credit the sender as a read of them would
    (checked here first, so that most messages skip the call and its lock)."""
    if _half_read(stream, len(stream.conn.stream_buffers.get(stream.stream_id, b""))):
        await stream._auto_tune_and_send_window_update(bytes_read=taken)


async def _handle_incoming(self: yamux.Yamux) -> None:
    """py-libp2p 0.8.1's `Yamux.handle_incoming`, frame for frame the same, less
    what it spent per frame on nothing: about a dozen f-string debug lines built
    whether or not debug logging is on, a dict and a list of flag names, and a
    `fail_after` scope around every DATA body (with the environment lookup of
    its bound). A header or body that the secure session already holds is
    taken from it at once (`_held_by`): with our frames fitting one Noise
    message, that is every body. One that must be waited for is read as
    before, under the same timeout. With `_read_stream` and QuickLock's lighter
    release, bench.transport's 600 B ping-pong (two hosts, one process) took
    137 to 172 us of CPU a round trip against 219 to 233.
    """
    session = self.secured_conn
    fast = isinstance(session, SecureSession) and type(session).read is _read_session
    data_type, window_type = yamux.TYPE_DATA, yamux.TYPE_WINDOW_UPDATE
    syn, ack, fin, rst = yamux.FLAG_SYN, yamux.FLAG_ACK, yamux.FLAG_FIN, yamux.FLAG_RST
    header_size = yamux.HEADER_SIZE
    unpack = _YAMUX_HEADER.unpack
    pack = _YAMUX_HEADER.pack

    async def body_of(length: int) -> Any:
        body = _held_by(session, length) if fast else None
        if body is None:
            body = await self._read_data_body(length)
        return body

    async def optional_body(
        typ: int, length: int, flag: str, stream_id: int
    ) -> tuple[Any, IncompleteReadError | None]:
        """A SYN's or ACK's DATA body, if any, and the error that cut it short."""
        if typ != data_type or length <= 0:
            return b"", None
        try:
            return await body_of(length), None
        except IncompleteReadError as e:
            logger.error("Incomplete read for %s data on stream %d: %s", flag, stream_id, e)
            return b"", e

    while not self.event_shutting_down.is_set():
        try:
            try:
                header = _held_by(session, header_size) if fast else None
                if header is None:
                    header = await vars(yamux)["read_exactly"](session, header_size)
            except IncompleteReadError as e:
                if e.is_clean_close:
                    logger.info("Yamux connection closed cleanly by peer %s", self.peer_id)
                else:
                    transport_type = "unknown"
                    try:
                        state = getattr(session, "conn_state", None)
                        if callable(state):
                            described = state()
                            if isinstance(described, dict):
                                transport_type = described.get("transport", "unknown")
                    except Exception:
                        pass
                    logger.warning(
                        "Yamux connection closed unexpectedly for peer %s: %s. Transport: %s.",
                        self.peer_id,
                        e,
                        transport_type,
                    )
                self.event_shutting_down.set()
                await self._cleanup_on_error()
                break
            except Exception as e:
                logger.debug("Error reading header for peer %s: %s", self.peer_id, e)
                self.event_shutting_down.set()
                await self._cleanup_on_error()
                break
            if len(header) != header_size:
                self.event_shutting_down.set()
                await self._cleanup_on_error()
                break
            _version, typ, flags, stream_id, length = unpack(header)
            if typ == data_type and length > yamux.MAX_WINDOW_SIZE:
                logger.warning(
                    "Yamux: peer %s announced oversized DATA frame length=%d "
                    "(> MAX_WINDOW_SIZE=%d) on stream %d closing connection",
                    self.peer_id,
                    length,
                    yamux.MAX_WINDOW_SIZE,
                    stream_id,
                )
                self.event_shutting_down.set()
                await self._cleanup_on_error()
                break
            if typ == data_type and not flags & (syn | ack):  # the common case, first
                try:
                    try:
                        data = await body_of(length) if length > 0 else b""
                    except IncompleteReadError as e:
                        logger.error("Incomplete read for data on stream %d: %s", stream_id, e)
                        async with self.streams_lock:
                            if stream_id in self.streams:
                                stream = self.streams[stream_id]
                                stream.recv_closed = True
                                stream.closed = True
                                if stream_id in self.stream_events:
                                    self.stream_events[stream_id].set()
                        continue
                    taken = 0
                    async with self.streams_lock:
                        stream = self.streams.get(stream_id)  # type: ignore[assignment]
                        if stream is not None:
                            taken = _buffer(self, stream, data)
                            if flags & fin:
                                stream.recv_closed = True
                                if stream.send_closed:
                                    stream.closed = True
                                self.stream_events[stream_id].set()  # even if tapped
                            if flags & rst:
                                stream.closed = True
                                stream.reset_received = True
                                self.stream_events[stream_id].set()
                            if stream.closed:
                                self._finalize_stream_locked(stream, fully_closed=True)
                    if taken:
                        await _credit_taken(stream, taken)
                except trio.TooSlowError:
                    raise
                except Exception as e:
                    logger.error("Error reading data for stream %d: %s", stream_id, e)
                    async with self.streams_lock:
                        if stream_id in self.streams:
                            self.streams[stream_id].recv_closed = True
                            if self.streams[stream_id].send_closed:
                                self.streams[stream_id].closed = True
                            self.stream_events[stream_id].set()
            elif typ in (data_type, window_type) and flags & syn:
                syn_payload, syn_payload_err = await optional_body(typ, length, "SYN", stream_id)
                rst_header: bytes | None = None
                ack_header: bytes | None = None
                new_stream_notify: yamux.YamuxStream | None = None
                async with self.streams_lock:
                    if stream_id not in self.streams:
                        stream = yamux.YamuxStream(stream_id, self, False)
                        self.streams[stream_id] = stream
                        self.stream_buffers[stream_id] = bytearray()
                        self.stream_events[stream_id] = trio.Event()
                        if syn_payload_err is not None:
                            stream.recv_closed = True
                            stream.closed = True
                            self.stream_events[stream_id].set()
                        elif typ == window_type and length > 0:
                            async with stream.window_lock:
                                stream.send_window += length
                        elif typ == data_type and length > 0:
                            _buffer(self, stream, syn_payload, taps=False)
                        if flags & fin:
                            stream.recv_closed = True
                            if stream.send_closed:
                                stream.closed = True
                            self.stream_events[stream_id].set()
                            if stream.closed:
                                self._finalize_stream_locked(stream, fully_closed=True)
                        if flags & rst:
                            stream.closed = True
                            stream.reset_received = True
                            self.stream_events[stream_id].set()
                            self._finalize_stream_locked(stream, fully_closed=True)
                            new_stream_notify = stream  # delivered reset, with no ACK
                        else:
                            ack_header = pack(0, window_type, ack, stream_id, 0)
                            new_stream_notify = stream
                    else:
                        rst_header = pack(0, window_type, rst, stream_id, 0)
                if rst_header is not None:
                    await self._write_frame(rst_header)
                elif ack_header is not None:
                    await self._write_frame(ack_header)
                    if new_stream_notify is not None:
                        await self.new_stream_send_channel.send(new_stream_notify)
                elif new_stream_notify is not None:
                    await self.new_stream_send_channel.send(new_stream_notify)
            elif typ in (data_type, window_type) and flags & ack:
                ack_payload, ack_payload_err = await optional_body(typ, length, "ACK", stream_id)
                async with self.streams_lock:
                    if stream_id in self.streams:
                        stream = self.streams[stream_id]
                        if typ == window_type:
                            if length > 0:
                                async with stream.window_lock:
                                    stream.send_window += length
                        elif typ == data_type and length > 0:
                            if ack_payload_err is not None:
                                stream.recv_closed = True
                                stream.closed = True
                                if stream_id in self.stream_events:
                                    self.stream_events[stream_id].set()
                            else:
                                _buffer(self, stream, ack_payload, taps=False)
            elif typ == yamux.TYPE_GO_AWAY:
                error_code = length
                if error_code == yamux.GO_AWAY_PROTOCOL_ERROR:
                    logger.error("Received GO_AWAY for peer%s: Protocol error", self.peer_id)
                elif error_code not in (
                    yamux.GO_AWAY_NORMAL,
                    yamux.GO_AWAY_INTERNAL_ERROR,
                    yamux.GO_AWAY_CONN_GARBAGE_COLLECTED,
                ):
                    logger.warning(
                        "Received GO_AWAY for peer %swith unknown error code: %s",
                        self.peer_id,
                        error_code,
                    )
                self.event_shutting_down.set()
                await self._cleanup_on_error()
                break
            elif typ == yamux.TYPE_PING:
                if flags & syn:
                    await self._write_frame(pack(0, yamux.TYPE_PING, ack, 0, length))
                elif flags & ack:
                    new_rtt = trio.current_time() - self._ping_sent_time
                    self._rtt = new_rtt if self._rtt == 0.0 else (self._rtt + new_rtt) / 2
                    self._ping_event.set()
            elif typ == data_type:
                pass  # unreachable: every DATA frame is taken above
            elif typ == window_type:
                async with self.streams_lock:
                    if stream_id in self.streams:
                        stream = self.streams[stream_id]
                        async with stream.window_lock:
                            stream.send_window += length
                        if flags & fin:
                            stream.recv_closed = True
                            if stream.send_closed:
                                stream.closed = True
                            self.stream_events[stream_id].set()
                        if flags & rst:
                            stream.closed = True
                            stream.reset_received = True
                            self.stream_events[stream_id].set()
                        if stream.closed:
                            self._finalize_stream_locked(stream, fully_closed=True)
        except trio.TooSlowError:
            logger.warning(
                "Yamux: timed out reading DATA frame body for peer %s; closing connection",
                self.peer_id,
            )
            self.event_shutting_down.set()
            await self._cleanup_on_error()
            break
        except Exception as e:
            if isinstance(e, IncompleteReadError):
                if e.is_clean_close:
                    logger.info("Yamux connection closed cleanly for peer %s", self.peer_id)
                    self.event_shutting_down.set()
                    await self._cleanup_on_error()
                    break
                logger.warning(
                    "Incomplete read in handle_incoming for peer %s: %s", self.peer_id, e
                )
            elif isinstance(e, RawConnError):
                if not str(e).strip():
                    logger.info(
                        "RawConnError (empty) during cleanup for peer %s "
                        "(normal connection shutdown)",
                        self.peer_id,
                    )
                else:
                    logger.warning(
                        "RawConnError during connection handling for peer %s: %s",
                        self.peer_id,
                        e,
                    )
            else:
                logger.error(
                    "Error in handle_incoming for peer %s: %s: %s",
                    self.peer_id,
                    type(e).__name__,
                    e,
                )
            if self.event_shutting_down.is_set() or isinstance(
                e,
                (
                    RawConnError,
                    OSError,
                    IncompleteReadError,
                    trio.ClosedResourceError,
                    trio.BrokenResourceError,
                ),
            ):
                await self._cleanup_on_error()
                break
            await trio.sleep(0.01)


# sha256 of py-libp2p 0.8.1's `Yamux.read_stream`, which `_read_stream` copies.
_READ_STREAM_SHA256 = "d9497aa737484fbf4187a9f10032f5734a8de47ebc75b3073508900ac68e7b91"


async def _read_stream(self: yamux.Yamux, stream_id: int, n: int = -1) -> bytes:
    """py-libp2p 0.8.1's `Yamux.read_stream`, branch for branch, less the four
    f-string debug lines it built on every read whether or not debug logging
    is on (about 6% of a ping-pong's CPU, the largest of yamux's own code);
    and while it waits with nothing buffered, the stream's tap, if any, may take
    what arrives (see `tap`)."""
    if n is None:
        n = -1
    while True:
        async with self.streams_lock:
            stream = self.streams.get(stream_id)
            if stream is None:
                raise MuxedStreamEOF("Stream closed")
            if self.event_shutting_down.is_set():
                raise MuxedStreamEOF("Connection shut down")
            buffer = self.stream_buffers.get(stream_id)
            if buffer is None:
                if stream.reset_received:
                    raise MuxedStreamReset("Stream was reset")
                raise MuxedStreamEOF("Stream buffer closed")
            # py-libp2p: data buffered is returned if the stream is closed for
            # receiving, else only if it was not reset.
            if buffer and (stream.recv_closed or not stream.reset_received):
                if n == -1 or n >= len(buffer):
                    data = bytes(buffer)
                    buffer.clear()
                else:
                    data = bytes(buffer[:n])
                    del buffer[:n]
                if stream.closed:
                    self._finalize_stream_locked(stream, fully_closed=True)
                return data
            if stream.reset_received:
                raise MuxedStreamReset("Stream was reset")
            if stream.recv_closed:
                raise MuxedStreamEOF("Stream is closed for receiving")
            if stream.closed:
                raise MuxedStreamReset("Stream is reset or closed")
        consumer = _TAPS.get(stream)
        if consumer is not None:  # parked with nothing buffered: data may go to it
            consumer.waiting = True
        try:
            await self.stream_events[stream_id].wait()
            self.stream_events[stream_id] = trio.Event()
        except KeyError:
            raise MuxedStreamEOF("Stream was removed") from None
        finally:
            if consumer is not None:
                consumer.waiting = False


def _source_sha256(function: Any) -> str:
    """sha256 of the source lines that `function`'s code spans (not
    `inspect.getsource`, which tokenizes the function: ~100 ms for these two)."""
    code = function.__code__
    last = max(line for _, _, line in code.co_lines() if line is not None)
    lines = linecache.getlines(code.co_filename)[code.co_firstlineno - 1 : last]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _lean_yamux_reader() -> None:
    patch = "lean yamux reader"
    if yamux.Yamux.handle_incoming is _handle_incoming:
        return
    _expect_shape(patch, yamux.Yamux, "handle_incoming", "(self)", is_async=True)
    _expect(
        patch,
        _source_sha256(yamux.Yamux.handle_incoming) == _HANDLE_INCOMING_SHA256,
        "Yamux.handle_incoming's code changed (the patch is a copy of it)",
    )
    _expect_uses(patch, yamux.Yamux._handle_incoming_with_ready_signal, "handle_incoming")
    _expect_shape(patch, yamux.Yamux, "_read_data_body", "(self, length)", is_async=True)
    _expect_shape(patch, yamux.Yamux, "_cleanup_on_error", "(self)", is_async=True)
    _expect_shape(
        patch,
        yamux.Yamux,
        "_finalize_stream_locked",
        "(self, stream, *, fully_closed)",
        is_async=False,
    )
    _expect(patch, vars(yamux).get("RawConnError") is RawConnError, "yamux's RawConnError changed")
    _expect_shape(patch, yamux.Yamux, "read_stream", "(self, stream_id, n=-1)", is_async=True)
    _expect(
        patch,
        _source_sha256(yamux.Yamux.read_stream) == _READ_STREAM_SHA256,
        "Yamux.read_stream's code changed (the patch is a copy of it)",
    )
    for name in ("MuxedStreamEOF", "MuxedStreamReset"):
        _expect(
            patch,
            vars(yamux).get(name) is globals()[name],
            f"yamux's {name} is not libp2p.stream_muxer.exceptions'",
        )
    REPLACED["Yamux.handle_incoming"] = yamux.Yamux.handle_incoming
    REPLACED["Yamux.read_stream"] = yamux.Yamux.read_stream
    yamux.Yamux.handle_incoming = _handle_incoming  # type: ignore[method-assign]
    yamux.Yamux.read_stream = _read_stream  # type: ignore[method-assign]


def apply_to_process() -> None:
    """The patches that change py-libp2p's classes for the whole process. Idempotent."""
    _yamux_frames_fit_one_noise_message()
    _yamux_credits_once_half_read()
    _yamux_writers_wait_for_window()
    _quick_locks()
    _noise_reads_in_bulk()
    _yamux_settings_read_once()
    _lean_yamux_reader()
    _direct_writes()


# --- per host ---------------------------------------------------------------------------


def cache_addrs(host: IHost) -> None:
    """Reuse the host's addresses for ADDRS_TTL_S instead of rebuilding them per call.

    py-libp2p rebuilds them from the listening sockets on every call, about a
    millisecond, and calls it for each pubsub message it publishes or forwards
    (to attach its signed peer record), as do we for each record we make.
    Kept, an idle 3-node network of processes used about a tenth less CPU.
    Listen addresses change only when a listener starts or stops, and observed
    ones seldom; an empty list (before listening) is never kept.
    """
    _expect_shape("cached host addresses", host, "get_addrs", "()", is_async=False)
    build = host.get_addrs
    kept: list[multiaddr.Multiaddr] = []
    built_at = -float("inf")

    def get_addrs() -> list[multiaddr.Multiaddr]:
        nonlocal kept, built_at
        now = time.monotonic()
        if not kept or now - built_at > ADDRS_TTL_S:
            kept, built_at = build(), now
        return list(kept)

    host.get_addrs = get_addrs  # type: ignore[method-assign]


def _security_upgrader(host: IHost, patch: str) -> Any:
    """The host's TransportUpgrader, whose `upgrade_security` every connection goes
    through, dialed or accepted, as `patch` expects it."""
    network: Any = host.get_network()
    upgrader = network.upgrader
    _expect(patch, isinstance(upgrader, TransportUpgrader), "the swarm has no TransportUpgrader")
    _expect_shape(
        patch, upgrader, "upgrade_security", "(raw_conn, is_initiator, peer_id=None)", is_async=True
    )
    return upgrader


_rto_cap_unsupported = False  # set when the kernel refused TCP_RTO_MAX_MS once


def bound_retransmission(host: IHost) -> None:
    """Cap the retransmission timer of every TCP connection, dialed or accepted, at
    RTO_MAX_MS (Linux 6.15 and later; elsewhere nothing changes).

    A link that drops packets without a reset (a cable pulled, a partition, a
    namespace's bridge cut) makes TCP back off between tries, doubling up to
    120 s. When the link comes back, its connections stay silent until their
    next try: beats, syncs and jobs on them wait, and membership sees no reason
    to redial. 200 nodes over 2 namespaced workers, cut 100/100 for 30 s, were
    not whole 120 s after the heal; with the cap, 5.0 s. The cost: on a path
    whose round trip exceeds a second, TCP retransmits more than it needs to.
    """
    upgrader = _security_upgrader(host, "bounded retransmission")
    upgrade = upgrader.upgrade_security

    async def upgrade_security(raw_conn: Any, is_initiator: bool, peer_id: ID | None = None) -> Any:
        cap_retransmission(raw_conn)
        return await upgrade(raw_conn, is_initiator, peer_id)

    upgrader.upgrade_security = upgrade_security


def cap_retransmission(raw_conn: object) -> None:
    """Set TCP_RTO_MAX_MS on the socket under a raw libp2p connection, if the
    kernel has it (see `bound_retransmission`)."""
    global _rto_cap_unsupported
    sock = tcp_socket(raw_conn)
    if sock is None or _rto_cap_unsupported:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, RTO_MAX_MS)
    except OSError as error:  # ENOPROTOOPT before Linux 6.15, and not Linux at all
        _rto_cap_unsupported = True
        logger.debug("TCP retransmissions keep the kernel's backoff: %s", error)


def tcp_socket(conn: object) -> trio.socket.SocketType | None:
    """The TCP socket under a libp2p connection (a raw one, or SwarmConn > Yamux >
    Noise > raw > TrioTCPStream > trio.SocketStream), or None."""
    for name in ("muxed_conn", "secured_conn", "conn", "conn", "stream", "stream", "socket"):
        if isinstance(conn, trio.socket.SocketType):
            return conn
        conn = getattr(conn, name, conn)
    return conn if isinstance(conn, trio.socket.SocketType) else None


class PeerRefused(SecurityUpgradeFailure):
    """The handshake named a peer this host does not connect to (its `PeerGate`)."""


def refuse_peers(host: IHost, allows: PeerGate) -> None:
    """Drop every connection, inbound or outbound, whose peer `allows` refuses, as
    soon as the security handshake names it: before the swarm adds it, so no
    connection event, stream or pubsub peer ever comes of it.

    libp2p's own connection gate judges addresses, and a peer that dials us
    comes from a new ephemeral port each time. A refused dialer sees its dial fail.
    """
    patch = "refuse peers after the handshake"
    upgrader = _security_upgrader(host, patch)
    # Both ways in go through it, and call it on the swarm's upgrader each time.
    _expect_uses(patch, Swarm.upgrade_inbound_raw_conn, "upgrader", "upgrade_security")
    _expect_uses(patch, Swarm.upgrade_outbound_raw_conn, "upgrader", "upgrade_security")
    upgrade = upgrader.upgrade_security

    async def upgrade_security(raw_conn: Any, is_initiator: bool, peer_id: ID | None = None) -> Any:
        secured = await upgrade(raw_conn, is_initiator, peer_id)
        remote = str(secured.get_remote_peer())
        if not allows(remote):
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await secured.close()
            raise PeerRefused(f"connections with {remote} are refused here")
        return secured

    upgrader.upgrade_security = upgrade_security


def log_refused_handshakes(host: IHost, psk: PreSharedKey) -> None:
    """Log each inbound connection whose handshake fails: in a private network, most
    likely a peer without our key. libp2p itself only says so at debug level. The
    first refusal from each address is a warning, later ones (a peer that keeps
    redialling, a port scanner) are at debug. A peer refused by our own gate
    (`refuse_peers`) is no stranger: debug."""
    patch = "log refused handshakes"
    network: Any = host.get_network()
    _expect_shape(patch, network, "upgrade_inbound_raw_conn", "(raw_conn, maddr)", is_async=True)
    if isinstance(network, Swarm):  # it calls the method on itself for each inbound connection
        _expect_uses(patch, Swarm._do_handle_inbound_connection, "upgrade_inbound_raw_conn")
    upgrade = network.upgrade_inbound_raw_conn
    warned: set[str] = set()

    async def logged_upgrade(raw_conn: Any, maddr: multiaddr.Multiaddr) -> Any:
        remote = raw_conn.get_remote_address()
        try:
            return await upgrade(raw_conn, maddr)
        except Exception as error:
            # Mostly a SwarmException; but a stranger's bytes decrypted with our key
            # are garbage, and not every way that fails comes wrapped in one (a CI run
            # refused a stranger and logged nothing).
            host_ip = remote[0] if remote else "?"
            first = host_ip not in warned and len(warned) < MAX_WARNED_ADDRESSES
            if caused_by(error, PeerRefused):
                first = False
            elif first:
                warned.add(host_ip)
            logger.log(
                logging.WARNING if first else logging.DEBUG,
                "refused a connection from %s: %s: %s (a peer outside private network %s?)",
                f"{remote[0]}:{remote[1]}" if remote else "an unknown address",
                type(error).__name__,
                error,
                psk.fingerprint,
            )
            raise

    network.upgrade_inbound_raw_conn = logged_upgrade


def caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether `error`, or anything it was raised from or holds, is a `kind`.

    libp2p reports a dial as one SwarmDialAllFailedError, caused by a MultiError of
    the per-address errors, each caused by what went wrong in its upgrade; trio
    may wrap any of them in exception groups.
    """
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return True
        if isinstance(current, BaseExceptionGroup):
            pending.extend(leaves(current))
        errors = getattr(current, "errors", ())  # libp2p's MultiError
        if isinstance(errors, list | tuple):
            pending.extend(e for e in errors if isinstance(e, BaseException))
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False


def auto_connector(host: IHost) -> Any:
    """The swarm's `AutoConnector`, for `run_host` to stop: it dials peerstore
    entries until the host holds ~150 connections; which peers a node talks to is
    ours to decide. py-libp2p offers no option to leave it off."""
    patch = "no auto-connector"
    connector = getattr(host.get_network(), "auto_connector", None)
    _expect(patch, connector is not None, "the swarm has no auto_connector")
    _expect_shape(patch, connector, "stop", "()", is_async=True)
    return connector


# --- pubsub -------------------------------------------------------------------------------


def _check_pubsub_overrides() -> None:
    """What GuardedPubsub and GuardedGossipSub override, and what calls it."""
    patch = "guarded pubsub"
    _expect_shape(patch, Pubsub, "stream_handler", "(self, stream)", is_async=True)
    _expect_shape(patch, Pubsub, "_handle_dead_peer", "(self, peer_id)", is_async=False)
    _expect_uses(patch, Pubsub.handle_dead_peer_queue, "_handle_dead_peer")
    _expect_shape(patch, Pubsub, "push_msg", "(self, msg_forwarder, msg)", is_async=True)
    _expect_shape(patch, Pubsub, "get_hello_packet", "(self)", is_async=False)
    _expect_uses(patch, Pubsub._handle_new_peer, "get_hello_packet")
    _expect_shape(patch, Pubsub, "write_msg", "(self, stream, rpc_msg)", is_async=True)
    _expect_uses(patch, Pubsub.__init__, "peers")
    _expect(patch, isinstance(getattr(Pubsub, "my_id", None), property), "Pubsub.my_id is gone")
    _expect(
        patch, "senderRecord" in rpc_pb2.RPC.DESCRIPTOR.fields_by_name, "RPC has no senderRecord"
    )
    _expect_shape(patch, GossipSub, "_do_px", "(self, px_peers)", is_async=True)
    _expect_uses(patch, GossipSub.handle_prune, "_do_px")


class GuardedPubsub(Pubsub):
    """py-libp2p's Pubsub, with what a peer sends unable to crash this node.

    Holes in py-libp2p 0.8, closed here:

    - Reading: a frame that is not a protobuf RPC raises DecodeError out of the
      stream handler, and from there out of the host: one garbled message from
      any peer ended the node. Now any error reading a peer's stream resets
      that stream, drops the peer from pubsub (as py-libp2p does for the errors
      it does catch) and is counted in `garbled`.
    - Checking: a published message whose `key` is not a public key raises
      DecodeError from the signature check, in a task whose error stops the
      whole pubsub service. Such a message is now dropped and counted.
    - Writing: GossipSub writes to a peer's stream from more than one task (the
      per-peer sender, and the flushes on identify and on subscribe), and yamux
      sends a message frame by frame as send window allows, so two messages
      could interleave on the wire. The receiver then read a torn RPC. Writes
      to a stream now take turns, and a write that stops part way (timed out
      waiting for window, cancelled) resets the stream, so what follows can
      never be read as the rest of it. (A cancellation in the middle of one
      frame would leave the connection's own framing broken, which no stream
      reset mends; these writes are cancelled only at shutdown.)
    - Forgetting: when pubsub drops a peer it forgot our outbound stream to
      it without closing it, and opened another on the same connection. A
      peer sending one bad frame per stream could leak our streams until its
      connection's stream limit, after which every new stream to it waited
      forever. The stream pubsub forgets is now reset.

    Also, a cost: py-libp2p puts its signed peer record (addresses, signed) in
    every RPC it sends, and the receiver checks its signature and updates the
    peerstore for every RPC it reads, records and control messages alike. Our
    records carry the addresses, signed; these copies are left out. An RPC
    without one is what other libp2p implementations send.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _check_pubsub_overrides()
        super().__init__(*args, **kwargs)
        self.garbled = 0  # streams dropped and messages refused for the above
        self._warned: set[ID] = set()
        self._write_locks: WeakKeyDictionary[INetStream, trio.Lock] = WeakKeyDictionary()

    async def stream_handler(self, stream: INetStream) -> None:
        try:
            await super().stream_handler(stream)
        except Exception as error:
            peer_id = stream.muxed_conn.peer_id
            if not self.manager.is_running:  # shutting down: not the peer's doing
                logger.debug("pubsub stream from %s ended at shutdown: %r", peer_id, error)
                return
            self._garbled(peer_id, "dropped its pubsub stream", error)
            await reset_quietly(stream)
            self._handle_dead_peer(peer_id)

    def _handle_dead_peer(self, peer_id: ID) -> None:
        outbound = self.peers.get(peer_id)
        super()._handle_dead_peer(peer_id)
        forgotten = outbound is not None and self.peers.get(peer_id) is not outbound
        if forgotten and self.manager.is_running:
            self.manager.run_task(reset_quietly, outbound)

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        try:
            await super().push_msg(msg_forwarder, msg)
        except Exception as error:
            if msg_forwarder == self.my_id:
                raise  # our own message: its errors are ours to see
            self._garbled(msg_forwarder, "dropped a message it forwarded", error)

    def _garbled(self, peer_id: ID, action: str, error: Exception) -> None:
        """Count it; warn once per peer (a hostile one could send millions)."""
        self.garbled += 1
        level = logging.DEBUG if peer_id in self._warned else logging.WARNING
        if len(self._warned) < 10_000:
            self._warned.add(peer_id)
        # A parse error is the peer's; anything else may be a bug of ours: show where.
        trace = level == logging.WARNING and not isinstance(error, (DecodeError, ValueError))
        logger.log(
            level, "garbled pubsub input from %s, %s: %r", peer_id, action, error, exc_info=trace
        )

    def get_hello_packet(self) -> rpc_pb2.RPC:
        packet = super().get_hello_packet()
        packet.ClearField("senderRecord")
        return packet

    async def write_msg(self, stream: INetStream, rpc_msg: rpc_pb2.RPC) -> bool:
        rpc_msg.ClearField("senderRecord")
        lock = self._write_locks.get(stream)
        if lock is None:  # not setdefault: that would build a lock for every message
            lock = self._write_locks[stream] = trio.Lock()
        async with lock:
            written = False
            try:
                written = await super().write_msg(stream, rpc_msg)
                return written
            finally:
                if not written:  # possibly part of a message on the wire: end the stream
                    with trio.CancelScope(shield=True):
                        await reset_quietly(stream)
                    peer_id = stream.muxed_conn.peer_id
                    if self.peers.get(peer_id) is stream:  # pubsub opens another
                        self._handle_dead_peer(peer_id)


class GuardedGossipSub(GossipSub):
    """GossipSub that never dials the peers a PRUNE suggests (peer exchange).

    py-libp2p dials them whatever `do_px` says, inline while it reads the
    sender's stream: any peer could make this node dial whom it names, and
    stall its reading meanwhile. Whom a node dials is membership's decision,
    made from signed records.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _check_pubsub_overrides()
        super().__init__(*args, **kwargs)

    async def _do_px(self, px_peers: list[rpc_pb2.PeerInfo]) -> None:
        return


async def reset_quietly(stream: INetStream) -> None:
    """Reset `stream`, whatever state it is in; gives up after a second."""
    with trio.move_on_after(1):
        try:
            await stream.reset()
        except Exception as error:  # already reset or closed: nothing more to stop
            logger.debug("reset of a stream failed: %r", error)
