"""Anti-entropy by digests: the wire messages, bad input, and repair on real nodes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgpack
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX
from test_view import record as view_record

from gossip import (
    PeerState,
    Rejection,
    decode_record,
    digest_entry,
    encode_record,
    is_entry_newer,
    is_newer_than_entry,
)
from p2p_node._codec import decode_reply, decode_request, encode
from p2p_node._config import ConfigError, GossipConfig
from p2p_node._gossip import PUSH_YOUNGER_THAN_S, _signed_by_sender, worth_pushing
from p2p_node._messages import DigestReply, DigestRequest, InvalidMessage, WireError
from p2p_node._node import Node
from p2p_node._rpc import SYNC_PROTOCOL
from p2p_node.testing import open_swarm

PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
ENTRY = (PEER, "0123456789abcdef", 7, 1.7e9)


@pytest.mark.parametrize(
    "message",
    [
        DigestRequest(()),
        DigestRequest((ENTRY,), (b"signed", b"")),
        DigestReply((b"\x00",), (PEER,)),
        DigestReply((), ()),
    ],
    ids=["empty digest?", "digest?", "digest", "empty digest"],
)
def test_digest_messages_round_trip(message: Any) -> None:
    decode = decode_request if isinstance(message, DigestRequest) else decode_reply
    assert decode(encode(message)) == message


@pytest.mark.parametrize(
    "digest",
    [
        "notalist",
        [[PEER, "boot", 1]],  # a row short
        [[PEER, "boot", 1, 1.0, "extra"]],
        [[PEER, "boot", -1, 1.0]],  # negative seq
        [[PEER, "b" * 65, 1, 1.0]],  # boot id over its limit
        [["p" * 129, "boot", 1, 1.0]],  # peer id over its limit
        [["", "boot", 1, 1.0]],
        [[PEER, "boot", 1, float("nan")]],
        [[PEER, "boot", 2**63, 1.0]],  # past MAX_INT
        [[7, "boot", 1, 1.0]],
    ],
)
def test_a_malformed_digest_is_refused_with_a_typed_error(digest: object) -> None:
    payload = msgpack.packb({"v": 1, "kind": "digest?", "digest": digest})
    with pytest.raises(WireError):
        decode_request(payload)


def test_a_digest_reply_of_anything_but_peer_ids_is_refused() -> None:
    with pytest.raises(WireError):
        decode_reply(msgpack.packb({"v": 1, "kind": "digest", "messages": [], "wants": [1]}))
    with pytest.raises(InvalidMessage):
        DigestReply((), ("",))


def test_entries_compare_as_records_do() -> None:
    record = view_record(PEER, 5)
    same = digest_entry(record)
    assert not is_newer_than_entry(record, same) and not is_entry_newer(same, record)
    older = replace(record, seq=record.seq - 1)
    assert is_newer_than_entry(record, digest_entry(older))
    assert is_entry_newer(same, older)
    # Across boots the issue time decides.
    reboot = view_record(PEER, 0, boot="another", at=record.issued_at + 1)
    assert is_newer_than_entry(reboot, same) and is_entry_newer(digest_entry(reboot), record)


def test_the_anti_entropy_period_must_be_positive() -> None:
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ConfigError):
            GossipConfig(anti_entropy_s=bad)


async def test_a_record_lost_on_the_way_is_repaired_by_anti_entropy_alone() -> None:
    """Node 0 loses node 2's record (as when GossipSub dropped it in a start-up
    burst); nothing is published again, yet the periodic digest sync brings it
    back from a neighbour, and only what was missing travels."""
    with trio.fail_after(60):
        async with open_swarm(3, topology="ring") as swarm:
            await swarm.wait_converged()
            lost = swarm[2].peer_id
            published = [swarm[i].gossip.published for i in swarm.live]
            view = swarm[0].view
            view._remove(lost)  # no departure: the record never came
            view._tombstones.pop(lost)
            swarm[0].gossip._signed.pop(lost, None)
            await view.wait_until(lambda v: lost in v.peers)
            assert view.snapshot().peers[lost].state is PeerState.ALIVE
            assert [swarm[i].gossip.published for i in swarm.live] == published


async def test_a_sync_between_nodes_that_agree_sends_no_record() -> None:
    with trio.fail_after(60):
        async with open_swarm(2, topology="full") as swarm:
            await swarm.wait_converged()
            a, b = swarm[0], swarm[1]
            reply = await a._rpc.call(
                b.peer_id, SYNC_PROTOCOL, DigestRequest(a.gossip.digest()), 10
            )
    assert isinstance(reply, DigestReply)
    assert reply.messages == () and reply.wants == ()


async def test_forged_digests_and_records_change_nothing() -> None:
    """A peer that lies in its digest gets at most what it asked for; records it
    pushes that are not signed by their peer are rejected and counted; the
    target's view and its own record stay as they were."""
    with trio.fail_after(60):
        async with open_swarm(3, topology="full") as swarm:
            await swarm.wait_converged()
            target, liar, victim = swarm[0], swarm[1], swarm[2]
            before = target.view.snapshot()
            published = target.gossip.published
            forged = replace(victim.make_record(1.0, ()), seq=10**6)
            victims_msg = target.gossip._signed[victim.peer_id]
            tampered = replace_data(victims_msg, encode_record(forged))
            fake_peers = tuple((f"12D3KooWfake{i}", "boot", 10**9, 1e12) for i in range(2000))
            lies = (
                # Claims newer records of everyone (and of peers that do not exist).
                DigestRequest(
                    tuple((p, "boot", 10**9, 1e12) for p in [*before.peers, target.peer_id])
                    + fake_peers,
                    (tampered, b"\x93garbage", b"", b"\x00" * 20_000),
                ),
                DigestRequest(((target.peer_id, "boot", 10**9, 1e12),)),  # the target's own
            )
            replies = [await liar._rpc.call(target.peer_id, SYNC_PROTOCOL, lie, 10) for lie in lies]
            after = target.view.snapshot()
            rejects = dict(target.gossip.rejects)
    first, second = replies
    assert isinstance(first, DigestReply) and isinstance(second, DigestReply)
    assert first.messages == ()  # it claims to hold newer: nothing to send it
    assert set(first.wants) >= {p for p, *_ in fake_peers}  # asked for: nothing changes
    assert target.peer_id not in second.wants  # a node never asks for its own record
    assert {p: k.record for p, k in after.peers.items()} == {
        p: k.record for p, k in before.peers.items()
    }
    assert target.gossip.published == published
    assert rejects.get(Rejection.FORGED, 0) >= 1 and rejects.get(Rejection.MALFORMED, 0) >= 2


def replace_data(msg: Any, data: bytes) -> bytes:
    """The signed message with its payload swapped: the signature no longer holds."""
    copy = rpc_pb2.Message()
    copy.CopyFrom(msg)
    copy.data = data
    return copy.SerializeToString()


def test_a_synced_record_is_pushed_on_when_its_own_peer_sent_it_or_is_young() -> None:
    old = view_record(PEER, 3, at=1000.0)
    other = "12D3KooWother"
    later = 1000.0 + PUSH_YOUNGER_THAN_S + 1
    assert worth_pushing(old, PEER, 1000.0 + 3600)  # its own peer sent it
    assert worth_pushing(old, other, 1000.0 + PUSH_YOUNGER_THAN_S / 2)  # news still
    assert not worth_pushing(old, other, later)  # our own gap


def signed_unpublished(node: Node) -> bytes:
    """A newer record of `node`, signed by it as GossipSub would sign it, never
    published: the record a peer behind a cut published while no one heard."""
    pubsub = node.gossip._pubsub
    record = node.make_record(node.config.gossip.refresh, ())
    msg = rpc_pb2.Message(
        data=encode_record(record),
        topicIDs=[node.config.gossip.topic],
        from_id=pubsub.my_id.to_bytes(),
        seqno=pubsub._next_seqno(),
    )
    msg.signature = pubsub.sign_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
    msg.key = pubsub.host.get_public_key().serialize()
    return msg.SerializeToString()


def test_a_good_signature_kept_passes_nothing_else_it_does_not_cover() -> None:
    """A good signature is checked once per process and kept; a message that
    differs from it in any field the signature covers is checked afresh, and
    refused."""
    keys = create_new_key_pair()
    other = create_new_key_pair()
    msg = rpc_pb2.Message(
        data=b"record", topicIDs=["t"], from_id=ID.from_pubkey(keys.public_key).to_bytes()
    )
    msg.seqno = b"\x00" * 8
    msg.signature = keys.private_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
    msg.key = keys.public_key.serialize()
    assert _signed_by_sender(msg) and _signed_by_sender(msg)  # checked, then kept
    forged = {
        "data": {"data": b"record!"},
        "topic": {"topicIDs": ["u"]},
        "seqno": {"seqno": b"\x00" * 7 + b"\x01"},
        "from": {"from_id": ID.from_pubkey(other.public_key).to_bytes()},
    }
    for name, change in forged.items():
        copy = rpc_pb2.Message()
        copy.CopyFrom(msg)
        for field, value in change.items():
            if field == "topicIDs":
                del copy.topicIDs[:]
                copy.topicIDs.extend(value)
            else:
                setattr(copy, field, value)
        assert not _signed_by_sender(copy), name


async def test_records_that_revive_peers_go_on_by_syncs_not_gossipsub() -> None:
    """Nodes 0, 1 and 2 of a ring hold node 3 departed (as a partition's far side
    does), and 0 alone takes 3's newer record by a sync (as across a healed
    cut). 0 passes it on by syncing with its other neighbours, who do the same:
    it reaches 1 and 2 though no one published it (anti-entropy and refreshes
    are off, and a push into GossipSub would have reached them as a gossiped
    record, not a synced one)."""
    quiet = GossipConfig(refresh=600.0, anti_entropy_s=600.0, heartbeat_s=1)
    with trio.fail_after(60):
        async with open_swarm(4, topology="ring", gossip=quiet) as swarm:
            await swarm.wait_converged()
            # Past the first heartbeats, when a node holds a synced record back
            # until its mesh has formed, then pushes it into GossipSub.
            await trio.sleep_until(max(swarm[i].gossip.meshed_at for i in swarm.live))
            far = swarm[3]
            for i in (0, 1, 2):
                held = swarm[i].view.last_record(far.peer_id)
                assert held is not None
                assert swarm[i].view.depart(far.peer_id, held.boot_id, held.seq)
            published = far.gossip.published
            assert await swarm[0].gossip.take_synced([signed_unpublished(far)], far.peer_id) == 1
            for i in (1, 2):
                await swarm[i].view.wait_until(lambda view: far.peer_id in view.peers)
                assert swarm[i].gossip.revivals == 1  # it came by a sync
            assert swarm[0].spread_rounds >= 1 and far.gossip.published == published


async def test_a_sync_carries_the_senders_own_record() -> None:
    """A node's record goes with its digest, not only when the reply asks for it:
    a reply to a newcomer (every record the peer holds) can take longer than the
    call's timeout in a start-up burst, and the request for its record came after."""
    with trio.fail_after(60):
        quiet = GossipConfig(refresh=600.0, anti_entropy_s=600.0)
        async with open_swarm(2, topology="full", gossip=quiet) as swarm:
            await swarm.wait_converged()
            a, b = swarm[1], swarm[0]
            b.gossip.wanted = lambda digest: ()  # b's reply asks for nothing
            pushed: list[tuple[bytes, ...]] = []
            take = b.gossip.take_synced

            async def taking(messages: Any, sender: str) -> int:
                if sender == a.peer_id:
                    pushed.append(tuple(messages))
                return await take(messages, sender)

            b.gossip.take_synced = taking  # type: ignore[method-assign]
            await a.sync_once(b.peer_id)
            (own,) = a.gossip.own_message()
    # (node 1's own syncs on connecting may land here too: they carry it as well)
    assert pushed and all(messages == (own,) for messages in pushed)
    signed = rpc_pb2.Message.FromString(own)
    assert decode_record(signed.data).seq == a._seq


async def test_a_peer_held_departed_publishes_again_when_a_sync_says_so() -> None:
    """Behind a cut link a peer never sees the report that dropped it, and after the
    heal a sync moves only newer records: the node holding it departed names it
    among the records it wants, and it publishes a newer one, which brings it back."""
    with trio.fail_after(60):
        quiet = GossipConfig(refresh=600.0, anti_entropy_s=600.0)
        async with open_swarm(2, topology="full", gossip=quiet) as swarm:
            await swarm.wait_converged()
            a, b = swarm[0], swarm[1]
            seq = a._seq
            # b took a report against a that a never saw (a partition's far side).
            record = b.view.last_record(a.peer_id)
            assert record is not None
            assert b.view.depart(a.peer_id, record.boot_id, record.seq)
            reply = await a._rpc.call(
                b.peer_id, SYNC_PROTOCOL, DigestRequest(a.gossip.digest()), 10
            )
            assert isinstance(reply, DigestReply) and reply.wants == (a.peer_id,)
            await a.sync_once(b.peer_id)
            await b.view.wait_until(lambda view: a.peer_id in view.peers)
            assert a._seq > seq and a.gossip.revived_by_sync >= 1
            # Alive again at b: a sync no longer names it.
            reply = await a._rpc.call(
                b.peer_id, SYNC_PROTOCOL, DigestRequest(a.gossip.digest()), 10
            )
    assert isinstance(reply, DigestReply) and reply.wants == ()
