"""Train every model a specialist's card reports on and write its `metrics.json`.

Usage (repository root; `tools/train/train_strong.py`'s requirements):

    .venv/bin/python -m tools.train.card_metrics tools/train/configs/strong.toml runs/strong-card

Trains the model (int8 and float32) and the two cross-corpus models (`--without` each corpus),
then runs `stream-ser eval --json` on the held-out test speakers (with and without speaker
adaptation) and on the whole other corpus (6 shared classes), and writes every report to
`<folder>/metrics.json`, keyed as in the model card. About 20 minutes on 2 cores once the
feature cache is filled.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

from tools.train import train_strong

REPO_ROOT = Path(__file__).resolve().parents[2]
EVAL = [str(Path(sys.executable).with_name("stream-ser")), "eval", "--json", "--no-progress"]


def train(config: str, output: Path, *flags: str) -> Path:
    """One training run of tools/train/train_strong.py into `output`."""
    if train_strong.main([config, "--output-dir", str(output), *flags]) != 0:
        raise SystemExit(f"training into {output} failed")
    return output


def evaluate(manifest: Path, root: Path, model: Path, adapt: str) -> dict[str, object]:
    """The `stream-ser eval --json` report of `model` on `manifest`."""
    command = [*EVAL, str(manifest), "--root", str(root), "--model", str(model), "--adapt", adapt]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)}: {done.stderr.strip()}")
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    config = tomllib.loads(Path(args.config).read_text())
    data = train_strong.resolve(config["data"]["root"])
    manifests = train_strong.resolve(config["runs_dir"]) / "manifests"
    folder = args.folder.resolve()
    models = {
        "int8": train(args.config, folder / "model"),
        "float32": train(args.config, folder / "float32", "--float32"),
    }
    for corpus in train_strong.CORPORA:
        models[f"without-{corpus}"] = train(
            args.config, folder / f"without-{corpus}", "--without", corpus
        )
    metrics = {}
    for corpus in train_strong.CORPORA:
        test = manifests / f"{corpus}-test.csv"
        for adapt in ("stream", "none"):
            metrics[f"{corpus}_test_{adapt}"] = evaluate(test, data / corpus, models["int8"], adapt)
        metrics[f"float32_{corpus}_test_stream"] = evaluate(
            test, data / corpus, models["float32"], "stream"
        )
        other = next(c for c in train_strong.CORPORA if c != corpus)
        for adapt in ("stream", "none"):
            metrics[f"cross_train_{other}_test_{corpus}_6class_{adapt}"] = evaluate(
                manifests / f"{corpus}-all-6class.csv", data / corpus,
                models[f"without-{corpus}"], adapt,
            )  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    for name, report in metrics.items():
        print(f"{name:<48} n {report['n']:>4}  UAR {report['uar']:.3f}  ECE {report['ece']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
