"""Integration: real libp2p hosts (TCP + Noise + Yamux) on loopback, real onnxruntime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.io.msgio import VarIntLengthMsgReadWriter
from libp2p.peer.id import ID

from p2p_node import Client, ErrorCode, JobError, Node, NodeConfig, bundled_models_dir, open_node
from p2p_node._codec import decode_reply
from p2p_node._host import new_libp2p_host, run_host
from p2p_node._messages import ErrorReply
from p2p_node._rpc import INFER_PROTOCOL, JOB_PROTOCOL
from p2p_node.testing import open_swarm


@asynccontextmanager
async def mesh(shares: list[list[str]]) -> AsyncIterator[list[Node]]:
    """Real nodes in a full mesh, node i serving shares[i], once every view is complete."""
    models = [frozenset(share) for share in shares]
    async with open_swarm(len(shares), topology="full", models=models) as swarm:
        await swarm.wait_converged()
        yield swarm.nodes


# Node 0 serves cancer-logreg, node 1 digits-logreg, node 2 (only) digits-mlp.
SHARES = [["cancer-logreg"], ["digits-logreg"], ["digits-mlp"]]


def direct_onnx(model_id: str, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(bundled_models_dir() / model_id / "model.onnx"))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": x}), strict=True))


async def test_job_is_forwarded_to_the_only_peer_serving_the_model(digits) -> None:
    x, _ = digits
    with trio.fail_after(30):
        async with mesh(SHARES) as (a, _b, c):
            async with Client.connect(a.addrs[0]) as client:
                result = await client.submit("digits-mlp", {"input": x[:5]})
    assert result.executor == c.peer_id
    expected = direct_onnx("digits-mlp", x[:5])
    np.testing.assert_array_equal(result.outputs["label"], expected["label"])
    np.testing.assert_allclose(
        result.outputs["probabilities"], expected["probabilities"], rtol=1e-6
    )
    assert result.queue_ms >= 0 and result.compute_ms > 0


async def test_job_runs_on_the_entry_node_when_it_serves_the_model(digits) -> None:
    x, _ = digits
    with trio.fail_after(30):
        async with mesh(SHARES) as (_a, b, _c):
            async with Client.connect(b.addrs[0]) as client:
                result = await client.submit("digits-logreg", {"": x[:1]})
    assert result.executor == b.peer_id


@pytest.mark.parametrize(
    ("model_id", "inputs", "code", "in_message"),
    [
        (
            "no-such-model",
            {"input": np.zeros((1, 64), np.float32)},
            ErrorCode.NO_CAPABLE_PEER,
            "digits-mlp",
        ),
        (
            "digits-mlp",
            {"input": np.zeros((1, 63), np.float32)},
            ErrorCode.INVALID_INPUT,
            "input float32 [N, 64]",
        ),
        (
            "digits-mlp",
            {"pixels": np.zeros((1, 64), np.float32)},
            ErrorCode.INVALID_INPUT,
            "pixels",
        ),
        (
            "digits-mlp",
            {"input": np.zeros((1, 64), np.complex64)},
            ErrorCode.INVALID_INPUT,
            "complex64",
        ),
    ],
    ids=["unknown-model", "wrong-shape", "wrong-name", "unsupported-dtype"],
)
async def test_bad_jobs_get_one_typed_error_and_the_node_keeps_serving(
    digits, model_id: str, inputs, code: ErrorCode, in_message: str
) -> None:
    x, _ = digits
    with trio.fail_after(30):
        async with mesh(SHARES) as (a, _b, c):
            async with Client.connect(a.addrs[0]) as client:
                with pytest.raises(JobError) as caught:
                    await client.submit(model_id, inputs)
                good = await client.submit("digits-mlp", {"input": x[:1]})
    assert caught.value.code == code
    assert in_message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert good.executor == c.peer_id


@pytest.mark.parametrize("protocol", [JOB_PROTOCOL, INFER_PROTOCOL])
@pytest.mark.parametrize(
    "payload", [b"\xff\x00garbage", b"\x81\xa1v\x01", b"\x93\x01\x02"], ids=["bytes", "map", "list"]
)
async def test_garbage_bytes_get_a_typed_error(digits, protocol, payload: bytes) -> None:
    x, _ = digits
    with trio.fail_after(30):
        async with mesh(SHARES[:1] + SHARES[2:]) as (a, c):
            raw = new_libp2p_host(create_new_key_pair())
            async with run_host(raw, []):
                await raw.connect(_peer_info(a.addrs[0]))
                stream = await raw.new_stream(ID.from_base58(a.peer_id), [protocol])
                framed = VarIntLengthMsgReadWriter(stream, 1 << 20)
                await framed.write_msg(payload)
                reply = decode_reply(await framed.read_msg())
                await stream.close()
            async with Client.connect(a.addrs[0]) as client:
                good = await client.submit("digits-mlp", {"input": x[:1]})
    assert isinstance(reply, ErrorReply)
    assert reply.code in (ErrorCode.MALFORMED_MESSAGE, ErrorCode.UNSUPPORTED_VERSION)
    assert reply.peer == a.peer_id
    assert good.executor == c.peer_id


async def test_a_departed_peer_leaves_the_view_and_its_models_become_unavailable() -> None:
    with trio.fail_after(30):
        async with mesh(SHARES[:2]) as (a, b):
            async with Client.connect(b.addrs[0]) as client:
                assert (await client.submit("cancer-logreg", _cancer_row())).executor == a.peer_id
                await a_closes(a, b)
                with pytest.raises(JobError) as caught:
                    await client.submit("cancer-logreg", _cancer_row())
    assert caught.value.code == ErrorCode.NO_CAPABLE_PEER


async def a_closes(a, b) -> None:
    """Close `a`'s host abruptly and wait until `b` notices."""
    await a._rpc.host.close()
    await b.view.wait_until(lambda view: a.peer_id not in view.peers)


def _cancer_row() -> dict[str, np.ndarray]:
    data = np.load(bundled_models_dir() / "heldout" / "cancer.npz")
    return {"input": data["x"][:1]}


def _peer_info(addr: str):
    import multiaddr
    from libp2p.peer.peerinfo import info_from_p2p_addr

    return info_from_p2p_addr(multiaddr.Multiaddr(addr))


async def test_a_node_shutting_down_answers_the_requests_it_admitted(
    tmp_path: Path, digits
) -> None:
    x, _ = digits
    rows = np.repeat(x, 4, axis=0)  # a few hundred ms of SVM work
    results = []

    async def submit(addr: str) -> None:
        async with Client.connect(addr) as client:
            results.append(await client.submit("digits-svm", {"input": rows}))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            config = NodeConfig(data_dir=tmp_path / "a", serve_models=frozenset({"digits-svm"}))
            async with open_node(config) as a:
                nursery.start_soon(submit, a.addrs[0])
                # Wait for the request to reach the node: a network event, no hook to await.
                while a.in_flight == 0:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            # open_node has returned: the admitted request was answered before the host closed
    (result,) = results
    assert result.outputs["label"].shape == (len(rows),)
    assert result.executor == a.peer_id


async def test_an_error_inside_a_running_node_comes_out(tmp_path) -> None:
    config = NodeConfig(data_dir=tmp_path, serve_models=frozenset({"digits-logreg"}))
    with trio.fail_after(30), pytest.raises(LookupError, match="raised inside the node"):
        async with open_node(config):
            raise LookupError("raised inside the node")
