"""`p2p-node demo`: a few real nodes on loopback, the bundled models spread over them.

Every node serves a share of the models, so most jobs are forwarded: the table
shows which peer took each job and which one ran it. The last jobs name a task
type instead of a model: the entry node selects the model (HYBRID: a cascade
from the cheapest adequate model), then places it.
"""

from __future__ import annotations

import numpy as np
import trio

from ._client import Client
from ._config import ConfigError
from ._psk import PreSharedKey
from ._repository import bundled_models_dir, read_repository
from .testing import open_swarm

HELDOUT = {"image-classification": "digits.npz", "tabular-classification": "cancer.npz"}
CONVERGE_TIMEOUT_S = 20.0


def short(peer_id: str) -> str:
    return f"…{peer_id[-6:]}"


async def run_demo(n: int, psk: PreSharedKey | None = None) -> list[tuple[str, ...]]:
    """Send one job per model through rotating entry peers; return the table rows.

    With `psk` the nodes and the client form a private network of that key.
    """
    rows: list[tuple[str, ...]] = [
        ("job", "entry peer", "executing peer", "model", "result", "latency")
    ]
    if n < 2:
        raise ConfigError(f"a demo network needs at least 2 nodes, got {n}")
    cards = read_repository(bundled_models_dir())
    ids = [card.id for card in cards]
    shares = [frozenset(ids[i::n]) or frozenset(ids[:1]) for i in range(n)]  # model i on node i%n
    # One job per model whose task has held-out rows to send (not yet the text models).
    jobs: list[tuple[str | None, str]] = [
        (card.id, card.task_type) for card in cards if card.task_type in HELDOUT
    ]
    jobs += [(None, task) for task in HELDOUT]  # the node selects the model
    async with open_swarm(n, topology="full", models=shares, psk=psk) as swarm:
        with trio.fail_after(CONVERGE_TIMEOUT_S):
            await swarm.wait_converged()
        nodes = swarm.nodes
        for job, (model_id, task) in enumerate(jobs):
            entry = nodes[(2 * job) % n]  # a mix of local and forwarded jobs
            data = np.load(bundled_models_dir() / "heldout" / HELDOUT[task])
            row = job % len(data["y"])
            inputs = {"input": data["x"][row : row + 1]}
            async with Client.connect(entry.addrs[0], psk=psk) as client:
                started = trio.current_time()
                if model_id is None:
                    result = await client.submit_task(task, inputs, selection="hybrid")
                    what = f"{task} -> {result.model_id}"
                else:
                    result = await client.submit(model_id, inputs)
                    what = model_id
                latency_ms = (trio.current_time() - started) * 1e3
            predicted, truth = int(result.outputs["label"][0]), int(data["y"][row])
            verdict = "right" if predicted == truth else "wrong"
            rows.append(
                (
                    str(job + 1),
                    short(entry.peer_id),
                    short(result.executor),
                    what,
                    f"label {predicted} ({verdict})",
                    f"{latency_ms:.1f} ms",
                )
            )
    return rows
