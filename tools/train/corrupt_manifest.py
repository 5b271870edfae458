"""Write a degraded copy of a labelled manifest's clips (noise, reverberation, gain) for
`stream-ser eval`: how a model holds up away from clean studio audio.

Usage (repository root; `tools/train/train_strong.py`'s requirements):

    .venv/bin/python -m tools.train.corrupt_manifest runs/strong/manifests/ravdess-test.csv \\
        --root ../shared/datasets/ravdess --noise-snr-db 10 runs/degraded/ravdess-snr10
    stream-ser eval runs/degraded/ravdess-snr10/manifest.csv --json

Each clip gets the gain, then the room (reverberation), then the noise; the random parts (noise,
room response) are seeded, so a run is reproducible. The output manifest keeps every column,
in order, with `path` pointing at the new FLAC file (relative to the output folder). The clips
are derived audio of the corpus: keep them out of git (the runs/ folder is ignored).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import soundfile

from tools.train.strong_features import AudioTransform, gain, noise, reverb

RATE = 16000


def transforms(args: argparse.Namespace) -> list[AudioTransform]:
    """The degradations asked for, in the order they are applied."""
    chosen = []
    if args.gain_db is not None:
        chosen.append(gain(args.gain_db, args.gain_db))
    if args.reverb_rt60_s is not None:
        chosen.append(reverb(args.reverb_rt60_s, args.reverb_rt60_s))
    if args.noise_snr_db is not None:
        chosen.append(noise(args.noise_snr_db, args.noise_snr_db))
    return chosen


def corrupt(
    manifest: Path, root: Path, output: Path, steps: list[AudioTransform], seed: int
) -> int:
    """Degrade every clip of `manifest` into `output`; returns the number of clips."""
    with manifest.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns, rows = reader.fieldnames or [], list(reader)
    if "path" not in columns:
        raise SystemExit(f"{manifest}: no 'path' column")
    rng = np.random.default_rng(seed)
    output.mkdir(parents=True, exist_ok=True)
    for row in rows:
        source = root / row["path"]
        audio, rate = soundfile.read(source, dtype="float32", always_2d=True)
        if rate != RATE:
            raise SystemExit(f"{source}: {rate} Hz; this tool needs {RATE} Hz clips")
        clip = audio.mean(axis=1).astype(np.float64)
        for step in steps:
            clip = step(clip, rng)
        target = Path(row["path"]).with_suffix(".flac")
        (output / target).parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(output / target, np.clip(clip, -1.0, 1.0), RATE, subtype="PCM_16")
        row["path"] = target.as_posix()
    with (output / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("output", type=Path, help="folder for the clips and manifest.csv")
    parser.add_argument("--root", type=Path, help="clip paths are relative to this folder "
                        "(default: the manifest's folder)")  # fmt: skip
    parser.add_argument("--noise-snr-db", type=float, help="white noise at this SNR")
    parser.add_argument("--reverb-rt60-s", type=float, help="a synthetic room with this RT60")
    parser.add_argument("--gain-db", type=float, help="louder (+) or quieter (-)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = transforms(args)
    if not steps:
        parser.error("give at least one of --noise-snr-db, --reverb-rt60-s, --gain-db")
    root = args.root or args.manifest.parent
    count = corrupt(args.manifest, root, args.output, steps, args.seed)
    print(f"{count} clip(s) written to {args.output}; manifest {args.output / 'manifest.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
