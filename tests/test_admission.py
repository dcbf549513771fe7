"""Job admission: the client allowlist and per-client token buckets, pure and on real nodes."""

from __future__ import annotations

import logging
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from p2p_node import Client, ConfigError, ErrorCode, JobError, NodeConfig
from p2p_node._admission import MAX_TRACKED_CLIENTS, Admission, TokenBucket
from p2p_node._channel import MessageLimits
from p2p_node._config import AdmissionConfig, GossipConfig, check_peer_id, load_client_allowlist
from p2p_node._host import new_libp2p_host, run_host
from p2p_node._identity import peer_id_of
from p2p_node._messages import ErrorReply, RunRequest
from p2p_node._rpc import INFER_PROTOCOL, open_rpc
from p2p_node.testing import open_swarm

ALICE = peer_id_of(create_new_key_pair())
MALLORY = peer_id_of(create_new_key_pair())

# --- pure -----------------------------------------------------------------------------


def test_a_token_bucket_admits_its_burst_then_says_when_to_come_back() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0, tokens=3.0, updated_at=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.25) == pytest.approx(0.25)  # half a token came back
    assert bucket.take(0.5) == 0.0
    assert bucket.take(100.0) == 0.0 and bucket.tokens == pytest.approx(2.0)  # capped at burst


def test_a_clock_going_backwards_does_not_mint_tokens() -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0, tokens=0.0, updated_at=10.0)
    assert bucket.take(5.0) == pytest.approx(1.0)
    assert bucket.take(10.5) == pytest.approx(0.5)


def test_without_an_allowlist_anyone_may_submit() -> None:
    admission = Admission(AdmissionConfig(), "node")
    for _ in range(1000):
        admission.admit_job(MALLORY, 0.0)
    assert admission.refused == {}


def test_a_client_off_the_allowlist_is_unauthorized_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    admission = Admission(AdmissionConfig(allowed_clients=frozenset({ALICE})), "node")
    admission.admit_job(ALICE, 0.0)
    with caplog.at_level(logging.DEBUG, logger="p2p_node._admission"):
        for _ in range(3):
            with pytest.raises(JobError) as caught:
                admission.admit_job(MALLORY, 0.0)
    assert caught.value.code == ErrorCode.UNAUTHORIZED
    assert not caught.value.retryable
    assert MALLORY in caught.value.message and "--allow-client" in caught.value.message
    assert caught.value.peer == "node"
    assert admission.refused == {ErrorCode.UNAUTHORIZED: 3}
    levels = [r.levelno for r in caplog.records if MALLORY in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_a_client_past_its_rate_is_overloaded_with_a_retry_after() -> None:
    admission = Admission(AdmissionConfig(job_rate=10.0, job_burst=2), "node")
    admission.admit_job(ALICE, 0.0)
    admission.admit_job(ALICE, 0.0)
    with pytest.raises(JobError) as caught:
        admission.admit_job(ALICE, 0.0)
    assert caught.value.code == ErrorCode.OVERLOADED and caught.value.retryable
    assert caught.value.retry_after == pytest.approx(0.1)
    assert "retry after 0.1 s" in caught.value.message
    admission.admit_job(MALLORY, 0.0)  # buckets are per client
    admission.admit_job(ALICE, 0.1)  # and refill
    assert admission.refused == {ErrorCode.OVERLOADED: 1}


def test_unauthorized_clients_spend_no_tokens() -> None:
    config = AdmissionConfig(allowed_clients=frozenset({ALICE}), job_rate=1.0, job_burst=1)
    admission = Admission(config, "node")
    with pytest.raises(JobError):
        admission.admit_job(MALLORY, 0.0)
    assert MALLORY not in admission._buckets


def test_the_buckets_kept_are_bounded() -> None:
    admission = Admission(AdmissionConfig(job_rate=1.0, job_burst=5), "node")
    for i in range(MAX_TRACKED_CLIENTS + 10):
        admission.admit_job(f"peer{i}", 0.0)  # none is full again at t=0
    assert len(admission._buckets) <= MAX_TRACKED_CLIENTS
    admission.admit_job("late", 100.0)  # by now every bucket is full: all forgotten
    assert len(admission._buckets) <= 2


@pytest.mark.parametrize(
    ("changes", "in_message"),
    [
        ({"allowed_clients": frozenset({"nobody"})}, "not a peer id"),
        ({"job_rate": 0.0}, "job_rate"),
        ({"job_rate": float("inf")}, "job_rate"),
        ({"job_rate": float("nan")}, "job_rate"),
        ({"job_burst": 0}, "job_burst"),
    ],
    ids=["peer-id", "zero-rate", "inf-rate", "nan-rate", "burst"],
)
def test_bad_admission_config_is_refused(changes: dict, in_message: str) -> None:
    with pytest.raises(ConfigError, match=in_message):
        AdmissionConfig(**changes)


def test_peer_ids_are_checked() -> None:
    assert check_peer_id(ALICE) == ALICE
    assert check_peer_id("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")  # an RSA peer id
    for bad in ["", "alice", ALICE[:-2], "0OIl" * 10]:
        with pytest.raises(ConfigError, match="is not a peer id"):
            check_peer_id(bad)


def test_an_allowlist_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "clients.toml"
    path.write_text(f'clients = ["{ALICE}", "{MALLORY}"]\n')
    assert load_client_allowlist(path) == {ALICE, MALLORY}


@pytest.mark.parametrize(
    ("text", "in_message"),
    [
        ("clients = [", "not valid TOML"),
        ('peers = ["x"]', "unknown keys"),
        ("clients = [1]", "list of peer id strings"),
        ('clients = ["alice"]', "'alice' is not a peer id"),
    ],
    ids=["toml", "key", "type", "peer-id"],
)
def test_a_bad_allowlist_file_is_one_typed_line(tmp_path: Path, text: str, in_message: str) -> None:
    path = tmp_path / "clients.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_client_allowlist(path)
    assert in_message in str(caught.value) and str(path) in str(caught.value)


def test_the_cli_builds_the_allowlist_from_flags_and_file(tmp_path: Path) -> None:
    from p2p_node._cli import _node_config, _parser

    path = tmp_path / "clients.toml"
    path.write_text(f'clients = ["{MALLORY}"]\n')
    start = ["start", "--data-dir", str(tmp_path), "--bootstrap-file", str(tmp_path / "none")]
    (tmp_path / "none").write_text("peers = []\n")
    open_config = _node_config(_parser().parse_args(start))
    assert open_config.admission == AdmissionConfig()
    argv = [*start, "--allow-client", ALICE, "--allow-clients-file", str(path), "--job-rate", "5"]
    config = _node_config(_parser().parse_args(argv))
    assert config.admission.allowed_clients == {ALICE, MALLORY}
    assert config.admission.job_rate == 5.0


# --- real nodes -----------------------------------------------------------------------


def _swarm_config(tmp_path: Path, admission: AdmissionConfig) -> NodeConfig:
    return NodeConfig(data_dir=tmp_path, shutdown_grace=1.0, target_degree=0, admission=admission)


async def test_only_allowed_clients_submit_but_peers_still_forward(
    tmp_path: Path, digits, caplog: pytest.LogCaptureFixture
) -> None:
    x, _ = digits
    alice = create_new_key_pair()
    admission = AdmissionConfig(allowed_clients=frozenset({peer_id_of(alice)}))
    shares = [frozenset({"digits-mlp"}), frozenset({"digits-logreg"})]
    with trio.fail_after(30):
        async with open_swarm(2, models=shares, base=_swarm_config(tmp_path, admission)) as swarm:
            await swarm.wait_converged()
            entry = swarm[1].addrs[0]
            async with Client.connect(entry, identity=alice) as client:
                # digits-mlp runs on node 0: node 1 forwards it as a peer of the network
                forwarded = await client.submit("digits-mlp", {"input": x[:1]})
                assert await client.load() == (0, 0)
            with caplog.at_level(logging.WARNING, logger="p2p_node._admission"):
                async with Client.connect(entry) as stranger:
                    with pytest.raises(JobError) as caught:
                        await stranger.submit("digits-logreg", {"input": x[:1]})
                    with pytest.raises(JobError) as probe_refused:
                        await stranger.load()
    assert forwarded.executor == swarm[0].peer_id
    assert caught.value.code == ErrorCode.UNAUTHORIZED
    assert caught.value.peer == swarm[1].peer_id
    assert probe_refused.value.code == ErrorCode.UNAUTHORIZED
    assert swarm[1].admission.refused == {ErrorCode.UNAUTHORIZED: 2}
    assert "refused a request from" in caplog.text and "UNAUTHORIZED" in caplog.text


async def test_a_stranger_cannot_use_the_infer_protocol_to_get_around_the_allowlist(
    tmp_path: Path, digits
) -> None:
    x, _ = digits
    admission = AdmissionConfig(allowed_clients=frozenset({ALICE}))
    base = _swarm_config(tmp_path, admission)
    fast = GossipConfig(interval=0.2)  # an unknown sender waits 3 intervals for its record
    with trio.fail_after(30):
        async with open_swarm(1, base=base, gossip=fast) as swarm:
            node = swarm[0]
            host = new_libp2p_host(create_new_key_pair())
            limits = MessageLimits(max_request_bytes=1 << 20, max_reply_bytes=1 << 20)
            async with run_host(host, []), open_rpc(host, limits) as stranger:
                await stranger.connect(multiaddr.Multiaddr(node.addrs[0]), timeout=5)
                request = RunRequest("j", "digits-mlp", {"input": x[:1]}, timeout_ms=5000)
                reply = await stranger.call(node.peer_id, INFER_PROTOCOL, request, 10)
    assert isinstance(reply, ErrorReply)
    assert reply.code == ErrorCode.UNAUTHORIZED
    assert "may not send infer requests" in reply.message


async def test_a_client_over_its_rate_is_told_when_to_come_back(tmp_path: Path, digits) -> None:
    x, _ = digits
    admission = AdmissionConfig(job_rate=0.5, job_burst=2)  # a token every 2 s
    with trio.fail_after(30):
        async with open_swarm(1, base=_swarm_config(tmp_path, admission)) as swarm:
            async with Client.connect(swarm[0].addrs[0]) as client:
                for _ in range(2):
                    await client.submit("digits-mlp", {"input": x[:1]})
                with pytest.raises(JobError) as caught:
                    await client.submit("digits-mlp", {"input": x[:1]})
    assert caught.value.code == ErrorCode.OVERLOADED
    assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 2.0
    assert "retry after" in caught.value.message


async def test_a_batch_sent_straight_to_a_node_still_spends_the_clients_job_tokens(
    tmp_path: Path, digits
) -> None:
    x, _ = digits
    admission = AdmissionConfig(job_rate=1.0, job_burst=2)
    with trio.fail_after(30):
        async with open_swarm(1, base=_swarm_config(tmp_path, admission)) as swarm:
            async with Client.connect(swarm[0].addrs[0]) as client:
                batch = await client.submit_batch(
                    "digits-mlp", {"input": x[:4]}, batch_size=1, concurrency=1
                )
            refused = dict(swarm[0].admission.refused)
            ran = swarm[0].executor.counters.completed
    # Four chunks against a burst of two: the third and fourth each waited for a token.
    assert batch.chunks == 4 and batch.chunks_by_executor == {swarm[0].peer_id: 4}
    assert refused == {ErrorCode.OVERLOADED: 2} and ran == 4
