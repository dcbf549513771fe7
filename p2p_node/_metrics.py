"""Prometheus metrics of one node, and the `/metrics` endpoint that serves them.

Each node owns its registry (a test process holds many nodes). The hot path, a
job answered, only bumps a counter and observes three histograms, through label
children it looked up once. Everything that is already a number somewhere else
(queue length, peers in the view, gossip's counts, bytes per protocol,
failovers and hedges, model loads) is read when Prometheus scrapes, by
`NodeMetrics.add_source`; `node_families` is that source for a running node.

Labels stay bounded: a model id comes from what a client sent, so the model
label keeps at most `MAX_LABEL_VALUES` distinct values and folds the rest into
"other". Every other label takes values from a fixed set (strategies, error
codes, peer states, rejection reasons, protocols).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gossip import PeerState, Rejection
from scheduler import InferenceResult

from ._channel import Traffic
from ._messages import ModelStats

if TYPE_CHECKING:
    # libp2p pulls in trio-typing, whose trio stubs shadow trio's own annotations.
    from trio_typing import TaskStatus

    from ._node import Node

logger = logging.getLogger(__name__)

MAX_LABEL_VALUES = 128
OTHER = "other"
TASK_LABEL = "(task)"  # a job that named a task and failed before a model answered it
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
    """Passes the first `limit` distinct values through; later ones become OTHER.
    Sticky: a value that passed once always passes, so counters stay monotonic."""

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


class _Sources(Collector):
    def __init__(self) -> None:
        self.sources: list[Callable[[], Iterable[Metric]]] = []

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source()


class _RecentJobs:
    """One model's coordinated jobs: counts, and the latest answers' latencies."""

    __slots__ = ("errors", "jobs", "seconds")

    def __init__(self) -> None:
        self.jobs = 0
        self.errors = 0
        self.seconds: deque[float] = deque(maxlen=RECENT_JOBS)


@dataclasses.dataclass(frozen=True, slots=True)
class _Answered:
    """What one answered job moves, for one set of label values."""

    jobs: Counter
    total: Histogram
    queue: Histogram
    compute: Histogram
    recent: _RecentJobs


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
            "Jobs this node coordinated, by model, placement strategy and outcome "
            "(ok, an error code, or cancelled)",
            ["model", "strategy", "outcome"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "p2p_node_job_duration_seconds",
            "Time to answer a coordinated job, from its arrival to its answer, by where "
            "it ran (local: this node's executor, remote: a peer's)",
            ["model", "where"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "p2p_node_job_queue_seconds",
            "Time a coordinated job waited for a worker in the executor that ran it",
            ["model", "where"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "p2p_node_job_compute_seconds",
            "Time a coordinated job ran on onnxruntime in the executor that ran it",
            ["model", "where"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Label children by label values: a lookup through `labels()` costs more
        # than the observation itself.
        self._answered: dict[tuple[str, str, str], _Answered] = {}
        self._recent: dict[str, _RecentJobs] = {}

    def add_source(self, source: Callable[[], Iterable[Metric]]) -> None:
        """Read `source` at every scrape: for numbers another component already keeps."""
        self._sources.sources.append(source)

    def model(self, model_id: str) -> str:
        """`model_id` as a label value, bounded."""
        return self._model(model_id or TASK_LABEL)

    def job_answered(
        self, strategy: str, seconds: float, result: InferenceResult, *, local: bool
    ) -> None:
        """One coordinated job answered by `result` after `seconds`; `local`: it ran
        on this node's executor."""
        model = self.model(result.model_id)
        key = (model, strategy, "local" if local else "remote")
        answered = self._answered.get(key)
        if answered is None:
            where = key[2]
            answered = self._answered[key] = _Answered(
                self.jobs.labels(model, strategy, "ok"),
                self.job_seconds.labels(model, where),
                self.queue_seconds.labels(model, where),
                self.compute_seconds.labels(model, where),
                self._recent_jobs(model),
            )
        answered.jobs.inc()
        answered.total.observe(seconds)
        answered.queue.observe(result.queue_ms / 1000)
        answered.compute.observe(result.compute_ms / 1000)
        answered.recent.jobs += 1
        answered.recent.seconds.append(seconds)

    def job_failed(self, model_id: str, strategy: str, outcome: str) -> None:
        """One coordinated job failed: `outcome` is its error code's name, lowercase,
        or "cancelled" (its client hung up, or the node stopped)."""
        model = self.model(model_id)
        self.jobs.labels(model, strategy, outcome).inc()
        recent = self._recent_jobs(model)
        recent.jobs += 1
        recent.errors += 1

    def _recent_jobs(self, model: str) -> _RecentJobs:
        recent = self._recent.get(model)
        if recent is None:
            recent = self._recent[model] = _RecentJobs()
        return recent

    def model_stats(self) -> tuple[ModelStats, ...]:
        """Per model: jobs and errors so far, and p50/p99 over the latest answered jobs."""
        stats = []
        for model, recent in sorted(self._recent.items()):
            p50 = p99 = None
            if recent.seconds:
                quantiles = np.quantile(np.asarray(recent.seconds), [0.5, 0.99]) * 1000
                p50, p99 = float(quantiles[0]), float(quantiles[1])
            stats.append(ModelStats(model, recent.jobs, recent.errors, p50, p99))
        return tuple(stats)

    def by_model(self, counts: Mapping[str, int]) -> dict[str, int]:
        """`counts` keyed by model label: models past the bound summed under OTHER."""
        labelled: dict[str, int] = {}
        for model_id, n in counts.items():
            label = self.model(model_id)
            labelled[label] = labelled.get(label, 0) + n
        return labelled

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


# --- what a running node already counts, read at each scrape -----------------------


def node_families(node: Node, rpc_traffic: Traffic, server_traffic: Traffic) -> Iterator[Metric]:
    """The metrics of `node` that other components keep as plain numbers; the bytes
    it moved as a caller and as a server."""
    metrics = node.metrics
    executor = node.executor
    yield _gauge("p2p_node_requests_running", "Requests holding a worker now", executor.running)
    yield _gauge(
        "p2p_node_requests_queued",
        "Requests admitted and waiting for a worker now",
        executor.queue_length,
    )
    yield _gauge(
        "p2p_node_requests_answering",
        "Requests from peers and clients being answered now, on every protocol",
        node.in_flight,
    )
    yield _counters(
        "p2p_node_executor_requests",
        "Requests this node's executor admitted, and how those it finished ended "
        "(completed, failed, cancelled_waiting, cancelled_running)",
        "outcome",
        dataclasses.asdict(executor.counters),
    )
    yield _counter(
        "p2p_node_executor_runs",
        "onnxruntime runs of the executor's requests (one in parts counts once): fewer "
        "than the requests completed where requests merged",
        executor.runs,
    )
    yield _counter(
        "p2p_node_executor_merged",
        "Requests answered from a run shared with other requests (dynamic batching)",
        executor.merged,
    )
    yield _counter(
        "p2p_node_executor_split",
        "Large requests run in parts at once, on worker slots that were free",
        executor.split,
    )
    yield from _generation_families(node)
    yield _counter(
        "p2p_node_job_duplicates",
        "Jobs sent again (a client failing over) and answered without running again",
        node.jobs.duplicates,
    )

    states = dict.fromkeys((str(s) for s in PeerState), 0)
    for known in node.view.snapshot().peers.values():
        states[str(known.state)] = states.get(str(known.state), 0) + 1
    peers = GaugeMetricFamily(
        "p2p_node_peers", "Peers in this node's view, by state", labels=["state"]
    )
    for state, n in states.items():
        peers.add_metric([state], n)
    yield peers
    yield _gauge(
        "p2p_node_connections",
        "Peers and clients this node holds a connection to",
        len(node.connected_peers()),
    )

    gossip = node.gossip
    yield _counter("p2p_node_records_published", "Records this node published", gossip.published)
    yield _counter(
        "p2p_node_records_received",
        "Peers' records that passed validation, by GossipSub or a sync",
        gossip.received,
    )
    yield _counters(
        "p2p_node_records_rejected",
        "Peers' records refused, by reason",
        "reason",
        {reason.value: gossip.rejects.get(reason, 0) for reason in Rejection},
    )

    counts = node.orchestrator.counts
    for name, help_text, by_model in (
        (
            "p2p_node_failovers",
            "Requests this node sent to another peer after a retryable failure",
            counts.failovers,
        ),
        (
            "p2p_node_hedges",
            "Second requests this node sent because the first peer was slower than its p95",
            counts.hedges,
        ),
        (
            "p2p_node_model_loads",
            "Models loaded on demand, after start",
            executor.models.loads_by_model,
        ),
        (
            "p2p_node_model_unloads",
            "Models unloaded to make room in the memory budget",
            executor.models.unloads_by_model,
        ),
    ):
        family = CounterMetricFamily(name, help_text, labels=["model"])
        for model, n in sorted(metrics.by_model(by_model).items()):
            family.add_metric([model], n)
        yield family
    loaded = GaugeMetricFamily(
        "p2p_node_model_loaded", "1 if a served model is in memory now, else 0", labels=["model"]
    )
    for model_id in executor.models.ids():
        loaded.add_metric([metrics.model(model_id)], int(executor.models.is_loaded(model_id)))
    yield loaded

    sent = CounterMetricFamily(
        "p2p_node_sent_bytes",
        "Bytes of framed messages sent, by protocol and side (caller: this node's "
        "requests; server: its replies)",
        labels=["protocol", "side"],
    )
    received = CounterMetricFamily(
        "p2p_node_received_bytes",
        "Bytes of framed messages received, by protocol and side (caller: replies to "
        "this node; server: requests to it)",
        labels=["protocol", "side"],
    )
    for side, traffic in (("caller", rpc_traffic), ("server", server_traffic)):
        for protocol, moved in sorted(traffic.by_protocol.items()):
            if moved.sent or moved.received:  # beat streams open here but do not frame
                sent.add_metric([protocol, side], moved.sent)
                received.add_metric([protocol, side], moved.received)
    yield sent
    yield received


def _generation_families(node: Node) -> Iterator[Metric]:
    generations = node.generations
    yield _gauge("p2p_node_generations_running", "Generations running now", generations.sessions)
    yield _gauge(
        "p2p_node_generation_cache_bytes",
        "KV cache memory the running generations hold (counted in --model-memory-mb)",
        generations.cache_bytes,
    )
    outcomes = ("started", "refused", "finished", "failed", "cancelled")
    yield _counters(
        "p2p_node_generations",
        "Generations this node ran: started, refused at the start (sessions or memory "
        "full), and how those that ended did (finished, failed, cancelled: a hang-up)",
        "outcome",
        {outcome: getattr(generations, outcome) for outcome in outcomes},
    )
    engines = {model_id: generations.engine(model_id) for model_id in generations.model_ids}
    for name, help_text, count in (
        (
            "p2p_node_decode_steps",
            "Decode steps run, each one onnxruntime run for every session of its batch",
            "steps",
        ),
        (
            "p2p_node_decode_rows",
            "Rows of those steps, a token each: rows / steps is the mean batch",
            "batched_rows",
        ),
        (
            "p2p_node_decode_wide_steps",
            "Of those steps, the ones run with every worker slot's threads (8 rows or more)",
            "wide_steps",
        ),
    ):
        by_model = {model_id: getattr(engine, count) for model_id, engine in engines.items()}
        yield _counters(name, help_text, "model", node.metrics.by_model(by_model))


def _counters(
    name: str, help_text: str, label: str, values: Mapping[str, float]
) -> CounterMetricFamily:
    """A counter family of one label: a sample per value of it."""
    family = CounterMetricFamily(name, help_text, labels=[label])
    for value, count in values.items():
        family.add_metric([value], count)
    return family


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, value=value)


# --- the HTTP endpoint -------------------------------------------------------------


async def serve_metrics(
    metrics: NodeMetrics,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `GET /metrics` on host:port until cancelled; reports the bound address
    (port 0 picks a free one; host "" listens on every interface). Plain HTTP/1.1,
    one request per connection."""
    listeners = await trio.open_tcp_listeners(port, host=host or None)
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
