"""Text models through a node against onnxruntime called directly, side by side in one run.

Usage: python -m bench.text [--quick] [--models DIR] [--embedder ID] [--generator ID]
                            [--batches 1 8 32 128] [--sessions 1 4 16 64] [--tokens 64]
                            [--repeats 3] [--rounds 20]
                            [--parts embeddings generation latency steady steps engine]
                            [--seconds 5] [--beside-jobs 0] [--in-process]

Three parts, and three more on request, each printed as a table (`--quick`:
smaller sizes, a few minutes):

- embeddings: sentences/s of the embedding model (default: the bundled
  minilm-l6-v2) at each batch size, through the node that serves it (local),
  through another node that forwards the job to it (one hop), and run by
  onnxruntime here on the same tokens (direct: tokenized here, one intra-op
  thread as the node's). Rounds of the three are interleaved, each figure the
  median round, and the ratios say what the node costs.
- generation: aggregate tokens/s of the generator (default: the bundled
  pydoc-gpt-small) with 1, 4, 16 and 64 concurrent greedy sessions on one
  node: continuous batching on ("batched"), off ("alone": one session per
  decode step, in turn), and the same sessions sent one after another ("one at
  a time"); each the best of `--repeats` runs. Beside them, the same ratio of
  batched to one at a time for onnxruntime alone, called here with no node: what
  batching can gain at most on this machine. Also the time to first token and
  per output token (p50) as the clients see them.
- steady (`--parts steady`, not run by default): runs of each count of
  sessions one after another for `--seconds` on one batching node: their mean
  tokens/s and the node process's CPU in cores over that time,
  where `generation` takes the best of a few runs, which favours code whose
  runs vary most. With `--beside-jobs K`, a second node on this machine
  meanwhile serves K one-row JOB_MODEL jobs in flight, and its jobs/s show
  what the generating node leaves to the machine's other processes.
- steps (`--parts steps`, not run by default): onnxruntime alone, one decode
  step of 1 to 32 rows with a cache of 8, 64 and 200 positions: ms per row,
  and how much faster 16 rows go together than one at a time. Where the cost
  per row stops falling, batching has nothing more to give on this machine.
- engine (`--parts engine`, not run by default): the generator's engine alone,
  in this process, with no node and no network: the same counts of sessions
  started together (`Generations.complete`, greedy, `--tokens` each), the
  best of `--repeats` runs each. Per run: tokens/s, decode steps, steps that
  built the batch from the sessions' caches and steps that narrowed it, and
  the engine's own time per step (the run's time less onnxruntime's runs).
  What the batching costs besides onnxruntime, without the transport's noise.
- latency: one generation at a time, local and forwarded one hop: time to
  first token (TTFT) and time per output token (TPOT), p50 and p99 over
  `--rounds` generations each, against the prefill's own compute (onnxruntime
  here, the same prompt, median of as many runs). Beside them, a one-row job
  of JOB_MODEL over the same path, one after each generation: what the hops
  of a first token cost with next to nothing to run; the last column is what
  is left of TTFT less the prefill and that job, the generation's own cost.

Each node runs in a process of its own, on loopback, as a node does (with
`p2p-node start`'s collector and allocator settings), and the clients in this
one; `--in-process` runs the nodes in this process too (then a figure counts
the clients' work as the node's, but no message waits for another process to
be scheduled). Compare figures of one run only (ratios), since absolute times
on a shared machine drift.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import trio
from tokenizers import Tokenizer

from bench._common import cpu_seconds
from p2p_node import Client, JobError, NodeConfig, open_node
from p2p_node._decoder import TextGenerator
from p2p_node._process import tune_process
from p2p_node._repository import bundled_models_dir
from p2p_node.testing import open_swarm

PROMPTS = [
    "The network is",
    "A peer-to-peer node",
    "Once upon a time",
    "def main():",
    "In the beginning",
    "Models are served by",
    "The quick brown fox",
    "Hello, world",
]
LATENCY_PROMPT = "The built-in function"
JOB_MODEL = "digits-mlp"  # the latency part's one-row job: the hops, with next to no run

Array = np.ndarray[Any, Any]


# --- embeddings ----------------------------------------------------------------------------


def english_sentences(n: int) -> list[str]:
    """`n` real English sentences, from the documentation Python ships (pydoc_data)."""
    from pydoc_data.topics import topics

    found: list[str] = []
    for name in sorted(topics):
        for line in topics[name].split(". "):
            sentence = " ".join(line.split())
            if 40 <= len(sentence) <= 200 and sentence[0].isupper() and sentence.isascii():
                found.append(sentence + ".")
                if len(found) == n:
                    return found
    raise RuntimeError(f"only {len(found)} sentences found")


class DirectEmbedder:
    """The embedding model run by onnxruntime here: tokenized as its model.toml says,
    one intra-op thread (the node's default), pooled when the graph does not."""

    def __init__(self, model_dir: Path, max_tokens: int) -> None:
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=max_tokens)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self._inputs = [i.name for i in self._session.get_inputs()]

    def embed(self, texts: Sequence[str]) -> Array:
        encodings = self._tokenizer.encode_batch(list(texts))
        made = {
            "input_ids": np.array([e.ids for e in encodings], np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], np.int64),
        }
        out: Array = self._session.run(None, {name: made[name] for name in self._inputs})[0]
        if out.ndim == 3:
            mask = made["attention_mask"][:, :, None]
            out = (out * mask).sum(axis=1) / mask.sum(axis=1)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@dataclass(frozen=True)
class EmbedRow:
    batch: int
    direct: float  # sentences/s
    local: float
    forwarded: float
    cosine: float  # the least cosine between the node's embeddings and direct's


async def measure_embeddings(
    local: Client,
    forwarder: Client,
    model_id: str,
    model_dir: Path,
    batches: list[int],
    rounds: int,
) -> list[EmbedRow]:
    max_tokens = _max_tokens(model_dir)
    direct = DirectEmbedder(model_dir, max_tokens)
    sentences = english_sentences(max(batches))
    rows = []
    for batch in batches:
        texts = sentences[:batch]
        times: dict[str, list[float]] = {"direct": [], "local": [], "forwarded": []}
        # Warm up each path at this batch size (allocations, the dynamic batcher's timings).
        expected = direct.embed(texts)
        got = (await forwarder.submit(model_id, texts=texts, timeout=120)).outputs["embeddings"]
        await local.submit(model_id, texts=texts, timeout=120)
        for _ in range(rounds):
            started = time.perf_counter()
            direct.embed(texts)
            times["direct"].append(time.perf_counter() - started)
            await trio.lowlevel.checkpoint()
            for name, client in (("local", local), ("forwarded", forwarder)):
                started = time.perf_counter()
                await client.submit(model_id, texts=texts, timeout=120)
                times[name].append(time.perf_counter() - started)
        rate = {name: batch / statistics.median(t) for name, t in times.items()}
        cosine = float(np.min(np.sum(got * expected, axis=1)))
        rows.append(EmbedRow(batch, rate["direct"], rate["local"], rate["forwarded"], cosine))
    return rows


def _max_tokens(model_dir: Path) -> int:
    import tomllib

    with (model_dir / "model.toml").open("rb") as f:
        return int(tomllib.load(f)["text"]["max_tokens"])


# --- generation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    sessions: int
    tokens: int
    seconds: float
    ttft_ms: float  # p50
    tpot_ms: float  # p50 of each session's time per output token after the first

    @property
    def per_s(self) -> float:
        return self.tokens / self.seconds


async def measure_generation(
    models_dir: Path,
    model_id: str,
    sessions: list[int],
    tokens: int,
    repeats: int,
    data: Path,
    node_process: bool,
) -> dict[str, list[Figures]]:
    """Per count of sessions: batched and alone (two nodes, measured in turn, so that
    a machine's drifting load falls on both), and the same sessions one at a time;
    each the best of `repeats` runs (the least disturbed by the machine's other work).
    With `node_process`, each node runs in a process of its own, as a node does: its
    clients' work (reading their frames) is then not the node's."""
    out: dict[str, list[Figures]] = {"batched": [], "alone": [], "one at a time": []}
    only = frozenset({model_id})
    settings = [(models_dir, only, batch, max(sessions), tokens) for batch in (True, False)]
    async with contextlib.AsyncExitStack() as stack:
        addrs = []
        for i, setting in enumerate(settings):
            where = data / str(i)
            if node_process:
                addrs.append(await stack.enter_async_context(_node_process(*setting, where)))
            else:
                swarm = await stack.enter_async_context(
                    open_swarm(1, base=_node_config(*setting, where))
                )
                addrs.append(swarm[0].addrs[0])
        batched = await stack.enter_async_context(Client.connect(addrs[0]))
        alone = await stack.enter_async_context(Client.connect(addrs[1]))
        for client in (batched, alone):
            await client.generate_text("warm up", model_id, max_tokens=4)
        for n in sessions:
            runs: dict[str, list[Figures]] = {name: [] for name in out}
            for _ in range(repeats):
                runs["batched"].append(await _run(batched, model_id, n, tokens))
                runs["alone"].append(await _run(alone, model_id, n, tokens))
                runs["one at a time"].append(
                    await _run(batched, model_id, n, tokens, sequential=True)
                )
            for name, figures in runs.items():
                out[name].append(max(figures, key=lambda f: f.per_s))
    return out


@dataclass(frozen=True, slots=True)
class Steady:
    sessions: int
    tokens_per_s: float
    node_cores: float  # the node process's CPU time over the wall time
    jobs_per_s: float | None  # the node beside it, where there is one


async def measure_steady(args: argparse.Namespace, data: Path) -> list[Steady]:
    """Per count of sessions (`--sessions`): runs of that many sessions, one after
    another, for `--seconds` on one node (batched, a process of its own), and
    their mean tokens/s with the node's CPU over that time,
    where `generation` takes the best of a few runs. With `--beside-jobs`, a
    second node on this machine meanwhile serves JOB_MODEL with that many
    one-row jobs in flight, and its jobs/s are the last column: what the
    generating node leaves to the other processes of its machine."""
    models_dir, model_id, sessions = args.models, args.generator, args.sessions
    tokens, seconds, beside_jobs = args.tokens, args.seconds, args.beside_jobs
    out = []
    async with contextlib.AsyncExitStack() as stack:
        pids: list[int] = []
        setting = (models_dir, frozenset({model_id}), True, max(sessions), tokens)
        addr = await stack.enter_async_context(_node_process(*setting, data / "gen", pids=pids))
        client = await stack.enter_async_context(Client.connect(addr))
        jobs_client = None
        if beside_jobs:
            other = (models_dir, frozenset({JOB_MODEL}), True, 1, tokens, data / "jobs")
            jobs_addr = await stack.enter_async_context(_node_process(*other))
            jobs_client = await stack.enter_async_context(Client.connect(jobs_addr))
        await client.generate_text("warm up", model_id, max_tokens=4)
        for n in sessions:
            await _run(client, model_id, n, tokens)  # warm up at this size
            jobs = (jobs_client, beside_jobs) if jobs_client is not None else None
            out.append(await _steady(client, model_id, n, tokens, seconds, pids[0], jobs))
    return out


async def _steady(
    client: Client,
    model_id: str,
    n: int,
    tokens: int,
    seconds: float,
    pid: int,
    jobs: tuple[Client, int] | None,
) -> Steady:
    """Runs of `n` sessions for `seconds`, and `jobs` (a client and how many jobs it
    keeps in flight) meanwhile."""
    made = done = 0
    row = {"input": np.zeros((1, 64), np.float32)}
    started, cpu = time.perf_counter(), cpu_seconds(pid)
    until = started + seconds

    async def generate() -> None:
        nonlocal made
        while time.perf_counter() < until:
            made += (await _run(client, model_id, n, tokens)).tokens

    async def job(jobs_client: Client) -> None:
        nonlocal done
        while time.perf_counter() < until:
            await jobs_client.submit(JOB_MODEL, row)
            done += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(generate)
        if jobs is not None:
            for _ in range(jobs[1]):
                nursery.start_soon(job, jobs[0])
    wall = time.perf_counter() - started
    cores = (cpu_seconds(pid) - cpu) / wall
    return Steady(n, made / wall, cores, done / wall if jobs is not None else None)


def print_steady(args: argparse.Namespace, rows: list[Steady]) -> None:
    beside = f"; beside it, a node serving {JOB_MODEL} ({args.beside_jobs} jobs in flight)"
    print(
        f"\nsteady generation with {args.generator}: runs of n sessions of {args.tokens} "
        f"greedy tokens, one after another for {args.seconds:g} s, one node (a process of "
        f"its own){beside if args.beside_jobs else ''}; the mean over that time"
    )
    jobs_header = "  jobs/s" if args.beside_jobs else ""
    print(f"{'sessions':>8}  {'tokens/s':>9}  {'node cores':>10}{jobs_header}")
    for r in rows:
        jobs = f"  {r.jobs_per_s:>6.0f}" if r.jobs_per_s is not None else ""
        print(f"{r.sessions:>8}  {r.tokens_per_s:>9.1f}  {r.node_cores:>10.2f}{jobs}")


def _node_config(
    models_dir: Path,
    model_ids: frozenset[str],
    batch: bool,
    sessions: int,
    tokens: int,
    data: Path,
    bootstrap: tuple[str, ...] = (),
) -> NodeConfig:
    base = NodeConfig(
        data_dir=data,
        shutdown_grace=1.0,
        target_degree=0,
        models_dir=models_dir,
        bootstrap=bootstrap,
    )
    executor = replace(
        base.executor, batch_decode=batch, max_sessions=sessions, max_new_tokens=tokens
    )
    return replace(base, executor=executor, serve_models=model_ids)


@contextlib.asynccontextmanager
async def _node_process(
    models_dir: Path,
    model_ids: frozenset[str],
    batch: bool,
    sessions: int,
    tokens: int,
    data: Path,
    bootstrap: tuple[str, ...] = (),
    pids: list[int] | None = None,
) -> AsyncIterator[str]:
    """A node serving `model_ids` in a process of its own; yields its address (and
    appends its process id to `pids`)."""
    argv = [sys.executable, "-m", "bench.text", "--serve-node", str(models_dir)]
    argv += [",".join(sorted(model_ids)), str(int(batch)), str(sessions), str(tokens)]
    argv += [str(data), ",".join(bootstrap)]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(
                trio.run_process,
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        )
        if pids is not None:
            pids.append(process.pid)
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(1)
        yield line.decode().strip()
        process.terminate()


def serve_node(argv: Sequence[str]) -> None:
    """(In the node's process) run one node until terminated; print its address."""
    models_dir, model_ids, batch, sessions, tokens, data, bootstrap = argv
    config = _node_config(
        Path(models_dir),
        frozenset(filter(None, model_ids.split(","))),
        batch == "1",
        int(sessions),
        int(tokens),
        Path(data),
        tuple(filter(None, bootstrap.split(","))),
    )

    async def serve() -> None:
        async with open_node(config) as node:
            print(node.addrs[0], flush=True)
            await trio.sleep_forever()

    tune_process()  # as `p2p-node start` does
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve)


async def _run(
    client: Client, model_id: str, n: int, tokens: int, *, sequential: bool = False
) -> Figures:
    ttfts: list[float] = []
    tpots: list[float] = []
    made = 0

    async def one(i: int) -> None:
        nonlocal made
        async with client.generate(
            PROMPTS[i % len(PROMPTS)], model_id, max_tokens=tokens, timeout=600
        ) as generation:
            await generation.text()
        summary = generation.summary
        assert summary is not None
        made += summary.tokens
        ttfts.append(summary.ttft_ms)
        if summary.tokens > 1:
            tpots.append((summary.total_ms - summary.ttft_ms) / (summary.tokens - 1))

    started = time.perf_counter()
    if sequential:
        for i in range(n):
            await one(i)
    else:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
    seconds = time.perf_counter() - started
    return Figures(n, made, seconds, statistics.median(ttfts), statistics.median(tpots or [0.0]))


# --- the engine alone ----------------------------------------------------------------------


@dataclass(frozen=True)
class EngineRun:
    sessions: int
    tokens: int
    seconds: float
    steps: int
    builds: int
    narrowed: int
    run_ms: float  # in onnxruntime's runs

    @property
    def own_ms_per_step(self) -> float:
        return (self.seconds * 1e3 - self.run_ms) / max(1, self.steps)


async def engine_run(
    models_dir: Path, model_id: str, sessions: int, tokens: int, repeats: int
) -> EngineRun:
    """`sessions` greedy generations of up to `tokens` tokens started together on the
    engine alone (no node), the best of `repeats` runs after one to warm up."""
    from p2p_node._config import ExecutorConfig
    from p2p_node._executor import Executor
    from p2p_node._generation import Generations
    from p2p_node._repository import read_repository

    config = ExecutorConfig(max_new_tokens=tokens, max_sessions=sessions)
    cards = read_repository(models_dir, frozenset({model_id}))
    service = Generations(Executor.from_cards(cards, config), cards, config)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(sessions)]
    runs = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.run)
        engine = service.engine(model_id)
        for repeat in range(repeats + 1):
            before = (engine.steps, engine.rebuilds, engine.narrowed, engine.run_ms)
            started = time.perf_counter()
            done = await service.complete(model_id, prompts)
            seconds = time.perf_counter() - started
            if repeat:  # (the first warms up)
                runs.append(
                    EngineRun(
                        sessions,
                        sum(count for _, count in done),
                        seconds,
                        engine.steps - before[0],
                        engine.rebuilds - before[1],
                        engine.narrowed - before[2],
                        engine.run_ms - before[3],
                    )
                )
        nursery.cancel_scope.cancel()
    return max(runs, key=lambda r: r.tokens / r.seconds)


def print_engine(args: argparse.Namespace, rows: list[EngineRun]) -> None:
    print()
    print(
        f"the engine alone with {args.generator}, in this process, no network: sessions "
        f"started together, up to {args.tokens} greedy tokens each, best of {args.repeats}"
    )
    print(
        f"{'sessions':>8}  {'tokens/s':>9}  {'steps':>5}  {'builds':>6}  {'narrowed':>8}  "
        f"{'own ms/step':>11}"
    )
    for r in rows:
        print(
            f"{r.sessions:>8}  {r.tokens / r.seconds:>9.1f}  {r.steps:>5}  {r.builds:>6}  "
            f"{r.narrowed:>8}  {r.own_ms_per_step:>11.3f}"
        )


# --- latency -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    ttft_ms: list[float]
    tpot_ms: list[float]
    job_ms: list[float]  # a one-row job of JOB_MODEL on the same path


def _direct_generator(model_dir: Path) -> tuple[TextGenerator, ort.InferenceSession]:
    """The generator of `model_dir` and an onnxruntime session of it here (one thread)."""
    from p2p_node._decoder import load_text_generator
    from p2p_node._repository import read_repository

    card = next(c for c in read_repository(model_dir.parent) if c.onnx_path.parent == model_dir)
    generator = load_text_generator(card)
    assert generator is not None
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(card.onnx_path), options, providers=["CPUExecutionProvider"])
    return generator, session


def direct_generation(model_dir: Path, sessions: int, tokens: int, repeats: int) -> float:
    """What continuous batching can gain at most here: onnxruntime alone, with no node,
    decoding `sessions` greedy generations of `tokens` tokens as one batch (one
    prefill, then a step per token) against the same one after another; the
    ratio of their tokens/s, each the best of `repeats`."""
    from p2p_node._decoder import past_names
    from p2p_node._generation import prefill_batch_feeds

    generator, session = _direct_generator(model_dir)
    layout = generator.layout
    prompts = [generator.tokenizer.encode(PROMPTS[i % len(PROMPTS)]).ids for i in range(sessions)]
    pasts = past_names(layout.layers)
    names = ["logits"] + [name.replace("past_key_values.", "present.") for name in pasts]

    def decode(batch: list[list[int]]) -> float:
        started = time.perf_counter()
        feeds, _ = prefill_batch_feeds(batch, layout)
        out = session.run(names, feeds)
        mask, positions = feeds["attention_mask"], feeds["position_ids"][:, -1:]
        for _ in range(tokens - 1):
            mask = np.concatenate([mask, np.ones((len(batch), 1), np.int64)], axis=1)
            positions = positions + 1
            feeds = {
                "input_ids": out[0][:, -1].argmax(axis=-1)[:, None].astype(np.int64),
                "attention_mask": mask,
                "position_ids": positions,
            }
            feeds.update(zip(pasts, out[1:], strict=True))  # presents are the next pasts
            out = session.run(names, feeds)
        return time.perf_counter() - started

    decode(prompts)  # warm up
    batched = alone = math.inf
    for _ in range(repeats):  # interleaved, so that the machine's drifting load falls on both
        batched = min(batched, decode(prompts))
        alone = min(alone, sum(decode([p]) for p in prompts))
    return alone / batched


STEP_BATCHES = (1, 2, 4, 8, 16, 32)
STEP_PASTS = (8, 64, 200)


def decode_steps(model_dir: Path, rounds: int) -> dict[int, list[float]]:
    """onnxruntime alone (one thread), one decode step at each of STEP_BATCHES rows:
    ms per step, median of `rounds` x 10 runs, for a cache of each of STEP_PASTS
    positions (random values: a step's cost does not depend on them)."""
    from p2p_node._decoder import past_names

    generator, session = _direct_generator(model_dir)
    layout = generator.layout
    pasts = past_names(layout.layers)
    names = ["logits"] + [name.replace("past_key_values.", "present.") for name in pasts]
    rng = np.random.default_rng(0)
    out: dict[int, list[float]] = {}
    for past in STEP_PASTS:
        out[past] = []
        for rows in STEP_BATCHES:
            cache = (rows, layout.heads, past, layout.head_dim)
            feeds = {
                "input_ids": np.ones((rows, 1), np.int64),
                "attention_mask": np.ones((rows, past + 1), np.int64),
                "position_ids": np.full((rows, 1), past, np.int64),
            }
            feeds.update({name: rng.random(cache, np.float32) for name in pasts})
            times = []
            for _ in range(rounds + 2):
                started = time.perf_counter()
                for _ in range(10):
                    session.run(names, feeds)
                times.append((time.perf_counter() - started) / 10)
            out[past].append(statistics.median(times[2:]) * 1e3)
    return out


def prefill_ms(model_dir: Path, prompt: str, rounds: int) -> float:
    """The median time onnxruntime here takes for `prompt`'s prefill (one thread)."""
    from p2p_node._generation import prefill_feeds

    generator, session = _direct_generator(model_dir)
    feeds = prefill_feeds(generator.tokenizer.encode(prompt).ids, generator.layout)
    times = []
    for _ in range(rounds + 3):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - started)
    return statistics.median(times[3:]) * 1e3


async def measure_latency(
    local: Client, forwarder: Client, model_id: str, tokens: int, rounds: int
) -> dict[str, Latency]:
    out = {"local": Latency([], [], []), "forwarded": Latency([], [], [])}
    row = {"input": np.zeros((1, 64), np.float32)}
    for client in (local, forwarder):
        await client.generate_text(LATENCY_PROMPT, model_id, max_tokens=4)
        for _ in range(5):
            await client.submit(JOB_MODEL, row)
    for _ in range(rounds):
        for name, client in (("local", local), ("forwarded", forwarder)):
            async with client.generate(LATENCY_PROMPT, model_id, max_tokens=tokens) as gen:
                await gen.text()
            summary = gen.summary
            assert summary is not None
            out[name].ttft_ms.append(summary.ttft_ms)
            if summary.tokens > 1:
                tpot = (summary.total_ms - summary.ttft_ms) / (summary.tokens - 1)
                out[name].tpot_ms.append(tpot)
            started = time.perf_counter()
            await client.submit(JOB_MODEL, row)
            out[name].job_ms.append((time.perf_counter() - started) * 1e3)
    return out


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --- the run -------------------------------------------------------------------------------


async def run(args: argparse.Namespace, data: Path) -> None:
    models_dir: Path = args.models
    parts = set(args.parts)
    if parts & {"embeddings", "latency"}:
        async with _two_nodes(args, data / "two") as (serving, forwarding):
            async with (
                Client.connect(serving) as local,
                Client.connect(forwarding) as forwarder,
            ):
                await _until_forwarded(forwarder, args.generator)
                if "embeddings" in parts:
                    rows = await measure_embeddings(
                        local,
                        forwarder,
                        args.embedder,
                        models_dir / args.embedder,
                        args.batches,
                        args.rounds,
                    )
                    print_embeddings(args, rows)
                if "latency" in parts:
                    latency = await measure_latency(
                        local, forwarder, args.generator, args.tokens, args.rounds
                    )
                    prefill = prefill_ms(models_dir / args.generator, LATENCY_PROMPT, args.rounds)
                    print_latency(args, latency, prefill)
    if "generation" in parts:
        results = await measure_generation(
            models_dir,
            args.generator,
            args.sessions,
            args.tokens,
            args.repeats,
            data / "gen",
            not args.in_process,
        )
        ceiling = [
            direct_generation(models_dir / args.generator, n, args.tokens, args.repeats)
            for n in args.sessions
        ]
        print_generation(args, results, ceiling)
    if "steady" in parts:
        print_steady(args, await measure_steady(args, data / "steady"))
    if "steps" in parts:
        print_steps(args, decode_steps(models_dir / args.generator, args.rounds))
    if "engine" in parts:
        rows = [
            await engine_run(models_dir, args.generator, n, args.tokens, args.repeats)
            for n in args.sessions
        ]
        print_engine(args, rows)


@contextlib.asynccontextmanager
async def _two_nodes(args: argparse.Namespace, data: Path) -> AsyncIterator[tuple[str, str]]:
    """A node serving the embedder and the generator, and one serving nothing that
    forwards to it: their addresses. Each in a process of its own unless
    `--in-process`."""
    served = frozenset({args.embedder, args.generator, JOB_MODEL})
    settings = (True, 64, args.tokens)
    if args.in_process:
        base = _node_config(args.models, served, *settings, data)
        async with open_swarm(2, models=[frozenset(), served], base=base) as swarm:
            await swarm.wait_converged()
            yield swarm[1].addrs[0], swarm[0].addrs[0]
        return
    async with _node_process(args.models, served, *settings, data / "serving") as serving:
        async with _node_process(
            args.models, frozenset(), *settings, data / "forwarding", (serving,)
        ) as forwarding:
            yield serving, forwarding


async def _until_forwarded(client: Client, model_id: str) -> None:
    """Until the forwarding node knows who generates with `model_id`."""
    with trio.fail_after(60):
        while True:
            try:
                await client.generate_text("warm up", model_id, max_tokens=2)
                return
            except JobError:
                await trio.sleep(0.2)


def print_embeddings(args: argparse.Namespace, rows: list[EmbedRow]) -> None:
    print(
        f"\nembeddings with {args.embedder}: sentences/s, median of {args.rounds} rounds; "
        "local = through the node serving it, forwarded = one hop more"
    )
    print(
        f"{'batch':>6}  {'direct':>9}  {'local':>9}  {'forwarded':>9}  "
        f"{'local/direct':>12}  {'fwd/direct':>10}  {'min cosine':>10}"
    )
    for r in rows:
        print(
            f"{r.batch:>6}  {r.direct:>9.1f}  {r.local:>9.1f}  {r.forwarded:>9.1f}  "
            f"{r.local / r.direct:>11.2f}x  {r.forwarded / r.direct:>9.2f}x  {r.cosine:>10.6f}"
        )


def print_generation(
    args: argparse.Namespace, results: dict[str, list[Figures]], ceiling: list[float]
) -> None:
    print(
        f"\ngeneration with {args.generator}, {args.tokens} greedy tokens per session, one "
        f"node ({'in this process' if args.in_process else 'a process of its own'}), "
        f"best of {args.repeats}"
    )
    print("aggregate tokens/s: batched = continuous batching on; alone = off (one session")
    print("per step); one at a time = the same sessions sent one after another;")
    print("onnxruntime alone = the same batched against one at a time, with no node (the")
    print("most batching can gain here: onnxruntime called directly in this process)")
    print(
        f"{'sessions':>8}  {'batched':>9}  {'alone':>9}  {'one at a time':>13}  "
        f"{'batched/alone':>13}  {'batched/one at a time':>21}  {'onnxruntime alone':>17}"
    )
    rows = zip(results["batched"], results["alone"], results["one at a time"], ceiling, strict=True)
    for on, off, serial, direct in rows:
        print(
            f"{on.sessions:>8}  {on.per_s:>9.1f}  {off.per_s:>9.1f}  {serial.per_s:>13.1f}  "
            f"{on.per_s / off.per_s:>12.2f}x  {on.per_s / serial.per_s:>20.2f}x  "
            f"{direct:>16.2f}x"
        )
    print("time to first token and per output token, p50 ms, as the clients see them")
    print(
        f"{'sessions':>8}  {'ttft batched':>12}  {'ttft alone':>10}  {'tpot batched':>12}  "
        f"{'tpot alone':>10}"
    )
    for on, off in zip(results["batched"], results["alone"], strict=True):
        print(
            f"{on.sessions:>8}  {on.ttft_ms:>12.2f}  {off.ttft_ms:>10.2f}  {on.tpot_ms:>12.3f}  "
            f"{off.tpot_ms:>10.3f}"
        )


def print_steps(args: argparse.Namespace, steps: dict[int, list[float]]) -> None:
    print(
        f"\ndecode steps of {args.generator}, onnxruntime alone (one thread): ms per row of "
        f"a step of n rows, median of {args.rounds}; last column: 16 rows one at a time "
        "against together, the most batching 16 sessions can gain at that cache length"
    )
    print(
        f"{'cache':>5}  " + "  ".join(f"{f'n={n}':>7}" for n in STEP_BATCHES) + "  16 x n=1 / n=16"
    )
    sixteen = STEP_BATCHES.index(16)
    for past, times in steps.items():
        per_row = [t / n for t, n in zip(times, STEP_BATCHES, strict=True)]
        gain = 16 * times[0] / times[sixteen]
        print(f"{past:>5}  " + "  ".join(f"{t:>7.3f}" for t in per_row) + f"  {gain:>14.2f}x")


def print_latency(args: argparse.Namespace, latency: dict[str, Latency], prefill: float) -> None:
    print(
        f"\nlatency with {args.generator}: one generation at a time of {args.tokens} greedy "
        f"tokens, {args.rounds} each, ms; prefill compute (onnxruntime here): {prefill:.2f} ms; "
        f"job = a one-row {JOB_MODEL} job on the same path after each generation; "
        "- job = ttft p50 less the prefill and the job"
    )
    print(
        f"{'path':>9}  {'ttft p50':>8}  {'ttft p99':>8}  {'tpot p50':>8}  {'tpot p99':>8}  "
        f"{'ttft p50 - prefill':>18}  {'job p50':>7}  {'- job':>5}"
    )
    for name, figures in latency.items():
        ttft50, job50 = pct(figures.ttft_ms, 50), pct(figures.job_ms, 50)
        print(
            f"{name:>9}  {ttft50:>8.2f}  {pct(figures.ttft_ms, 99):>8.2f}  "
            f"{pct(figures.tpot_ms, 50):>8.3f}  {pct(figures.tpot_ms, 99):>8.3f}  "
            f"{ttft50 - prefill:>18.2f}  {job50:>7.2f}  {ttft50 - prefill - job50:>5.2f}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a few minutes")
    parser.add_argument("--models", type=Path, default=bundled_models_dir())
    parser.add_argument("--embedder", default="minilm-l6-v2")
    parser.add_argument("--generator", default="pydoc-gpt-small")
    parser.add_argument("--batches", type=int, nargs="+", help="default 1 8 32 128")
    parser.add_argument("--sessions", type=int, nargs="+", help="default 1 4 16 64")
    parser.add_argument("--tokens", type=int, help="new tokens per generation (default 64)")
    parser.add_argument("--repeats", type=int, help="generation runs per figure (default 3)")
    parser.add_argument("--rounds", type=int, help="embedding and latency rounds (default 20)")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["embeddings", "generation", "latency", "steady", "steps", "engine"],
        default=["embeddings", "generation", "latency"],
        help="steady, steps and engine are not run by default: tokens/s and the node's "
        "cores over a stretch of runs; the cost of one decode step by rows and cache "
        "length; the engine's own cost per step, in this process",
    )
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="steady: the stretch for each count"
    )
    parser.add_argument(
        "--beside-jobs",
        type=int,
        default=0,
        help=f"steady: one-row {JOB_MODEL} jobs in flight to a second node meanwhile",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the nodes in this process, with the clients, not each in its own",
    )
    parser.add_argument("--serve-node", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_node:
        serve_node(args.serve_node)
        return
    quick = args.quick
    defaults = {
        "batches": [1, 8, 32] if quick else [1, 8, 32, 128],
        "sessions": [1, 4, 16] if quick else [1, 4, 16, 64],
        "tokens": 32 if quick else 64,
        "repeats": 1 if quick else 3,
        "rounds": 8 if quick else 20,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    with tempfile.TemporaryDirectory(prefix="bench-text-") as tmp:
        trio.run(run, args, Path(tmp))


if __name__ == "__main__":
    main()
