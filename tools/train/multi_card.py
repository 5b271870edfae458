"""`stream-ser eval` figures of a multi-corpus model on every corpus's test speakers.

Usage (repository root, after tools/train/train_multi.py wrote the manifests and the model):

    .venv/bin/python -m tools.train.multi_card tools/train/configs/multi.toml \
        runs/multi/model OUT.json

Runs `stream-ser eval --json` once per (order, adaptation): the test manifests of all corpora
together (one corpus each, reported per corpus), in manifest (seeded mixed) and blocked order,
with and without speaker adaptation, and writes every report to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNS = (("manifest", "stream"), ("blocked", "stream"), ("manifest", "none"))


def evaluate(manifests: list[Path], model: Path, order: str, adapt: str) -> dict[str, Any]:
    """The `stream-ser eval --json` report over `manifests`."""
    command = [
        sys.executable, "-m", "stream_ser", "eval", *map(str, manifests), "--model", str(model),
        "--order", order, "--adapt", adapt, "--json", "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)}: {done.stderr.strip()}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    config = tomllib.loads(Path(args.config).read_text())
    root = (REPO_ROOT / config["data"]["root"]).resolve()
    folder = REPO_ROOT / config["runs_dir"] / "manifests"
    manifests = []
    for corpus in config["data"]["corpora"]:  # paths rewritten relative to the manifest
        source = folder / f"{corpus}-test.csv"
        target = folder / "eval" / corpus / f"{corpus}.csv"
        target.parent.mkdir(parents=True, exist_ok=True)
        lines = source.read_text().splitlines()
        rows = [f"{root / corpus}/{line}" for line in lines[1:]]
        target.write_text("\n".join([lines[0], *rows]) + "\n")
        manifests.append(target)
    metrics = {f"{order}_{adapt}": evaluate(manifests, args.model, order, adapt)
               for order, adapt in RUNS}  # fmt: skip
    args.out.write_text(json.dumps(metrics, indent=1) + "\n")
    for name, report in metrics.items():
        per_corpus = report["corpora"]
        cells = "  ".join(f"{c} {r['uar']:.3f}/{r['ece']:.3f}" for c, r in per_corpus.items())
        print(f"{name:<16} UAR/ECE  {cells}  mean {report['corpus_mean']['uar']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
