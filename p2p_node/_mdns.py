"""Finding peers on the LAN with mDNS (py-libp2p's, over zeroconf), for membership.

The node runs py-libp2p's `MDNSDiscovery` itself rather than through
`new_host(enable_mDNS=True)`, for two reasons:

- The host's own mDNS announces the raw listen addresses: a node listening on
  `/ip4/0.0.0.0/tcp/4001` tells its LAN to dial 0.0.0.0, which means the dialer
  itself. Here it announces the node's own addresses, with the wildcard expanded
  to the machine's addresses (and loopback left out when there are others).
- The host registers the service on the trio thread, and zeroconf's register and
  unregister block for about a second each while they probe and announce. Here
  they run in a worker thread.

zeroconf calls back from its own threads: found peers cross into trio with
`TrioToken.run_sync_soon`, onto the channel that `Membership` takes them from.
py-libp2p reports them through a process-wide hook, so in a process that runs
several nodes each hears what any of them found (all on the same LAN).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.discovery.mdns import MDNSDiscovery, create_mdns_discovery
from libp2p.peer.peerinfo import PeerInfo

from ._membership import Found

if TYPE_CHECKING:
    # libp2p pulls in trio-typing, whose trio stubs shadow trio's own annotations.
    from trio_typing import TaskStatus

logger = logging.getLogger(__name__)


def lan_addrs(addrs: Sequence[str]) -> list[str]:
    """The addresses to announce on the LAN: without loopback ones, unless that is all."""
    outside = [a for a in addrs if not a.startswith(("/ip4/127.", "/ip6/::1/"))]
    return outside or list(addrs)


async def run_mdns(
    host: IHost,
    addrs: Sequence[str],
    found: trio.MemorySendChannel[Found],
    *,
    task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Announce `addrs` (full multiaddrs of this node) on the LAN and send every peer
    found there on `found`, until cancelled."""
    me = str(host.get_id())
    token = trio.lowlevel.current_trio_token()
    announced = lan_addrs(addrs)

    def take(peer_id: str, transports: tuple[str, ...]) -> None:  # on the trio thread
        try:
            found.send_nowait((peer_id, transports))
        except trio.WouldBlock:
            logger.debug("mDNS found %s while membership was behind: dropped", peer_id)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # membership is gone: the node is stopping

    def discovered(info: PeerInfo) -> None:  # on a zeroconf thread
        peer_id = str(info.peer_id)
        if peer_id == me:
            return
        with contextlib.suppress(trio.RunFinishedError):  # the node has stopped
            token.run_sync_soon(take, peer_id, tuple(str(a) for a in info.addrs))

    def start() -> MDNSDiscovery:
        discovery = create_mdns_discovery(
            host.get_network(), port=_tcp_port(announced), listen_addrs=announced
        )
        discovery.broadcaster.register()
        return discovery

    peerDiscovery.register_peer_discovered_handler(discovered)
    try:
        discovery = await trio.to_thread.run_sync(start)
        try:
            logger.info("mDNS: announcing %s on the LAN", announced)
            task_status.started()
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(discovery.stop)
    finally:
        peerDiscovery.unregister_peer_discovered_handler(discovered)


def _tcp_port(addrs: Sequence[str]) -> int:
    for addr in addrs:
        try:
            return int(multiaddr.Multiaddr(addr).value_for_protocol("tcp"))
        except multiaddr.exceptions.ProtocolLookupError:
            continue
    return 0
