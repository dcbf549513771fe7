"""Node configuration: one frozen value, read once at the entry point."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import multiaddr
from libp2p.peer.id import ID

from gossip import Capabilities
from scheduler import DistributionStrategy
from selection import AdvancedModelSelectionStrategy

from ._psk import PreSharedKey

DEFAULT_TARGET_DEGREE = 6


class ConfigError(ValueError):
    """A configuration file or value is unusable; the message says which and why."""


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    """How this node runs models.

    `workers` bounds concurrent ONNX runs, `intra_op_threads` the threads each run
    may use: keep workers x intra_op_threads near the cores this node may use so
    that several nodes on one machine do not oversubscribe it. A large request
    (estimated at 5 ms or more) of a model whose rows run apart runs in parts at
    once in the worker slots free when it starts. `queue_limit`
    bounds admitted requests (running + waiting); past it a request is answered
    OVERLOADED at once.

    A request estimated to run under `inline_below_ms` runs on the event loop's
    own thread: for a small model the hop to a worker thread and back costs more
    than the run itself (see bench/overhead.py). The estimate is the model's
    recent runs, scaled up by the request's input size when it is larger than
    theirs. 0 turns that off.

    `model_memory_mb` bounds the memory of the models kept loaded (None: no
    bound). A model's memory is estimated by its files on disk, or given by
    `memory_mb` in its model.toml; a model not loaded is loaded when a request
    needs it, unloading the least recently used first. `max_batch_rows` caps the
    rows (leading dimension) of one request's inputs; past it the request is
    INVALID_INPUT.

    Text generation (models whose model.toml says `postprocess = "generate"`):
    at most `max_sessions` generations run at once on this node (past it, a new
    one is OVERLOADED); one generates at most `max_new_tokens` tokens (a request
    for more is INVALID_INPUT); one whose client takes no token for
    `session_idle_s` seconds ends (DEADLINE_EXCEEDED). Each holds its KV cache,
    counted against `model_memory_mb`. With `batch_decode`, the decode steps of
    all sessions of a model run as one batch (continuous batching); without it,
    one session at a time (for comparison). With more than one worker, a
    generator also loads a second session with the threads of every worker
    (workers x intra_op_threads), counted in `model_memory_mb` (not made where
    two of the model do not fit), for the decode steps of 8 rows or more and
    the prefill runs of 64 tokens or more that start while no other run holds
    a worker, where the node has measured that they go faster on it
    (`_generation.WideChoice`).
    """

    workers: int = 2
    intra_op_threads: int = 1
    queue_limit: int = 64
    use_gpu: bool = True
    inline_below_ms: float = 0.5
    model_memory_mb: float | None = None
    max_batch_rows: int = 65_536
    max_sessions: int = 32
    max_new_tokens: int = 1024
    session_idle_s: float = 30.0
    batch_decode: bool = True

    def __post_init__(self) -> None:
        names = ("workers", "intra_op_threads", "queue_limit", "max_batch_rows")
        for name in (*names, "max_sessions", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.inline_below_ms >= 0:
            raise ConfigError(f"inline_below_ms must be >= 0, got {self.inline_below_ms}")
        if not 0 < self.session_idle_s < float("inf"):
            raise ConfigError(
                f"session_idle_s must be a positive number, got {self.session_idle_s}"
            )
        budget = self.model_memory_mb
        if budget is not None and not 0 < budget < float("inf"):
            raise ConfigError(f"model_memory_mb must be a positive number of MB, got {budget}")


@dataclass(frozen=True, slots=True)
class GossipConfig:
    network: str = "default"
    interval: float = 1.0  # changes published at most this often; sets the liveness ttl
    refresh: float = 120.0  # a record is republished at least this often with nothing changed
    budget: float = 200.0  # records/s for the whole network; the interval grows to fit
    degree: int = 6
    degree_low: int = 4
    degree_high: int = 12
    heartbeat_s: int = 2  # GossipSub mesh upkeep; py-libp2p takes whole seconds
    ttl_factor: float = 3.0  # a peer silent for ttl_factor x its interval is dead
    anti_entropy_s: float = 2.0  # a digest sync with one random neighbour this often

    @property
    def liveness_ttl(self) -> float:
        """How long a neighbour may go unheard (no beat, no record) before it is dead."""
        return self.ttl_factor * self.interval

    @property
    def beat_period(self) -> float:
        """How often neighbours beat to each other: twice per ttl, so a neighbour is
        reported after two beats missed, or one beat late by more than half the ttl."""
        return self.liveness_ttl / 2

    def __post_init__(self) -> None:
        if not 0 < len(self.network) <= 64 or "/" in self.network:
            raise ConfigError(f"network name must be 1-64 characters without '/': {self.network!r}")
        if not (self.interval > 0 and self.budget > 0 and self.heartbeat_s >= 1):
            raise ConfigError("interval, budget and heartbeat must be positive")
        if not 0 < self.anti_entropy_s < float("inf"):
            raise ConfigError(f"anti_entropy_s must be positive, got {self.anti_entropy_s}")
        if not self.refresh >= self.interval:
            raise ConfigError(
                f"refresh ({self.refresh} s) must be at least the interval ({self.interval} s)"
            )
        if not self.ttl_factor > 1:
            raise ConfigError(f"ttl_factor must be > 1, got {self.ttl_factor}")
        if not 0 < self.degree_low <= self.degree <= self.degree_high:
            raise ConfigError("need 0 < degree_low <= degree <= degree_high")

    @property
    def topic(self) -> str:
        return f"/p2p-node/{self.network}/records/1"


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """Who may submit jobs, and how fast.

    `allowed_clients`: peer ids that may send jobs; None lets anyone. Peers of
    the network (in this node's view) may always send infer requests. `job_rate`
    (jobs/s) and `job_burst` size a token bucket per client; past it a job is
    answered OVERLOADED with a retry-after. None (the default) sets no rate.
    """

    allowed_clients: frozenset[str] | None = None
    job_rate: float | None = None
    job_burst: int = 100

    def __post_init__(self) -> None:
        for peer_id in self.allowed_clients or ():
            check_peer_id(peer_id)
        if self.job_rate is not None and not 0 < self.job_rate < float("inf"):
            raise ConfigError(f"job_rate must be a positive number of jobs/s, got {self.job_rate}")
        if self.job_burst < 1:
            raise ConfigError(f"job_burst must be >= 1, got {self.job_burst}")


MAX_ANNOUNCED_ADDRS = 16  # in a record


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """Models to fetch from peers at start (`p2p-node start --fetch`), and its bounds.

    `models`: `MODEL_ID`, or `MODEL_ID@STAGE` for one stage (from 1) of a staged model. A
    model bigger than `max_model_mb` (all its files) is refused, as is one whose
    memory estimate is over the node's model memory budget. `find_timeout`: how
    long to wait for a peer announcing it; `request_timeout`: for one manifest or
    chunk. `streams_per_peer` chunks are in flight from each peer at once.
    """

    models: tuple[str, ...] = ()
    max_model_mb: float = 4096.0
    find_timeout: float = 300.0
    request_timeout: float = 30.0
    streams_per_peer: int = 2

    def __post_init__(self) -> None:
        for target in self.models:
            parse_fetch_target(target)
        if not self.max_model_mb > 0:
            raise ConfigError(f"max_model_mb must be > 0, got {self.max_model_mb}")
        if not (self.find_timeout > 0 and self.request_timeout > 0):
            raise ConfigError("fetch timeouts must be > 0")
        if self.streams_per_peer < 1:
            raise ConfigError(f"streams_per_peer must be >= 1, got {self.streams_per_peer}")


def parse_fetch_target(text: str) -> tuple[str, int | None]:
    """`MODEL_ID` or `MODEL_ID@STAGE` as (model id, 0-based stage index or None).

    STAGE counts from 1, as `p2p-node peers` and `place` show stages; a stage
    model's own id (`minilm-l6-v2@2of2`) is a plain model id.
    """
    bad = ConfigError(f"--fetch {text!r}: expected MODEL_ID or MODEL_ID@STAGE (STAGE from 1)")
    if not text or len(text) > 128 or not text.isprintable() or "/" in text:
        raise bad
    model_id, at, stage = text.rpartition("@")
    if not (at and stage.isascii() and stage.isdigit()):
        if text.endswith("@") or text.startswith("@"):
            raise bad
        return text, None
    if not model_id or int(stage) < 1:
        raise bad
    return model_id, int(stage) - 1


@dataclass(frozen=True, slots=True)
class NodeConfig:
    data_dir: Path
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    # What records tell peers to dial, replacing the listen addresses (NAT, port
    # forwarding); without /p2p/, which the node adds. (): the listen addresses.
    announce: tuple[str, ...] = ()
    models_dir: Path | None = None  # None: the bundled example models
    serve_models: frozenset[str] | None = None  # None: every model in models_dir
    bootstrap: tuple[str, ...] = ()
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    target_degree: int = DEFAULT_TARGET_DEGREE  # connections sought beyond bootstrap peers
    mdns: bool = False
    capabilities: Capabilities | None = None  # announce these instead of probing the machine
    strategy: DistributionStrategy = DistributionStrategy.LEAST_LOADED  # for jobs naming none
    # How a job that names a task type, not a model, gets its model (when it names none).
    selection: AdvancedModelSelectionStrategy = AdvancedModelSelectionStrategy.HYBRID
    tracker_save_interval: float = 10.0  # seconds between saves of what selection learned
    # Message limits: job and infer requests (they carry tensors); models, peers,
    # place and select requests (they carry none); every reply. Streams opened by
    # peers and served at once (idle kept streams included).
    max_request_bytes: int = 16 * 1024 * 1024
    max_control_request_bytes: int = 64 * 1024
    max_reply_bytes: int = 16 * 1024 * 1024
    max_concurrent_inbound: int = 256
    dial_timeout: float = 5.0
    shutdown_grace: float = 10.0
    psk: PreSharedKey | None = None  # join the private network of this key
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    # Serve Prometheus metrics on http://HOST:PORT/metrics (port 0: any free one; host
    # "": every interface). None: no endpoint.
    metrics_listen: tuple[str, int] | None = None
    fetch: FetchConfig = field(default_factory=FetchConfig)  # models fetched from peers

    def __post_init__(self) -> None:
        if not self.listen:
            raise ConfigError("a node needs at least one listen address")
        for addr in self.listen:
            parse_multiaddr(addr)
        if len(self.announce) > MAX_ANNOUNCED_ADDRS:
            raise ConfigError(f"announce: at most {MAX_ANNOUNCED_ADDRS} addresses")
        for addr in self.announce:
            if "p2p" in (p.name for p in parse_multiaddr(addr).protocols()):
                raise ConfigError(f"announce {addr!r}: leave out /p2p/..., the node adds its own")
        for addr in self.bootstrap:
            parse_peer_multiaddr(addr)
        if self.target_degree < 0:
            raise ConfigError(f"target_degree must be >= 0, got {self.target_degree}")
        for name in ("max_request_bytes", "max_control_request_bytes", "max_reply_bytes"):
            if getattr(self, name) < 1024:
                raise ConfigError(f"{name} must be at least 1024 bytes, got {getattr(self, name)}")
        if self.max_concurrent_inbound < 1:
            raise ConfigError(
                f"max_concurrent_inbound must be >= 1, got {self.max_concurrent_inbound}"
            )
        if self.metrics_listen is not None:
            host, port = self.metrics_listen
            if not isinstance(host, str) or not (type(port) is int and 0 <= port <= 65535):
                raise ConfigError(f"metrics_listen must be (host, port), got {self.metrics_listen}")


def parse_host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT`: `127.0.0.1:9100`, `[::1]:9100`, or `:9100` for every interface."""
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    valid = (
        sep
        and port.isascii()
        and port.isdigit()
        and int(port) <= 65535
        and (bracketed or not any(c in host for c in ":[]"))
        and not any(c.isspace() for c in host)
    )
    if not valid:
        raise ConfigError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9100, [::1]:9100, :9100)")
    return host, int(port)


def parse_multiaddr(text: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception as error:  # multiaddr raises several unrelated types
        raise ConfigError(f"{text!r} is not a multiaddr: {error}") from None


def parse_peer_multiaddr(text: str) -> multiaddr.Multiaddr:
    """A multiaddr that names its peer: `/ip4/10.0.0.2/tcp/4001/p2p/12D3KooW...`."""
    addr = parse_multiaddr(text)
    try:
        peer_id = addr.get_peer_id()
    except Exception:
        peer_id = None
    if not peer_id:
        raise ConfigError(f"{text!r} does not end in /p2p/<peer id>")
    return addr


def load_bootstrap_file(path: Path) -> tuple[str, ...]:
    """The `peers` list of a bootstrap file (format: see bootstrap_peers.toml)."""
    peers = _string_list(path, "bootstrap file", "peers", "multiaddr")
    for peer in peers:
        try:
            parse_peer_multiaddr(peer)
        except ConfigError as error:
            raise ConfigError(f"bootstrap file {path}: {error}") from None
    return peers


def _string_list(path: Path, what: str, key: str, item: str) -> tuple[str, ...]:
    """The list of strings under `key` in the TOML file `path`, its only key."""
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except OSError as error:
        raise ConfigError(f"cannot read {what} {path}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{what} {path} is not valid TOML: {error}") from None
    unknown = set(document) - {key}
    if unknown:
        raise ConfigError(f"{what} {path}: unknown keys {sorted(unknown)}")
    values = document.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{what} {path}: `{key}` must be a list of {item} strings")
    return tuple(values)


def check_peer_id(text: str) -> str:
    """`text` if it is a peer id (base58, `12D3KooW...`); else ConfigError."""
    try:
        raw = ID.from_base58(text).to_bytes() if isinstance(text, str) else b""
    except Exception:  # base58 raises several unrelated types
        raw = b""
    # A multihash: identity (0x00, inlined keys such as ed25519) or sha2-256 (0x12), then
    # the digest's length, then the digest.
    valid = len(raw) > 2 and raw[0] in (0x00, 0x12) and raw[1] == len(raw) - 2
    if not valid:
        raise ConfigError(f"{text!r} is not a peer id (expected base58, like 12D3KooW...)")
    return text


def load_client_allowlist(path: Path) -> frozenset[str]:
    """The `clients` list of an allowlist file: `clients = ["12D3KooW...", ...]`."""
    clients = _string_list(path, "allowlist file", "clients", "peer id")
    try:
        return frozenset(check_peer_id(c) for c in clients)
    except ConfigError as error:
        raise ConfigError(f"allowlist file {path}: {error}") from None
