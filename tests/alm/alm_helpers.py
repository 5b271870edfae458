"""Helpers shared by the ALM tests ."""

from __future__ import annotations

import numpy as np

LABELS = ("neutral", "happy", "sad", "angry")
RATE = 16000


def noise(seconds: float, seed: int, level: float = 0.1) -> np.ndarray:
    """White noise, float32 at 16 kHz."""
    rng = np.random.default_rng(seed)
    return (level * rng.standard_normal(int(seconds * RATE))).astype(np.float32)
