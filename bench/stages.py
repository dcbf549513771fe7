"""Pipeline stages: hop overhead, tokens/s through 1, 2 and 3 stages, failover, fetch.

Usage: python -m bench.stages [--model pydoc-gpt-small] [--tokens 64] [--steps 200]
                              [--no-failover] [--no-fetch]

The bundled generator is split with `p2p-node shard` (1, 2 and 3 stages) into a
temporary repository. Figures:

- **hop overhead**: a coordinator node (this process) and one `p2p-node start`
  process per stage, on loopback. For each greedy decode step, the chain's wall time as the
  coordinator sees it, minus the same step's stage compute run in this process
  without any network (its median), divided by the hops: k + 1 for k stages
  (coordinator to stage 1, each stage to the next, the last to the coordinator).
  Reported p50 and p99 over the steps.
- **tokens/s**: the same network per split, 1 and 16 concurrent sessions, each of
  `--tokens` greedy tokens; aggregate tokens over wall time. Also 16 sessions with
  the stage peers started with `--no-batch-decode` (each session's decode step run
  alone at every stage, as before continuous batching per stage), and the ratio.
- **failover**: the stage peers are `p2p-node start` processes (stage 2 served
  by two of them); the coordinator (this process) generates, and at token 20
  the middle peer in use gets SIGKILL. Reported: the time from the kill to the
  next token, and whether the tokens match an undisturbed run.
- **fetch**: a fresh node fetching MiniLM (22.3 MiB) by content from 1 and from
  2 peer processes, against copying its files and raw loopback TCP in the same
  run (`bench.fetch`, which also runs alone).

All in one run, on one machine: compare ratios within a run, not across runs.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import trio

from bench.fetch import print_rows, run_bench
from p2p_node import NodeConfig, bundled_models_dir
from p2p_node._node import open_node
from p2p_node._repository import read_model_card
from p2p_node._shard import shard, stage_id
from p2p_node._stages import StageState, run_chain_locally

FETCH_MODEL = "minilm-l6-v2"  # 22.3 MiB: the "20+ MB model"

PROMPT = [5, 17, 99, 3, 250, 7, 42]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def _local_step_ms(repo: Path, model: str, k: int, steps: int) -> list[float]:
    """Each decode step's stage compute, in this process, no network."""
    chain = []
    for i in range(k):
        card = read_model_card(repo / stage_id(model, i, k))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(
            str(card.onnx_path), options, providers=["CPUExecutionProvider"]
        )
        chain.append((session, card.stage))
    states = [StageState() for _ in range(k)]
    n = len(PROMPT)
    feeds = {
        "input_ids": np.array([PROMPT], np.int64),
        "attention_mask": np.ones((1, n), np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }
    out = run_chain_locally(chain, feeds, states, last_only=True)  # type: ignore[arg-type]
    times = []
    for _ in range(steps):
        token = int(np.argmax(out["logits"][0, -1]))
        n += 1
        feeds = {
            "input_ids": np.array([[token]], np.int64),
            "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.array([[n - 1]], np.int64),
        }
        started = time.perf_counter()
        out = run_chain_locally(chain, feeds, states, last_only=True)  # type: ignore[arg-type]
        times.append((time.perf_counter() - started) * 1e3)
    return times


def _base(repo: Path, data: Path) -> NodeConfig:
    return NodeConfig(data_dir=data, shutdown_grace=1.0, target_degree=0, models_dir=repo)


def _coordinator(
    repo: Path, data: Path, procs: list[tuple[subprocess.Popen[str], str]]
) -> NodeConfig:
    """This process's node: serves nothing, bootstraps from the stage processes."""
    return replace(
        _base(repo, data / "coordinator"),
        bootstrap=tuple(a for _, a in procs),
        serve_models=frozenset(),
    )


async def _chain_network(  # type: ignore[no-untyped-def]
    repo: Path, model: str, k: int, data: Path, tokens: int, steps: int, batch: bool = True
):
    """One `p2p-node start` process per stage; the coordinator is this process."""
    procs: list[tuple[subprocess.Popen[str], str]] = []
    try:
        for i in range(k):
            first = procs[0][1] if procs else None
            procs.append(_start_process(repo, data / f"p{i}", stage_id(model, i, k), first, batch))
        config = _coordinator(repo, data, procs)
        async with open_node(config) as node:
            chains = node.chains
            while True:
                try:
                    if chains.plan(model).k == k:
                        break
                except Exception:
                    pass
                await trio.sleep(0.05)
            # Warm up (loads every stage), then time single decode steps.
            _ = [t async for t in chains.generate(model, PROMPT, 8)]
            chains.times.steps_ms.clear()
            _ = [t async for t in chains.generate(model, PROMPT, steps + 1)]
            step_ms = chains.times.steps_ms[1:]  # the prefill is not a decode step
            rates = {}
            for sessions in (1, 16):
                made = 0

                async def one() -> None:
                    nonlocal made
                    async for _ in chains.generate(model, PROMPT, tokens):
                        made += 1

                started = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for _ in range(sessions):
                        nursery.start_soon(one)
                rates[sessions] = made / (time.perf_counter() - started)
            return step_ms, rates
    finally:
        _stop(procs)


def _stop(procs: list[tuple[subprocess.Popen[str], str]]) -> None:
    for proc, _ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc, _ in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _start_process(
    repo: Path, data: Path, serve: str, bootstrap: str | None, batch: bool = True
) -> tuple[subprocess.Popen[str], str]:
    args = [sys.executable, "-m", "p2p_node", "start", "--listen", "/ip4/127.0.0.1/tcp/0"]
    args += ["--data-dir", str(data), "--models", str(repo), "--serve", serve]
    if not batch:
        args.append("--no-batch-decode")
    if bootstrap:
        args += ["--bootstrap", bootstrap]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=60):
            raise RuntimeError("a stage node printed no address in 60 s")
    line = proc.stdout.readline()
    return proc, line.removeprefix("listening on ").strip()


async def _failover(repo: Path, model: str, data: Path, tokens: int) -> tuple[float, bool]:
    k = 3
    serving = [
        stage_id(model, 0, k),
        stage_id(model, 1, k),
        stage_id(model, 1, k),
        stage_id(model, 2, k),
    ]
    procs: list[tuple[subprocess.Popen[str], str]] = []
    try:
        for i, serve in enumerate(serving):
            procs.append(
                _start_process(repo, data / f"p{i}", serve, procs[0][1] if procs else None)
            )
        by_peer = {addr.rsplit("/p2p/", 1)[1]: proc for proc, addr in procs}
        config = _coordinator(repo, data, procs)
        async with open_node(config) as node:
            chains = node.chains
            while True:
                offers = [o for o in chains.offers() if o.index == 1]
                if len(offers) == 2:
                    try:
                        chains.plan(model)
                        break
                    except Exception:
                        pass
                await trio.sleep(0.1)
            undisturbed = [t async for t in chains.generate(model, PROMPT, tokens)]
            victim = chains.plan(model).peers[1]
            got: list[int] = []
            killed_at = gap = 0.0
            async for token in chains.generate(model, PROMPT, tokens):
                got.append(token)
                if len(got) == 20:
                    by_peer[victim].send_signal(signal.SIGKILL)
                    killed_at = time.perf_counter()
                elif len(got) == 21:
                    gap = time.perf_counter() - killed_at
            return gap, got == undisturbed
    finally:
        _stop(procs)


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        root = Path(tmp)
        repo = root / "repo"
        for k in (1, 2, 3):
            shard(bundled_models_dir() / args.model, k, repo)
        print(
            f"# bench.stages: {args.model}, {args.steps} decode steps, "
            f"{args.tokens} tokens per session"
        )
        print(f"# machine: {os.cpu_count()} cpus (shared: compare within this run)")
        rows = []
        for k in (1, 2, 3):
            local = _local_step_ms(repo, args.model, k, args.steps)
            step_ms, rates = await _chain_network(
                repo, args.model, k, root / f"net{k}", args.tokens, args.steps
            )
            # The same, each session's decode steps alone at every stage peer.
            _, alone = await _chain_network(
                repo, args.model, k, root / f"alone{k}", args.tokens, 8, batch=False
            )
            compute = statistics.median(local)
            # k + 1 hops a step: coordinator to stage 1, each stage to the next, the
            # last stage to the coordinator.
            overhead = [(ms - compute) / (k + 1) for ms in step_ms]
            rows.append(
                (
                    k,
                    compute,
                    _percentile(overhead, 50),
                    _percentile(overhead, 99),
                    rates[1],
                    rates[16],
                    alone[16],
                )
            )
        print()
        print(
            "stages | compute ms/step p50 | hop overhead ms p50 | p99 "
            "| tokens/s 1 session | 16 sessions | 16 unbatched | ratio"
        )
        for k, compute, p50, p99, one, sixteen, unbatched in rows:
            print(
                f"{k:6d} | {compute:19.3f} | {p50:19.3f} | {p99:6.3f} "
                f"| {one:18.1f} | {sixteen:11.1f} | {unbatched:12.1f} "
                f"| {sixteen / unbatched:5.2f}x"
            )
        if not args.no_failover:
            gap, same = await _failover(repo, args.model, root / "failover", max(args.tokens, 40))
            print()
            print(
                f"failover (3 stages, middle peer SIGKILLed at token 20): next token after "
                f"{gap * 1e3:.0f} ms; tokens same as undisturbed: {same}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pydoc-gpt-small")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--no-failover", action="store_true")
    parser.add_argument(
        "--no-fetch", action="store_true", help="skip fetching a model from 1 and 2 peers"
    )
    args = parser.parse_args()
    trio.run(main_async, args)
    if not args.no_fetch:  # bench.fetch runs its own trio loops and peer processes
        print()
        print_rows(FETCH_MODEL, 3, run_bench(FETCH_MODEL, 3))


if __name__ == "__main__":
    main()
