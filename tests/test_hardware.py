"""GPU discovery through NVML degrades to "no GPUs"; tested with a fake NVML module."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gossip import GpuInfo
from p2p_node._hardware import Gpus, capabilities


class NVMLError(Exception):
    pass


class FakeNvml:
    """The slice of pynvml that Gpus uses, over a list of (name, total bytes, util %)."""

    def __init__(self, gpus: list[tuple[str | bytes, int, int]], *, broken: str = "") -> None:
        self.gpus = gpus
        self.broken = broken
        self.shut_down = False

    def nvmlInit(self) -> None:
        if self.broken == "init":
            raise NVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        return self.gpus[handle][0]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=self.gpus[handle][1])

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        if self.broken == "utilization" and handle == 1:
            raise NVMLError("GPU is lost")
        return SimpleNamespace(gpu=self.gpus[handle][2])

    def nvmlShutdown(self) -> None:
        self.shut_down = True


def test_gpus_are_described_and_their_load_read() -> None:
    nvml = FakeNvml([("NVIDIA H200", 141 << 30, 37), (b"NVIDIA L4", 24 << 30, 5)])
    gpus = Gpus(nvml)
    assert gpus.info == (GpuInfo("NVIDIA H200", 141 << 10), GpuInfo("NVIDIA L4", 24 << 10))
    assert gpus.utilization() == (37.0, 5.0)
    gpus.close()
    assert nvml.shut_down


@pytest.mark.parametrize(
    "nvml",
    [FakeNvml([("x", 1 << 30, 0)], broken="init"), FakeNvml([])],
    ids=["no-driver", "no-gpu"],
)
def test_without_a_driver_or_a_gpu_the_machine_has_no_gpus(nvml: FakeNvml) -> None:
    gpus = Gpus(nvml)
    assert gpus.info == ()
    assert gpus.utilization() == ()
    gpus.close()


def test_a_gpu_that_cannot_be_read_counts_as_idle() -> None:
    gpus = Gpus(FakeNvml([("a", 1 << 30, 50), ("b", 1 << 30, 60)], broken="utilization"))
    assert gpus.utilization() == (50.0, 0.0)


def test_this_machine_is_described_without_failing() -> None:
    """The real probe: here there is no NVIDIA driver, so no GPUs and the CPU provider."""
    gpus = Gpus()
    caps = capabilities(gpus)
    gpus.close()
    assert caps.cpu_count >= 1 and caps.memory_mb > 0
    assert "CPUExecutionProvider" in caps.providers
    assert len(caps.gpus) == len(gpus.info)
