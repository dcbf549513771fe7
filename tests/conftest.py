from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from p2p_node import bundled_models_dir

# Hypothesis profiles: "ci" (the default) keeps the suite fast on a shared machine;
# "long" is the fuzz run, `HYPOTHESIS_PROFILE=long pytest tests/test_fuzz.py`. Tests
# that set their own max_examples keep it in both.
settings.register_profile("ci", max_examples=100, deadline=None)
settings.register_profile(
    "long",
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits rows (float32 [N, 64]) and their labels."""
    data = np.load(bundled_models_dir() / "heldout" / "digits.npz")
    return data["x"], data["y"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding only the tiny test decoder (see tiny_decoder.py)."""
    from tiny_decoder import write_tiny_decoder

    models_dir = tmp_path_factory.mktemp("tiny-models")
    write_tiny_decoder(models_dir)
    return models_dir
