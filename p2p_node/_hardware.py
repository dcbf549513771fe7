"""What this machine offers and how busy it is: CPU, memory, GPUs, ONNX providers.

GPUs are read through NVML (the `pynvml` module of nvidia-ml-py). Without a
driver or a GPU, NVML fails to initialise and the machine simply has no GPUs:
nothing here raises for that. Tests pass a fake NVML object.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable, Sequence
from typing import Any

import onnxruntime as ort
import psutil

from gossip import Capabilities, GpuInfo

logger = logging.getLogger(__name__)

MIN_CPU_WINDOW_S = 0.5  # a CPU reading over less wall time than this says nothing


class Gpus:
    """The machine's NVIDIA GPUs, or none. Holds NVML open while it lives."""

    def __init__(self, nvml: Any = None) -> None:
        self._handles: list[Any] = []
        self.info: tuple[GpuInfo, ...] = ()
        if nvml is None:
            try:
                import pynvml
            except ImportError:  # nvidia-ml-py is a dependency, but be lenient
                return
            nvml = pynvml
        self._nvml: Any = nvml
        try:
            self._nvml.nvmlInit()
            count = self._nvml.nvmlDeviceGetCount()
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self.info = tuple(self._describe(h) for h in self._handles)
        except Exception as error:  # NVMLError subclasses, or a missing libnvidia-ml.so
            logger.info("no GPUs: NVML unavailable (%s)", error)
            self._handles, self.info = [], ()

    def _describe(self, handle: Any) -> GpuInfo:
        name = self._nvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):  # older nvidia-ml-py returns bytes
            name = name.decode(errors="replace")
        memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
        return GpuInfo(name=str(name)[:128], memory_mb=int(memory.total) // (1 << 20))

    def utilization(self) -> tuple[float, ...]:
        """Percent busy per GPU; a GPU that cannot be read counts as 0."""
        out = []
        for handle in self._handles:
            try:
                out.append(float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            except Exception:  # a GPU fallen off the bus must not stop the node
                out.append(0.0)
        return tuple(out)

    def close(self) -> None:
        if self._handles:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                logger.debug("nvmlShutdown failed", exc_info=True)
            self._handles = []


def capabilities(gpus: Gpus, providers: Sequence[str] | None = None) -> Capabilities:
    memory = psutil.virtual_memory()
    return Capabilities(
        cpu_count=os.cpu_count() or 1,
        cpu_model=(platform.processor() or platform.machine() or "unknown")[:128],
        memory_mb=int(memory.total) // (1 << 20),
        gpus=gpus.info,
        providers=tuple(providers if providers is not None else ort.get_available_providers()),
    )


def cpu_busy_and_total() -> tuple[float, float]:
    """Seconds of CPU time since boot, all cores together: busy, and in all (as psutil
    counts them: guest time is already in user time; idle and iowait are not busy)."""
    t = psutil.cpu_times()
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    return total - t.idle - getattr(t, "iowait", 0.0), total


class CpuMeter:
    """How busy this machine's CPUs are, in percent of all cores, for a node's records.

    `psutil.cpu_percent(interval=None)` measures since its previous call in the same
    thread, and its first call over no time at all: it reads 0, or 100 when the
    only ticks in that instant are the reader's own (a node's first record showed
    100% cpu). Nodes sharing a thread would also cut each other's windows short.

    A meter keeps its own baseline, primed when it is made. A reading covers the
    time since the last reading that counted, and counts only once that window
    spans `min_window_s` of wall time (CPU time over all cores / cores). Until then
    the meter repeats its last reading; before its first, the average since the
    machine booted, which the CPU counters give by themselves.
    """

    def __init__(
        self,
        times: Callable[[], tuple[float, float]] = cpu_busy_and_total,
        cpus: int | None = None,
        min_window_s: float = MIN_CPU_WINDOW_S,
    ) -> None:
        self._times = times
        self._min_total = min_window_s * (cpus or os.cpu_count() or 1)
        self._busy, self._total = times()
        self._percent = _busy_percent(self._busy, self._total)

    def percent(self) -> float:
        busy, total = self._times()
        if total < self._total:  # counters went back (CPUs taken offline): start again
            self._busy, self._total = busy, total
        elif total - self._total >= self._min_total:
            self._percent = _busy_percent(busy - self._busy, total - self._total)
            self._busy, self._total = busy, total
        return self._percent


def _busy_percent(busy: float, total: float) -> float:
    if not total > 0:
        return 0.0
    return round(min(100.0, max(0.0, 100.0 * busy / total)), 1)
