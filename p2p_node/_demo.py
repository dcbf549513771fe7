"""`p2p-node demo`: a few real nodes on loopback, the bundled models spread over them.

Every node serves a share of the models, so most jobs are forwarded: the table
shows which peer took each job and which one ran it. The next jobs name a task
type instead of a model: the entry node selects the model (HYBRID: a cascade
from the cheapest adequate model), then places it. The last two are text: three
sentences embedded (two alike, one not), and a generation streamed back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import trio

from ._client import Client
from ._config import ConfigError
from ._node import Node
from ._psk import PreSharedKey
from ._repository import bundled_models_dir, read_repository
from .testing import open_swarm

Row = tuple[str, ...]
HELDOUT = {"image-classification": "digits.npz", "tabular-classification": "cancer.npz"}
SENTENCES = (
    "A node runs the model on its own machine.",
    "The model is run locally by one of the peers.",
    "Bake the bread for forty minutes.",
)
PROMPT = "The module"
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
        rows += await _text_jobs(nodes, len(jobs), psk)
    return rows


async def _text_jobs(nodes: Sequence[Node], first: int, psk: PreSharedKey | None) -> list[Row]:
    """An embedding and a generation, each sent to a task type, not a model."""
    entry = nodes[(2 * first) % len(nodes)]
    async with Client.connect(entry.addrs[0], psk=psk) as client:
        started = trio.current_time()
        result = await client.submit_task("sentence-embedding", texts=list(SENTENCES))
        latency_ms = (trio.current_time() - started) * 1e3
    vectors = result.outputs["embeddings"]
    alike, unlike = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    verdict = "right" if alike > unlike else "wrong"
    embedded: Row = (
        str(first + 1),
        short(entry.peer_id),
        short(result.executor),
        f"sentence-embedding -> {result.model_id}",
        f"cosine {alike:.2f} alike, {unlike:.2f} not ({verdict})",
        f"{latency_ms:.1f} ms",
    )
    entry = nodes[(2 * (first + 1)) % len(nodes)]
    async with Client.connect(entry.addrs[0], psk=psk) as client:
        async with client.generate(PROMPT, task="text-generation", max_tokens=16) as generation:
            text = await generation.text()
    summary = generation.summary
    assert summary is not None  # read to the end
    generated: Row = (
        str(first + 2),
        short(entry.peer_id),
        short(summary.executor),
        f"text-generation -> {summary.model_id}",
        f"{summary.tokens} tokens: {PROMPT}{text!r}"[:60],
        f"{summary.total_ms:.1f} ms",
    )
    return [embedded, generated]
