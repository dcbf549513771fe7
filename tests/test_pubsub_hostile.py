"""Integration: what a peer sends on GossipSub's own protocol never stops a node.

The record validators (tests/test_gossip.py) see only messages that py-libp2p
parsed and signature-checked; these tests go below them, to raw frames on
/meshsub/1.1.0 from a real libp2p host, and to our own writes on that stream.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamError, StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11
from libp2p.pubsub.pb import rpc_pb2
from libp2p.stream_muxer.yamux import yamux
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils import encode_varint_prefixed
from libp2p.utils.varint import read_varint_prefixed_bytes

from p2p_node._host import new_libp2p_host, run_host
from p2p_node._libp2p import GuardedGossipSub, GuardedPubsub
from p2p_node.testing import Swarm, open_swarm

TOPIC = "/p2p-node/default/records/1"
LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


@asynccontextmanager
async def raw_host() -> AsyncIterator[IHost]:
    """A real libp2p host (TCP, Noise, Yamux) with no pubsub: it sends what we write."""
    host = new_libp2p_host(create_new_key_pair())
    async with run_host(host, LOOPBACK):
        yield host


@asynccontextmanager
async def guarded_pubsub(host: IHost) -> AsyncIterator[GuardedPubsub]:
    """Our Pubsub, running on `host` (its service reads the connection events)."""
    pubsub = GuardedPubsub(host, GuardedGossipSub([PROTOCOL_ID_V11], 6, 4, 12))
    async with background_trio_service(pubsub), background_trio_service(pubsub.router):
        await pubsub.wait_until_ready()
        yield pubsub


async def open_meshsub(host: IHost, addr: str) -> INetStream:
    info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    await host.connect(info)
    return await host.new_stream(info.peer_id, [PROTOCOL_ID_V11])


async def still_gossiping(swarm: Swarm) -> None:
    """Node 0 still takes in node 1's records: its pubsub service is alive."""
    before = swarm[1]._seq
    swarm[1].gossip.changed()
    await swarm[0].view.wait_until(lambda v: v.peers[swarm[1].peer_id].record.seq > before)


async def test_a_frame_that_is_not_an_rpc_drops_that_stream_and_the_node_keeps_gossiping() -> None:
    with trio.fail_after(60):
        async with open_swarm(2, topology="full") as swarm, raw_host() as host:
            await swarm.wait_converged()
            stream = await open_meshsub(host, swarm[0].addrs[0])
            await stream.write(encode_varint_prefixed(b"\xff" * 10))  # no protobuf parses this
            with trio.move_on_after(10):  # the node resets the stream: reads end in an error
                try:
                    while await stream.read(1024):
                        pass
                except StreamError:
                    pass
            garbled = swarm[0].gossip.garbled
            await still_gossiping(swarm)
    assert garbled == 1


async def test_a_peer_that_garbles_stream_after_stream_does_not_leak_our_streams() -> None:
    """Each bad frame makes the node drop the peer from pubsub and open a new
    stream to it; the one it forgot must be closed, not left to pile up."""
    open_ours: set[INetStream] = set()
    with trio.fail_after(60):
        async with open_swarm(2, topology="full") as swarm, raw_host() as host:

            async def hold(stream: INetStream) -> None:  # the node's outbound pubsub stream
                open_ours.add(stream)
                try:
                    while await stream.read(64 * 1024):
                        pass
                except StreamError:
                    pass
                open_ours.discard(stream)

            host.set_stream_handler(PROTOCOL_ID_V11, hold)
            await swarm.wait_converged()
            for garbled in range(1, 6):
                stream = await open_meshsub(host, swarm[0].addrs[0])
                await stream.write(encode_varint_prefixed(b"\xff" * 10))
                while swarm[0].gossip.garbled < garbled:  # noqa: ASYNC110
                    await trio.sleep(0.01)  # a count, not an event
            while len(open_ours) > 1:  # noqa: ASYNC110
                await trio.sleep(0.01)  # the resets are on their way
            await still_gossiping(swarm)


def _junk(r: random.Random, most: int = 40) -> bytes:
    return r.randbytes(r.randrange(most))


def _topic(r: random.Random) -> str:
    return r.choice([TOPIC, "", "x" * r.randrange(300), _junk(r).decode("latin-1")])


def random_rpc(r: random.Random) -> bytes:
    """A well-formed RPC with nonsense in every field: what protobuf parses but no peer means."""
    rpc = rpc_pb2.RPC()
    for _ in range(r.randrange(3)):
        rpc.subscriptions.add(subscribe=r.random() < 0.5, topicid=_topic(r))
    for _ in range(r.randrange(3)):
        msg = rpc.publish.add(data=_junk(r, 200), seqno=_junk(r, 12), topicIDs=[_topic(r)])
        if r.random() < 0.7:
            msg.from_id = _junk(r)
        if r.random() < 0.5:
            msg.signature = _junk(r, 70)
        if r.random() < 0.5:
            msg.key = _junk(r)  # not a public key: py-libp2p's signature check raised
    if r.random() < 0.6:
        control = rpc.control
        for _ in range(r.randrange(3)):
            control.ihave.add(topicID=_topic(r), messageIDs=[_junk(r) for _ in range(3)])
        for _ in range(r.randrange(3)):
            control.iwant.add(messageIDs=[_junk(r) for _ in range(3)])
        for _ in range(r.randrange(3)):
            control.graft.add(topicID=_topic(r))
        for _ in range(r.randrange(3)):
            prune = control.prune.add(topicID=_topic(r), backoff=r.getrandbits(64))
            for _ in range(r.randrange(3)):
                prune.peers.add(peerID=_junk(r), signedPeerRecord=_junk(r, 100))
    if r.random() < 0.3:
        rpc.senderRecord = _junk(r, 100)
    return rpc.SerializeToString()


async def test_nonsense_rpcs_from_a_peer_never_stop_a_node() -> None:
    r = random.Random(1)
    with trio.fail_after(120):
        async with open_swarm(2, topology="full") as swarm, raw_host() as host:
            await swarm.wait_converged()
            stream = await open_meshsub(host, swarm[0].addrs[0])
            for _ in range(500):
                try:
                    await stream.write(encode_varint_prefixed(random_rpc(r)))
                except StreamError:  # the node dropped this stream: open another
                    stream = await open_meshsub(host, swarm[0].addrs[0])
            await still_gossiping(swarm)
            garbled = swarm[0].gossip.garbled
    assert garbled > 0  # the messages with a key that is not a key, at least


async def test_a_prune_naming_other_peers_does_not_make_the_node_dial_them() -> None:
    with trio.fail_after(60):
        async with open_swarm(2, topology="full") as swarm, raw_host() as host:
            async with raw_host() as bystander:
                await swarm.wait_converged()
                record, _ = env_to_send_in_RPC(bystander)
                rpc = rpc_pb2.RPC()
                prune = rpc.control.prune.add(topicID=TOPIC, backoff=60)
                prune.peers.add(peerID=bystander.get_id().to_bytes(), signedPeerRecord=record)
                stream = await open_meshsub(host, swarm[0].addrs[0])
                await stream.write(encode_varint_prefixed(rpc.SerializeToString()))
                # One stream is read in order (and py-libp2p dials PX peers inline):
                # once the garbage after the PRUNE is read, the PRUNE was handled.
                await stream.write(encode_varint_prefixed(b"\xff" * 10))
                while swarm[0].gossip.garbled == 0:  # noqa: ASYNC110
                    await trio.sleep(0.01)  # a count, not an event
                node = ID.from_base58(swarm[0].peer_id)
                dialed = swarm[0].connected_peers() & {str(bystander.get_id())}
                reached = bystander.get_network().connections.get(node)
    assert not dialed and not reached


ECHO = TProtocol("/test/rpcs/1")
BIG = 300 * 1024  # over yamux's initial 256 KiB window, and five frames at least


async def test_concurrent_writes_to_one_stream_arrive_whole() -> None:
    received: list[bytes] = []
    with trio.fail_after(60):
        async with raw_host() as sender_host, raw_host() as receiver:
            done = trio.Event()

            async def read_two(stream: INetStream) -> None:
                for _ in range(2):
                    received.append(await read_varint_prefixed_bytes(stream))
                done.set()

            receiver.set_stream_handler(ECHO, read_two)
            stream = await open_stream(sender_host, receiver)
            messages = [
                rpc_pb2.RPC(publish=[rpc_pb2.Message(data=bytes([i]) * BIG)]) for i in (1, 2)
            ]
            async with guarded_pubsub(sender_host) as pubsub, trio.open_nursery() as nursery:
                for message in messages:
                    nursery.start_soon(pubsub.write_msg, stream, message)
            await done.wait()
    parsed = [rpc_pb2.RPC.FromString(data).publish[0].data for data in received]
    assert sorted(parsed) == sorted(m.publish[0].data for m in messages)


async def open_stream(host: IHost, to: IHost) -> INetStream:
    info = info_from_p2p_addr(multiaddr.Multiaddr(f"{to.get_addrs()[0]}/p2p/{to.get_id()}"))
    await host.connect(info)
    return await host.new_stream(info.peer_id, [ECHO])


async def test_a_write_cut_off_part_way_resets_the_stream() -> None:
    with trio.fail_after(60):
        async with raw_host() as sender_host, raw_host() as receiver:
            streams: trio.MemorySendChannel[INetStream]
            streams, arrived = trio.open_memory_channel[INetStream](1)

            async def hold(stream: INetStream) -> None:
                await streams.send(stream)  # read nothing: the sender's window runs out
                await trio.sleep_forever()

            receiver.set_stream_handler(ECHO, hold)
            stream = await open_stream(sender_host, receiver)
            # Past the largest window yamux grows to: the write must wait for credit.
            big = rpc_pb2.RPC(publish=[rpc_pb2.Message(data=b"x" * (yamux.MAX_WINDOW_SIZE + 1))])
            async with guarded_pubsub(sender_host) as pubsub:
                with trio.move_on_after(0.5):  # the write is stuck waiting for credit
                    await pubsub.write_msg(stream, big)
            inbound = await arrived.receive()
            with trio.fail_after(10):  # without the reset this read waits forever
                try:
                    while await inbound.read(64 * 1024):
                        pass
                    ended = "closed"
                except StreamReset:
                    ended = "reset"
                except StreamError:  # StreamEOF among them: closed, not reset
                    ended = "closed"
    assert ended == "reset"


async def test_a_nodes_rpcs_carry_records_but_no_signed_peer_record() -> None:
    """Our records carry the addresses; py-libp2p's per-RPC signed copy is left out."""
    rpcs: list[rpc_pb2.RPC] = []
    with trio.fail_after(60):
        async with open_swarm(1) as swarm, raw_host() as host:
            got_record = trio.Event()

            async def read_rpcs(stream: INetStream) -> None:
                while not got_record.is_set():
                    rpc = rpc_pb2.RPC.FromString(await read_varint_prefixed_bytes(stream))
                    rpcs.append(rpc)
                    if any(TOPIC in m.topicIDs for m in rpc.publish):
                        got_record.set()

            host.set_stream_handler(PROTOCOL_ID_V11, read_rpcs)
            stream = await open_meshsub(host, swarm[0].addrs[0])
            hello = rpc_pb2.RPC(subscriptions=[rpc_pb2.RPC.SubOpts(subscribe=True, topicid=TOPIC)])
            await stream.write(encode_varint_prefixed(hello.SerializeToString()))
            graft = rpc_pb2.RPC()
            graft.control.graft.add(topicID=TOPIC)  # into node 0's mesh: records come
            await stream.write(encode_varint_prefixed(graft.SerializeToString()))
            await got_record.wait()
    assert rpcs[0].subscriptions[0].topicid == TOPIC  # the hello
    assert not any(rpc.HasField("senderRecord") for rpc in rpcs)
