"""What a node's record tells its peers to dial."""

from __future__ import annotations

import socket
from pathlib import Path

import psutil
import pytest
import trio

from p2p_node import NodeConfig, open_node
from p2p_node._config import ConfigError

SERVE = frozenset({"digits-logreg"})


def _has_outside_ipv4() -> bool:
    return any(
        a.family == socket.AF_INET and not a.address.startswith("127.")
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
    )


async def _record_seen_by_peer(
    config: NodeConfig, tmp_path: Path
) -> tuple[list[str], tuple[str, ...]]:
    """(the node's own addresses, the addresses a peer holds for it from its record)."""
    async with open_node(config) as node:
        loopback = next(a for a in node.addrs if a.startswith("/ip4/127."))
        peer_config = NodeConfig(
            data_dir=tmp_path / "peer", serve_models=SERVE, bootstrap=(loopback,)
        )
        async with open_node(peer_config) as peer:
            seen = await peer.view.wait_until(
                lambda v: any(p.peer_id == node.peer_id for p in v.alive())
            )
            (known,) = [p for p in seen.alive() if p.peer_id == node.peer_id]
            return node.addrs, known.record.addrs


@pytest.mark.skipif(not _has_outside_ipv4(), reason="this machine has no non-loopback IPv4")
async def test_a_node_on_every_interface_announces_no_loopback_address(tmp_path: Path) -> None:
    config = NodeConfig(data_dir=tmp_path / "a", listen=("/ip4/0.0.0.0/tcp/0",), serve_models=SERVE)
    with trio.fail_after(30):
        own, announced = await _record_seen_by_peer(config, tmp_path)
    assert any(a.startswith("/ip4/127.") for a in own)  # still printed for local use
    assert announced
    assert not [a for a in announced if a.startswith("/ip4/127.")]
    assert set(announced) <= set(own)


async def test_announced_addresses_replace_the_listen_addresses(tmp_path: Path) -> None:
    public = ("/ip4/203.0.113.7/tcp/4001", "/dns4/node.example.org/tcp/4001")
    config = NodeConfig(data_dir=tmp_path / "a", announce=public, serve_models=SERVE)
    with trio.fail_after(30):
        own, announced = await _record_seen_by_peer(config, tmp_path)
    peer_id = own[0].rsplit("/p2p/", 1)[1]
    assert announced == tuple(f"{a}/p2p/{peer_id}" for a in public)


def test_an_announced_address_names_no_peer(tmp_path: Path) -> None:
    addr = "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
    with pytest.raises(ConfigError, match="leave out /p2p/"):
        NodeConfig(data_dir=tmp_path, announce=(addr,))
    with pytest.raises(ConfigError, match="at most 16"):
        NodeConfig(data_dir=tmp_path, announce=("/ip4/203.0.113.7/tcp/1",) * 17)
