"""The patches to py-libp2p: applied by building a host, never by an import, and
refused loudly where py-libp2p no longer has the shape they were written for."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.stream.net_stream import NetStream
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise import io as noise_io
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux import yamux
from noise.exceptions import NoiseInvalidMessage

from p2p_node import _libp2p
from p2p_node._host import new_libp2p_host
from p2p_node._libp2p import Libp2pChanged, apply_to_process
from p2p_node.testing import open_swarm

# The codec and everything importing the package pulls in (the host, the caller, the node).
IMPORTS = ["p2p_node._codec", "p2p_node._messages", "p2p_node"]

_CHECK = textwrap.dedent(
    """
    import importlib, sys
    from libp2p.stream_muxer.yamux import yamux

    def patched():
        return (
            yamux.MAX_MESSAGE_SIZE,
            yamux.YamuxStream._auto_tune_and_send_window_update,
            yamux.YamuxStream.write,
            yamux.Yamux._write_frame,
        )

    original = patched()
    importlib.import_module(sys.argv[1])
    imported = patched()
    from libp2p.crypto.ed25519 import create_new_key_pair
    from p2p_node._host import new_libp2p_host
    new_libp2p_host(create_new_key_pair())
    hosted = patched()
    print(imported == original, hosted == original)
    """
)


@pytest.mark.parametrize("module", IMPORTS)
def test_importing_patches_nothing_building_a_host_does(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist (yet)")
    ran = subprocess.run(
        [sys.executable, "-c", _CHECK, module],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    unchanged_by_import, unchanged_by_host = ran.stdout.split()
    assert unchanged_by_import == "True"
    assert unchanged_by_host == "False"  # the check above can see a patch


def _yamux_patched() -> tuple[Any, ...]:
    return (
        yamux.MAX_MESSAGE_SIZE,
        yamux.YamuxStream._auto_tune_and_send_window_update,
        yamux.YamuxStream.write,
        yamux.Yamux._write_frame,
        vars(yamux.YamuxStream).get("send_window"),
        yamux.Yamux.handle_incoming,
        yamux.Yamux.read_stream,
    )


def test_applying_twice_changes_nothing_more() -> None:
    apply_to_process()
    once = _yamux_patched()
    apply_to_process()
    assert _yamux_patched() == once
    assert once[1] is _libp2p._window_update_when_half_read
    assert once[2] is _libp2p._write_woken_by_window
    assert once[3] is _libp2p._write_frame_quietly
    assert once[5:] == (_libp2p._handle_incoming, _libp2p._read_stream)
    assert TrioTCPStream.write is _libp2p._tcp_write
    assert noise_io.NoiseTransportReadWriter.write_msg is _libp2p._write_noise_message


async def test_a_writer_out_of_window_wakes_when_the_window_grows_not_by_polling(
    mock_clock: trio.testing.MockClock,  # time moves only when the test moves it
) -> None:
    apply_to_process()
    stream = yamux.YamuxStream(1, None, True)  # type: ignore[arg-type]  # no I/O here
    stream.send_window = 0
    woke: list[float] = []

    async def wait() -> None:
        await _libp2p._until_window(stream)
        woke.append(trio.current_time())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert not woke
            async with stream.window_lock:  # as a WINDOW_UPDATE frame is taken
                stream.send_window += 4096
            await trio.testing.wait_all_tasks_blocked()
            assert woke == [0.0]  # at once: py-libp2p's writer slept 10 ms between looks
    assert stream.send_window == 4096


async def test_a_writer_out_of_window_gives_up_after_the_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    apply_to_process()
    stream = yamux.YamuxStream(1, None, True)  # type: ignore[arg-type]
    stream.send_window = 0
    with trio.fail_after(_libp2p.WINDOW_WAIT_S + 1):
        with pytest.raises(MuxedStreamError, match="Timed out waiting for window update"):
            await _libp2p._until_window(stream)


async def _as_written(self: Any, *, bytes_read: int = 0) -> None:  # py-libp2p's shape
    return None


async def _reshaped(self: Any, bytes_read: int = 0) -> None:  # positional, not keyword-only
    return None


@pytest.mark.parametrize(
    ("owner", "name", "replacement", "says"),
    [
        pytest.param(
            yamux.YamuxStream,
            "_auto_tune_and_send_window_update",
            _reshaped,
            "is now (self, bytes_read=0), not (self, *, bytes_read=0)",
            id="window-update-reshaped",
        ),
        pytest.param(
            yamux.YamuxStream, "_grow_to_delta", None, "_grow_to_delta is gone", id="helper-gone"
        ),
        pytest.param(yamux, "MAX_MESSAGE_SIZE", None, "MAX_MESSAGE_SIZE is gone", id="size-gone"),
        pytest.param(
            yamux.YamuxStream,
            "write",
            _reshaped,
            "_reshaped no longer uses MAX_MESSAGE_SIZE",  # the first patch to read it
            id="write-reshaped",
        ),
        pytest.param(
            yamux.Yamux, "_write_frame", None, "Yamux._write_frame is gone", id="write-frame-gone"
        ),
        pytest.param(yamux, "TYPE_DATA", None, "yamux.TYPE_DATA is gone", id="frame-type-gone"),
    ],
)
def test_a_reshaped_yamux_is_refused_loudly(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str, replacement: Any, says: str
) -> None:
    apply_to_process()  # so that REPLACED holds py-libp2p's own write
    # As if this process had not patched yamux yet (another test may have built a host).
    monkeypatch.setattr(yamux.YamuxStream, "_auto_tune_and_send_window_update", _as_written)
    monkeypatch.setattr(yamux.YamuxStream, "write", _libp2p.REPLACED["YamuxStream.write"])
    if replacement is None:
        monkeypatch.delattr(owner, name)
    else:
        monkeypatch.setattr(owner, name, replacement)
    with pytest.raises(Libp2pChanged) as caught:
        apply_to_process()
    assert says in str(caught.value)
    assert _libp2p.LIBP2P_VERSION in str(caught.value)


def test_a_reshaped_pubsub_is_refused_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    def write_msg(self: Any, stream: Any, rpc_msg: Any, timeout: float = 1) -> bool:
        return True

    monkeypatch.setattr(Pubsub, "write_msg", write_msg)
    with pytest.raises(Libp2pChanged, match=r"Pubsub\.write_msg is now"):
        _libp2p.GuardedGossipSub([], 6, 4, 12)


def test_a_host_whose_upgrader_changed_is_refused_loudly() -> None:
    host = new_libp2p_host(create_new_key_pair())

    async def upgrade_security(raw_conn: Any, is_initiator: bool) -> Any:
        return raw_conn

    host.get_network().upgrader.upgrade_security = upgrade_security  # type: ignore[attr-defined]
    with pytest.raises(Libp2pChanged, match=r"upgrade_security is now"):
        _libp2p.refuse_peers(host, lambda peer_id: True)


class _Pieces:
    """A connection whose reads return the given pieces, then EOF."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)
        self.asked: list[int | None] = []

    async def read(self, n: int | None = None) -> bytes:
        self.asked.append(n)
        await trio.lowlevel.checkpoint()
        return self.pieces.pop(0) if self.pieces else b""


class _Plain:
    """A Noise state that 'decrypts' by reversing, so a skipped step would show."""

    def decrypt(self, data: bytes) -> bytes:
        assert isinstance(data, bytes)
        return data[::-1]


def _noise_reader(conn: _Pieces) -> Any:
    reader = noise_io.NoiseTransportReadWriter.__new__(noise_io.NoiseTransportReadWriter)
    reader.read_writer = noise_io.NoisePacketReadWriter(conn)  # type: ignore[arg-type]
    reader.noise_state = _Plain()  # type: ignore[assignment]
    return reader


def _noise_wire(*messages: bytes) -> bytes:
    return b"".join(len(m).to_bytes(2, "big") + m[::-1] for m in messages)


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 1000])
async def test_noise_messages_read_in_bulk_come_out_whole_however_the_bytes_arrive(
    cut: int,
) -> None:
    messages = [b"a" * 5, b"", b"bc" * 300, b"d"]
    wire = _noise_wire(*messages)
    conn = _Pieces([wire[i : i + cut] for i in range(0, len(wire), cut)])
    reader = _noise_reader(conn)
    with trio.fail_after(5):
        got = [await _libp2p._read_noise_message(reader) for _ in messages]
        assert got == messages
        with pytest.raises(IncompleteReadError) as closed:
            await _libp2p._read_noise_message(reader)
    assert closed.value.is_clean_close  # EOF between messages, as py-libp2p says it
    if cut == 1000:
        assert len(conn.asked) == 2  # one read for all four messages, one for the EOF


async def test_a_connection_closed_inside_a_noise_message_is_not_a_clean_close() -> None:
    reader = _noise_reader(_Pieces([_noise_wire(b"hello")[:4]]))
    with trio.fail_after(5), pytest.raises(IncompleteReadError) as closed:
        await _libp2p._read_noise_message(reader)
    assert not closed.value.is_clean_close


class _Messages:
    def __init__(self, messages: list[bytes]) -> None:
        self.messages = list(messages)

    async def read_msg(self) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.messages.pop(0) if self.messages else b""


async def test_a_secure_session_reads_exact_sizes_across_messages() -> None:
    session: Any = SecureSession.__new__(SecureSession)
    session.conn = _Messages([b"0123456789", b"abc", b"defgh"])
    with trio.fail_after(5):
        assert await _libp2p._read_session(session, 4) == b"0123"
        assert await _libp2p._read_session(session, 6) == b"456789"  # the rest, as it is
        assert await _libp2p._read_session(session, 5) == b"abcde"  # across two messages
        assert await _libp2p._read_session(session, None) == b"fgh"  # what is left
        assert await _libp2p._read_session(session, 0) == b""
        with pytest.raises(ConnectionClosedError):
            await _libp2p._read_session(session, 3)


async def test_a_secure_session_closed_part_way_returns_what_arrived() -> None:
    session: Any = SecureSession.__new__(SecureSession)
    session.conn = _Messages([b"abc"])
    with trio.fail_after(5):
        assert await _libp2p._read_session(session, 10) == b"abc"


async def test_read_exactly_goes_on_after_a_short_first_read() -> None:
    apply_to_process()
    with trio.fail_after(5):
        assert await _libp2p._read_exactly(_Pieces([b"ab", b"c", b"def"]), 6) == b"abcdef"
        with pytest.raises(IncompleteReadError):
            await _libp2p._read_exactly(_Pieces([b"ab"]), 6)


async def test_a_free_quick_lock_does_not_yield_and_a_held_one_waits_its_turn() -> None:
    lock = _libp2p.QuickLock()
    order: list[str] = []

    async def other(name: str) -> None:
        order.append(name)
        async with lock:
            order.append(f"{name} has it")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other, "first")
            async with lock:  # free: no checkpoint, so "first" has not run yet
                assert order == []
                await trio.testing.wait_all_tasks_blocked()
                assert order == ["first"]  # it waits for the lock
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["first", "first has it"]


def test_hosts_get_quick_locks_where_py_libp2p_made_trio_locks() -> None:
    apply_to_process()
    stream = yamux.YamuxStream(1, None, True)  # type: ignore[arg-type]
    assert isinstance(stream.window_lock, _libp2p.QuickLock)
    tcp = TrioTCPStream(None)  # type: ignore[arg-type]
    assert isinstance(tcp.read_lock, _libp2p.QuickLock)
    assert isinstance(tcp.write_lock, _libp2p.QuickLock)
    net = NetStream(stream, None, None)  # type: ignore[arg-type]
    assert isinstance(net._state_lock, _libp2p.QuickLock)


def test_a_reshaped_secure_session_is_refused_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    apply_to_process()
    # As if this process had not patched them yet.
    replaced = _libp2p.REPLACED
    monkeypatch.setattr(
        noise_io.NoiseTransportReadWriter, "read_msg", replaced["NoiseTransportReadWriter.read_msg"]
    )
    monkeypatch.setattr(SecureSession, "read", replaced["SecureSession.read"])
    monkeypatch.setitem(vars(yamux), "read_exactly", replaced["read_exactly"])
    monkeypatch.delattr(SecureSession, "_drain")
    with pytest.raises(Libp2pChanged, match=r"SecureSession\._drain is gone"):
        apply_to_process()


def test_yamux_settings_are_read_from_the_environment_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    apply_to_process()
    monkeypatch.setattr(_libp2p, "_TUNING", {})
    monkeypatch.setenv("PY_YAMUX_DATA_READ_TIMEOUT", "7")
    assert yamux._yamux_data_read_timeout() == 7.0
    monkeypatch.setenv("PY_YAMUX_DATA_READ_TIMEOUT", "9")  # after the start: not seen
    assert yamux._yamux_data_read_timeout() == 7.0


async def test_a_quick_lock_waiter_cancelled_while_waiting_never_holds_it() -> None:
    lock = _libp2p.QuickLock()
    got: list[str] = []

    async def wait_for_it(name: str, scope: trio.CancelScope) -> None:
        with scope:
            async with lock:
                got.append(name)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            first, second = trio.CancelScope(), trio.CancelScope()
            await lock.acquire()
            nursery.start_soon(wait_for_it, "first", first)
            nursery.start_soon(wait_for_it, "second", second)
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()
            await trio.testing.wait_all_tasks_blocked()
            lock.release()  # handed to "second", the one still waiting
            await trio.testing.wait_all_tasks_blocked()
    assert got == ["second"]
    assert not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()


async def test_noise_messages_over_a_socket_are_read_from_it_directly_and_whole() -> None:
    apply_to_process()
    ours, theirs = trio.socket.socketpair()
    stream = trio.SocketStream(ours)
    reader = _noise_reader(RawConnection(TrioTCPStream(stream), False))  # type: ignore[arg-type]
    messages = [b"a" * 5, b"bc" * 30_000, b"", b"d" * 65_000]
    wire = _noise_wire(*messages)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                sender = trio.SocketStream(theirs)
                for start in range(0, len(wire), 40_000):  # in pieces, across messages
                    await sender.send_all(wire[start : start + 40_000])
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(send)
            got = [await _libp2p._read_noise_message(reader) for _ in messages]
        assert got == messages
        assert reader._p2p_inbox.sock is ours  # read from the socket, not through conn.read
        theirs.close()
        with pytest.raises(IncompleteReadError) as closed:
            await _libp2p._read_noise_message(reader)
        assert closed.value.is_clean_close


async def test_a_socket_closed_here_while_its_reader_waits_ends_the_read_cleanly() -> None:
    apply_to_process()
    ours, theirs = trio.socket.socketpair()
    stream = trio.SocketStream(ours)
    reader = _noise_reader(RawConnection(TrioTCPStream(stream), False))  # type: ignore[arg-type]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.aclose)  # once the reader waits
            with pytest.raises(IncompleteReadError) as closed:
                await _libp2p._read_noise_message(reader)
    assert closed.value.is_clean_close
    theirs.close()


async def _receive_all(sock: Any, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        piece = await sock.recv(1 << 20)
        assert piece, "closed early"
        got += piece
    return bytes(got)


async def test_tcp_writes_sent_on_the_socket_arrive_whole_however_much_it_takes() -> None:
    apply_to_process()
    ours, theirs = trio.socket.socketpair()
    tcp = TrioTCPStream(trio.SocketStream(ours))
    small, large = b"x" * 600, bytes(range(256)) * 16_384  # 4 MiB: more than one send takes
    with trio.fail_after(10):
        await tcp.write(small)
        assert await _receive_all(theirs, len(small)) == small
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def receive() -> None:
                got.append(await _receive_all(theirs, len(large)))

            nursery.start_soon(receive)
            await tcp.write(large)
        assert got == [large]
        theirs.close()
        with pytest.raises(ConnectionClosedError):  # the peer is gone
            for _ in range(100):
                await tcp.write(small)
        await tcp.close()
        await tcp.write(small)  # closed here: nothing, as py-libp2p does


async def test_a_whole_tcp_write_takes_no_scheduling_round_but_one_in_sixteen_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    apply_to_process()
    monkeypatch.setattr(_libp2p, "_unyielded_writes", 0)
    ours, theirs = trio.socket.socketpair()
    tcp = TrioTCPStream(trio.SocketStream(ours))
    ran: list[int] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _note(ran))
            writes = 0
            while not ran:
                await tcp.write(b"x" * 600)
                writes += 1
        # No round before the 16th write; at it, trio may step this task before or
        # after the other (it shuffles each batch), so that one runs by the 32nd.
        assert writes in (_libp2p.DIRECT_WRITES_PER_YIELD, 2 * _libp2p.DIRECT_WRITES_PER_YIELD)
        assert await _receive_all(theirs, 600 * writes) == b"x" * 600 * writes
        with trio.CancelScope() as scope:  # a cancelled write sends nothing
            scope.cancel()
            await tcp.write(b"y")
        with pytest.raises(BlockingIOError):
            theirs._sock.recv(1)
    theirs.close()


async def _note(ran: list[int]) -> None:
    ran.append(1)


class _Sealer:
    def encrypt(self, data: bytes) -> bytes:
        return b"<" + data[::-1] + b">"


async def test_a_noise_message_is_written_sealed_after_its_length_in_one_write() -> None:
    apply_to_process()
    conn = _Written()
    writer = noise_io.NoiseTransportReadWriter.__new__(noise_io.NoiseTransportReadWriter)
    writer.read_writer = noise_io.NoisePacketReadWriter(conn)  # type: ignore[arg-type]
    writer.noise_state = _Sealer()  # type: ignore[assignment]
    with trio.fail_after(5):
        await writer.write_msg(b"abc")
        longest = noise_io.MAX_PLAINTEXT_LENGTH
        await writer.write_msg(b"y" * (longest + 1))  # two messages, as py-libp2p cuts it
    assert conn.writes[0] == b"\x00\x05<cba>"
    assert [len(w) for w in conn.writes[1:]] == [2 + longest + 2, 2 + 1 + 2]


class _Written:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))


class _CountingSealer:
    """Seals as `_Sealer` does, counting the nonces spent; `then` runs after each."""

    def __init__(self, then: Callable[[], object] = lambda: None) -> None:
        self.sealed = 0
        self.then = then

    def encrypt(self, data: bytes) -> bytes:
        self.sealed += 1
        self.then()
        return b"<" + data[::-1] + b">"


async def test_a_noise_message_is_cancelled_before_it_is_sealed_never_after() -> None:
    # A sealed message spends a nonce: one not sent breaks the connection (the
    # peer's next decryption fails), so a deadline passing once it is sealed must
    # not stop it. Here the caller's scope is cancelled while the message is sealed.
    apply_to_process()
    ours, theirs = trio.socket.socketpair()
    writer = noise_io.NoiseTransportReadWriter.__new__(noise_io.NoiseTransportReadWriter)
    tcp = TrioTCPStream(trio.SocketStream(ours))
    writer.read_writer = noise_io.NoisePacketReadWriter(tcp)  # type: ignore[arg-type]
    with trio.fail_after(5):
        sealer = _CountingSealer()
        writer.noise_state = sealer  # type: ignore[assignment]
        with trio.CancelScope() as scope:  # cancelled before: nothing sealed, nothing sent
            scope.cancel()
            await writer.write_msg(b"abc")
        assert scope.cancelled_caught and sealer.sealed == 0
        with pytest.raises(BlockingIOError):
            theirs._sock.recv(1)
        with trio.CancelScope() as scope:
            sealer.then = scope.cancel  # the deadline passes while it is sealed
            await writer.write_msg(b"abc")
        assert sealer.sealed == 1
        assert await _receive_all(theirs, 7) == b"\x00\x05<cba>"  # sent whole all the same
    theirs.close()


def _noise_pair() -> tuple[Any, Any]:
    """Two ends of a finished Noise handshake (the noise library py-libp2p uses)."""
    from noise.connection import NoiseConnection

    ends = [NoiseConnection.from_name(b"Noise_NN_25519_ChaChaPoly_SHA256") for _ in range(2)]
    ends[0].set_as_initiator()
    ends[1].set_as_responder()
    for end in ends:
        end.start_handshake()
    ends[1].read_message(ends[0].write_message())
    ends[0].read_message(ends[1].write_message())
    assert all(end.handshake_finished for end in ends)
    return ends[0], ends[1]


async def test_noise_messages_sealed_and_opened_in_place_come_out_whole_and_in_order() -> None:
    # Sealed into the connection's own buffer (cryptography's encrypt_into), or by
    # py-libp2p's own path for a message longer than one Noise message: one nonce
    # count for both, the buffer used again for the next. Opened where they lie in
    # the reader's buffer, with the same count.
    apply_to_process()
    ours, theirs = trio.socket.socketpair()
    sender, receiver = _noise_pair()
    writer = _noise_end(ours, sender)
    reader = _noise_end(theirs, receiver)
    longest = noise_io.MAX_PLAINTEXT_LENGTH
    messages = [b"abc", b"x" * longest, b"", b"y" * (longest + 5), b"z" * 1000]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write_all, writer, messages)
            opened = [await _libp2p._read_noise_message(reader) for _ in range(6)]
    assert writer.__dict__["_p2p_sealer"]._state is not None  # sealed in place
    assert reader.__dict__["_p2p_inbox"].opener.in_place  # opened in place
    assert opened[:3] == messages[:3] and b"".join(opened[3:5]) == messages[3]
    assert opened[5] == messages[4]
    ours.close()
    theirs.close()


async def test_a_noise_message_that_fails_authentication_is_refused_and_spends_no_nonce() -> None:
    apply_to_process()
    ours, theirs = trio.socket.socketpair()
    sender, receiver = _noise_pair()
    reader = _noise_end(theirs, receiver)
    good = sender.encrypt(b"hello")
    forged = bytearray(good)
    forged[3] ^= 1
    with trio.fail_after(5):
        await ours.send(len(forged).to_bytes(2, "big") + forged)
        with pytest.raises(NoiseInvalidMessage, match="Failed authentication"):
            await _libp2p._read_noise_message(reader)
        await ours.send(len(good).to_bytes(2, "big") + good)
        assert await _libp2p._read_noise_message(reader) == b"hello"  # its nonce unspent
    ours.close()
    theirs.close()


def _noise_end(sock: Any, noise: Any) -> Any:
    end = noise_io.NoiseTransportReadWriter.__new__(noise_io.NoiseTransportReadWriter)
    end.read_writer = noise_io.NoisePacketReadWriter(TrioTCPStream(trio.SocketStream(sock)))  # type: ignore[arg-type]
    end.noise_state = noise
    return end


async def _write_all(writer: Any, messages: list[bytes]) -> None:
    for message in messages:
        await writer.write_msg(message)


def _kernel_caps_retransmission() -> bool:
    with socket.socket() as sock:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _libp2p.TCP_RTO_MAX_MS, _libp2p.RTO_MAX_MS)
        except OSError:
            return False
    return True


@pytest.mark.skipif(not _kernel_caps_retransmission(), reason="the kernel has no TCP_RTO_MAX_MS")
async def test_both_ends_of_a_connection_cap_their_retransmission_timer() -> None:
    """So that a link that dropped packets (a partition) resumes within a second of
    coming back, not at TCP's next try, up to 120 s later."""
    with trio.fail_after(30):
        async with open_swarm(2, topology="full") as swarm:
            await swarm.wait_converged()
            caps = []
            for i in swarm.live:
                for conns in swarm[i]._rpc.host.get_network().connections.values():
                    for conn in conns:
                        sock = _libp2p.tcp_socket(conn)
                        assert sock is not None
                        caps.append(sock.getsockopt(socket.IPPROTO_TCP, _libp2p.TCP_RTO_MAX_MS))
    assert caps == [_libp2p.RTO_MAX_MS] * 2


def test_a_kernel_without_the_cap_leaves_connections_as_they_are(monkeypatch) -> None:
    class OldKernelSocket(trio.socket.SocketType):  # type: ignore[misc]
        def setsockopt(self, *args: Any) -> None:
            raise OSError(92, "Protocol not available")  # ENOPROTOOPT

    monkeypatch.setattr(_libp2p, "_rto_cap_unsupported", False)
    _libp2p.cap_retransmission(OldKernelSocket.__new__(OldKernelSocket))  # no error
    assert _libp2p._rto_cap_unsupported  # and later connections are not asked again
