"""`p2p-node demo`: a few real nodes on loopback, the bundled models spread over them.

Every node serves a share of the models, so most jobs are forwarded: the table
shows which peer took each job and which one ran it.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import numpy as np
import trio

from ._client import Client
from ._config import ConfigError, NodeConfig
from ._node import Node, open_node
from ._repository import bundled_models_dir, read_repository

HELDOUT = {"image-classification": "digits.npz", "tabular-classification": "cancer.npz"}
CONVERGE_TIMEOUT_S = 20.0


def short(peer_id: str) -> str:
    return f"…{peer_id[-6:]}"


@asynccontextmanager
async def open_demo_network(n: int, data_root: Path) -> AsyncIterator[list[Node]]:
    """n nodes in one full mesh, model i served by node i mod n."""
    if n < 2:
        raise ConfigError(f"a demo network needs at least 2 nodes, got {n}")
    model_ids = [card.id for card in read_repository(bundled_models_dir())]
    shares = [frozenset(model_ids[i::n]) or frozenset(model_ids[:1]) for i in range(n)]
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(n):
            config = NodeConfig(
                data_dir=data_root / f"node{i}",
                serve_models=shares[i],
                bootstrap=tuple(node.addrs[0] for node in nodes),
            )
            nodes.append(await stack.enter_async_context(open_node(config)))
        with trio.fail_after(CONVERGE_TIMEOUT_S):
            await wait_until_connected(nodes)
        yield nodes


async def wait_until_connected(nodes: Sequence[Node]) -> None:
    """Return once every node knows every other node's models."""
    for node in nodes:
        await node.view.wait_until(lambda view: len(view.peers) == len(nodes) - 1)


async def run_demo(n: int) -> list[tuple[str, ...]]:
    """Send one job per model through rotating entry peers; return the table rows."""
    rows: list[tuple[str, ...]] = [
        ("job", "entry peer", "executing peer", "model", "result", "latency")
    ]
    cards = read_repository(bundled_models_dir())
    with tempfile.TemporaryDirectory(prefix="p2p-node-demo-") as tmp:
        async with open_demo_network(n, Path(tmp)) as nodes:
            for job, card in enumerate(cards):
                entry = nodes[(2 * job) % n]  # a mix of local and forwarded jobs
                data = np.load(bundled_models_dir() / "heldout" / HELDOUT[card.task_type])
                row = job % len(data["y"])
                async with Client.connect(entry.addrs[0]) as client:
                    started = trio.current_time()
                    result = await client.submit(card.id, {"input": data["x"][row : row + 1]})
                    latency_ms = (trio.current_time() - started) * 1e3
                predicted, truth = int(result.outputs["label"][0]), int(data["y"][row])
                verdict = "right" if predicted == truth else "wrong"
                rows.append(
                    (
                        str(job + 1),
                        short(entry.peer_id),
                        short(result.executor),
                        card.id,
                        f"label {predicted} ({verdict})",
                        f"{latency_ms:.1f} ms",
                    )
                )
    return rows
