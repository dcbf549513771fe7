"""Who may submit jobs to this node, and how fast: an allowlist and per-client token buckets.

Pure: the clock is passed in, nothing here awaits. The node asks `admit_job`
before it coordinates a job, and `allows` before it runs another peer's infer
request (peers of the network pass too; the node checks its view for those).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from scheduler import ErrorCode, JobError

from ._config import AdmissionConfig

logger = logging.getLogger(__name__)

MAX_TRACKED_CLIENTS = 10_000  # token buckets kept; full ones are forgotten first
MAX_LOGGED_PEERS = 1024  # peers whose first refusal was logged at WARNING


@dataclass(slots=True)
class TokenBucket:
    """`burst` tokens, refilled at `rate` per second; one job takes one token."""

    rate: float
    burst: float
    tokens: float
    updated_at: float

    def take(self, now: float) -> float:
        """0 if a token was taken; else the seconds until one will be there."""
        self.refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated_at)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated_at = max(now, self.updated_at)

    def full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.burst


class Admission:
    """The admission state of one node: its config, a bucket per client, refusals."""

    def __init__(self, config: AdmissionConfig, node_peer_id: str) -> None:
        self.config = config
        self._peer_id = node_peer_id
        self._buckets: dict[str, TokenBucket] = {}
        self._logged: set[str] = set()
        self.refused: dict[ErrorCode, int] = {}  # refusals by code, for tests and metrics

    def allows(self, sender: str) -> bool:
        """Whether `sender` is on the allowlist (everyone is when there is none)."""
        allowed = self.config.allowed_clients
        return allowed is None or sender in allowed

    def admit_job(self, sender: str, now: float) -> None:
        """Raise UNAUTHORIZED for a client off the allowlist, OVERLOADED (with a
        retry-after) for one past its job rate; return if the job may run."""
        if not self.allows(sender):
            raise self.unauthorized(sender, "submit jobs")
        if self.config.job_rate is None:
            return
        bucket = self._bucket(sender, now)
        wait = bucket.take(now)
        if wait > 0:
            self._note(ErrorCode.OVERLOADED, sender, "is over its job rate")
            raise JobError(
                ErrorCode.OVERLOADED,
                f"client {sender} is over its rate of {self.config.job_rate:g} jobs/s "
                f"(burst {self.config.job_burst}); retry after {wait:.3g} s",
                peer=self._peer_id,
                retry_after=wait,
            )

    def unauthorized(self, sender: str, what: str) -> JobError:
        """The error for a peer that may not `what` here; the refusal is logged."""
        self._note(ErrorCode.UNAUTHORIZED, sender, f"may not {what}: not on the client allowlist")
        return JobError(
            ErrorCode.UNAUTHORIZED,
            f"peer {sender} may not {what} on this node; ask its operator to add it "
            "with --allow-client",
            peer=self._peer_id,
        )

    def _bucket(self, sender: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(sender)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_CLIENTS:
                self._forget_idle(now)
            rate, burst = self.config.job_rate or 0.0, float(self.config.job_burst)
            bucket = self._buckets[sender] = TokenBucket(rate, burst, burst, now)
        return bucket

    def _forget_idle(self, now: float) -> None:
        """Drop full buckets (a new one is the same); if none is full, the oldest."""
        for peer in [p for p, b in self._buckets.items() if b.full(now)]:
            del self._buckets[peer]
        while len(self._buckets) >= MAX_TRACKED_CLIENTS:
            del self._buckets[next(iter(self._buckets))]

    def _note(self, code: ErrorCode, sender: str, why: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1
        first = sender not in self._logged and len(self._logged) < MAX_LOGGED_PEERS
        if first:
            self._logged.add(sender)
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "refused a request from %s (%s): it %s",
            sender,
            code.name,
            why,
        )
