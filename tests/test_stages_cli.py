"""System: stage peers as `p2p-node start` processes. `peers` and `place` show the
chain; a middle stage peer SIGKILLed mid-generation is replaced, same tokens."""

from __future__ import annotations

import signal
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from test_cli import DEADLINE_S, p2p_node, running_node
from test_shard import _greedy_whole

from p2p_node import NodeConfig, bundled_models_dir
from p2p_node._node import open_node

GPT = "pydoc-gpt-small"
PROMPT = [5, 17, 99, 3, 250, 7, 42]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli-stages")
    model = str(bundled_models_dir() / GPT)
    done = p2p_node("shard", "--model", model, "--stages", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_three_stage_processes_show_the_chain_and_survive_a_sigkill(
    repo: Path, tmp_path: Path
) -> None:
    serving = [f"{GPT}@1of3", f"{GPT}@2of3", f"{GPT}@2of3", f"{GPT}@3of3"]
    with ExitStack() as stack:
        procs = []
        for i, serve in enumerate(serving):
            boot = ("--bootstrap", procs[0][1]) if procs else ()
            procs.append(
                stack.enter_context(
                    running_node(tmp_path / f"n{i}", "--models", str(repo), "--serve", serve, *boot)
                )
            )
        first = procs[0][1]
        deadline = time.monotonic() + DEADLINE_S
        while True:  # the first node's view holds every stage peer
            peers = p2p_node("peers", "--peer", first)
            if peers.stdout.count(f"{GPT}@") >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert "complete chains of stages:" in peers.stdout, peers.stdout + peers.stderr
        assert f"{GPT} in 3 stages" in peers.stdout
        placed = p2p_node("place", "--peer", first, "--model", GPT)
        assert placed.returncode == 0, placed.stderr
        assert "chain of 3 stages" in placed.stdout and "no peer serves it whole" in placed.stdout
        by_peer = {addr.rsplit("/p2p/", 1)[1]: proc for proc, addr in procs}
        tokens, failovers = trio.run(_generate_and_kill, tmp_path, repo, procs, by_peer)
    assert tokens == _greedy_whole(PROMPT, 60)
    assert failovers == 1


async def _generate_and_kill(
    tmp: Path, repo: Path, procs: list, by_peer: dict
) -> tuple[list[int], int]:  # type: ignore[type-arg]
    config = NodeConfig(
        data_dir=tmp / "coordinator",
        shutdown_grace=1.0,
        target_degree=0,
        models_dir=repo,
        serve_models=frozenset(),
    )
    config = replace(config, bootstrap=tuple(addr for _, addr in procs))
    with trio.fail_after(90):
        async with open_node(config) as node:
            while not _every_stage_and_two_middles(node):  # noqa: ASYNC110
                await trio.sleep(0.1)  # records arrive by gossip, in any order
            victim = node.chains.plan(GPT).peers[1]
            tokens = []
            async for token in node.chains.generate(GPT, PROMPT, 60):
                tokens.append(token)
                if len(tokens) == 20:
                    by_peer[victim].send_signal(signal.SIGKILL)
            return tokens, len(node.chains.times.failovers)


def _every_stage_and_two_middles(node: object) -> bool:
    offers = node.chains.offers()  # type: ignore[attr-defined]
    indices = [o.index for o in offers if o.parent == GPT]
    return indices.count(1) >= 2 and 0 in indices and 2 in indices
