"""The lean yamux reader (`_libp2p._handle_incoming`): frame for frame what
py-libp2p's own `Yamux.handle_incoming` does, checked by running both on the
same frames, and still bounded against a peer that stops part way."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.peer.id import ID
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.yamux import yamux

from p2p_node import _libp2p
from p2p_node._libp2p import apply_to_process

HEADER = struct.Struct(yamux.YAMUX_HEADER_FORMAT)


def _frame(typ: int, flags: int, stream_id: int, length: int, body: bytes = b"") -> bytes:
    return HEADER.pack(0, typ, flags, stream_id, length) + body


class _Script:
    """A Noise connection that hands out the given (decrypted) messages, then
    waits until `ended` is set, then reports a closed connection."""

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = list(messages)
        self.written: list[bytes] = []
        self.ended = trio.Event()
        self.drained = trio.Event()

    async def read_msg(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.messages:
            return self.messages.pop(0)
        self.drained.set()
        await self.ended.wait()
        return b""

    async def write_msg(self, data: bytes) -> None:
        self.written.append(bytes(data))

    async def close(self) -> None:
        self.ended.set()


def _muxer(script: _Script) -> yamux.Yamux:
    session: Any = SecureSession.__new__(SecureSession)  # no handshake: plaintext frames
    session.conn = script
    session.is_initiator = True
    return yamux.Yamux(session, ID(b"\x00\x01peer"), is_initiator=True)


DATA, WINDOW, PING = yamux.TYPE_DATA, yamux.TYPE_WINDOW_UPDATE, yamux.TYPE_PING
SYN, ACK, FIN, RST = yamux.FLAG_SYN, yamux.FLAG_ACK, yamux.FLAG_FIN, yamux.FLAG_RST

FRAMES = [
    _frame(DATA, SYN, 2, 5, b"hello"),  # the peer opens stream 2, with data
    _frame(DATA, 0, 2, 5, b"world") + _frame(WINDOW, 0, 2, 1000),  # two frames, one message
    _frame(DATA, FIN, 2, 3),  # a header whose body comes in the next message
    b"end",
    _frame(PING, SYN, 0, 7),
    _frame(WINDOW, SYN, 4, 0),  # stream 4 opened, then reset
    _frame(WINDOW, RST, 4, 0),
    _frame(WINDOW, SYN, 2, 0),  # a SYN for a stream that exists: refused with RST
    _frame(DATA, 0, 2, 0) + _frame(9, 0, 0, 0),  # empty data, an unknown frame type
]


READERS = ["py-libp2p", "lean"]


def _reader(name: str) -> Any:
    apply_to_process()
    return _libp2p._handle_incoming if name == "lean" else _libp2p.REPLACED["Yamux.handle_incoming"]


def _read_stream(name: str) -> Any:
    apply_to_process()
    return _libp2p._read_stream if name == "lean" else _libp2p.REPLACED["Yamux.read_stream"]


@pytest.mark.parametrize("name", READERS)
async def test_the_lean_reader_does_what_py_libp2p_s_reader_does(name: str) -> None:
    reader = _reader(name)
    script = _Script(FRAMES)
    muxer = _muxer(script)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, muxer)
            await script.drained.wait()
            await trio.testing.wait_all_tasks_blocked()
            two = muxer.streams[2]
            assert bytes(muxer.stream_buffers[2]) == b"helloworldend"
            assert two.recv_closed and not two.closed and not two.reset_received
            assert two.recv_window == yamux.DEFAULT_WINDOW_SIZE - 13
            assert two.send_window == yamux.DEFAULT_WINDOW_SIZE + 1000
            assert 4 not in muxer.streams  # reset: its bookkeeping is gone
            accepted = [muxer.new_stream_receive_channel.receive_nowait() for _ in range(2)]
            assert [s.stream_id for s in accepted] == [2, 4]
            assert accepted[1].reset_received and accepted[1].closed
            assert script.written == [
                _frame(WINDOW, ACK, 2, 0),
                _frame(PING, ACK, 0, 7),
                _frame(WINDOW, ACK, 4, 0),
                _frame(WINDOW, RST, 2, 0),
            ]
            script.ended.set()  # the connection closes: the reader ends and cleans up
        assert muxer.event_closed.is_set() and not muxer.streams


@pytest.mark.parametrize("name", READERS)
async def test_a_peer_that_never_sends_an_announced_body_loses_the_connection(
    name: str, autojump_clock: trio.testing.MockClock
) -> None:
    reader = _reader(name)
    script = _Script([_frame(WINDOW, SYN, 2, 0), _frame(DATA, 0, 2, 100, b"only part")])
    muxer = _muxer(script)
    bound = yamux._yamux_data_read_timeout()
    with trio.fail_after(bound + 10):
        await reader(muxer)  # returns once it gave up on the body
        assert trio.current_time() >= bound
    assert muxer.event_shutting_down.is_set() and muxer.event_closed.is_set()
    assert not muxer.streams


@pytest.mark.parametrize("name", READERS)
async def test_an_oversized_data_frame_closes_the_connection(name: str) -> None:
    reader = _reader(name)
    script = _Script([_frame(DATA, 0, 2, yamux.MAX_WINDOW_SIZE + 1)])
    muxer = _muxer(script)
    with trio.fail_after(10):
        await reader(muxer)
    assert muxer.event_closed.is_set()


def test_held_plaintext_is_taken_at_once_and_nothing_is_taken_when_short() -> None:
    session: Any = SecureSession.__new__(SecureSession)
    big = bytes(range(256)) * 20
    session.__dict__.update(_p2p_rest=b"head" + big, _p2p_at=0)
    assert _libp2p._held_by(session, 4) == b"head"
    assert _libp2p._held_by(session, len(big) + 1) is None  # short: nothing taken
    body = _libp2p._held_by(session, len(big))
    assert isinstance(body, memoryview) and body == big  # a large body: a view, no copy
    assert _libp2p._held_by(session, 1) is None
    assert session.__dict__["_p2p_rest"] == b""


def test_a_changed_py_libp2p_reader_is_refused_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    apply_to_process()

    async def handle_incoming(self: Any) -> None:  # same shape, other code
        return None

    monkeypatch.setattr(yamux.Yamux, "handle_incoming", handle_incoming)
    with pytest.raises(_libp2p.Libp2pChanged, match="handle_incoming's code changed"):
        apply_to_process()


def _with_stream(muxer: yamux.Yamux, stream_id: int, data: bytes, **state: bool) -> Any:
    stream = yamux.YamuxStream(stream_id, muxer, False)
    for name, value in state.items():
        setattr(stream, name, value)
    muxer.streams[stream_id] = stream
    muxer.stream_buffers[stream_id] = bytearray(data)
    muxer.stream_events[stream_id] = trio.Event()
    return stream


async def _outcome(read: Any, *args: Any) -> Any:
    try:
        return await read(*args)
    except Exception as error:
        return type(error).__name__, str(error)


@pytest.mark.parametrize("name", READERS)
async def test_the_lean_stream_read_does_what_py_libp2p_s_does(name: str) -> None:
    read = _read_stream(name)
    muxer = _muxer(_Script([]))
    _with_stream(muxer, 2, b"abcdef")
    _with_stream(muxer, 4, b"left", reset_received=True)
    _with_stream(muxer, 6, b"last", reset_received=True, recv_closed=True, closed=True)
    _with_stream(muxer, 8, b"", recv_closed=True)
    _with_stream(muxer, 10, b"", closed=True)
    with trio.fail_after(5):
        got = [
            await _outcome(read, muxer, 2, 4),
            await _outcome(read, muxer, 2, -1),
            await _outcome(read, muxer, 4, -1),
            await _outcome(read, muxer, 6, 2),
            await _outcome(read, muxer, 6, 10),
            await _outcome(read, muxer, 6, 10),  # drained and closed: forgotten
            await _outcome(read, muxer, 8, 1),
            await _outcome(read, muxer, 10, 1),
            await _outcome(read, muxer, 12, 1),
        ]
        async with trio.open_nursery() as nursery:  # a read that waits, then is woken
            waited: list[Any] = []

            async def wait() -> None:
                waited.append(await _outcome(read, muxer, 2, -1))

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert not waited
            muxer.stream_buffers[2].extend(b"more")
            muxer.stream_events[2].set()
    assert got == [
        b"abcd",
        b"ef",
        ("MuxedStreamReset", "Stream was reset"),
        b"la",
        b"st",
        ("MuxedStreamEOF", "Stream closed"),
        ("MuxedStreamEOF", "Stream is closed for receiving"),
        ("MuxedStreamReset", "Stream is reset or closed"),
        ("MuxedStreamEOF", "Stream closed"),
    ]
    assert waited == [b"more"]
