"""The network the seed's examples run in (tests/test_distributed.py and
tests/test_model_selection.py): this task's own node and two peers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from p2p_node import Node, NodeConfig, open_node
from p2p_node.testing import open_swarm

SVM, LOGREG, MLP = "digits-svm", "digits-logreg", "digits-mlp"


@asynccontextmanager
async def own_node_in_a_network(data_dir: Path) -> AsyncIterator[tuple[Node, list[Node]]]:
    """This task's own node, serving MLP, joined to two more serving SVM and LOGREG.

    `open_node` in this task is what binds `get_distributed_orchestrator()` and
    `get_enhanced_orchestrator()` here. Yields when the node's view holds both
    peers alive (their models with them).
    """
    async with open_swarm(2, models=[frozenset({SVM}), frozenset({LOGREG})]) as swarm:
        config = NodeConfig(
            data_dir=data_dir,
            serve_models=frozenset({MLP}),
            bootstrap=tuple(swarm[i].addrs[0] for i in range(2)),
            shutdown_grace=1.0,
        )
        async with open_node(config) as node:
            others = {swarm[0].peer_id, swarm[1].peer_id}
            await node.view.wait_until(lambda v: others <= {p.peer_id for p in v.alive()})
            yield node, [swarm[0], swarm[1]]
