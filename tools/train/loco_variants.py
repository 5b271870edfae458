"""LOCO of recipe variants that tools/train/train_multi.py has no setting for (exploration only).

Usage (repository root; the feature caches of train_multi.py, plus the ones a variant names):

    .venv/bin/python -m tools.train.loco_variants tools/train/configs/multi.toml NAME \
        [--clip Z] [--dual] [--blocked-orders N] [--copies 0.9,1.1] [--add-tiny] [--set K=V ...]

Each variant changes how train_multi.py's recipe builds the head's input; everything else (the
corpora, masked loss, weights, adaptation card, LOCO folds, scores) is train_multi.py's own:
- `--clip Z`: the normalised embedding clipped to [-Z, Z] (training and scoring);
- `--dual`: the population-normalised embedding appended to the adapted one (the head sees both);
- `--blocked-orders N`: N emotion-blocked replays of every training speaker added to the
  `train_orders` mixed ones;
- `--copies`: speed-perturbed copies of the training clips (cached `whisper_speech@<copy>` and
  `logmel_speech@<copy>` of tools/train/strong_features.py), each copy of a speaker its own
  stream; tiny.en features only;
- `--add-tiny`: the tiny.en layer pools (no log-mel) appended to the configured encoder's
  embedding (with `features.encoder="base"`: both encoders side by side).

Prints train_multi.py's table and writes `<runs_dir>/variant-NAME.json` and `.npz`. None of these
variants is exportable; they decide whether one is worth building (models/default/README.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tools.train import train_multi as tm
from tools.train import train_strong as ts
from tools.train.strong_features import SPEECH_DB, cached_features

TINY_POOLS = {"encoder": "tiny.en", "whisper_layers": [0, 1, 2, 3], "logmel_stats": False,
              "pooling": "speech", "speech_db": SPEECH_DB}  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """How the head's input differs from train_multi.py's recipe."""

    clip: float | None = None
    dual: bool = False
    blocked_orders: int = 0
    copies: tuple[np.ndarray, ...] = ()  # augmented copies of every clip (NaN: none)

    def head_input(self, adapted: np.ndarray, population: np.ndarray) -> np.ndarray:
        """The head's input from the adapted and the population-normalised embeddings."""
        parts = [adapted, population] if self.dual else [adapted]
        if self.clip is not None:
            parts = [np.clip(part, -self.clip, self.clip) for part in parts]
        return np.concatenate(parts, axis=1)


def train_recipe(
    variant: Variant, config: dict[str, Any], x: np.ndarray, data: ts.Data, rows: np.ndarray
) -> tm.Fitted:
    """train_multi.train_recipe with the variant's head input, copies and blocked replays."""
    labels, adapt = config["labels"], config["adaptation"]
    y, speakers, corpora = data.labels()[rows], data.speakers()[rows], data.corpora()[rows]
    card = tm.make_card(x[rows], adapt, tm.adapt_weights(x[rows], speakers, y,
                                                         adapt["adapt_fraction"]))  # fmt: skip
    xs, ys, ss = ts.with_copies(x, list(variant.copies), data.labels(), data.speakers(), rows)
    cs = np.tile(corpora, len(variant.copies) + 1)
    present = np.isfinite(xs).all(axis=1)  # corpora without copies have NaN rows there
    xs, ys, ss, cs = xs[present], ys[present], ss[present], cs[present]
    rng = np.random.default_rng(config["seed"])
    orders = [rng.permutation(len(ys)) for _ in range(adapt["train_orders"])]
    orders += [tm.blocked_order(ys, ss, config["seed"] + 100 + k)
               for k in range(variant.blocked_orders)]  # fmt: skip
    population = ts.global_normalise(xs, card)
    inputs = [variant.head_input(ts.causal_normalise(xs, ss, order, card), population)
              for order in orders]  # fmt: skip
    covers = tm.corpus_labels(data, labels)
    mask = tm.label_mask(cs, covers, labels) & np.isin(labels, sorted(set(ys)))[None]
    weights = tm.sample_weights(ys, cs, config["training"]["corpus_weighting"])
    n = len(orders)
    head = tm.fit_masked(
        np.concatenate(inputs), np.tile(ys, n), np.tile(mask, (n, 1)), np.tile(weights, n),
        labels, config["head"]["c"],
    )  # fmt: skip
    return tm.Fitted(head, card)


def predict(
    variant: Variant, fitted: tm.Fitted, x: np.ndarray, speakers: np.ndarray, order: np.ndarray,
    allowed: list[str],
) -> np.ndarray:  # fmt: skip
    """train_multi.predict with the variant's head input."""
    adapted = ts.causal_normalise(x, speakers, order, fitted.card)
    logits = fitted.head.logits(variant.head_input(adapted, ts.global_normalise(x, fitted.card)))
    return logits[:, [list(fitted.head.classes_).index(label) for label in allowed]]


def copies_of(
    config: dict[str, Any], data: ts.Data, names: list[str], width: int
) -> tuple[np.ndarray, ...]:
    """Each named augmented copy of every clip; NaN rows for corpora not trained on."""
    root, cache = ts.resolve(config["data"]["root"]), ts.resolve(config["cache_dir"])
    copies = []
    for name in names:
        parts = []
        for corpus in config["data"]["corpora"]:
            inside = data.corpora() == corpus
            if corpus not in config["training"]["corpora"]:
                parts.append(np.full((int(inside.sum()), width), np.nan))
                continue
            kinds = ts.feature_parts(config["features"], name)
            features = {part.partition(":")[0]: cached_features(root, corpus,
                        part.partition(":")[0], cache) for part in kinds}  # fmt: skip
            rows = [r for r in data.rows if r.corpus == corpus]
            parts.append(ts.embedding(ts.Data(rows, features, data.split, data.order), kinds))
        copies.append(np.concatenate(parts))
    return tuple(copies)


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("name")
    parser.add_argument("--clip", type=float)
    parser.add_argument("--dual", action="store_true")
    parser.add_argument("--blocked-orders", type=int, default=0)
    parser.add_argument("--copies", default="", help="comma-separated copy names, e.g. 0.9,1.1")
    parser.add_argument("--add-tiny", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    config = tm.override(tomllib.loads(Path(args.config).read_text()), args.set)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    data = tm.load(config)
    x = ts.embedding(data, ts.feature_parts(config["features"]))
    if args.add_tiny:
        root, cache = ts.resolve(config["data"]["root"]), ts.resolve(config["cache_dir"])
        data.features["whisper_speech"] = np.concatenate([
            cached_features(root, corpus, "whisper_speech", cache)
            for corpus in config["data"]["corpora"]
        ])  # fmt: skip
        x = np.concatenate([x, ts.embedding(data, ts.feature_parts(TINY_POOLS))], axis=1)
    copies = copies_of(config, data, [c for c in args.copies.split(",") if c], x.shape[1])
    variant = Variant(args.clip, args.dual, args.blocked_orders, copies)
    tm.train_recipe = lambda *a: train_recipe(variant, *a)  # what tm.loco and tm.within call
    tm.predict = lambda *a: predict(variant, *a)
    _, within_results = tm.within(config, data, x)
    loco_results = tm.loco(config, data, x)
    result = tm.report(loco_results, within_results) | {"config": config, "argv": argv or sys.argv}
    runs = ts.resolve(config["runs_dir"])
    runs.mkdir(parents=True, exist_ok=True)
    tm.save_logits(runs / f"variant-{args.name}.npz", loco_results, within_results)
    (runs / f"variant-{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    tm.print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
