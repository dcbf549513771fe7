"""What a job costs a node's own code: its CPU per job, in process, without transport.

Usage: python -m bench.jobpath [--model digits-mlp] [--jobs 3000] [--rounds 7]
                               [--concurrency 1 32]

One real node (its libp2p host, gossip and executor running, in this trio loop)
takes jobs straight into its job handler, as its server hands them over: the
request decoded from its wire bytes, `NodeHandlers.job` (exactly-once, selection,
placement, the executor, metrics), the reply encoded. `concurrency` tasks keep
jobs in flight. The requests are encoded before the clock starts.

Printed per concurrency: CPU time per job (this process's, all threads), the
least and the median of `rounds` rounds of `jobs` jobs. The transport's share
(reads, writes, Noise, yamux, the server's task per request) is not in it:
`bench.overhead` measures the whole. Without other processes or sockets in the
way it moves less than that bench's CPU per job, but it still drifts with the
machine (by a sixth between two runs a minute apart here): compare two versions
of the job path by running them in turn, several times.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import trio

from bench._common import heldout_rows
from p2p_node._codec import decode_request, encode, encode_parts
from p2p_node._handlers import NodeHandlers
from p2p_node._messages import RunRequest
from p2p_node.testing import open_swarm

TIMEOUT_MS = 10_000
WARM_UP_JOBS = 200


async def measure(
    model_id: str, jobs: int, rounds: int, concurrencies: list[int]
) -> dict[int, list[float]]:
    """CPU us per job at each concurrency, one figure per round."""
    row = heldout_rows(model_id)[:1]
    figures: dict[int, list[float]] = {c: [] for c in concurrencies}
    async with open_swarm(1, models=[frozenset({model_id})]) as swarm:
        node = swarm.nodes[0]
        handlers = NodeHandlers(node)

        def payloads(n: int) -> list[bytes]:
            return [
                encode(RunRequest(uuid.uuid4().hex, model_id, {"input": row}, TIMEOUT_MS))
                for _ in range(n)
            ]

        async def work(queued: list[bytes]) -> None:
            while queued:
                request = decode_request(queued.pop())
                assert isinstance(request, RunRequest)
                encode_parts(await handlers.job(request, node.peer_id))

        await work(payloads(WARM_UP_JOBS))
        for _ in range(rounds):
            for c in concurrencies:  # (interleaved: drift hits each alike)
                per_task = max(1, jobs // c)
                queues = [payloads(per_task) for _ in range(c)]
                started = time.process_time()
                async with trio.open_nursery() as nursery:
                    for queued in queues:
                        nursery.start_soon(work, queued)
                figures[c].append((time.process_time() - started) / (per_task * c) * 1e6)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-mlp")
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args(argv)
    figures = trio.run(measure, args.model, args.jobs, args.rounds, args.concurrency)
    print(
        f"the job path of one node in process, {args.model}: CPU us per job "
        f"(decode, NodeHandlers.job, encode), {args.rounds} rounds of {args.jobs} jobs"
    )
    print(f"{'c':>5}{'least':>10}{'median':>10}")
    for c, per_job in figures.items():
        print(f"{c:>5}{min(per_job):>10.1f}{statistics.median(per_job):>10.1f}")


if __name__ == "__main__":
    main()
