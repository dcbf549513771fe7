"""What this node has learned about each model: latency, success and quality, per
context bucket, with old evidence discounted so that the estimates follow drift.

Pure and synchronous; the node saves it to its data dir (`to_bytes` / `from_bytes`)
so that learning survives a restart. Memory is bounded: at most `max_entries`
(model, bucket) pairs (the least recently updated go first) and `max_jobs`
remembered jobs waiting for feedback.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import msgpack

from scheduler import ErrorCode, JobError

ALL = "*"  # the bucket every observation also lands in
FORMAT_VERSION = 1
LATENCY_ALPHA = 0.2
SUCCESS_ALPHA = 0.1
PRIOR_STRENGTH = 2.0  # the announced accuracy counts as this many observations


@dataclass(frozen=True, slots=True)
class TrackerConfig:
    """How the tracker forgets. Two ways, one slow and one fast:

    - every quality observation in a bucket discounts the bucket's older evidence
      by `discount` (a memory of about 1 / (1 - discount) observations);
    - a model whose last `drift_window` scores differ from its older ones by more
      than `drift_sigmas` standard errors has drifted: the bucket keeps only that
      model's recent scores, and a tenth of what it knew of the others, so that
      they are tried again (after Cao et al., "Nearly optimal adaptive procedure
      with change detection for piecewise-stationary bandit", AISTATS 2019).
    """

    discount: float = 0.999
    drift_window: int = 50  # 0 turns change detection off
    drift_sigmas: float = 3.0
    max_entries: int = 4096
    max_jobs: int = 10_000

    def __post_init__(self) -> None:
        if not 0.0 < self.discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {self.discount}")
        if self.max_entries < 1 or self.max_jobs < 1:
            raise ValueError("max_entries and max_jobs must be >= 1")
        if self.drift_window < 0 or not self.drift_sigmas > 0:
            raise ValueError("drift_window must be >= 0 and drift_sigmas > 0")


FORGET_ON_DRIFT = 0.1  # what the other models of a drifted bucket keep of their evidence


class Evidence:
    """One model in one bucket. Quality counts are discounted by `discount` for every
    quality observation made in the bucket since (lazily, at the next touch)."""

    __slots__ = (
        "failures",
        "latency_ms",
        "quality_n",
        "quality_sum",
        "recent",
        "runs",
        "step",
        "success_rate",
    )

    def __init__(self, step: int = 0) -> None:
        self.runs = 0
        self.failures = 0
        self.latency_ms: float | None = None
        self.success_rate = 1.0
        self.quality_n = 0.0
        self.quality_sum = 0.0
        self.recent: deque[float] = deque()  # the last scores, for change detection
        self.step = step

    def catch_up(self, step: int, discount: float) -> None:
        if step > self.step:
            factor = discount ** (step - self.step)
            self.quality_n *= factor
            self.quality_sum *= factor
            self.step = step

    def as_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "failures": self.failures,
            "latency_ms": self.latency_ms,
            "success_rate": self.success_rate,
            "quality_n": self.quality_n,
            "quality_sum": self.quality_sum,
            "recent": list(self.recent),
            "step": self.step,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Evidence:
        evidence = cls(int(raw["step"]))
        evidence.runs = int(raw["runs"])
        evidence.failures = int(raw["failures"])
        latency = raw["latency_ms"]
        evidence.latency_ms = None if latency is None else float(latency)
        evidence.success_rate = float(raw["success_rate"])
        evidence.quality_n = float(raw["quality_n"])
        evidence.quality_sum = float(raw["quality_sum"])
        evidence.recent = deque(float(x) for x in raw["recent"])
        return evidence

    def drifted(self, window: int, sigmas: float) -> bool:
        """Do the last `window` scores differ from the older ones beyond chance?"""
        if window == 0 or len(self.recent) < window:
            return False
        recent_sum = sum(self.recent)
        older_n = self.quality_n - window
        if older_n < window:
            return False
        older = (self.quality_sum - recent_sum) / older_n
        pooled = min(max(self.quality_sum / self.quality_n, 0.02), 0.98)
        error = math.sqrt(pooled * (1.0 - pooled) * (1.0 / window + 1.0 / older_n))
        return abs(recent_sum / window - older) > sigmas * error


@dataclass(frozen=True, slots=True)
class QualityEstimate:
    """The posterior over a model's quality in a bucket: Beta(alpha, beta), its prior
    being the announced accuracy worth PRIOR_STRENGTH observations."""

    alpha: float
    beta: float
    observations: float  # discounted

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def sample(self, rng: random.Random) -> float:
        return rng.betavariate(self.alpha, self.beta)


@dataclass(frozen=True, slots=True)
class Learned:
    """What the tracker learned of one model in one context bucket, as plain values
    (`select --json`; a select reply carries these in this order)."""

    model_id: str
    bucket: str
    runs: int
    failures: int
    latency_ms: float | None
    success_rate: float
    quality: float | None  # mean of the scores, None before any
    quality_weight: float  # how many (discounted) scores the mean stands on


class PerformanceTracker:
    def __init__(self, config: TrackerConfig = TrackerConfig()) -> None:
        self.config = config
        self._entries: OrderedDict[tuple[str, str], Evidence] = OrderedDict()
        self._steps: dict[str, int] = {}
        # job id -> (models that answered, bucket), until the job is scored
        self._jobs: OrderedDict[str, tuple[tuple[str, ...], str]] = OrderedDict()
        self.drifts: dict[str, int] = {}  # change points detected, per bucket

    # --- observing ---------------------------------------------------------------

    def record_run(self, model_id: str, bucket: str, *, ok: bool, latency_ms: float) -> None:
        """A run finished (ok) or failed for a reason that is the model's or its peers'."""
        for evidence in self._touch(model_id, bucket):
            evidence.runs += 1
            if ok:
                previous = evidence.latency_ms
                evidence.latency_ms = (
                    latency_ms
                    if previous is None
                    else previous + LATENCY_ALPHA * (latency_ms - previous)
                )
            else:
                evidence.failures += 1
            evidence.success_rate += SUCCESS_ALPHA * (float(ok) - evidence.success_rate)

    def record_quality(self, model_id: str, bucket: str, score: float) -> None:
        """A quality observation in [0, 1]: a labelled outcome or a user's feedback."""
        if not (math.isfinite(score) and 0.0 <= score <= 1.0):
            raise JobError(ErrorCode.INVALID_SELECTION, f"score must be in [0, 1], got {score}")
        for key_bucket in dict.fromkeys((bucket, ALL)):
            self._steps[key_bucket] = self._steps.get(key_bucket, 0) + 1
        for key_bucket, evidence in zip(
            dict.fromkeys((bucket, ALL)), self._touch(model_id, bucket), strict=True
        ):
            evidence.quality_n += 1.0
            evidence.quality_sum += score
            evidence.recent.append(score)
            while len(evidence.recent) > self.config.drift_window:
                evidence.recent.popleft()
            if evidence.drifted(self.config.drift_window, self.config.drift_sigmas):
                self._forget(key_bucket, evidence)

    def _forget(self, bucket: str, drifted: Evidence) -> None:
        """A change point in `bucket`: keep the drifted model's recent scores only, and
        a little of the others' evidence, so that every model is explored again."""
        self.drifts[bucket] = self.drifts.get(bucket, 0) + 1
        for (_, key_bucket), evidence in self._entries.items():
            if key_bucket != bucket:
                continue
            if evidence is drifted:
                evidence.quality_n = float(len(evidence.recent))
                evidence.quality_sum = sum(evidence.recent)
            else:
                evidence.catch_up(self._steps.get(bucket, 0), self.config.discount)
                evidence.quality_n *= FORGET_ON_DRIFT
                evidence.quality_sum *= FORGET_ON_DRIFT
                evidence.recent.clear()

    def remember_job(self, job_id: str, model_ids: Iterable[str], bucket: str) -> None:
        """Keep which models answered `job_id`, so that feedback can find them."""
        self._jobs[job_id] = (tuple(model_ids), bucket)
        self._jobs.move_to_end(job_id)
        while len(self._jobs) > self.config.max_jobs:
            self._jobs.popitem(last=False)

    def feedback(self, job_id: str, score: float) -> tuple[str, ...]:
        """Credit `score` to the models that answered `job_id`, once; returns them.

        A job id is the capability: whoever knows it may score the answer (job ids
        are random 128-bit values unless a client chooses worse), and only once, so
        one job cannot be used to push a model's quality around.
        """
        remembered = self._jobs.get(job_id)
        if remembered is None:
            raise JobError(
                ErrorCode.UNKNOWN_JOB,
                f"job {job_id!r} is not among the last {self.config.max_jobs} unscored jobs "
                "this node coordinated; send feedback, once, to the peer the job was "
                "submitted to",
            )
        model_ids, bucket = remembered
        del self._jobs[job_id]
        for model_id in model_ids:
            self.record_quality(model_id, bucket, score)
        return model_ids

    # --- reading -----------------------------------------------------------------

    def evidence(self, model_id: str, bucket: str = ALL) -> Evidence | None:
        evidence = self._entries.get((model_id, bucket))
        if evidence is not None:
            evidence.catch_up(self._steps.get(bucket, 0), self.config.discount)
        return evidence

    def quality(self, model_id: str, bucket: str, prior: float) -> QualityEstimate:
        """The quality posterior in `bucket`, falling back to all buckets when this one
        has no quality evidence yet."""
        evidence = self.evidence(model_id, bucket)
        if (evidence is None or evidence.quality_n < 1e-9) and bucket != ALL:
            evidence = self.evidence(model_id, ALL)
        n, total = (0.0, 0.0) if evidence is None else (evidence.quality_n, evidence.quality_sum)
        prior = min(max(prior, 1e-3), 1.0 - 1e-3)  # a Beta needs both counts > 0
        return QualityEstimate(
            PRIOR_STRENGTH * prior + total, PRIOR_STRENGTH * (1.0 - prior) + (n - total), n
        )

    def latency_ms(self, model_id: str, bucket: str = ALL) -> float | None:
        for key_bucket in dict.fromkeys((bucket, ALL)):
            evidence = self.evidence(model_id, key_bucket)
            if evidence is not None and evidence.latency_ms is not None:
                return evidence.latency_ms
        return None

    def success_rate(self, model_id: str, bucket: str = ALL) -> float:
        evidence = self.evidence(model_id, bucket) or self.evidence(model_id, ALL)
        return 1.0 if evidence is None else evidence.success_rate

    def learned(self, model_ids: Iterable[str] | None = None) -> tuple[Learned, ...]:
        """What was learned of `model_ids` (None: of every model), by model and bucket."""
        wanted = None if model_ids is None else set(model_ids)
        out = []
        for (model_id, bucket), _ in sorted(self._entries.items()):
            if wanted is not None and model_id not in wanted:
                continue
            evidence = self.evidence(model_id, bucket)
            assert evidence is not None
            n = evidence.quality_n
            out.append(
                Learned(
                    model_id,
                    bucket,
                    evidence.runs,
                    evidence.failures,
                    evidence.latency_ms,
                    round(evidence.success_rate, 4),
                    round(evidence.quality_sum / n, 4) if n > 1e-9 else None,
                    round(n, 2),
                )
            )
        return tuple(out)

    def describe(self, model_ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """`learned`, as a map of model to bucket to the other fields."""
        out: dict[str, dict[str, Any]] = {}
        for facts in map(asdict, self.learned(model_ids)):
            model_id, bucket = facts.pop("model_id"), facts.pop("bucket")
            out.setdefault(model_id, {})[bucket] = facts
        return out

    def __len__(self) -> int:
        return len(self._entries)

    # --- persistence ---------------------------------------------------------------

    def to_bytes(self) -> bytes:
        data: bytes = msgpack.packb(
            {
                "v": FORMAT_VERSION,
                "steps": self._steps,
                "drifts": self.drifts,
                "entries": [[m, b, e.as_dict()] for (m, b), e in self._entries.items()],
                "jobs": [[j, list(ms), b] for j, (ms, b) in self._jobs.items()],
            }
        )
        return data

    @classmethod
    def from_bytes(cls, data: bytes, config: TrackerConfig = TrackerConfig()) -> PerformanceTracker:
        """Raises ValueError on anything that is not a tracker this version wrote."""
        try:
            raw = msgpack.unpackb(data, strict_map_key=True)
            if raw["v"] != FORMAT_VERSION:
                raise ValueError(f"tracker format {raw['v']!r}, expected {FORMAT_VERSION}")
            tracker = cls(config)
            tracker._steps = {str(b): int(s) for b, s in raw["steps"].items()}
            tracker.drifts = {str(b): int(n) for b, n in raw["drifts"].items()}
            for model_id, bucket, evidence in raw["entries"][-config.max_entries :]:
                tracker._entries[(str(model_id), str(bucket))] = Evidence.from_dict(evidence)
            for job_id, model_ids, bucket in raw["jobs"][-config.max_jobs :]:
                tracker._jobs[str(job_id)] = (tuple(str(m) for m in model_ids), str(bucket))
        except (
            KeyError,
            TypeError,
            ValueError,
            AttributeError,
            OverflowError,
            msgpack.UnpackException,
        ) as error:
            raise ValueError(f"not a performance tracker: {error}") from None
        return tracker

    # --- internals -----------------------------------------------------------------

    def _touch(self, model_id: str, bucket: str) -> list[Evidence]:
        touched = []
        for key_bucket in dict.fromkeys((bucket, ALL)):
            key = (model_id, key_bucket)
            step = self._steps.get(key_bucket, 0)
            evidence = self._entries.get(key)
            if evidence is None:
                evidence = self._entries[key] = Evidence(step)
            evidence.catch_up(step, self.config.discount)
            self._entries.move_to_end(key)
            touched.append(evidence)
        while len(self._entries) > self.config.max_entries:
            self._entries.popitem(last=False)
        if len(self._steps) > 2 * self.config.max_entries:  # buckets whose entries all went
            live = {b for _, b in self._entries} | {ALL}
            self._steps = {b: s for b, s in self._steps.items() if b in live}
            self.drifts = {b: n for b, n in self.drifts.items() if b in live}
        return touched
