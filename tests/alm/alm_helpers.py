"""Helpers shared by the ALM tests (importable: tests/alm is on sys.path under pytest)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

LABELS = ("neutral", "happy", "sad", "angry")
RATE = 16000
TOOLS = Path(__file__).resolve().parents[2] / "tools"


def noise(seconds: float, seed: int, level: float = 0.1) -> np.ndarray:
    """White noise, float32 at 16 kHz."""
    rng = np.random.default_rng(seed)
    return (level * rng.standard_normal(int(seconds * RATE))).astype(np.float32)


def tool(name: str) -> ModuleType:
    """Import a module from tools/ (the tiny-model builder, the fake server) once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
