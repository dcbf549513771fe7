"""Private networks: the swarm.key format, and real hosts that do or do not hold the key."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import trio

from p2p_node import Client, ErrorCode, JobError, NodeConfig, open_node
from p2p_node._cli import main
from p2p_node._psk import (
    PSK_BYTES,
    PreSharedKey,
    PskError,
    format_psk,
    parse_psk,
    read_psk_file,
    write_new_psk_file,
)
from p2p_node.testing import open_swarm

# A key file as `ipfs-swarm-key-gen` writes it.
GO_SWARM_KEY = (
    b"/key/swarm/psk/1.0.0/\n/base16/\n"
    b"4f2b1f1a5fd5e0d1b0a8d2d3cbd9e7d1c0e46f2a4a8e1b1c9d0f1e2d3c4b5a69\n"
)

# --- the key file ---------------------------------------------------------------------


def test_a_go_libp2p_swarm_key_is_read() -> None:
    psk = parse_psk(GO_SWARM_KEY)
    assert psk.hex == "4f2b1f1a5fd5e0d1b0a8d2d3cbd9e7d1c0e46f2a4a8e1b1c9d0f1e2d3c4b5a69"


def test_format_and_parse_round_trip() -> None:
    psk = PreSharedKey.generate()
    text = format_psk(psk)
    assert text.splitlines()[:2] == [b"/key/swarm/psk/1.0.0/", b"/base16/"]
    assert parse_psk(text) == psk


def test_base64_and_binary_encodings_are_read() -> None:
    import base64

    key = bytes(range(PSK_BYTES))
    header = b"/key/swarm/psk/1.0.0/\n"
    assert parse_psk(header + b"/base64/\n" + base64.b64encode(key) + b"\n").key == key
    assert parse_psk(header + b"/bin/\n" + key).key == key


def test_the_key_never_shows_in_a_repr() -> None:
    psk = PreSharedKey(bytes(range(PSK_BYTES)))
    shown = repr(NodeConfig(data_dir=Path("x"), psk=psk))
    assert psk.hex not in shown and psk.fingerprint in shown


@pytest.mark.parametrize(
    ("data", "in_message"),
    [
        (b"", "not a swarm.key file"),
        (b"/key/swarm/psk/2.0.0/\n/base16/\n" + b"00" * 32, "not a swarm.key file"),
        (b"/key/swarm/psk/1.0.0/\n/base32/\n" + b"00" * 32, "unknown key encoding"),
        (b"/key/swarm/psk/1.0.0/\n/base16/\n" + b"zz" * 32, "not valid /base16/"),
        (b"/key/swarm/psk/1.0.0/\n/base16/\n" + b"00" * 31, "31 bytes"),
        (b"/key/swarm/psk/1.0.0/\n/base16/\n" + b"00" * 33, "33 bytes"),
        (b"/key/swarm/psk/1.0.0/\n/base64/\n!!!!", "not valid /base64/"),
        (b"/key/swarm/psk/1.0.0/\n/base16/\n\xff\xfe", "not valid /base16/"),
    ],
    ids=["empty", "version", "encoding", "hex", "short", "long", "base64", "utf8"],
)
def test_a_bad_key_file_is_one_typed_line(data: bytes, in_message: str) -> None:
    with pytest.raises(PskError) as caught:
        parse_psk(data, "swarm.key")
    assert in_message in str(caught.value)
    assert str(caught.value).startswith("swarm.key: ")
    assert "\n" not in str(caught.value)


def test_a_new_key_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    psk = write_new_psk_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_psk_file(path) == psk
    with pytest.raises(PskError, match="exists; refusing to overwrite"):
        write_new_psk_file(path)
    assert read_psk_file(path) == psk


def test_missing_and_oversize_key_files_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(PskError, match="cannot read key file"):
        read_psk_file(tmp_path / "nope.key")
    big = tmp_path / "big.key"
    big.write_bytes(b"/key/swarm/psk/1.0.0/\n" + b"0" * 10_000)
    with pytest.raises(PskError, match="over 4096 bytes"):
        read_psk_file(big)


def test_a_key_file_others_can_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "swarm.key"
    path.write_bytes(GO_SWARM_KEY)
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="p2p_node._psk"):
        read_psk_file(path)
    assert "can be read by others" in caplog.text


def test_keygen_writes_a_key_and_an_identity_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, identity = tmp_path / "swarm.key", tmp_path / "client.id"
    assert main(["keygen", "--psk", str(key), "--identity", str(identity)]) == 0
    out = capsys.readouterr().out
    assert read_psk_file(key).fingerprint in out
    assert "--allow-client 12D3KooW" in out
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    assert main(["keygen", "--psk", str(key)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_a_node_with_a_bad_key_file_does_not_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "swarm.key"
    bad.write_bytes(b"not a key\n")
    argv = ["start", "--data-dir", str(tmp_path / "d"), "--psk", str(bad)]
    assert main(argv) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("p2p-node start: ") and "not a swarm.key file" in line


# --- real hosts -----------------------------------------------------------------------


class _Refusals(logging.Handler):
    """Collects the refused-connection warnings, and wakes a trio task on the first."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.seen = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "refused a connection" in record.getMessage():
            self.messages.append(record.getMessage())
            self.seen.set()


async def test_nodes_with_the_same_key_talk(digits) -> None:
    x, _ = digits
    psk = PreSharedKey.generate()
    shares = [frozenset({"digits-logreg"}), frozenset({"digits-mlp"})]
    with trio.fail_after(30):
        async with open_swarm(2, models=shares, psk=psk) as swarm:
            await swarm.wait_converged()
            async with Client.connect(swarm[0].addrs[0], psk=psk) as client:
                result = await client.submit("digits-mlp", {"input": x[:1]})
    assert result.executor == swarm[1].peer_id


@pytest.mark.parametrize("outsider_key", ["another", "none"])
async def test_a_node_without_the_key_cannot_connect_and_it_is_logged(
    tmp_path: Path, outsider_key: str
) -> None:
    psk = PreSharedKey.generate()
    other = PreSharedKey.generate() if outsider_key == "another" else None
    refusals = _Refusals()
    logging.getLogger("p2p_node._libp2p").addHandler(refusals)
    try:
        with trio.fail_after(30):
            async with open_swarm(1, psk=psk) as swarm:
                member = swarm[0]
                config = NodeConfig(data_dir=tmp_path / "outsider", psk=other, dial_timeout=1.0)
                async with open_node(config) as outsider:
                    with pytest.raises(JobError) as caught:
                        await outsider.connect(member.addrs[0])
                    await refusals.seen.wait()
                    assert member.peer_id not in outsider.connected_peers()
                    assert outsider.peer_id not in member.connected_peers()
                    assert not member.view.snapshot().peers
    finally:
        logging.getLogger("p2p_node._libp2p").removeHandler(refusals)
    assert caught.value.code == ErrorCode.PEER_UNREACHABLE
    assert "same private network (--psk)" in caught.value.message
    assert "127.0.0.1:" in refusals.messages[0]
    assert psk.fingerprint in refusals.messages[0]


async def test_a_client_without_the_key_cannot_submit() -> None:
    psk = PreSharedKey.generate()
    with trio.fail_after(30):
        async with open_swarm(1, psk=psk) as swarm:
            for client_key in (None, PreSharedKey.generate()):
                with pytest.raises(JobError) as caught:
                    async with Client.connect(swarm[0].addrs[0], psk=client_key, timeout=1):
                        pytest.fail("connected without the network's key")
                assert caught.value.code == ErrorCode.PEER_UNREACHABLE
            async with Client.connect(swarm[0].addrs[0], psk=psk) as client:
                assert await client.models()


async def test_the_demo_runs_as_a_private_network() -> None:
    from p2p_node._demo import run_demo

    with trio.fail_after(60):
        rows = await run_demo(2, PreSharedKey.generate())
    assert len(rows) > 1
    assert all("right" in row[4] or "wrong" in row[4] for row in rows[1:-1])
    assert "tokens" in rows[-1][4]  # the generation, streamed under the key too


class _FailingNetwork:
    """Stands in for the swarm: every inbound upgrade fails, as a stranger's would."""

    async def upgrade_inbound_raw_conn(self, raw_conn: object, maddr: object) -> object:
        raise RuntimeError("garbage where a handshake should be")


class _FakeHost:
    def __init__(self) -> None:
        self.network = _FailingNetwork()

    def get_network(self) -> _FailingNetwork:
        return self.network


class _RawConn:
    def __init__(self, ip: str, port: int) -> None:
        self.address = (ip, port)

    def get_remote_address(self) -> tuple[str, int]:
        return self.address


async def test_each_address_is_warned_of_once_then_logged_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from p2p_node._libp2p import log_refused_handshakes

    host = _FakeHost()
    psk = PreSharedKey.generate()
    log_refused_handshakes(host, psk)  # type: ignore[arg-type]
    upgrade = host.network.upgrade_inbound_raw_conn
    dials = [("10.0.0.1", 4001), ("10.0.0.1", 4002), ("10.0.0.2", 4001), ("10.0.0.1", 4003)]
    with trio.fail_after(5), caplog.at_level(logging.DEBUG, logger="p2p_node._libp2p"):
        for ip, port in dials:
            with pytest.raises(RuntimeError):
                await upgrade(_RawConn(ip, port), None)
    refused = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in refused] == [
        logging.WARNING,
        logging.DEBUG,
        logging.WARNING,
        logging.DEBUG,
    ]
    assert all(psk.fingerprint in message and "RuntimeError" in message for _, message in refused)
