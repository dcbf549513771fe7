"""A swarm of real nodes in one trio process: for tests, benchmarks and experiments.

Every node is a full `p2p_node` node (libp2p host on loopback with TCP, Noise
and Yamux, GossipSub, onnxruntime); only the process is shared. ::

    async with open_swarm(10, topology="random", degree=4) as swarm:
        await swarm.wait_converged()
        await swarm.kill(3)                 # abrupt: its connections drop
        swarm.stall(4, seconds=2.0)         # alive but silent
        await swarm.partition([range(0, 5), range(5, 10)])
        await swarm.block(0, [swarm[1].peer_id])  # one-sided: node 0 refuses node 1
        await swarm.heal()
        await swarm.wait_converged()
"""

from __future__ import annotations

import gc
import inspect
import os
import random
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import multiaddr
import trio

from gossip import Capabilities, PeerState, ViewSnapshot

from . import _swarm_proc
from ._config import GossipConfig, NodeConfig
from ._libp2p import tcp_socket
from ._node import Node, open_node
from ._psk import PreSharedKey
from ._swarm_proc import NodeHandle, ProcessSwarm, RemoteError, SwarmWorkerError, partition_cuts

if TYPE_CHECKING:
    # libp2p pulls in trio-typing, whose trio stubs shadow trio's own annotations.
    from trio_typing import TaskStatus

    from ._swarm_netns import Namespaces

Topology = Literal["full", "ring", "random"]

__all__ = [
    "Blocklist",
    "NodeHandle",
    "ProcessSwarm",
    "RemoteError",
    "Swarm",
    "SwarmWorkerError",
    "Topology",
    "edges",
    "open_rogue",
    "open_swarm",
]


def edges(
    n: int, topology: Topology, degree: int = 4, seed: int = 0, groups: int = 1
) -> set[tuple[int, int]]:
    """Undirected edges (i, j) with j < i: who dials whom when the swarm starts.

    "random": node i dials node i - `groups` (the one before it in its worker,
    when nodes are dealt to `groups` workers in turn; i - 1 in one process) and
    max(1, degree/2 - 1) random earlier nodes (degree/2 while it is first in its
    worker): degree `degree` on average. The chain keeps every worker's nodes, and any
    range of indices, connected: a partition by workers or by index ranges cuts
    links, and leaves no node without one on its side. With random links only
    (each node dialing degree/2 earlier ones), a 100/100 cut of 200 nodes left
    22 of them with no link on their side, unheard there until the heal."""
    if topology == "full":
        return {(i, j) for i in range(n) for j in range(i)}
    if topology == "ring":
        return {(i, i - 1) for i in range(1, n)} | ({(n - 1, 0)} if n > 2 else set())
    if topology == "random":
        if groups < 1:
            raise ValueError(f"groups must be at least 1, got {groups}")
        rng = random.Random(seed)
        out = set()
        picks = max(1, degree // 2)
        for i in range(1, n):
            if i >= groups:
                out.add((i, i - groups))
                others = [j for j in range(i) if j != i - groups]
                for j in rng.sample(others, min(len(others), max(1, picks - 1))):
                    out.add((i, j))
            else:
                for j in rng.sample(range(i), min(i, picks)):
                    out.add((i, j))
        return out
    raise ValueError(f"unknown topology {topology!r}; use full, ring or random")


class Blocklist:
    """The peers one node of the swarm refuses: its connection gate (see `open_node`)."""

    def __init__(self) -> None:
        self.peers: set[str] = set()
        self.refused = 0  # connections refused so far, at their handshake or on connecting

    def allows(self, peer_id: str) -> bool:
        if peer_id in self.peers:
            self.refused += 1
            return False
        return True


class Swarm:
    """Handles on a running swarm. Indices are stable; killed nodes stay dead."""

    def __init__(
        self, nodes: list[Node], scopes: list[trio.CancelScope], blocklists: list[Blocklist]
    ) -> None:
        self.nodes = nodes
        self._scopes = scopes
        self.blocklists = blocklists
        self.dead: set[int] = set()

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, i: int) -> Node:
        return self.nodes[i]

    @property
    def live(self) -> list[int]:
        return [i for i in range(len(self.nodes)) if i not in self.dead]

    async def run(self, i: int, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(node_i, *args)`, awaited if it returns an awaitable: the way to reach a
        node that works for every swarm (in a `ProcessSwarm` fn runs in the node's
        worker, so it must be picklable: a module-level function or a partial)."""
        result = fn(self.nodes[i], *args)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def cpu_seconds(self) -> float:
        """CPU time this process has used so far (all nodes run in it)."""
        return time.process_time()

    async def kill(self, i: int) -> None:
        """Stop node i abruptly, as a SIGKILL would: its TCP sockets close at once, so
        peers see the connections drop, then the node's tasks are cancelled."""
        self.dead.add(i)
        await kill_node(self.nodes[i], self._scopes[i])

    def stall(self, i: int, seconds: float) -> None:
        """Node i stays up but publishes no record for `seconds`."""
        self.nodes[i].gossip.silence(seconds)

    @contextmanager
    def busy(self, i: int) -> Iterator[None]:
        """Hold all of node i's worker slots: requests it admits wait until the block
        ends (or are cancelled). Models that run inline on its event loop thread are
        not held back: start the swarm with `ExecutorConfig(inline_below_ms=0)`."""
        slots = self.nodes[i].executor.limiter
        holders = [object() for _ in range(int(slots.total_tokens))]
        for holder in holders:
            slots.acquire_on_behalf_of_nowait(holder)
        try:
            yield
        finally:
            for holder in holders:
                slots.release_on_behalf_of(holder)

    async def block(self, i: int, peer_ids: Collection[str]) -> None:
        """Cut node i's connections to these peers and keep them cut until `heal()`.

        Node i refuses each of them once its handshake names it, whichever side
        dials, and its membership dials them no more; so one side's block keeps
        the link cut, though the other side keeps redialing.
        """
        await block_node(self.nodes[i], self.blocklists[i], peer_ids)

    async def partition(self, groups: Iterable[Iterable[int]]) -> None:
        """Cut every connection between groups, and keep them cut until `heal()`."""
        cuts = partition_cuts(groups, self.live, [node.peer_id for node in self.nodes])
        await block_nodes([(self.nodes[i], self.blocklists[i], cut) for i, cut in cuts])

    async def heal(self) -> None:
        """Lift every block at once; the nodes that had blocked dial their peers again."""
        for i in self.live:
            unblock_node(self.nodes[i], self.blocklists[i])

    def converged(self) -> bool:
        return all(self._complete(i) for i in self.live)

    async def wait_converged(self) -> None:
        """Until every live node sees every other live node alive, and no dead one."""
        for i in self.live:
            await self.nodes[i].view.wait_until(partial(self._complete_view, i))

    def _complete(self, i: int) -> bool:
        return self._complete_view(i, self.nodes[i].view.snapshot())

    def _complete_view(self, i: int, view: ViewSnapshot) -> bool:
        peers = view.peers
        want = {self.nodes[j].peer_id for j in self.live if j != i}
        alive = {p for p, known in peers.items() if known.state is PeerState.ALIVE}
        return alive == want


@asynccontextmanager
async def open_swarm(
    n: int,
    *,
    topology: Topology = "full",
    degree: int = 4,
    seed: int = 0,
    models: Sequence[frozenset[str] | None] | None = None,
    capabilities: Sequence[Capabilities | None] | None = None,
    gossip: GossipConfig | None = None,
    base: NodeConfig | None = None,
    data_root: Path | None = None,
    psk: PreSharedKey | None = None,
    processes: int = 1,
    namespaces: bool = False,
) -> AsyncIterator[Any]:
    """Start n real nodes, dialing each other per `topology`.

    `models[i]` limits node i to some of the repository's models (None: all),
    `capabilities[i]` replaces what node i announces (e.g. a fake GPU). `base`
    is the NodeConfig every node starts from (data_dir is set per node); `psk`
    makes the swarm a private network of that key.

    `processes=1` (the default) runs every node in this trio loop on loopback and
    yields a `Swarm` of the nodes themselves. `processes=k > 1` spreads them over
    k worker processes (node i in worker i mod k, see `worker_of_node`), and yields a
    `ProcessSwarm`: the same API, with `NodeHandle`s for nodes (reach a node with
    `await swarm.run(i, fn, *args)`). `namespaces=True` (Linux, root; implies
    worker processes) runs each worker in a network namespace of its own, with
    its own address, and `partition` cuts links there (see `_swarm_netns`).
    A worker that crashes makes `open_swarm` raise `SwarmWorkerError`.
    Yields as soon as all nodes run; call `wait_converged()` to wait for views.
    """
    if n < 1:
        raise ValueError("a swarm needs at least one node")
    # Where workers write their stderr (workerW.log): kept there when set.
    logs = os.environ.get("P2P_NODE_SWARM_LOGS")
    if processes < 1:
        raise ValueError("a swarm needs at least one process")
    workers = min(processes, n) if processes > 1 or namespaces else 1
    links = edges(n, topology, degree, seed, groups=workers)
    with tempfile.TemporaryDirectory(prefix="p2p-node-swarm-") as tmp:
        root = data_root or Path(tmp)
        template = base or NodeConfig(data_dir=root, shutdown_grace=1.0, target_degree=0)
        if gossip is not None:
            template = replace(template, gossip=gossip)
        if psk is not None:
            template = replace(template, psk=psk)

        def config_of(i: int, addrs: Sequence[str]) -> NodeConfig:
            return replace(
                template,
                data_dir=root / f"node{i}",
                serve_models=models[i] if models else template.serve_models,
                capabilities=capabilities[i] if capabilities else template.capabilities,
                bootstrap=tuple(addrs[j] for (a, j) in sorted(links) if a == i),
            )

        if processes > 1 or namespaces:
            async with _open_process_swarm(
                n, workers, namespaces, links, config_of, Path(logs or tmp)
            ) as process_swarm:
                yield process_swarm
            return
        async with AsyncExitStack() as stack:
            nursery = await stack.enter_async_context(trio.open_nursery())
            nodes: list[Node] = []
            scopes: list[trio.CancelScope] = []
            blocklists = [Blocklist() for _ in range(n)]
            for i in range(n):
                config = config_of(i, [node.addrs[0] for node in nodes])
                scope = trio.CancelScope()
                node = await nursery.start(_run_node, config, scope, blocklists[i])
                nodes.append(node)
                scopes.append(scope)
            # What the started nodes hold lives as long as they do: out of the
            # collector's full passes, which would stall every node at once.
            gc.collect()
            gc.freeze()
            try:
                yield Swarm(nodes, scopes, blocklists)
            finally:
                gc.unfreeze()
                nursery.cancel_scope.cancel()


STARTS_PER_WORKER = 4


def worker_of_node(i: int, k: int) -> int:
    """Which of k workers holds node i: in turn (i mod k), so that each holds as
    many old nodes as new. The first nodes are the hubs of a "random" topology
    (each node dials earlier ones): in blocks of consecutive indices the first
    worker held them all, saturated while the others idled (at 200 nodes in 2
    workers: loop lag 100-250 ms against 5 ms; with namespaces, views never
    converged). With namespaces a partition cuts whole workers: its groups are
    the workers' nodes (`ProcessSwarm.owner`)."""
    return i % k


@asynccontextmanager
async def _open_process_swarm(
    n: int,
    k: int,
    namespaces: bool,
    links: set[tuple[int, int]],
    config_of: Callable[[int, Sequence[str]], NodeConfig],
    logs: Path,
) -> AsyncIterator[ProcessSwarm]:

    owner = [worker_of_node(i, k) for i in range(n)]
    netns: Namespaces | None = None
    if namespaces:
        from ._swarm_netns import Namespaces, unavailable

        if (why := unavailable()) is not None:
            raise RuntimeError(why)
        netns = Namespaces(k)
    workers: list[_swarm_proc._Worker] = []
    try:
        if netns is not None:
            await trio.to_thread.run_sync(netns.create)
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as body:
                for w in range(k):
                    prefix = netns.prefix(w) if netns is not None else ()
                    worker, posted = await _swarm_proc.spawn_worker(
                        w, logs / f"worker{w}.log", prefix
                    )
                    workers.append(worker)
                    nursery.start_soon(worker.read, body.cancel)
                    nursery.start_soon(worker.send_posted, posted)
                swarm = _swarm_proc.ProcessSwarm(workers, owner, netns)
                addrs: list[str] = [""] * n
                handles: list[_swarm_proc.NodeHandle | None] = [None] * n
                started = [trio.Event() for _ in range(n)]
                slots = [trio.Semaphore(STARTS_PER_WORKER) for _ in range(k)]

                async def start(i: int) -> None:
                    for a, j in links:
                        if a == i:
                            await started[j].wait()
                    config = config_of(i, addrs)
                    if netns is not None:
                        config = replace(config, listen=(f"/ip4/{netns.ips[owner[i]]}/tcp/0",))
                    async with slots[owner[i]]:
                        peer_id, node_addrs = await workers[owner[i]].call(
                            _swarm_proc.start_node, i, config
                        )
                    addrs[i] = node_addrs[0]
                    handles[i] = _swarm_proc.NodeHandle(swarm, i, peer_id, node_addrs)
                    started[i].set()

                async with trio.open_nursery() as starting:
                    for i in range(n):
                        starting.start_soon(start, i)
                swarm.nodes = [h for h in handles if h is not None]
                for worker in workers:
                    await worker.call(_swarm_proc.settle_gc)
                try:
                    yield swarm
                except BaseException:
                    # A call that met the dead worker first: the crash is the error.
                    if not any(w.failure for w in workers):
                        raise
                finally:
                    nursery.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for worker in workers:
                await _swarm_proc.stop_worker(worker)
            if netns is not None:
                await trio.to_thread.run_sync(netns.close)
    failures = [w.failure for w in workers if w.failure]
    if failures:
        raise _swarm_proc.SwarmWorkerError("\n".join(failures))


async def kill_node(node: Node, scope: trio.CancelScope) -> None:
    network = node._rpc.host.get_network()
    for conns in list(network.connections.values()):
        for conn in conns:
            _close_socket(conn)
    scope.cancel()
    await node._rpc.host.close()


async def block_node(node: Node, blocklist: Blocklist, peer_ids: Collection[str]) -> None:
    await block_nodes([(node, blocklist, peer_ids)])


async def block_nodes(blocks: Sequence[tuple[Node, Blocklist, Collection[str]]]) -> None:
    """Block each node's peers, all of them before any connection is cut: a cut made
    node by node let records cross by links not yet cut, which revived on the far
    side the peers already cut off there."""
    for node, blocklist, peer_ids in blocks:
        blocklist.peers |= set(peer_ids)
        node.membership.block(peer_ids)
    async with trio.open_nursery() as nursery:
        for node, _, peer_ids in blocks:
            for peer_id in set(peer_ids) & node.connected_peers():
                nursery.start_soon(node.disconnect, peer_id)


def unblock_node(node: Node, blocklist: Blocklist) -> None:
    blocklist.peers.clear()
    node.membership.unblock_all()


def _close_socket(conn: object) -> None:
    """Close the TCP socket under a libp2p connection (SwarmConn > Yamux > Noise > TCP)."""
    sock = tcp_socket(conn)
    if sock is not None:
        sock.close()


async def _run_node(
    config: NodeConfig,
    scope: trio.CancelScope,
    blocklist: Blocklist,
    *,
    task_status: TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        async with open_node(config, gate=blocklist.allows) as node:
            task_status.started(node)
            await trio.sleep_forever()


@asynccontextmanager
async def open_rogue(
    target_addr: str, topic: str = GossipConfig().topic
) -> AsyncIterator[tuple[Any, str]]:
    """A peer that signs what it publishes but validates nothing: the attacker's
    stack, connected to `target_addr`. It does not subscribe (nothing to read); it
    publishes to the nodes subscribed to `topic`. Yields its libp2p Pubsub (publish
    any bytes with `await pubsub.publish(topic, data)`) and its peer id."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
    from libp2p.pubsub.pubsub import Pubsub
    from libp2p.tools.anyio_service import background_trio_service

    from ._host import new_libp2p_host, run_host

    host = new_libp2p_host(create_new_key_pair())
    router = GossipSub(
        [PROTOCOL_ID_V11],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=1,
        adaptive_gossip_enabled=False,
        spam_protection_enabled=False,
        eclipse_protection_enabled=False,
    )
    pubsub = Pubsub(host, router, strict_signing=True)
    async with run_host(host, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(target_addr)))
            yield pubsub, str(host.get_id())
