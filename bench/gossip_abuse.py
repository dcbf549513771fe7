"""Honest gossip under a flood of forged and replayed records.

Usage: python -m bench.gossip_abuse [--nodes 6] [--changes 30] [--rate 400]

N real nodes (one process, `open_swarm`, full mesh) and a rogue peer connected
to node 0 that signs what it publishes and validates nothing. Side by side in
one run: the time for an honest change (`gossip.changed()` on a random node)
to reach every other node's view, quiet and while the rogue floods node 0 with
records forged in other peers' names and replays of its own, at `--rate`
messages per second (the network's whole record budget is 200/s). Also counted:
how many flood messages were rejected, and how many forgeries got into a view
(the answer must be none).
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
from dataclasses import replace

import trio

from gossip import Rejection, encode_record
from p2p_node.testing import Swarm, open_rogue, open_swarm


async def propagation_ms(swarm: Swarm, rng: random.Random) -> float:
    """One honest change, from the call until every other node's view has it."""
    source = swarm[rng.randrange(1, len(swarm))]
    before = source._seq
    started = trio.current_time()
    source.gossip.changed()
    for node in swarm.nodes:
        if node is not source:
            await node.view.wait_until(lambda v: v.peers[source.peer_id].record.seq > before)
    return (trio.current_time() - started) * 1e3


async def run(nodes: int, changes: int, rate: float) -> None:
    rng = random.Random(1)
    async with open_swarm(nodes, topology="full") as swarm:
        await swarm.wait_converged()
        target = swarm[0]
        quiet = [await propagation_ms(swarm, rng) for _ in range(changes)]
        victims = [swarm[i].make_record(1.0, ()) for i in range(1, nodes)]
        async with open_rogue(target.addrs[0]) as (pubsub, rogue_id):
            own = replace(victims[0], peer_id=rogue_id, boot_id="rogue", models=())
            await pubsub.publish(target.config.gossip.topic, encode_record(replace(own, seq=1)))
            sent = 0
            flooding, done = trio.Event(), trio.Event()

            async def flood() -> None:
                nonlocal sent
                topic = target.config.gossip.topic
                next_at = trio.current_time()
                while not done.is_set():
                    victim = victims[sent % len(victims)]
                    forged = replace(victim, seq=victim.seq + 10**6 + sent)
                    await pubsub.publish(topic, encode_record(forged))
                    await pubsub.publish(topic, encode_record(replace(own, seq=1)))
                    sent += 2
                    flooding.set()
                    next_at += 2 / rate
                    await trio.sleep_until(next_at)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                await flooding.wait()
                flood_started = trio.current_time()
                loaded = [await propagation_ms(swarm, rng) for _ in range(changes)]
                done.set()
                flood_s = trio.current_time() - flood_started
            await trio.sleep(1.0)  # let the last of the flood through validation
            rejects = dict(target.gossip.rejects)
        forged_in = sum(
            1
            for node in swarm.nodes
            for known in node.view.snapshot().peers.values()
            if known.record.seq >= 10**6
        )
    print(f"{nodes} nodes, {changes} honest changes each way, flood at {rate:g} msg/s")
    print(f"  {'':28} {'p50 ms':>8} {'p99 ms':>8}")
    for label, samples in (("quiet", quiet), ("under the flood", loaded)):
        ordered = sorted(samples)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        print(f"  {label:28} {statistics.median(ordered):8.1f} {p99:8.1f}")
    ratio = statistics.median(loaded) / statistics.median(quiet)
    print(f"  flood / quiet, p50: {ratio:.2f}x")
    arrived = rejects.get(Rejection.FORGED, 0) + rejects.get(Rejection.REPLAYED, 0)
    print(
        f"  flood: {sent} messages published over {flood_s:.1f} s; {arrived} reached node 0 "
        f"({arrived / flood_s:.0f}/s) and were rejected (forged "
        f"{rejects.get(Rejection.FORGED, 0)}, replayed {rejects.get(Rejection.REPLAYED, 0)}); "
        "the rest were dropped by the rogue's own stack (py-libp2p keeps at most 100 "
        "messages queued per peer), so node 0 read as fast as it could"
    )
    print(f"  forgeries in any view: {forged_in}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--rate", type=float, default=400.0)
    args = parser.parse_args()
    logging.getLogger("libp2p").setLevel(logging.ERROR)  # the rogue's queue-full warnings
    trio.run(run, args.nodes, args.changes, args.rate)


if __name__ == "__main__":
    main()
