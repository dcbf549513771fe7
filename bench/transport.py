"""What py-libp2p costs per message and per byte, without our job path.

Usage: python -m bench.transport [--round-trips 3000] [--bulk 6]

Two hosts in this process (TCP + Noise + yamux on loopback, the node's
patches applied) and one stream between them:

- ping-pong: 600 bytes each way, one round trip at a time;
- bulk: 16 MiB requests, each read in full by the other end, which answers
  one byte.

Both hosts share one trio loop, so CPU time is the cost of both ends together;
wall time also counts waits. Compare versions by running each in turn, on the
same machine, a few times over.
"""

from __future__ import annotations

import argparse
import time

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2p_node._host import new_libp2p_host, run_host

PROTOCOL = TProtocol("/bench/transport/1.0.0")
SMALL = 600
BULK_BYTES = 16 * 1024 * 1024
READ = 32 * 1024 * 1024  # a read takes whatever is buffered


async def _answer(stream: INetStream) -> None:
    """Echo a small message; answer a bulk one (its first byte says which) with b"k"."""
    while True:
        data = await stream.read(READ)
        if not data:
            return
        if data[:1] == b"s":
            await stream.write(data)
            continue
        left = BULK_BYTES - len(data)
        while left > 0:
            more = await stream.read(READ)
            if not more:
                return
            left -= len(more)
        await stream.write(b"k")


async def measure(round_trips: int, bulk: int) -> tuple[float, float, float, float]:
    """(ping-pong us wall, us CPU per round trip, bulk MB/s wall, MB/s CPU)."""
    server, caller = new_libp2p_host(create_new_key_pair()), new_libp2p_host(create_new_key_pair())
    server.set_stream_handler(PROTOCOL, _answer)
    async with run_host(server, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        async with run_host(caller, []):
            await caller.connect(info_from_p2p_addr(server.get_addrs()[0]))
            stream = await caller.new_stream(server.get_id(), [PROTOCOL])
            small, large = b"s" * SMALL, b"b" * BULK_BYTES

            async def timed(payload: bytes, count: int) -> tuple[float, float]:
                for _ in range(3):  # warm up
                    await stream.write(payload)
                    await stream.read(READ)
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(count):
                    await stream.write(payload)
                    await stream.read(READ)
                return time.perf_counter() - wall, time.process_time() - cpu

            wall, cpu = await timed(small, round_trips)
            bulk_wall, bulk_cpu = await timed(large, bulk) if bulk else (0.0, 0.0)
            await stream.reset()
    mb = bulk * BULK_BYTES / 1e6
    return (
        wall / round_trips * 1e6,
        cpu / round_trips * 1e6,
        mb / bulk_wall if bulk else 0.0,
        mb / bulk_cpu if bulk else 0.0,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=3000)
    parser.add_argument("--bulk", type=int, default=6, help="16 MiB requests to time (0: none)")
    args = parser.parse_args(argv)
    pp_wall, pp_cpu, mb_wall, mb_cpu = trio.run(measure, args.round_trips, args.bulk)
    print(f"ping-pong {SMALL} B: {pp_wall:.0f} us wall, {pp_cpu:.0f} us CPU per round trip")
    if args.bulk:
        print(f"bulk {BULK_BYTES >> 20} MiB: {mb_wall:.0f} MB/s wall, {mb_cpu:.0f} MB/s CPU")


if __name__ == "__main__":
    main()
