"""Run-time adaptation rules for the blocked-order gap, chosen by LOCO on training speakers.

Usage (repository root; the requirements of tools/train/train_multi.py, no feature cache):

    .venv/bin/python -m tools.train.adapt_offsets extract tools/train/configs/multi.toml
    .venv/bin/python -m tools.train.adapt_offsets search tools/train/configs/multi.toml
    .venv/bin/python -m tools.train.adapt_offsets card tools/train/configs/multi.toml \
        models/default --offset-scale 0.5 --prior-weight 3

`extract`: the model's own `embedding` output (int8 ONNX, population baseline) for every clip
of the training corpora's NON-test speakers ([data.test_speakers] are never read), cached in
`<runs_dir>/adapt/<corpus>.npz`. `search`: for each training corpus, the recipe of
train_multi.py trained on the other corpora and replayed on this corpus through
`stream_ser.adaptation.StreamBaseline` under each candidate rule (prior weight, emotion
offsets and their scale), in 3 seeded mixed and 3 blocked orders; UAR on the LOCO labels,
the mean over corpora. `card`: writes the chosen rule into a model directory's card.json,
with the emotion offsets computed from all training corpora's non-test speakers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from stream_ser.adaptation import StreamBaseline
from stream_ser.evaluate import confusion_matrix, load_audio, unweighted_average_recall
from stream_ser.specialist import AdaptationCard, Specialist
from tools.train import train_multi as tm
from tools.train import train_strong as ts
from tools.train.strong_features import Row, read_corpus

SEEDS = (0, 1, 2)
TEMPERATURE = 2.8  # the bundled model's (LOCO-fitted) temperature; the search's heads use it
RULES = [  # (prior_weight, offset_scale); offset_scale 0: no emotion offsets
    (1.5, 0.0), (3.0, 0.0), (5.0, 0.0), (10.0, 0.0),
    (1.5, 0.25), (3.0, 0.25), (5.0, 0.25),
    (1.5, 0.5), (3.0, 0.5), (5.0, 0.5),
    (1.5, 0.75), (3.0, 0.75), (1.5, 1.0),
]  # fmt: skip


def cache_path(config: dict[str, Any], corpus: str) -> Path:
    """Where `extract` keeps a corpus's embeddings."""
    return ts.resolve(config["runs_dir"]) / "adapt" / f"{corpus}.npz"


def training_rows(config: dict[str, Any], corpus: str) -> list[Row]:
    """The corpus's clips of non-test speakers."""
    test = set(config["data"]["test_speakers"].get(corpus, []))
    rows = read_corpus(ts.resolve(config["data"]["root"]), corpus)
    return [row for row in rows if row.speaker.split(":", 1)[1] not in test]


def extract(config: dict[str, Any], model: Path) -> None:
    """Cache the model's embeddings of every training corpus's non-test clips."""
    specialist = Specialist(model)
    root = ts.resolve(config["data"]["root"])
    for corpus in config["training"]["corpora"]:
        rows = training_rows(config, corpus)
        x = np.stack([
            specialist.analyze([load_audio(root / corpus / row.path)])[1][0]  # type: ignore[index]
            for row in rows
        ])  # fmt: skip
        path = cache_path(config, corpus)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=x, rows=np.array([[r.path, r.label, r.speaker] for r in rows]))
        print(f"{corpus}: {len(rows)} clips -> {path}", flush=True)


def load(config: dict[str, Any]) -> tuple[np.ndarray, ts.Data]:
    """The cached embeddings (float64) and their rows, all 'train'."""
    xs, rows = [], []
    for corpus in config["training"]["corpora"]:
        cached = np.load(cache_path(config, corpus))
        xs.append(cached["x"].astype(np.float64))
        rows += [Row(corpus, str(p), str(lb), str(s)) for p, lb, s in cached["rows"]]
    order = np.argsort(np.random.default_rng(config["seed"]).permutation(len(rows)))
    return np.concatenate(xs), ts.Data(rows, {}, np.array(["train"] * len(rows)), order)


def emotion_offsets(
    x: np.ndarray, y: np.ndarray, speakers: np.ndarray, labels: list[str]
) -> np.ndarray:
    """(labels, dims): per label, the mean over speakers of (the speaker's mean embedding of
    that label - the mean of the speaker's label means); zeros for a label never seen."""
    found: dict[str, list[np.ndarray]] = {label: [] for label in labels}
    for speaker in np.unique(speakers):
        inside = speakers == speaker
        means = {lb: x[inside & (y == lb)].mean(0) for lb in np.unique(y[inside]) if lb in found}
        centre = np.mean(list(means.values()), axis=0)
        for label, mean in means.items():
            found[label].append(mean - centre)
    dims = x.shape[1]
    return np.stack([np.mean(found[lb], 0) if found[lb] else np.zeros(dims) for lb in labels])


def replay(
    x: np.ndarray, speakers: np.ndarray, order: np.ndarray, head: tm.Head, card: AdaptationCard
) -> np.ndarray:
    """Logits of each clip, each speaker one causal stream through StreamBaseline (updated with
    the clip's probabilities at TEMPERATURE, as the exported model gives them)."""
    out = np.empty((len(x), len(head.classes_)))
    for speaker in np.unique(speakers):
        members = np.flatnonzero(speakers == speaker)
        stream = StreamBaseline(card)
        for i in members[np.argsort(order[members], kind="stable")]:
            baseline = stream.current() or card.population
            out[i] = head.logits(((x[i] - baseline.mean) / baseline.std)[None])[0]
            stream.update(x[i], tm.softmax(out[i][None] / TEMPERATURE)[0])
    return out


def rule_card(
    card: AdaptationCard, offsets: np.ndarray, prior: float, scale: float
) -> AdaptationCard:
    """`card` under one candidate rule."""
    return dataclasses.replace(
        card, prior_weight=prior, offsets=offsets if scale else None, offset_scale=scale or 1.0
    )


def search(config: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """{rule: {corpus: [mixed UAR, blocked UAR]}} (each the mean over SEEDS)."""
    x, data = load(config)
    y, speakers, corpora = data.labels(), data.speakers(), data.corpora()
    results: dict[str, dict[str, list[float]]] = {}
    for held in config["training"]["corpora"]:
        rows = corpora != held
        fitted = tm.train_recipe(config, x, data, rows)
        offsets = emotion_offsets(x[rows], y[rows], speakers[rows], list(fitted.head.classes_))
        allowed = [lb for lb in config["loco"]["labels"] if lb in set(y[corpora == held])]
        keep = (corpora == held) & np.isin(y, allowed)
        truth = np.array([allowed.index(lb) for lb in y[keep]])
        columns = [list(fitted.head.classes_).index(lb) for lb in allowed]
        orders = [[np.random.default_rng(s).permutation(int(keep.sum())) for s in SEEDS],
                  [tm.blocked_order(y[keep], speakers[keep], s) for s in SEEDS]]  # fmt: skip
        for prior, scale in RULES:
            card = rule_card(fitted.card, offsets, prior, scale)
            figures = [float(np.mean([_uar(replay(x[keep], speakers[keep], o, fitted.head, card)
                                           [:, columns], truth) for o in kind]))
                       for kind in orders]  # fmt: skip
            results.setdefault(f"prior {prior:g}, offsets {scale:g}", {})[held] = figures
            print(f"{held:8s} prior {prior:<4g} offsets {scale:<4g} mixed {figures[0]:.3f} "
                  f"blocked {figures[1]:.3f}", flush=True)  # fmt: skip
    return results


def _uar(logits: np.ndarray, truth: np.ndarray) -> float:
    return unweighted_average_recall(confusion_matrix(truth, logits.argmax(1), logits.shape[1]))


def print_table(results: dict[str, dict[str, list[float]]]) -> None:
    """One line per rule: per corpus mixed/blocked, the means and the gap."""
    for rule, per in results.items():
        mixed, blocked = (float(np.mean([v[k] for v in per.values()])) for k in (0, 1))
        cells = "  ".join(f"{c} {v[0]:.3f}/{v[1]:.3f}" for c, v in per.items())
        print(f"{rule:<22} {cells}  mean {mixed:.3f}/{blocked:.3f} gap {mixed - blocked:.3f}")


def write_card(config: dict[str, Any], model: Path, scale: float, prior: float) -> None:
    """Put the rule and the offsets (model label order) into `model`/card.json."""
    x, data = load(config)
    path = model / "card.json"
    raw = json.loads(path.read_text())
    offsets = emotion_offsets(x, data.labels(), data.speakers(), list(raw["labels"]))
    raw["adaptation"] |= {"prior_weight": prior, "offset_scale": scale,
                          "emotion_offsets": np.round(offsets, 6).tolist()}  # fmt: skip
    path.write_text(json.dumps(raw) + "\n")
    print(f"wrote {path}: prior_weight {prior}, offset_scale {scale}, offsets {offsets.shape}")


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("extract", "search", "card"))
    parser.add_argument("config")
    parser.add_argument("model", nargs="?", type=Path, default=Path("models/default"))
    parser.add_argument("--offset-scale", type=float, default=0.5)
    parser.add_argument("--prior-weight", type=float, default=3.0)
    args = parser.parse_args(argv)
    config = tomllib.loads(Path(args.config).read_text())
    if args.command == "extract":
        extract(config, args.model)
    elif args.command == "search":
        results = search(config)
        out = ts.resolve(config["runs_dir"]) / "adapt" / "search.json"
        out.write_text(json.dumps(results, indent=1) + "\n")
        print_table(results)
    else:
        write_card(config, args.model, args.offset_scale, args.prior_weight)
    return 0


if __name__ == "__main__":
    sys.exit(main())
