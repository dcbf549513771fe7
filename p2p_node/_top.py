"""`p2p-node top`: a live view of the network as one node sees it.

Once per interval it asks the node for its view (the peers request), for
what it counts of itself (the stats request: its load, and per model the jobs
it coordinated with their p50/p99) and for its fetches, and redraws. Jobs/s come from the change
in the node's job counts between two samples.

Building a frame (`frame_of`) and drawing it (`render`, `frame_text`) are pure
functions of the samples; `run_top` is the thin loop around them, the only part
that touches the terminal: `q` or Ctrl-C quits, and the terminal is put back as
it was. Without a terminal it prints one frame, after one interval (so that
its jobs/s are measured), and returns.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
import termios
import time
import tty
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ._client import Client
from ._fetch import node_fetches
from ._manifest import Progress
from ._messages import ModelStats, PeerReport, StatsReply

DEFAULT_INTERVAL_S = 1.0
QUIT_KEYS = frozenset(b"qQ")
MB = 1 << 20


@dataclass(frozen=True, slots=True)
class Sample:
    """What a node said at one moment (`at`, on the caller's clock, in seconds)."""

    at: float
    stats: StatsReply
    peers: tuple[PeerReport, ...]
    fetches: tuple[Progress, ...] = ()  # what the node is fetching (`--fetch`)


@dataclass(frozen=True, slots=True)
class ModelRow:
    model_id: str
    jobs: int
    errors: int
    jobs_per_s: float | None  # None: no earlier sample to compare with
    p50_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True, slots=True)
class Frame:
    """One screen of `top`: values only."""

    peer_id: str
    in_flight: int
    queue_length: int
    serves: tuple[str, ...]
    peers: tuple[PeerReport, ...]
    models: tuple[ModelRow, ...]
    taken_at: float  # wall clock, for the header
    measured: bool  # an earlier sample gave the rates
    fetches: tuple[Progress, ...] = ()

    @property
    def jobs_per_s(self) -> float | None:
        """Jobs/s over every model, None until measured."""
        if not self.measured:
            return None
        return sum(m.jobs_per_s or 0.0 for m in self.models)


async def take_sample(client: Client) -> Sample:
    peers = await client.peers()
    stats = await client.stats()
    fetches = await node_fetches(client)
    return Sample(trio.current_time(), stats, peers, fetches)


def frame_of(
    sample: Sample, previous: Sample | None, serves: Sequence[str], *, taken_at: float
) -> Frame:
    """The frame of `sample`; rates from the change since `previous`, if given."""
    before: Mapping[str, ModelStats] = (
        {} if previous is None else {m.model_id: m for m in previous.stats.models}
    )
    elapsed = None if previous is None else sample.at - previous.at
    rows = []
    for model in sample.stats.models:
        rate = None
        if elapsed is not None and elapsed > 0:
            earlier = before.get(model.model_id)
            rate = (model.jobs - (earlier.jobs if earlier else 0)) / elapsed
        rows.append(
            ModelRow(model.model_id, model.jobs, model.errors, rate, model.p50_ms, model.p99_ms)
        )
    stats = sample.stats
    return Frame(
        stats.peer_id,
        stats.in_flight,
        stats.queue_length,
        tuple(serves),
        sample.peers,
        tuple(rows),
        taken_at,
        measured=elapsed is not None and elapsed > 0,
        fetches=sample.fetches,
    )


# --- drawing ------------------------------------------------------------------------


def short_id(peer_id: str) -> str:
    """`12D3KooW…x5YzAb`: every ed25519 peer id starts alike, so the end tells them apart."""
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:8]}…{peer_id[-6:]}"


def render(frame: Frame) -> RenderableType:
    """The frame as rich renderables: a header, the peers, the models."""
    alive = sum(1 for p in frame.peers if p.state == "alive")
    rate = frame.jobs_per_s
    header = Text.assemble(
        ("p2p-node top ", "bold"),
        f"{frame.peer_id}  ",
        f"{time.strftime('%H:%M:%S', time.localtime(frame.taken_at))}\n",
        f"this node: {frame.in_flight} running, {frame.queue_length} queued; "
        f"serves {', '.join(frame.serves) or 'nothing'}\n",
        f"{len(frame.peers)} peers ({alive} alive, {len(frame.peers) - alive} suspect); "
        f"{_rate(rate)} jobs/s coordinated here",
    )
    parts: list[RenderableType] = [header, _peers_table(frame.peers), _models_table(frame.models)]
    if frame.fetches:
        parts.append(_fetches_table(frame.fetches))
    return Group(*parts)


def _fetches_table(fetches: Sequence[Progress]) -> Table:
    table = Table(title="models this node fetches", title_justify="left", expand=False)
    table.add_column("model")
    table.add_column("state")
    for name in ("MiB", "of MiB", "peers"):
        table.add_column(name, justify="right")
    for p in fetches:
        total = f"{p.total_bytes / MB:.1f}" if p.total_bytes else "-"
        table.add_row(p.model_id, p.state, f"{p.done_bytes / MB:.1f}", total, str(p.peers))
    return table


def _peers_table(peers: Sequence[PeerReport]) -> Table:
    table = Table(title="peers", title_justify="left", expand=False)
    for name, justify in (
        ("peer", "left"),
        ("state", "left"),
        ("age", "right"),
        ("running", "right"),
        ("queued", "right"),
        ("cpu", "right"),
        ("models (* on disk)", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for report in peers:
        record = report.record
        models = ", ".join(m.descriptor.id + ("" if m.loaded else "*") for m in record.models)
        table.add_row(
            short_id(record.peer_id),
            Text(report.state, style="green" if report.state == "alive" else "yellow"),
            f"{report.age_s:.1f}s",
            str(record.load.in_flight),
            str(record.load.queue_length),
            f"{record.load.cpu_percent:.0f}%",
            models or "-",
        )
    if not peers:
        table.add_row("(no peers known)", "", "", "", "", "", "")
    return table


def _models_table(models: Sequence[ModelRow]) -> Table:
    table = Table(title="jobs coordinated by this node", title_justify="left", expand=False)
    table.add_column("model")
    for name in ("jobs", "errors", "jobs/s", "p50 ms", "p99 ms"):
        table.add_column(name, justify="right")
    for m in models:
        table.add_row(
            m.model_id,
            str(m.jobs),
            str(m.errors),
            _rate(m.jobs_per_s),
            _ms(m.p50_ms),
            _ms(m.p99_ms),
        )
    if not models:
        table.add_row("(no jobs yet)", "", "", "", "", "")
    return table


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def frame_text(frame: Frame, width: int = 100) -> str:
    """The frame as plain text, `width` columns wide (no colours, no escapes)."""
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, force_terminal=False)
    console.print(render(frame))
    return out.getvalue()


# --- the terminal --------------------------------------------------------------------


async def run_top(client: Client, *, interval: float = DEFAULT_INTERVAL_S) -> None:
    """Show the node `client` is connected to until `q` or Ctrl-C; without a
    terminal on stdout, print one frame and return."""
    serves = tuple(m.id for m in await client.models())
    first = await take_sample(client)
    if not sys.stdout.isatty():
        await trio.sleep_until(first.at + interval)
        sample = await take_sample(client)
        frame = frame_of(sample, first, serves, taken_at=time.time())
        sys.stdout.write(frame_text(frame, shutil.get_terminal_size((100, 24)).columns))
        return
    console = Console()
    with _keys_unbuffered(sys.stdin) as keys, trio.open_signal_receiver(signal.SIGINT) as sigint:
        with Live(console=console, screen=True, auto_refresh=False) as live:
            async with trio.open_nursery() as nursery:
                if keys is not None:
                    nursery.start_soon(_quit_on_key, keys, nursery.cancel_scope)
                nursery.start_soon(_quit_on_signal, sigint, nursery.cancel_scope)
                previous = first
                live.update(render(frame_of(first, None, serves, taken_at=time.time())))
                live.refresh()
                while True:
                    await trio.sleep_until(previous.at + interval)
                    sample = await take_sample(client)
                    frame = frame_of(sample, previous, serves, taken_at=time.time())
                    live.update(render(frame), refresh=True)
                    previous = sample


@contextmanager
def _keys_unbuffered(stream: TextIO) -> Iterator[int | None]:
    """`stream`'s fd in cbreak mode (each key as it is typed, no echo; Ctrl-C still
    signals), put back as it was on exit; None if it is no terminal."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        yield None
        return
    if not os.isatty(fd):
        yield None
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _quit_on_key(fd: int, scope: trio.CancelScope) -> None:
    """Cancel `scope` on `q` (or when the terminal goes away). The fd stays blocking:
    it is read only once trio says a key is there."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        typed = os.read(fd, 64)
        if not typed or QUIT_KEYS & set(typed):
            scope.cancel()
            return


async def _quit_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return
