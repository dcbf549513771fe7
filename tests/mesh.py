"""Real nodes on loopback for integration tests (the public harness comes with gossip)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from p2p_node import Node, NodeConfig, open_node


@asynccontextmanager
async def open_mesh(root: Path, shares: Sequence[Sequence[str]]) -> AsyncIterator[list[Node]]:
    """Real nodes on loopback, node i serving shares[i], each dialing all before it.

    Yields once every node has every other node's models in its view.
    """
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i, share in enumerate(shares):
            config = NodeConfig(
                data_dir=root / f"node{i}",
                serve_models=frozenset(share),
                bootstrap=tuple(n.addrs[0] for n in nodes),
            )
            nodes.append(await stack.enter_async_context(open_node(config)))
        for node in nodes:
            await node.view.wait_until(lambda view: len(view.peers) == len(nodes) - 1)
        yield nodes
