"""Text generation: aggregate tokens/s with concurrent sessions, continuous batching on
and off, side by side in one run.

Usage: python -m bench.text [--models DIR --model ID | --size small|tiny]
                            [--sessions 1 4 16] [--tokens 64]

One node (in this process, on loopback) serves the generator; one client sends
`--sessions` generations at once, each of `--tokens` greedy tokens, and the
aggregate tokens/s is all their tokens over the wall time from the first
request to the last token. With batching on, the node's engine runs the decode
steps of all running sessions as one onnxruntime batch; off, one session per
step, in turn. Also printed: time to first token (p50, as the client sees it)
and time per output token (p50 over sessions, after the first token).

Without `--models`, the generator is a random-weight decoder built like the
tests' (`--size small`: 4 layers, d 128, the shape of the feasibility run's
GPT; `--size tiny`: the tests' own, whose compute is so small that the figures
measure the node's own cost per step, which is what batching shares out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from p2p_node import Client, NodeConfig
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


async def measure(
    models_dir: Path, model_id: str, sessions: list[int], tokens: int, repeats: int, data: Path
) -> dict[str, list[Figures]]:
    """Per count of sessions: batched and alone (two nodes, measured in turn, so that
    a machine's drifting load falls on both), and the same sessions one at a time;
    each the best of `repeats` runs (the least disturbed by the machine's other work)."""
    base = NodeConfig(data_dir=data, shutdown_grace=1.0, target_degree=0, models_dir=models_dir)
    configs = [
        replace(base, executor=replace(base.executor, batch_decode=batch, max_new_tokens=tokens))
        for batch in (True, False)
    ]
    out: dict[str, list[Figures]] = {"batched": [], "alone": [], "one at a time": []}
    async with (
        open_swarm(1, base=configs[0]) as on,
        open_swarm(1, base=replace(configs[1], data_dir=data / "off")) as off,
        Client.connect(on[0].addrs[0]) as batched,
        Client.connect(off[0].addrs[0]) as alone,
    ):
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


# Random-weight decoders of the tests' kind (tests/tiny_decoder.py): "tiny" is the
# tests' own (1 layer, d 16); "small" has the shape of the feasibility run's GPT
# (4 layers, d 128, 4 heads).
SIZES = {
    "tiny": {"layers": 1, "heads": 2, "head_dim": 8},
    "small": {"layers": 4, "heads": 4, "head_dim": 32},
}


def random_decoder(root: Path, size: str) -> tuple[Path, str]:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from tiny_decoder import MODEL_ID, write_tiny_decoder

    write_tiny_decoder(root, context=1024, **SIZES[size])
    return root, MODEL_ID


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, help="a model repository (default: tiny)")
    parser.add_argument("--model", help="the generator's id in --models")
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="small",
        help="without --models: a random-weight decoder of this size",
    )
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per session")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the best")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-text-") as tmp:
        if args.models is None:
            models_dir, model_id = random_decoder(Path(tmp) / "models", args.size)
        else:
            models_dir, model_id = args.models, args.model
        results = trio.run(
            measure,
            models_dir,
            model_id,
            args.sessions,
            args.tokens,
            args.repeats,
            Path(tmp) / "nodes",
        )
    name = model_id if args.models else f"a random {args.size} decoder"
    print(
        f"generation with {name}, {args.tokens} greedy tokens per session, one node, "
        f"best of {args.repeats}"
    )
    print("aggregate tokens/s: batched = continuous batching on; alone = off (one session")
    print("per step); one at a time = the same sessions sent one after another")
    print(
        f"{'sessions':>8}  {'batched':>9}  {'alone':>9}  {'one at a time':>13}  "
        f"{'batched/alone':>13}  {'batched/one at a time':>21}"
    )
    rows = zip(results["batched"], results["alone"], results["one at a time"], strict=True)
    for on, off, serial in rows:
        print(
            f"{on.sessions:>8}  {on.per_s:>9.1f}  {off.per_s:>9.1f}  {serial.per_s:>13.1f}  "
            f"{on.per_s / off.per_s:>12.2f}x  {on.per_s / serial.per_s:>20.2f}x"
        )
    print("\ntime to first token and per output token, p50 ms, as the client sees them")
    print(
        f"{'sessions':>8}  {'ttft batched':>12}  {'ttft alone':>10}  {'tpot batched':>12}  "
        f"{'tpot alone':>10}"
    )
    for on, off in zip(results["batched"], results["alone"], strict=True):
        print(
            f"{on.sessions:>8}  {on.ttft_ms:>12.2f}  {off.ttft_ms:>10.2f}  {on.tpot_ms:>12.3f}  "
            f"{off.tpot_ms:>10.3f}"
        )


if __name__ == "__main__":
    main()
