from __future__ import annotations

import numpy as np
import pytest

from p2p_node import bundled_models_dir


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits rows (float32 [N, 64]) and their labels."""
    data = np.load(bundled_models_dir() / "heldout" / "digits.npz")
    return data["x"], data["y"]
