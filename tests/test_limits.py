"""A real node's message limits per protocol: small for requests without tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.io.msgio import VarIntLengthMsgReadWriter
from libp2p.peer.id import ID

from p2p_node import Client, ErrorCode, NodeConfig, open_node
from p2p_node._codec import decode_reply, encode
from p2p_node._host import new_libp2p_host, run_host
from p2p_node._messages import ErrorReply, SelectRequest
from p2p_node._rpc import MODELS_PROTOCOL
from selection import CONTEXT_KEYS, MAX_CONTEXT_KEYS
from selection._context import MAX_CONTEXT_TEXT


def test_the_largest_valid_select_request_fits_the_default_control_limit(
    tmp_path: Path,
) -> None:
    widest = "\U0001f600" * MAX_CONTEXT_TEXT  # 4 bytes a character in UTF-8
    keys = [*CONTEXT_KEYS, *(f"k{i}" for i in range(MAX_CONTEXT_KEYS))][:MAX_CONTEXT_KEYS]
    request = SelectRequest(widest, widest, dict.fromkeys(keys, widest), k=64)
    limit = NodeConfig(data_dir=tmp_path).max_control_request_bytes
    assert len(encode(request)) < limit / 2


async def test_a_control_request_over_its_limit_is_refused_and_a_job_that_size_runs(
    tmp_path: Path, digits
) -> None:
    x, _ = digits
    rows = np.repeat(x, 2, axis=0)[:300]  # 300 x 64 float32: 75 KiB, over the 64 KiB limit
    with trio.fail_after(30):
        async with open_node(NodeConfig(data_dir=tmp_path / "a")) as node:
            raw = new_libp2p_host(create_new_key_pair())
            async with run_host(raw, []):
                await raw.connect(_peer_info(node.addrs[0]))
                stream = await raw.new_stream(ID.from_base58(node.peer_id), [MODELS_PROTOCOL])
                framed = VarIntLengthMsgReadWriter(stream, 1 << 20)
                await framed.write_msg(b"\x00" * (100 * 1024))
                reply = decode_reply(await framed.read_msg())
                await stream.close()
            async with Client.connect(node.addrs[0]) as client:
                result = await client.submit("digits-mlp", {"input": rows})
    assert isinstance(reply, ErrorReply)
    assert reply.code == ErrorCode.MESSAGE_TOO_LARGE
    assert f"{MODELS_PROTOCOL} request of {100 * 1024} bytes" in reply.message
    assert "limit of 65536 bytes" in reply.message
    assert result.outputs["label"].shape == (300,)


def _peer_info(addr: str):
    import multiaddr
    from libp2p.peer.peerinfo import info_from_p2p_addr

    return info_from_p2p_addr(multiaddr.Multiaddr(addr))


def test_start_flags_set_every_limit(tmp_path: Path) -> None:
    from p2p_node._cli import _node_config, _parser

    args = _parser().parse_args(
        [
            "start",
            "--data-dir",
            str(tmp_path),
            "--bootstrap-file",
            str(_empty_bootstrap(tmp_path)),
            "--model-memory-mb",
            "0.5",
            "--max-batch-rows",
            "1000",
            "--max-request-bytes",
            str(32 << 20),
            "--max-inbound-streams",
            "64",
        ]
    )
    config = _node_config(args)
    assert config.executor.model_memory_mb == 0.5
    assert config.executor.max_batch_rows == 1000
    assert (config.max_request_bytes, config.max_reply_bytes) == (32 << 20, 32 << 20)
    assert config.max_concurrent_inbound == 64


def test_start_refuses_a_model_bigger_than_the_budget_in_one_line(tmp_path: Path, capsys) -> None:
    from p2p_node._cli import main

    code = main(
        [
            "start",
            "--data-dir",
            str(tmp_path / "a"),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--bootstrap-file",
            str(_empty_bootstrap(tmp_path)),
            "--serve",
            "digits-svm",
            "--model-memory-mb",
            "0.1",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert "\n" not in err
    assert "digits-svm" in err and "0.1 MB" in err and "--model-memory-mb" in err


def _empty_bootstrap(tmp_path: Path) -> Path:
    path = tmp_path / "bootstrap.toml"
    path.write_text("peers = []\n")
    return path
