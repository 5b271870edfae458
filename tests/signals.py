"""Synthetic test signals (16 kHz float32)."""

from __future__ import annotations

import numpy as np

RATE = 16000


def silence(seconds: float) -> np.ndarray:
    """Digital silence."""
    return np.zeros(int(RATE * seconds), dtype=np.float32)


def buzz(seconds: float, f0_hz: float = 150.0, level: float = 0.1) -> np.ndarray:
    """A voice-like harmonic buzz: webrtcvad classifies it as speech."""
    t = np.arange(int(RATE * seconds)) / RATE
    wave = sum((np.sin(2 * np.pi * f0_hz * k * t) / k for k in range(1, 20)), np.zeros_like(t))
    return (level * wave).astype(np.float32)


def tone(seconds: float, hz: float = 220.0, level: float = 0.3) -> np.ndarray:
    """A pure sine tone."""
    t = np.arange(int(RATE * seconds)) / RATE
    return (level * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def noise(seconds: float, level: float = 0.1, seed: int = 0) -> np.ndarray:
    """White noise."""
    return (level * np.random.default_rng(seed).standard_normal(int(RATE * seconds))).astype(
        np.float32
    )
