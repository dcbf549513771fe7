"""PNG figures for the benchmarks' `--plot DIR` (matplotlib, from the `bench` extra).

matplotlib is imported inside the functions, with the Agg backend, so a benchmark
run without `--plot` never needs it. A benchmark calls `plot_dir(args.plot)`
before its run, so a missing matplotlib stops it at once with one line, not after
minutes of measuring.

    parser.add_argument("--plot", type=Path, metavar="DIR", help=PLOT_HELP)
    ...
    out = plot_dir(args.plot)          # None when not plotting
    ...
    if out:
        cdf(out / "overhead_latency_cdf.png", {"direct": ms, ...}, xlabel="latency (ms)", title=...)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MISSING = "--plot needs matplotlib: pip install '.[bench]'"
PLOT_HELP = "write PNG figures into DIR (needs matplotlib: pip install '.[bench]')"
# A figure spans decades when its largest value is this many times its smallest.
LOG_SPAN = 50.0


def plot_dir(directory: Path | None) -> Path | None:
    """None when not plotting; else check matplotlib is there and make `directory`."""
    if directory is None:
        return None
    _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def cdf(
    path: Path,
    series: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    title: str,
    log_x: bool | None = None,
) -> Path:
    """One empirical CDF per series. `log_x=None`: log scale when the values span decades."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = [v for samples in series.values() for v in samples]
    for label, samples in series.items():
        ordered = sorted(samples)
        if not ordered:
            continue
        fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
        ax.step(ordered, fractions, where="post", label=f"{label} (n={len(ordered)})")
    if log_x if log_x is not None else _spans_decades(values):
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of samples at or below")
    ax.set_ylim(0, 1.02)
    return _save(fig, ax, path, title)


def lines(
    path: Path,
    x: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    upper: Mapping[str, Sequence[float | None]] | None = None,
    log_y: bool | None = None,
    dodge: bool = False,
) -> Path:
    """One line per series over `x`; a None value is a missing point (e.g. a timeout).

    `upper` gives, per series, a higher figure at each x (a p99 beside a p50), drawn
    as a dashed line in the series' colour.
    `log_y=None`: log scale when the values span decades. `dodge` shifts each series a
    little sideways, so points of different series at one x do not hide each other.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    upper = upper or {}
    values: list[float] = []
    step = 0.025 * ((max(x) - min(x)) or max(abs(x[0]), 1.0)) if dodge and x else 0.0
    for i, (label, ys) in enumerate(series.items()):
        highs = upper.get(label, [None] * len(x))
        shift = (i - (len(series) - 1) / 2) * step
        kept = [(xi + shift, y, h) for xi, y, h in zip(x, ys, highs, strict=True) if y is not None]
        if not kept:
            continue
        xs = [xi for xi, _, _ in kept]
        mids = [y for _, y, _ in kept]
        tops = [y if h is None else h for _, y, h in kept]
        values += mids + tops
        (line,) = ax.plot(xs, mids, marker="o", label=label)
        if label in upper:
            ax.plot(xs, tops, "--_", linewidth=1, markersize=12, color=line.get_color())
    if log_y if log_y is not None else _spans_decades(values):
        ax.set_yscale("log")
    ax.set_xticks(list(x))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _save(fig, ax, path, title)


def timeline(
    path: Path,
    points: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    events: Mapping[str, float],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    log_y: bool | None = None,
) -> Path:
    """A scatter of (time, value) per series, with a labelled vertical line per event."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    values: list[float] = []
    for label, (ts, ys) in points.items():
        if len(ts):
            ax.scatter(ts, ys, s=8, alpha=0.6, label=f"{label} (n={len(ts)})")
            values += ys
    if log_y if log_y is not None else _spans_decades(values):
        ax.set_yscale("log")
    # Events are named along the top edge, outside the data, where no point hides them.
    marks = sorted(events.items(), key=lambda e: e[1])
    for _, at in marks:
        ax.axvline(at, color="black", linestyle="--", linewidth=1)
    top = ax.secondary_xaxis("top")
    top.set_xticks([at for _, at in marks], labels=[f"{name} {at:.1f}s" for name, at in marks])
    for label in top.get_xticklabels():
        label.update({"rotation": 30, "ha": "left", "rotation_mode": "anchor", "fontsize": 9})
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    # Below the axes: the scatter can fill every corner inside them.
    return _save(fig, ax, path, title, legend_below=True)


def _spans_decades(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) >= LOG_SPAN


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, ax: Any, path: Path, title: str, legend_below: bool = False) -> Path:
    from matplotlib.ticker import FuncFormatter

    # Log axes read 0.1, 1, 10 rather than 10^-1, 10^0, 10^1.
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":
            axis.set_major_formatter(plain)
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    if handles and legend_below:
        ax.legend(
            fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(3, len(handles))
        )
    elif handles:
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)  # pyplot keeps every figure alive until it is closed
    return path
