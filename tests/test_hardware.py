"""GPU discovery through NVML degrades to "no GPUs"; tested with a fake NVML module.
The CPU meter never reads a window too short to mean anything; tested with fake counters."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from gossip import GpuInfo
from p2p_node._hardware import CpuMeter, Gpus, capabilities, cpu_busy_and_total


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


def counters(*readings: tuple[float, float]) -> Iterator[tuple[float, float]]:
    """(busy, total) CPU seconds since boot, all cores together, one per read."""
    yield from readings


@pytest.mark.parametrize(
    ("readings", "expected"),
    [
        # Primed at (1000, 4000): 25% busy since boot. 10 ms later only busy ticks
        # moved (the reader's own): psutil's first reading, over that instant, was 100%.
        pytest.param([(1000, 4000), (1000.01, 4000.01)], [25.0], id="first-read-at-once"),
        # 2 cores: a window of 0.5 s wall time is 1 CPU second.
        pytest.param([(1000, 4000), (1000.75, 4001.0)], [75.0], id="first-window-counts"),
        pytest.param(
            [(1000, 4000), (1001.5, 4002.0), (1001.51, 4002.01), (1001.6, 4003.0)],
            [75.0, 75.0, 10.0],
            id="short-windows-repeat-the-last-reading",
        ),
        pytest.param([(1000, 4000), (1001, 4001), (1001, 4001)], [100.0, 100.0], id="busy"),
        pytest.param([(1000, 4000), (1000, 4001)], [0.0], id="idle"),
        pytest.param([(1000, 4000), (10, 40), (11, 41.5)], [25.0, 66.7], id="counters-went-back"),
        pytest.param([(0, 0), (0, 0)], [0.0], id="no-time-at-all"),
    ],
)
def test_the_cpu_meter_reads_only_windows_long_enough(
    readings: list[tuple[float, float]], expected: list[float]
) -> None:
    source = counters(*readings)
    meter = CpuMeter(lambda: next(source), cpus=2, min_window_s=0.5)
    assert [meter.percent() for _ in expected] == expected


def test_the_real_cpu_meter_starts_from_the_average_since_boot() -> None:
    busy, total = cpu_busy_and_total()
    meter = CpuMeter(min_window_s=60.0)
    readings = {meter.percent() for _ in range(50)}
    (reading,) = readings  # no window of 60 s yet: the same reading every time
    assert reading == pytest.approx(100 * busy / total, abs=0.5)
    assert 0.0 <= reading < 100.0
