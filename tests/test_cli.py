"""System: real `p2p-node` processes, driven through the command line."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from p2p_node import bundled_models_dir

SCRIPT = Path(sys.executable).with_name("p2p-node")
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "p2p_node"]
DEADLINE_S = 30.0


def p2p_node(*args: str, timeout: float = DEADLINE_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@contextmanager
def running_node(data_dir: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A `p2p-node start` process and the first address it prints; SIGTERM on exit."""
    proc = subprocess.Popen(
        [*CLI, "start", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir", str(data_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, _first_address(proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=DEADLINE_S)


def _first_address(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=DEADLINE_S):
            raise AssertionError("node printed no address in time")
    line = proc.stdout.readline()
    assert line.startswith("listening on /ip4/127.0.0.1/tcp/"), line + _stderr(proc)
    return line.removeprefix("listening on ").strip()


def _stderr(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is not None and proc.stderr is not None:
        return proc.stderr.read()
    return ""


def submit_until_placed(peer: str, model: str, input_file: Path) -> dict:
    """Submit until the entry node has learned who serves `model` (it learns on connect)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        done = p2p_node(
            "submit", "--peer", peer, "--model", model, "--input", str(input_file), "--json"
        )
        if done.returncode == 0:
            return json.loads(done.stdout)
        assert "NO_CAPABLE_PEER" in done.stderr, done.stderr
        assert time.monotonic() < deadline, "the entry node never learned its peer's models"
        time.sleep(0.2)


@pytest.fixture
def digits_npy(tmp_path: Path) -> Path:
    path = tmp_path / "digits.npy"
    np.save(path, np.load(bundled_models_dir() / "heldout" / "digits.npz")["x"][:3])
    return path


@pytest.mark.system
def test_two_processes_run_each_others_models(tmp_path: Path, digits_npy: Path) -> None:
    with running_node(tmp_path / "a", "--serve", "digits-logreg") as (a, a_addr):
        with running_node(tmp_path / "b", "--serve", "digits-mlp", "--bootstrap", a_addr) as (
            b,
            b_addr,
        ):
            with ThreadPoolExecutor(4) as pool:  # at once: each mostly starts Python
                placed_b = pool.submit(submit_until_placed, a_addr, "digits-mlp", digits_npy)
                placed_a = pool.submit(submit_until_placed, b_addr, "digits-logreg", digits_npy)
                on_b, on_a = placed_b.result(), placed_a.result()
                submit = ("submit", "--peer", a_addr, "--model", "digits-mlp", "--input")
                asked = [
                    pool.submit(p2p_node, *args)
                    for args in (
                        (*submit, str(digits_npy)),
                        ("models", "--peer", b_addr, "--json"),
                        ("peers", "--peer", a_addr, "--json"),
                        ("peers", "--peer", a_addr),
                    )
                ]
                text, models, peers, shown = (future.result() for future in asked)
            listed = json.loads(models.stdout)
            view = json.loads(peers.stdout)
            table = shown.stdout
    assert on_b["executor"] == b_addr.rsplit("/", 1)[1]
    assert on_a["executor"] == a_addr.rsplit("/", 1)[1]
    assert on_b["outputs"]["label"]["shape"] == [3]
    assert f"executed by {on_b['executor']}" in text.stdout
    assert [m["id"] for m in listed] == ["digits-mlp"]
    (b_seen,) = view["peers"]
    assert view["fetches"] == []
    assert b_seen["peer_id"] == b_addr.rsplit("/", 1)[1]
    # A record is republished at least every refresh (120 s) with nothing changed.
    assert b_seen["state"] == "alive" and b_seen["record_age_s"] < 125
    assert [m["id"] for m in b_seen["models"]] == ["digits-mlp"]
    assert b_seen["gpus"] == [] and b_seen["load"]["in_flight"] >= 0
    assert b_seen["peer_id"] in table and "alive" in table
    assert a.returncode == 0 and b.returncode == 0  # SIGTERM is a clean shutdown


@pytest.mark.system
def test_a_restarted_node_keeps_its_peer_id(tmp_path: Path) -> None:
    with running_node(tmp_path / "a") as (_, first):
        pass
    with running_node(tmp_path / "a") as (_, second):
        pass
    assert first.rsplit("/", 1)[1] == second.rsplit("/", 1)[1]
    assert (tmp_path / "a" / "identity.ed25519").stat().st_mode & 0o777 == 0o600


@pytest.mark.system
def test_a_second_node_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    with running_node(tmp_path / "a"):
        second = p2p_node(
            "start", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir", str(tmp_path / "a")
        )
    assert second.returncode == 1
    assert "in use by another node" in second.stderr


def test_the_command_line_imports_neither_onnx_nor_pytest_until_it_needs_them() -> None:
    # onnx (with ml_dtypes) took a second to import and trio.testing brought pytest:
    # every command paid them, a client's `submit` as much as a node's start.
    probe = "import sys, p2p_node._cli; print(sorted({'onnx', 'pytest'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.system
def test_user_errors_are_one_line_without_traceback(tmp_path: Path, digits_npy: Path) -> None:
    bad_shape = tmp_path / "bad.json"
    bad_shape.write_text(json.dumps({"input": [[1.0, 2.0]]}))
    with running_node(tmp_path / "a", "--serve", "digits-mlp") as (_, addr):
        cases = {
            "unknown model": (
                "submit",
                "--peer",
                addr,
                "--model",
                "nope",
                "--input",
                str(digits_npy),
            ),
            "bad shape": (
                "submit",
                "--peer",
                addr,
                "--model",
                "digits-mlp",
                "--input",
                str(bad_shape),
            ),
            "unreadable input": (
                "submit",
                "--peer",
                addr,
                "--model",
                "digits-mlp",
                "--input",
                str(tmp_path / "missing.npy"),
            ),
            "not an address": ("models", "--peer", "not-a-multiaddr"),
            "unreachable peer": ("models", "--peer", _closed_port_address(addr)),
        }
        with ThreadPoolExecutor(len(cases)) as pool:  # at once: each mostly starts Python
            futures = {name: pool.submit(p2p_node, *args) for name, args in cases.items()}
            results = {name: future.result() for name, future in futures.items()}
    for name, done in results.items():
        assert done.returncode == 1, name
        assert done.stdout == "", name
        assert len(done.stderr.strip().splitlines()) == 1, (name, done.stderr)
        assert "Traceback" not in done.stderr, name
    assert "NO_CAPABLE_PEER" in results["unknown model"].stderr
    assert "INVALID_INPUT" in results["bad shape"].stderr
    assert "input float32 [N, 64]" in results["bad shape"].stderr
    assert "PEER_UNREACHABLE" in results["unreachable peer"].stderr


def _closed_port_address(live: str) -> str:
    """The live node's peer id at a port nobody listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{live.rsplit('/', 1)[1]}"


def test_demo_shows_a_table_with_several_executing_peers() -> None:
    done = p2p_node("demo", "--nodes", "3", timeout=120)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.strip().splitlines()
    assert header.split()[:3] == ["job", "entry", "peer"]
    executors = {row.split()[2] for row in rows}
    assert len(rows) == 11 and len(executors) >= 2
    assert os.linesep.join(rows[:9]).count("right") >= 8
    selected = [row.split()[3:6] for row in rows[7:9]]  # "<task> -> <model>"
    assert [s[0] for s in selected] == ["image-classification", "tabular-classification"]
    assert all(s[1] == "->" and s[2].split("-")[0] in ("digits", "cancer") for s in selected)
    embedded, generated = (row.split()[3:6] for row in rows[9:])
    assert embedded == ["sentence-embedding", "->", "minilm-l6-v2"]
    assert "(right)" in rows[9]  # the two alike sentences are the closer pair
    assert generated[:2] == ["text-generation", "->"] and generated[2].startswith("pydoc-gpt")


@pytest.mark.system
def test_place_and_a_batch_job_spread_over_two_nodes(tmp_path: Path) -> None:
    rows = np.load(bundled_models_dir() / "heldout" / "digits.npz")["x"][:300]
    big = tmp_path / "big.npy"
    np.save(big, rows)
    out = tmp_path / "out.npz"
    with running_node(tmp_path / "a", "--serve", "digits-mlp") as (_, a_addr):
        with running_node(tmp_path / "b", "--serve", "digits-mlp", "--bootstrap", a_addr) as (
            _,
            b_addr,
        ):
            submit_until_placed(a_addr, "digits-mlp", big)  # a knows b's record by now
            deadline = time.monotonic() + DEADLINE_S
            while True:  # wait until a's view holds b (records, not connections)
                ranked = json.loads(
                    p2p_node(
                        "place",
                        "--peer",
                        a_addr,
                        "--model",
                        "digits-mlp",
                        "--strategy",
                        "round_robin",
                        "--json",
                    ).stdout
                )
                if len(ranked["candidates"]) == 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            batch = p2p_node(
                "submit",
                "--peer",
                a_addr,
                "--model",
                "digits-mlp",
                "--input",
                str(big),
                "--batch-size",
                "25",
                "--output",
                str(out),
                "--outputs",
                "label",
                "--strategy",
                "round_robin",
                "--json",
            )
    assert {c["peer_id"] for c in ranked["candidates"]} == {
        a_addr.rsplit("/", 1)[1],
        b_addr.rsplit("/", 1)[1],
    }
    assert all(c["reason"] for c in ranked["candidates"])
    assert batch.returncode == 0, batch.stderr
    summary = json.loads(batch.stdout)
    assert summary["rows"] == 300 and summary["chunks"] == 12
    assert len(summary["chunks_by_executor"]) == 2  # round robin used both nodes
    saved = np.load(out)
    assert saved.files == ["label"]  # the probabilities were never sent
    expected = direct_labels(rows)
    np.testing.assert_array_equal(saved["label"], expected)  # in input order


def direct_labels(rows: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundled_models_dir() / "digits-mlp" / "model.onnx"))
    return session.run(["label"], {"input": rows})[0]


@pytest.mark.system
def test_submit_a_task_then_select_and_feedback_from_the_command_line(
    tmp_path: Path, digits_npy: Path
) -> None:
    with running_node(tmp_path / "a", "--serve", "digits-logreg", "--serve", "digits-svm") as (
        _,
        addr,
    ):
        done = p2p_node(
            "submit",
            "--peer",
            addr,
            "--task",
            "image-classification",
            "--selection",
            "hybrid",
            "--context",
            "confidence=0.95",
            "--input",
            str(digits_npy),
            "--json",
        )
        assert done.returncode == 0, done.stderr
        job = json.loads(done.stdout)
        routed = {step["model"]: step["rows"] for step in job["route"]}
        assert set(routed) <= {"digits-logreg", "digits-svm"}
        assert sum(routed.values()) == len(job["outputs"]["label"]["data"])

        scored = p2p_node("feedback", "--peer", addr, "--job", job["job_id"], "--score", "1")
        assert scored.returncode == 0, scored.stderr
        assert scored.stdout.startswith(f"job {job['job_id']}: score 1 credited to digits-logreg")

        shown = p2p_node(
            "select",
            "--peer",
            addr,
            "--task",
            "image-classification",
            "--strategy",
            "context_aware",
            "--context",
            "input_length=64",
            "--json",
        )
        assert shown.returncode == 0, shown.stderr
        ranking = json.loads(shown.stdout)
        assert ranking["bucket"] == "len<=64"
        assert {r["model"] for r in ranking["ranked"]} == {"digits-logreg", "digits-svm"}
        assert all(r["reasons"] for r in ranking["ranked"])
        assert any(x["runs"] and x["quality"] == 1.0 for x in ranking["learned"])

        table = p2p_node("select", "--peer", addr, "--task", "image-classification")
        assert table.returncode == 0 and "first stage: cheapest adequate model" in table.stdout

        unknown = p2p_node("select", "--peer", addr, "--task", "speech")
        assert unknown.returncode == 1
        assert unknown.stderr.count("\n") == 1 and "UNKNOWN_TASK" in unknown.stderr
        no_fit = p2p_node(
            "select",
            "--peer",
            addr,
            "--task",
            "image-classification",
            "--context",
            "input_length=900",
        )
        assert no_fit.returncode == 1 and "NO_FITTING_MODEL" in no_fit.stderr
        assert "input_length <= 64" in no_fit.stderr


@pytest.mark.system
def test_a_node_from_a_config_file_logs_json_and_a_gone_reader_is_quiet(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        'serve = ["digits-logreg"]\nnetwork = "lab"\nlog-level = "info"\nlog-format = "json"\n'
    )
    with running_node(tmp_path / "a", "--config", str(config)) as (node, addr):
        listed = json.loads(p2p_node("models", "--peer", addr, "--json").stdout)
        reading, writing = os.pipe()
        os.close(reading)  # `p2p-node peers --json | head -c 0`, with head already gone
        try:
            piped = subprocess.run(
                [*CLI, "peers", "--peer", addr, "--json"],
                stdout=writing,
                stderr=subprocess.PIPE,
                text=True,
                timeout=DEADLINE_S,
            )
        finally:
            os.close(writing)
    assert [m["id"] for m in listed] == ["digits-logreg"]  # the file's `serve`
    assert piped.returncode == 141 and piped.stderr == ""
    assert node.returncode == 0 and node.stderr is not None
    logged = [json.loads(line) for line in node.stderr.read().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(logged[-1])
    assert any(line["message"] == "SIGTERM: shutting down" for line in logged)
