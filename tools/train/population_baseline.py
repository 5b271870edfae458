"""Population baseline of the acoustic descriptors: mean and std of each eGeMAPS functional
over RAVDESS and EmoDB (all speakers, all emotions), the fallback before a stream has its own.

    .venv/bin/python -m tools.train.population_baseline [--limit N]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import soundfile

from stream_ser.acoustics import CUES, DESCRIPTOR_SPECS, analyse_functionals

DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"


def clips(limit: int | None) -> list[Path]:
    """Every clip of both corpora (every k-th one when `limit` is given)."""
    paths = []
    for corpus in ("ravdess", "emodb"):
        with open(DATASETS / corpus / "manifest.csv", newline="") as manifest:
            paths += [DATASETS / corpus / row["path"] for row in csv.DictReader(manifest)]
    step = max(1, len(paths) // limit) if limit else 1
    return paths[::step]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=None, help="use about this many clips")
    args = parser.parse_args()
    specs = {spec.feature: spec for spec in (*CUES, *DESCRIPTOR_SPECS)}
    values: dict[str, list[float]] = {feature: [] for feature in specs}
    paths = clips(args.limit)
    for path in paths:
        audio, rate = soundfile.read(path, dtype="float32")
        functionals = analyse_functionals(audio, rate)
        for feature, spec in specs.items():
            if functionals.voiced or not spec.needs_voice:
                values[feature].append(functionals.values[feature])
    print(f"{len(paths)} clips")
    print(f"{'feature':<45} {'mean':>10} {'std':>10} {'n':>6}")
    for feature, found in values.items():
        print(f"{feature:<45} {np.mean(found):>10.4g} {np.std(found):>10.4g} {len(found):>6}")


if __name__ == "__main__":
    main()
