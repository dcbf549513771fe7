"""The metrics registry and its HTTP endpoint, over real loopback TCP."""

from __future__ import annotations

import trio
from prometheus_client.parser import text_string_to_metric_families

from p2p_node._metrics import MAX_LABEL_VALUES, OTHER, NodeMetrics, serve_metrics


def samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


async def http_get(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        reply = bytearray()
        while chunk := await stream.receive_some(65536):
            reply += chunk
    return bytes(reply)


def test_jobs_count_by_outcome_and_latency_only_for_answers() -> None:
    metrics = NodeMetrics()
    metrics.job_done("digits-mlp", "least_loaded", "ok", 0.002, "remote")
    metrics.job_done("digits-mlp", "least_loaded", "ok", 0.004, "local")
    metrics.job_done("digits-mlp", "least_loaded", "deadline_exceeded", 5.0, None)
    got = samples(metrics.exposition().decode())
    ok = (("model", "digits-mlp"), ("outcome", "ok"), ("strategy", "least_loaded"))
    late = (("model", "digits-mlp"), ("outcome", "deadline_exceeded"), ("strategy", "least_loaded"))
    assert got[("p2p_node_jobs_total", ok)] == 2
    assert got[("p2p_node_jobs_total", late)] == 1
    remote = (("model", "digits-mlp"), ("where", "remote"))
    assert got[("p2p_node_job_duration_seconds_count", remote)] == 1
    assert got[("p2p_node_job_duration_seconds_sum", remote)] == 0.002
    [stats] = metrics.model_stats()
    assert (stats.jobs, stats.errors) == (3, 1)
    assert stats.p50_ms is not None and 2.0 <= stats.p50_ms <= 4.0


def test_model_labels_are_bounded() -> None:
    metrics = NodeMetrics()
    for i in range(MAX_LABEL_VALUES + 10):
        metrics.job_done(f"m{i}", "round_robin", "unknown_model", 0.0, None)
    models = {
        dict(labels)["model"]
        for (name, labels) in samples(metrics.exposition().decode())
        if name == "p2p_node_jobs_total"
    }
    assert len(models) == MAX_LABEL_VALUES + 1
    assert OTHER in models


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
    metrics.job_done("digits-mlp", "round_robin", "ok", 0.001, "local")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
            ok = await http_get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            head, _, body = ok.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert b"text/plain; version=" in head
            assert b'p2p_node_jobs_total{model="digits-mlp"' in body
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
