"""System: `p2p-node start --fetch` in real processes, and `p2p-node peers` (text and
--json) and `top` showing it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_cli import DEADLINE_S, p2p_node, running_node

MINILM = "minilm-l6-v2"


@pytest.mark.system
def test_a_node_started_with_fetch_serves_the_model_and_peers_shows_it(tmp_path: Path) -> None:
    with running_node(tmp_path / "a", "--serve", MINILM) as (_, a_addr):
        with running_node(
            tmp_path / "b", "--serve", "digits-logreg", "--fetch", MINILM, "--bootstrap", a_addr
        ) as (b, b_addr):
            deadline = time.monotonic() + 3 * DEADLINE_S
            while True:
                table = p2p_node("peers", "--peer", b_addr).stdout
                if f"fetch {MINILM}: done" in table:
                    break
                assert "failed" not in table, table
                assert time.monotonic() < deadline, table
                time.sleep(0.2)
            listed = json.loads(p2p_node("models", "--peer", b_addr, "--json").stdout)
            shown = json.loads(p2p_node("peers", "--peer", b_addr, "--json").stdout)
            top = p2p_node("top", "--peer", b_addr, "--interval", "0.1").stdout
    assert sorted(m["id"] for m in listed) == ["digits-logreg", MINILM]
    (fetch,) = shown["fetches"]
    assert fetch["model_id"] == MINILM and fetch["state"] == "done"
    assert fetch["done_bytes"] == fetch["total_bytes"] > 20 * 1e6
    assert [p["peer_id"] for p in shown["peers"]] == [a_addr.rsplit("/", 1)[1]]
    assert "models this node fetches" in top and MINILM in top.split("fetches", 1)[1]
    assert (tmp_path / "b" / "models" / MINILM / "model.onnx").is_file()
    assert b.returncode == 0


def test_a_bad_fetch_target_is_refused_naming_the_flag(tmp_path: Path) -> None:
    done = p2p_node("start", "--data-dir", str(tmp_path), "--fetch", "gpt@0")
    assert done.returncode != 0 and "--fetch" in done.stderr
