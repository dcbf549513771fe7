"""What the scheduler knows of a node, and what a request requires of one."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from gossip import PeerRecord


class GpuNeed(StrEnum):
    ANY = "any"
    PREFERRED = "preferred"
    REQUIRED = "required"


@dataclass(frozen=True, slots=True)
class Requirements:
    """What a request needs from the node that runs it: every strategy leaves out the
    nodes that fail it (GPU PREFERRED only weighs GPUs more in CAPABILITY_BASED)."""

    min_memory_mb: int = 0
    gpu: GpuNeed = GpuNeed.ANY
    provider: str | None = None  # an onnxruntime execution provider, e.g. CUDAExecutionProvider

    def __post_init__(self) -> None:
        if self.min_memory_mb < 0:
            raise ValueError(f"min_memory_mb must be >= 0, got {self.min_memory_mb}")


NO_REQUIREMENTS = Requirements()


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node as a placement strategy sees it: a flat, frozen summary of its record."""

    peer_id: str
    models_loaded: frozenset[str]
    models_on_disk: frozenset[str] = frozenset()
    in_flight: int = 0
    queue_length: int = 0
    cpu_percent: float = 0.0
    cpu_count: int = 1
    memory_mb: int = 0
    memory_available_mb: int = 0
    gpu_count: int = 0
    gpu_memory_mb: int = 0
    providers: frozenset[str] = frozenset({"CPUExecutionProvider"})
    latency_ms: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    is_local: bool = False
    as_of: float = -math.inf  # when its record arrived here (the coordinator's clock)

    def serves(self, model_id: str) -> bool:
        return model_id in self.models_loaded or model_id in self.models_on_disk

    @property
    def load(self) -> int:
        """Requests the node reported as admitted or queued."""
        return self.in_flight + self.queue_length

    @classmethod
    def from_record(
        cls, record: PeerRecord, *, is_local: bool = False, as_of: float = -math.inf
    ) -> NodeInfo:
        caps, load = record.capabilities, record.load
        return cls(
            peer_id=record.peer_id,
            models_loaded=frozenset(m.descriptor.id for m in record.models if m.loaded),
            models_on_disk=frozenset(m.descriptor.id for m in record.models if not m.loaded),
            in_flight=load.in_flight,
            queue_length=load.queue_length,
            cpu_percent=load.cpu_percent,
            cpu_count=caps.cpu_count,
            memory_mb=caps.memory_mb,
            memory_available_mb=load.memory_available_mb,
            gpu_count=len(caps.gpus),
            gpu_memory_mb=sum(g.memory_mb for g in caps.gpus),
            providers=frozenset(caps.providers),
            latency_ms=MappingProxyType(
                {p.model_id: p.latency_ms for p in record.performance if p.samples > 0}
            ),
            is_local=is_local,
            as_of=as_of,
        )


class NodeIndex:
    """Nodes by the models they serve, built once per view so each decision is cheap."""

    def __init__(self, nodes: Sequence[NodeInfo]) -> None:
        self.nodes = tuple(nodes)
        by_model: dict[str, list[NodeInfo]] = {}
        for node in self.nodes:
            for model_id in node.models_loaded | node.models_on_disk:
                by_model.setdefault(model_id, []).append(node)
        self._by_model = {m: tuple(sorted(ns, key=_peer_key)) for m, ns in by_model.items()}
        self._speeds: dict[str, list[float]] = {}
        self._by_id = {node.peer_id: node for node in self.nodes}

    def serving(self, model_id: str) -> tuple[NodeInfo, ...]:
        """Nodes that serve `model_id`, in peer id order."""
        return self._by_model.get(model_id, ())

    def cumulative_speeds(self, model_id: str) -> list[float]:
        """Running sums of `speed_of` over `serving(model_id)`, computed once per index:
        what weighted random draws bisect."""
        cached = self._speeds.get(model_id)
        if cached is None:
            speeds = (speed_of(n, model_id) for n in self.serving(model_id))
            cached = self._speeds[model_id] = list(itertools.accumulate(speeds))
        return cached

    def node(self, peer_id: str) -> NodeInfo | None:
        return self._by_id.get(peer_id)

    def model_ids(self) -> frozenset[str]:
        return frozenset(self._by_model)


def speed_of(node: NodeInfo, model_id: str) -> float:
    """Requests for `model_id` the node serves per ms, by its gossiped latency (1 when
    it has gossiped none): how often two random choices draw it."""
    latency = node.latency_ms.get(model_id)
    return 1.0 / latency if latency else 1.0


def _peer_key(node: NodeInfo) -> str:
    return node.peer_id
