"""bench._plot: the PNG helpers behind the benchmarks' `--plot DIR`.

matplotlib is in the `bench` extra, not the `test` one: the drawing tests skip
without it; the tests of running without it always run.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NEEDS_MATPLOTLIB = "matplotlib is in the bench extra: pip install '.[bench]'"


@pytest.fixture
def plot(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench._plot (bench is a directory of scripts, not an installed package)."""
    monkeypatch.syspath_prepend(str(ROOT))
    import bench._plot

    return bench._plot


@pytest.fixture
def drawing(plot: ModuleType) -> ModuleType:
    pytest.importorskip("matplotlib", reason=NEEDS_MATPLOTLIB)
    return plot


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header, after checking it is one."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_cdf_writes_a_png_with_one_curve_per_series(drawing: ModuleType, tmp_path: Path) -> None:
    path = drawing.cdf(
        tmp_path / "cdf.png",
        {"direct": [0.02, 0.03, 0.05], "forwarded": [4.0, 5.5, 9.0, 30.0], "none": []},
        xlabel="latency (ms)",
        title="t",
    )
    assert path == tmp_path / "cdf.png"
    assert png_size(path) == (700, 450)


def test_lines_draws_around_missing_points(drawing: ModuleType, tmp_path: Path) -> None:
    path = drawing.lines(
        tmp_path / "lines.png",
        [10, 30, 60],
        {"converge": [0.3, 0.9, None], "kill": [0.3, None, 0.8]},
        upper={"kill": [0.5, None, None]},
        dodge=True,
        xlabel="N",
        ylabel="s",
        title="t",
    )
    assert png_size(path) == (700, 450)


def test_lines_writes_a_figure_when_every_point_is_missing(
    drawing: ModuleType, tmp_path: Path
) -> None:
    # A gossip run whose every step timed out still gets its (empty) figure.
    path = drawing.lines(
        tmp_path / "empty.png", [10], {"converge": [None]}, xlabel="N", ylabel="s", title="t"
    )
    assert png_size(path) == (700, 450)


def test_timeline_writes_points_and_event_markers(drawing: ModuleType, tmp_path: Path) -> None:
    path = drawing.timeline(
        tmp_path / "timeline.png",
        {"node 0": ([0.1, 1.0, 2.0], [12.0, 9000.0, 15.0]), "node 1": ([], [])},
        {"kill": 0.5, "stop": 0.6, "restart": 1.5},
        xlabel="s",
        ylabel="ms",
        title="t",
    )
    assert png_size(path) == (900, 500)


@pytest.mark.parametrize(
    ("values", "log"),
    [
        pytest.param([0.02, 30.0], True, id="three-decades"),
        pytest.param([1.0, 49.0], False, id="under-the-span"),
        pytest.param([0.0, -1.0, 2.0], False, id="one-positive-value"),
        pytest.param([], False, id="no-values"),
    ],
)
def test_log_scale_only_when_values_span_decades(
    plot: ModuleType, values: list[float], log: bool
) -> None:
    assert plot._spans_decades(values) is log


def test_without_matplotlib_plot_dir_stops_with_one_line_and_makes_nothing(
    plot: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert plot.plot_dir(None) is None  # not plotting needs no matplotlib
    with pytest.raises(SystemExit) as stopped:
        plot.plot_dir(tmp_path / "figures")
    message = str(stopped.value.code)
    assert "\n" not in message and "pip install '.[bench]'" in message
    assert not (tmp_path / "figures").exists()


@pytest.mark.parametrize("module", ["bench.overhead", "bench.gossip", "bench.chaos"])
def test_a_benchmark_given_plot_without_matplotlib_stops_before_it_runs(
    module: str, tmp_path: Path
) -> None:
    # Importing the benchmark must not need matplotlib; --plot must fail at once.
    script = (
        "import runpy, sys\n"
        "sys.modules['matplotlib'] = None\n"
        f"sys.argv = [{module!r}, '--plot', {str(tmp_path / 'out')!r}]\n"
        f"runpy.run_module({module!r}, run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == ["--plot needs matplotlib: pip install '.[bench]'"]
    assert done.stdout == ""
    assert not (tmp_path / "out").exists()
