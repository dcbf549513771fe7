"""This coordinator's own view of its peers: outstanding requests, observed latency,
failure backoff. Updated on every send, completion, failure and cancellation."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StatsConfig:
    latency_decay_s: float = 10.0  # peak-EWMA time constant
    backoff_base_s: float = 0.25
    backoff_cap_s: float = 10.0
    overloaded_backoff_s: float = 0.05  # an OVERLOADED peer is skipped only briefly
    latency_window: int = 256  # samples kept per model for the hedging delay


COMPUTE_EWMA_ALPHA = 0.2


class _PeakEwma:
    """Finagle/Linkerd peak-EWMA: jumps up to a slow sample at once, decays back slowly."""

    __slots__ = ("at", "value")

    def __init__(self, value: float, at: float) -> None:
        self.value = value
        self.at = at

    def observe(self, sample: float, now: float, decay_s: float) -> None:
        if sample > self.value:
            self.value = sample
        else:
            weight = math.exp(-max(0.0, now - self.at) / decay_s)
            self.value = self.value * weight + sample * (1.0 - weight)
        self.at = now


class PeerStats:
    """Implements `CoordinatorState` for the strategies. Times come from the caller."""

    def __init__(self, config: StatsConfig = StatsConfig()) -> None:
        self.config = config
        self._outstanding: dict[str, int] = {}
        self._latency: dict[tuple[str, str], _PeakEwma] = {}
        self._backoff_until: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._turns: dict[str, int] = {}
        self._recent: dict[str, deque[float]] = {}
        self._reports: dict[str, tuple[float, int]] = {}
        self._compute: dict[str, float] = {}

    # --- CoordinatorState ---------------------------------------------------------

    def outstanding(self, peer_id: str) -> int:
        return self._outstanding.get(peer_id, 0)

    def observed_latency_ms(self, peer_id: str, model_id: str) -> float | None:
        ewma = self._latency.get((peer_id, model_id))
        return ewma.value if ewma else None

    def backoff_until(self, peer_id: str) -> float:
        return self._backoff_until.get(peer_id, -math.inf)

    def turns(self, model_id: str) -> int:
        return self._turns.get(model_id, 0)

    def reported_load(self, peer_id: str) -> tuple[float, int] | None:
        return self._reports.get(peer_id)

    def compute_ms(self, model_id: str) -> float | None:
        return self._compute.get(model_id)

    # --- updates ------------------------------------------------------------------

    def placed(self, model_id: str) -> None:
        self._turns[model_id] = self._turns.get(model_id, 0) + 1

    def sent(self, peer_id: str) -> None:
        self._outstanding[peer_id] = self._outstanding.get(peer_id, 0) + 1

    def done(self, peer_id: str) -> None:
        """Every send ends here once: on success, failure or cancellation."""
        left = self._outstanding.get(peer_id, 0) - 1
        if left > 0:
            self._outstanding[peer_id] = left
        else:
            self._outstanding.pop(peer_id, None)

    def succeeded(
        self,
        peer_id: str,
        model_id: str,
        latency_ms: float,
        now: float,
        compute_ms: float | None = None,
    ) -> None:
        """An answer came back after `latency_ms`, of which the executor computed for
        `compute_ms` (when it said)."""
        if compute_ms is not None:
            before = self._compute.get(model_id, compute_ms)
            self._compute[model_id] = before + COMPUTE_EWMA_ALPHA * (compute_ms - before)
        self._failures.pop(peer_id, None)
        self._backoff_until.pop(peer_id, None)
        key = (peer_id, model_id)
        ewma = self._latency.get(key)
        if ewma is None:
            self._latency[key] = _PeakEwma(latency_ms, now)
        else:
            ewma.observe(latency_ms, now, self.config.latency_decay_s)
        window = self._recent.setdefault(model_id, deque(maxlen=self.config.latency_window))
        window.append(latency_ms)

    def reported(self, peer_id: str, load: int, now: float) -> None:
        """The load the peer reported with an answer or a probe (requests there from
        anyone), after `done`. Kept without our own share, estimated as what is
        outstanding from here now (requests still on their way there, or answered
        but not yet back, make it off by a few): what remains is the others' load."""
        self._reports[peer_id] = (now, max(0, load - self.outstanding(peer_id)))

    def failed(self, peer_id: str, now: float, *, overloaded: bool = False) -> None:
        """Back the peer off: briefly when it said OVERLOADED, exponentially otherwise."""
        if overloaded:
            self._backoff_until[peer_id] = now + self.config.overloaded_backoff_s
            return
        count = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = count
        delay = min(self.config.backoff_cap_s, self.config.backoff_base_s * 2 ** (count - 1))
        self._backoff_until[peer_id] = now + delay

    def forget(self, peer_id: str) -> None:
        """A peer left the view: drop what we learned of it (memory stays bounded)."""
        self._backoff_until.pop(peer_id, None)
        self._failures.pop(peer_id, None)
        self._reports.pop(peer_id, None)
        for key in [k for k in self._latency if k[0] == peer_id]:
            del self._latency[key]

    def latency_quantile_ms(self, model_id: str, q: float) -> float | None:
        """The q-quantile of recent latencies of `model_id` from here (None: too few)."""
        window = self._recent.get(model_id)
        if not window or len(window) < 20:
            return None
        ordered = sorted(window)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
