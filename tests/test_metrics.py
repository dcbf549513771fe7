"""The metrics registry and its HTTP endpoint, over real loopback TCP; the orchestrator's
counts in virtual time; and a real node scraped while it answers jobs."""

from __future__ import annotations

import math
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from test_cli import p2p_node, running_node
from test_orchestrator import Fail, Ok, node, request, setup
from tiny_decoder import MODEL_ID as TINY
from tiny_decoder import write_tiny_decoder

from p2p_node import Client, ErrorCode, JobError, NodeConfig, open_node
from p2p_node._cli import parse_args
from p2p_node._config import ConfigError, parse_host_port
from p2p_node._metrics import MAX_LABEL_VALUES, OTHER, NodeMetrics, serve_metrics
from p2p_node._pipeline import PIPELINED
from p2p_node._rpc import JOB_PROTOCOL
from p2p_node.testing import open_swarm
from scheduler import InferenceResult

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
MLP = "digits-mlp"


def samples(exposition: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def value(got: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a labelled sample not (yet) exported."""
    return got.get((name, tuple(sorted(labels.items()))), 0.0)


async def http_get(port: int, request: bytes, host: str = "127.0.0.1") -> bytes:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(request)
        reply = bytearray()
        while chunk := await stream.receive_some(65536):
            reply += chunk
    return bytes(reply)


async def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    reply = await http_get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", host)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    return samples(body.decode())


def result(model: str, executor: str, queue_ms: float, compute_ms: float) -> InferenceResult:
    return InferenceResult("job", model, {}, executor, queue_ms, compute_ms)


# --- the registry ---------------------------------------------------------------------


def test_jobs_count_by_outcome_and_latency_only_for_answers() -> None:
    metrics = NodeMetrics()
    metrics.job_answered("least_loaded", 0.002, result(MLP, "b", 0.5, 1.0), local=False)
    metrics.job_answered("least_loaded", 0.004, result(MLP, "a", 0.25, 2.0), local=True)
    metrics.job_failed(MLP, "least_loaded", "deadline_exceeded")
    got = samples(metrics.exposition().decode())
    jobs = "p2p_node_jobs_total"
    assert value(got, jobs, model=MLP, outcome="ok", strategy="least_loaded") == 2
    assert value(got, jobs, model=MLP, outcome="deadline_exceeded", strategy="least_loaded") == 1
    remote = {"model": MLP, "where": "remote"}
    local = {"model": MLP, "where": "local"}
    assert value(got, "p2p_node_job_duration_seconds_count", **remote) == 1
    assert value(got, "p2p_node_job_duration_seconds_sum", **remote) == 0.002
    assert value(got, "p2p_node_job_queue_seconds_sum", **remote) == 0.0005
    assert value(got, "p2p_node_job_compute_seconds_sum", **local) == 0.002
    # A failed job has no latency, and no bucket counts it.
    assert value(got, "p2p_node_job_duration_seconds_bucket", **local, le="+Inf") == 1
    [stats] = metrics.model_stats()
    assert (stats.model_id, stats.jobs, stats.errors) == (MLP, 3, 1)
    assert stats.p50_ms == pytest.approx(3.0) and stats.p99_ms == pytest.approx(3.98)


def test_a_failed_task_job_counts_under_the_task_label() -> None:
    metrics = NodeMetrics()
    metrics.job_failed("", "round_robin", "unknown_task")
    [stats] = metrics.model_stats()
    assert (stats.model_id, stats.jobs, stats.errors, stats.p50_ms) == ("(task)", 1, 1, None)


def test_model_labels_are_bounded() -> None:
    metrics = NodeMetrics()
    for i in range(MAX_LABEL_VALUES + 10):
        metrics.job_failed(f"m{i}", "round_robin", "unknown_model")
    got = samples(metrics.exposition().decode())
    models = {dict(labels)["model"] for (name, labels) in got if name == "p2p_node_jobs_total"}
    assert len(models) == MAX_LABEL_VALUES + 1
    assert OTHER in models
    assert (
        value(
            got, "p2p_node_jobs_total", model=OTHER, outcome="unknown_model", strategy="round_robin"
        )
        == 10
    )
    # Counts kept elsewhere fold the same way, summed.
    folded = metrics.by_model({"m0": 1, "m200": 2, "m201": 3})
    assert folded == {"m0": 1, OTHER: 5}


def test_sources_are_read_at_each_scrape() -> None:
    from prometheus_client.core import GaugeMetricFamily

    metrics = NodeMetrics()
    queue = [3]

    def source() -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("p2p_node_queue_length", "queued", value=queue[0])]

    metrics.add_source(source)
    assert samples(metrics.exposition().decode())[("p2p_node_queue_length", ())] == 3
    queue[0] = 7
    assert samples(metrics.exposition().decode())[("p2p_node_queue_length", ())] == 7


async def test_endpoint_serves_metrics_and_refuses_the_rest() -> None:
    metrics = NodeMetrics()
    metrics.job_answered("round_robin", 0.001, result(MLP, "a", 0, 1), local=True)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
            ok = await http_get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            head, _, body = ok.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert b"text/plain; version=" in head
            assert b'p2p_node_jobs_total{model="digits-mlp"' in body
            only_head = await http_get(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert only_head.startswith(b"HTTP/1.1 200 OK") and only_head.endswith(b"\r\n\r\n")
            missing = await http_get(port, b"GET / HTTP/1.1\r\n\r\n")
            assert missing.startswith(b"HTTP/1.1 404")
            post = await http_get(port, b"POST /metrics HTTP/1.1\r\n\r\n")
            assert post.startswith(b"HTTP/1.1 405")
            # An oversize head is refused (the reset may beat the 431 to the client).
            try:
                huge = await http_get(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000)
                assert huge.startswith(b"HTTP/1.1 431")
            except trio.BrokenResourceError:
                pass
            # A client that hangs up at once leaves the server serving.
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()
            again = await http_get(port, b"GET /metrics HTTP/1.0\r\n\r\n")
            assert again.startswith(b"HTTP/1.1 200 OK")
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("[::1]:0", ("::1", 0)),
        (":9100", ("", 9100)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_host_port_parses(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["9100", "host:", "host:65536", "::1:9100", "a b:1", "h:-1"])
def test_host_port_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        parse_host_port(text)
    with pytest.raises(SystemExit):
        parse_args(["start", "--metrics-listen", text])


# --- what the orchestrator counts -------------------------------------------------------


async def test_the_orchestrator_counts_failovers_and_hedges(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = [node("a"), node("b", in_flight=1)]
    with trio.fail_after(30):
        # a fails: the request moves to b, once.
        orchestrator, _ = setup(nodes, {"a": [Fail(ErrorCode.PEER_UNREACHABLE)], "b": [Ok()]})
        await orchestrator.run_distributed_inference(request())
        assert (orchestrator.counts.failovers[MLP], orchestrator.counts.hedges[MLP]) == (1, 0)
        # a is slow: b is asked too, after the hedge delay; a hedge, no failover.
        orchestrator, _ = setup(nodes, {"a": [Ok(delay=1.0)], "b": [Ok()]})
        await orchestrator.run_distributed_inference(request(), hedge=True)
        assert (orchestrator.counts.failovers[MLP], orchestrator.counts.hedges[MLP]) == (0, 1)
        # a fails while hedging: b is asked at once, which is a failover, not a hedge.
        orchestrator, _ = setup(nodes, {"a": [Fail(ErrorCode.PEER_UNREACHABLE)], "b": [Ok()]})
        await orchestrator.run_distributed_inference(request(), hedge=True)
        assert (orchestrator.counts.failovers[MLP], orchestrator.counts.hedges[MLP]) == (1, 0)
        # a answers in time: nothing to count.
        orchestrator, _ = setup(nodes, {"a": [Ok()], "b": [Ok()]})
        await orchestrator.run_distributed_inference(request(), hedge=True)
        assert (orchestrator.counts.failovers[MLP], orchestrator.counts.hedges[MLP]) == (0, 0)


# --- a real node, scraped ---------------------------------------------------------------


async def test_a_node_scraped_over_http_counts_the_jobs_it_answered(
    tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = digits
    config = NodeConfig(
        data_dir=tmp_path / "node",
        serve_models=frozenset({MLP}),
        metrics_listen=("127.0.0.1", 0),
        shutdown_grace=1.0,
    )
    jobs = 5
    with trio.fail_after(60):
        async with open_node(config) as node, Client.connect(node.addrs[0]) as client:
            assert node.metrics_addr is not None
            host, port = node.metrics_addr
            before = await scrape(port, host)
            results = [await client.submit(MLP, {"input": x[i : i + 2]}) for i in range(jobs)]
            with pytest.raises(JobError) as refused:
                await client.submit("no-such-model", {"input": x[:1]})
            after = await scrape(port, host)
            caller = client._rpc.traffic.of(PIPELINED[JOB_PROTOCOL])
            sent, received = caller.sent, caller.received

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    strategy = "least_loaded"
    assert moved("p2p_node_jobs_total", model=MLP, strategy=strategy, outcome="ok") == jobs
    failed = refused.value.code.name.lower()
    assert (
        moved("p2p_node_jobs_total", model="no-such-model", strategy=strategy, outcome=failed) == 1
    )
    local = {"model": MLP, "where": "local"}
    for histogram in ("job_duration", "job_queue", "job_compute"):
        assert moved(f"p2p_node_{histogram}_seconds_count", **local) == jobs
        assert moved(f"p2p_node_{histogram}_seconds_bucket", **local, le="+Inf") == jobs
        assert moved(f"p2p_node_{histogram}_seconds_count", model=MLP, where="remote") == 0
    # The histograms hold what the jobs' answers said, to the last bit.
    compute = moved("p2p_node_job_compute_seconds_sum", **local)
    queue = moved("p2p_node_job_queue_seconds_sum", **local)
    assert math.isclose(compute, sum(r.compute_ms / 1000 for r in results), rel_tol=1e-9)
    assert math.isclose(queue, sum(r.queue_ms / 1000 for r in results), rel_tol=1e-9)
    total = moved("p2p_node_job_duration_seconds_sum", **local)
    assert total >= compute + queue
    assert moved("p2p_node_executor_requests_total", outcome="completed") == jobs
    assert moved("p2p_node_executor_requests_total", outcome="admitted") == jobs
    # One after another, each ran alone: a run each, none shared, none in parts.
    assert moved("p2p_node_executor_runs_total") == jobs
    assert moved("p2p_node_executor_merged_total") == 0
    assert moved("p2p_node_executor_split_total") == 0
    assert value(after, "p2p_node_requests_running") == 0
    assert value(after, "p2p_node_requests_queued") == 0
    # The node, as server of the job protocol, took what the client sent and sent what
    # it took: the same frames, counted at both ends.
    job = {"protocol": str(PIPELINED[JOB_PROTOCOL]), "side": "server"}
    assert value(after, "p2p_node_received_bytes_total", **job) == sent
    assert value(after, "p2p_node_sent_bytes_total", **job) == received
    assert sent > jobs * x[:2].nbytes  # the tensors, at least
    # Alone: no peers, no records received, none rejected; it published its own.
    assert value(after, "p2p_node_peers", state="alive") == 0
    assert value(after, "p2p_node_records_published_total") >= 1
    assert value(after, "p2p_node_records_rejected_total", reason="forged") == 0
    assert value(after, "p2p_node_model_loaded", model=MLP) == 1
    assert value(after, "p2p_node_model_loads_total", model=MLP) == 0  # loaded at start


async def test_a_forwarded_job_is_remote_and_the_view_and_records_are_counted(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, _ = digits
    base = NodeConfig(
        data_dir=Path(), shutdown_grace=1.0, target_degree=0, metrics_listen=("127.0.0.1", 0)
    )
    with trio.fail_after(60):
        # Node 0 serves another model: digits-mlp runs on node 1.
        models = [frozenset({"digits-logreg"}), frozenset({MLP})]
        async with open_swarm(2, models=models, base=base) as swarm:
            await swarm.wait_converged()
            async with Client.connect(swarm[0].addrs[0]) as client:
                answers = [await client.submit(MLP, {"input": x[:1]}) for _ in range(3)]
            assert swarm[0].metrics_addr is not None
            got = await scrape(swarm[0].metrics_addr[1])
    assert {a.executor for a in answers} == {swarm[1].peer_id}
    remote = {"model": MLP, "where": "remote"}
    assert value(got, "p2p_node_job_duration_seconds_count", **remote) == 3
    assert value(got, "p2p_node_job_compute_seconds_sum", **remote) == pytest.approx(
        sum(a.compute_ms for a in answers) / 1000, rel=1e-9
    )
    assert value(got, "p2p_node_peers", state="alive") == 1
    assert value(got, "p2p_node_records_received_total") >= 1
    infer = {"protocol": "/p2p-node/infer/2.0.0", "side": "caller"}  # pipelined
    assert value(got, "p2p_node_sent_bytes_total", **infer) > 3 * x[:1].nbytes
    assert value(got, "p2p_node_executor_requests_total", outcome="admitted") == 0


async def test_generations_are_counted_by_outcome_with_their_cache_and_decode_steps(
    tmp_path: Path,
) -> None:
    models_dir = tmp_path / "models"
    write_tiny_decoder(models_dir, context=4096)  # long enough not to end by itself
    config = NodeConfig(
        data_dir=tmp_path / "node",
        models_dir=models_dir,
        metrics_listen=("127.0.0.1", 0),
        shutdown_grace=1.0,
    )
    executor = replace(config.executor, max_sessions=1, max_new_tokens=4000)
    config = replace(config, executor=executor)
    with trio.fail_after(60):
        async with open_node(config) as node, Client.connect(node.addrs[0]) as client:
            assert node.metrics_addr is not None
            port = node.metrics_addr[1]
            async with client.generate("Hello world", TINY, max_tokens=20) as done:
                await done.text()
            ended = await scrape(port)
            async with client.generate("Hello", TINY, max_tokens=4000) as running:
                await running.next_piece()
                with pytest.raises(JobError):  # max_sessions: OVERLOADED
                    await client.generate_text("Hi", TINY, max_tokens=5)
                held = node.generations.cache_bytes
                during = await scrape(port)
            await node.generations.wait_until(lambda g: g.sessions == 0)
            after = await scrape(port)
    summary = done.summary
    assert summary is not None
    # A lone generation: its first token from the prefill, each next one from a step
    # of one row (and the end of text, if it came, from one more).
    steps = summary.tokens - 1 + (summary.finish == "eos")
    assert value(ended, "p2p_node_decode_steps_total", model=TINY) == steps
    assert value(ended, "p2p_node_decode_rows_total", model=TINY) == steps
    assert value(ended, "p2p_node_decode_wide_steps_total", model=TINY) == 0  # of one row
    generations = "p2p_node_generations_total"
    assert value(ended, generations, outcome="started") == 1
    assert value(ended, generations, outcome="finished") == 1
    assert value(ended, "p2p_node_generations_running") == 0
    assert value(ended, "p2p_node_generation_cache_bytes") == 0
    assert held > 0
    assert value(during, "p2p_node_generations_running") == 1
    assert value(during, "p2p_node_generation_cache_bytes") == held
    assert value(during, generations, outcome="refused") == 1
    assert value(after, generations, outcome="started") == 2  # the refused never started
    assert value(after, generations, outcome="cancelled") == 1  # left before its end
    assert value(after, generations, outcome="failed") == 0
    assert value(after, "p2p_node_generations_running") == 0
    assert value(after, "p2p_node_generation_cache_bytes") == 0


@pytest.mark.system
def test_p2p_node_start_serves_metrics_only_when_asked(tmp_path: Path) -> None:
    import urllib.request

    with running_node(tmp_path / "a", "--metrics-listen", "127.0.0.1:0") as (proc, _):
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("metrics on http://127.0.0.1:"), line
        url = line.removeprefix("metrics on ").strip()
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = reply.read().decode()
        got = samples(body)
        assert value(got, "p2p_node_peers", state="alive") == 0
        assert ("p2p_node_requests_running", ()) in got
    with running_node(tmp_path / "b") as (proc, _):
        assert proc.stdout is not None
        proc.send_signal(signal.SIGINT)  # the node stops; it printed no metrics line
        rest, _ = proc.communicate(timeout=30)
        assert "metrics on" not in rest
    assert p2p_node("start", "--metrics-listen", "nope").returncode == 2
