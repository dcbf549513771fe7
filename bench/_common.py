"""What several benchmarks share: the bundled held-out data, and a process's CPU time."""

from __future__ import annotations

import numpy as np
import psutil

from p2p_node import bundled_models_dir

HELDOUT = {"digits": "digits.npz", "cancer": "cancer.npz"}  # by a model id's first word


def heldout_rows(model_id: str) -> np.ndarray:
    """The held-out rows of the data set `model_id` (digits-mlp: digits) was trained on."""
    data = np.load(bundled_models_dir() / "heldout" / HELDOUT[model_id.split("-")[0]])
    rows: np.ndarray = data["x"]
    return rows


def cpu_seconds(pid: int) -> float:
    """Process `pid`'s CPU time so far, user and system, every thread, in s."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)
