"""Prometheus metrics of one node, and the `/metrics` endpoint that serves them.

Each node owns its registry (a test process holds many nodes). The hot path only
bumps counters and observes histograms; everything that is already a number
somewhere else (queue length, peers in the view, gossip's counts) is read when
Prometheus scrapes, by `NodeMetrics.add_source`.

Labels stay bounded: a model id comes from what a client sent, so each label
keeps at most `MAX_LABEL_VALUES` distinct values and folds the rest into
"other".
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

MAX_LABEL_VALUES = 128
OTHER = "other"
RECENT_JOBS = 1024  # per model, for `top`'s p50/p99
# 50 us to 60 s: a local digits job is ~0.1 ms, a forwarded generation can take seconds.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
MAX_REQUEST_HEAD = 8192
HTTP_TIMEOUT_S = 5.0


class _BoundedLabel:
    """Passes the first `limit` distinct values through; later ones become OTHER."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


@dataclass(frozen=True, slots=True)
class ModelJobStats:
    """What `top` shows per model: this node's coordinated jobs."""

    model_id: str
    jobs: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None


class _Sources(Collector):
    def __init__(self) -> None:
        self.sources: list[Callable[[], Iterable[Metric]]] = []

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source()


class NodeMetrics:
    """Everything one node counts, in its own Prometheus registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._model = _BoundedLabel()
        self._sources = _Sources()
        self.registry.register(self._sources)
        r = self.registry
        self.jobs = Counter(
            "p2p_node_jobs",
            "Jobs this node coordinated, by model, placement strategy and outcome",
            ["model", "strategy", "outcome"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "p2p_node_job_duration_seconds",
            "Time to answer a coordinated job, from its arrival to its reply",
            ["model", "where"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "p2p_node_queue_seconds",
            "Time a job's request waited in its executor's queue",
            ["model", "where"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "p2p_node_compute_seconds",
            "Time a job's request ran on onnxruntime",
            ["model", "where"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.failovers = Counter(
            "p2p_node_failovers",
            "Requests this node moved to another peer after a retryable failure",
            ["model"],
            registry=r,
        )
        self.hedges = Counter(
            "p2p_node_hedges",
            "Second requests this node sent because the first was slow",
            ["model"],
            registry=r,
        )
        self.model_loads = Counter(
            "p2p_node_model_loads", "Models loaded into memory", ["model"], registry=r
        )
        self.model_unloads = Counter(
            "p2p_node_model_unloads", "Models evicted from memory", ["model"], registry=r
        )
        self._recent: dict[str, deque[float]] = {}
        self._job_counts: dict[str, list[int]] = {}  # model -> [jobs, errors]

    def add_source(self, source: Callable[[], Iterable[Metric]]) -> None:
        """Read `source` at every scrape: for numbers another component already keeps."""
        self._sources.sources.append(source)

    def model(self, model_id: str) -> str:
        """`model_id` as a label value, bounded."""
        return self._model(model_id or "(task)")

    def job_done(
        self, model_id: str, strategy: str, outcome: str, seconds: float, where: str | None
    ) -> None:
        """One coordinated job answered (`outcome` "ok") or failed (an error code's name).
        `where`: "local" or "remote" for an answered job, None for a failed one."""
        model = self.model(model_id)
        self.jobs.labels(model, strategy, outcome).inc()
        counts = self._job_counts.setdefault(model, [0, 0])
        counts[0] += 1
        if where is None:
            counts[1] += 1
            return
        self.job_seconds.labels(model, where).observe(seconds)
        self._recent.setdefault(model, deque(maxlen=RECENT_JOBS)).append(seconds)

    def executed(self, model_id: str, where: str, queue_ms: float, compute_ms: float) -> None:
        model = self.model(model_id)
        self.queue_seconds.labels(model, where).observe(queue_ms / 1000)
        self.compute_seconds.labels(model, where).observe(compute_ms / 1000)

    def model_stats(self) -> tuple[ModelJobStats, ...]:
        """Per model: jobs and errors so far, and p50/p99 over the latest answered jobs."""
        stats = []
        for model, (jobs, errors) in sorted(self._job_counts.items()):
            recent = self._recent.get(model)
            p50 = p99 = None
            if recent:
                p50, p99 = (float(q) * 1000 for q in np.quantile(np.asarray(recent), [0.5, 0.99]))
            stats.append(ModelJobStats(model, jobs, errors, p50, p99))
        return tuple(stats)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


# --- the HTTP endpoint -------------------------------------------------------------


async def serve_metrics(
    metrics: NodeMetrics,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `GET /metrics` on host:port until cancelled; reports the bound address
    (port 0 picks a free one). Plain HTTP/1.1, one request per connection."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    logger.info("metrics on http://%s:%d/metrics", bound[0], bound[1])
    task_status.started((bound[0], bound[1]))
    await trio.serve_listeners(partial(_answer, metrics), listeners)


async def _answer(metrics: NodeMetrics, stream: trio.SocketStream) -> None:
    try:
        async with stream:
            with trio.move_on_after(HTTP_TIMEOUT_S):
                head = await _read_head(stream)
                await stream.send_all(_response(metrics, head))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
        logger.debug("metrics connection dropped: %s", error)


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request line and headers, or None if they do not fit MAX_REQUEST_HEAD."""
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer and b"\n\n" not in buffer:
        chunk = await stream.receive_some(MAX_REQUEST_HEAD)
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > MAX_REQUEST_HEAD:
            return None
    return bytes(buffer)


def _response(metrics: NodeMetrics, head: bytes | None) -> bytes:
    if head is None:
        return _http(431, "Request Header Fields Too Large", b"request head too large\n")
    method, _, rest = head.partition(b" ")
    path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _http(405, "Method Not Allowed", b"only GET /metrics\n")
    if path != b"/metrics":
        return _http(404, "Not Found", b"try /metrics\n")
    body = metrics.exposition()
    return _http(200, "OK", body, CONTENT_TYPE_LATEST, head_only=method == b"HEAD")


def _http(
    status: int,
    reason: str,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
) -> bytes:
    header = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return header if head_only else header + body
