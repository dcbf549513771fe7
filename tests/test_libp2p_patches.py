"""The patches to py-libp2p: applied by building a host, never by an import, and
refused loudly where py-libp2p no longer has the shape they were written for."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.pubsub.pubsub import Pubsub
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux import yamux

from p2p_node import _libp2p
from p2p_node._host import new_libp2p_host
from p2p_node._libp2p import Libp2pChanged, apply_to_process

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
    )


def test_applying_twice_changes_nothing_more() -> None:
    apply_to_process()
    once = _yamux_patched()
    apply_to_process()
    assert _yamux_patched() == once
    assert once[1] is _libp2p._window_update_when_half_read
    assert once[2] is _libp2p._write_woken_by_window
    assert once[3] is _libp2p._write_frame_quietly


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
