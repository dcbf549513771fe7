"""What selection learned, kept in the node's data dir so that it survives a restart."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

from selection import PerformanceTracker

logger = logging.getLogger(__name__)

TRACKER_FILE = "selection-tracker.msgpack"


def load_tracker(data_dir: Path) -> PerformanceTracker:
    """The saved tracker, or a fresh one. A file this version cannot read is moved
    aside (`.unreadable`) with a warning: learning restarts, the node still starts."""
    path = data_dir / TRACKER_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return PerformanceTracker()
    try:
        tracker = PerformanceTracker.from_bytes(data)
    except ValueError as error:
        aside = path.with_suffix(".unreadable")
        os.replace(path, aside)
        logger.warning("%s: %s; moved it to %s and starting afresh", path, error, aside.name)
        return PerformanceTracker()
    logger.info("loaded what selection learned: %d entries from %s", len(tracker), path)
    return tracker


def save_tracker(data_dir: Path, data: bytes) -> None:
    """Write `tracker.to_bytes()` atomically: a crash mid-save leaves the previous file."""
    path = data_dir / TRACKER_FILE
    temporary = path.with_suffix(".tmp")
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


async def save_periodically(data_dir: Path, tracker: PerformanceTracker, interval: float) -> None:
    """Save every `interval` seconds when something changed since the last save."""
    saved = tracker.to_bytes()
    while True:
        await trio.sleep(interval)
        current = tracker.to_bytes()
        if current != saved:
            await trio.to_thread.run_sync(save_tracker, data_dir, current)
            saved = current
