"""Developer tools run from a checkout: `python -m tools.train.X`, `python -m tools.bench.X`."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
"""The repository root (the tools run from a checkout, never from an installed package)."""
