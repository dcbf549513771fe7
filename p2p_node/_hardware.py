"""What this machine offers and how busy it is: CPU, memory, GPUs, ONNX providers.

GPUs are read through NVML (the `pynvml` module of nvidia-ml-py). Without a
driver or a GPU, NVML fails to initialise and the machine simply has no GPUs:
nothing here raises for that. Tests pass a fake NVML object.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Sequence
from typing import Any

import onnxruntime as ort
import psutil

from gossip import Capabilities, GpuInfo

logger = logging.getLogger(__name__)


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
