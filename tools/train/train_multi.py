"""Train the specialist across corpora and select its recipe by leave-one-corpus-out (LOCO).

Usage (repository root; the requirements of tools/train/train_strong.py):

    .venv/bin/python -m tools.train.train_multi tools/train/configs/multi.toml --loco  # LOCO table
    .venv/bin/python -m tools.train.train_multi tools/train/configs/multi.toml  # -> output_dir

Recipe: the cached utterance features of tools/train/strong_features.py for every corpus of
[data] corpora. One label space (`labels`); every corpus covers a subset, and a clip's softmax is
taken over its own corpus's labels only (masked loss): a RAVDESS "calm" is never a negative for
a corpus without calm. Each corpus weighs the same in the loss (`corpus_weighting = "balanced"`:
within a corpus the classes weigh the same too), so a big corpus cannot swamp the others. The
speaker split is speaker-independent inside every corpus ([data.test_speakers]); the test
speakers are never used for training, selection or the temperature.

The embedding is normalised with the causal per-speaker baseline of stream_ser.adaptation,
simulated over several random utterance orders per training speaker. With `adapt_fraction < 1`
only that share of the dimensions adapts - the ones whose variance is most between speakers
rather than between emotions (training clips only) - and the head is trained under exactly that
normalisation; the mask goes into the card's [adaptation] adapt_weights.

`--loco`: for each corpus, the recipe trained on the others' non-test speakers and scored on all
of its clips (labels the training corpora cover), in mixed and in emotion-blocked order (as
`stream-ser eval --order blocked`): UAR per corpus and the mean, ECE with a temperature fitted
on the other corpora's LOCO predictions, and within-corpus UAR on each corpus's test speakers.
The exported model's temperature is the one fitted on all LOCO predictions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream_ser.evaluate import (
    confusion_matrix,
    expected_calibration_error,
    unweighted_average_recall,
)
from stream_ser.specialist import AdaptationCard, Baseline
from tools.train import train_strong as ts
from tools.train.strong_features import Row, cached_features, read_corpus
from tools.train.whisper_encoder import load_pooled_whisper

log = logging.getLogger("train_multi")
LBFGS_STEPS = 150


# --------------------------------------------------------------------------- data


def load(config: dict[str, Any]) -> ts.Data:
    """Rows (labels corrected by [data.relabel]), cached features and the split ("train" or
    "test") of every configured corpus."""
    root, cache = ts.resolve(config["data"]["root"]), ts.resolve(config["cache_dir"])
    kinds = {part.partition(":")[0] for part in ts.feature_parts(config["features"])}
    rows, split, features = [], [], {kind: [] for kind in kinds}  # type: ignore[var-annotated]
    for corpus in config["data"]["corpora"]:
        corpus_rows = relabel(read_corpus(root, corpus), config["data"].get("relabel", {}))
        rows += corpus_rows
        for kind in kinds:
            features[kind].append(cached_features(root, corpus, kind, cache, config["threads"]))
        test = set(config["data"]["test_speakers"].get(corpus, []))
        split += ["test" if r.speaker.split(":", 1)[1] in test else "train" for r in corpus_rows]
    order = np.argsort(np.random.default_rng(config["seed"]).permutation(len(rows)))
    stacked = {kind: np.concatenate(parts) for kind, parts in features.items()}
    return ts.Data(rows, stacked, np.array(split), order)


def relabel(rows: list[Row], fixes: dict[str, dict[str, str]]) -> list[Row]:
    """Rows with their corpus's label corrections ({corpus: {manifest label: true label}})
    applied; every mapped label must occur in the corpus (a stale fix is an error)."""
    if not rows or rows[0].corpus not in fixes:
        return rows
    fix = fixes[rows[0].corpus]
    if missing := sorted(set(fix) - {row.label for row in rows}):
        raise SystemExit(f"[data.relabel] {rows[0].corpus}: no clip has the label(s) {missing}")
    return [replace(row, label=fix.get(row.label, row.label)) for row in rows]


def corpus_labels(data: ts.Data, labels: list[str]) -> dict[str, list[str]]:
    """The labels each corpus has, in `labels` order."""
    y, corpora = data.labels(), data.corpora()
    return {c: [lb for lb in labels if lb in set(y[corpora == c])] for c in dict.fromkeys(corpora)}


def label_mask(corpora: np.ndarray, covers: dict[str, list[str]], labels: list[str]) -> np.ndarray:
    """(clips, labels) True where the clip's corpus has the label: the masked loss's support."""
    mask = np.zeros((len(corpora), len(labels)), dtype=bool)
    for corpus, have in covers.items():
        mask[np.ix_(corpora == corpus, [labels.index(lb) for lb in have])] = True
    return mask


def sample_weights(y: np.ndarray, corpora: np.ndarray, weighting: str) -> np.ndarray:
    """Per-clip loss weights, mean 1: "balanced" - every corpus the same total, every label the
    same within its corpus; "pooled" - every label the same over all clips (sklearn balanced)."""
    weights = np.zeros(len(y))
    if weighting == "balanced":
        names = np.unique(corpora)
        for corpus in names:
            inside = corpora == corpus
            labels = np.unique(y[inside])
            for label in labels:
                members = inside & (y == label)
                weights[members] = 1.0 / (len(names) * len(labels) * members.sum())
    elif weighting == "pooled":
        labels = np.unique(y)
        for label in labels:
            weights[y == label] = 1.0 / (len(labels) * (y == label).sum())
    else:
        raise SystemExit(f"corpus_weighting must be balanced or pooled, not {weighting!r}")
    return weights * len(y)


# --------------------------------------------------------------------------- adaptation


def speaker_heaviness(x: np.ndarray, speakers: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per dimension: variance of the speakers' means / mean within-speaker variance of the
    emotion means. High: the dimension says who speaks (adapt it); low: how they feel."""
    speaker_means, emotion_vars = [], []
    for speaker in np.unique(speakers):
        inside = speakers == speaker
        means = np.stack([x[inside & (y == lb)].mean(0) for lb in np.unique(y[inside])])
        speaker_means.append(x[inside].mean(0))
        emotion_vars.append(means.var(0))
    heaviness: np.ndarray = np.var(speaker_means, axis=0) / (np.mean(emotion_vars, axis=0) + 1e-12)
    return heaviness


def adapt_weights(
    x: np.ndarray, speakers: np.ndarray, y: np.ndarray, fraction: float
) -> np.ndarray | None:
    """1 for the `fraction` most speaker-heavy dimensions, 0 for the rest; None for 1.0."""
    if fraction >= 1.0:
        return None
    ratio = speaker_heaviness(x, speakers, y)
    weights = np.zeros(x.shape[1])
    weights[np.argsort(-ratio)[: round(fraction * x.shape[1])]] = 1.0
    return weights


def make_card(x: np.ndarray, adapt: dict[str, Any], weights: np.ndarray | None) -> AdaptationCard:
    """The [adaptation] card of a head fitted on `x` (population statistics of `x`)."""
    pop = Baseline(x.mean(0).astype(np.float32), (x.std(0) + 1e-6).astype(np.float32))
    return AdaptationCard(
        "embedding", "baseline_mean", "baseline_std", adapt["warmup_utterances"],
        adapt["prior_weight"], pop, weights,
    )  # fmt: skip


def blocked_order(y: np.ndarray, speakers: np.ndarray, seed: int) -> np.ndarray:
    """Replay positions with each speaker's clips emotion by emotion (labels and clips within a
    label in a seeded random order), as `stream-ser eval --order blocked`."""
    rng = np.random.default_rng(seed)
    position = np.zeros(len(y), dtype=np.int64)
    for speaker in np.unique(speakers):
        inside = speakers == speaker
        labels = np.unique(y[inside])
        sequence = []
        for label in labels[rng.permutation(len(labels))]:
            block = np.flatnonzero(inside & (y == label))
            sequence += list(block[rng.permutation(len(block))])
        position[sequence] = np.arange(len(sequence))
    return position


# --------------------------------------------------------------------------- the head


@dataclass
class Head:
    """A linear head over the normalised embedding, duck-typed as sklearn's for the export."""

    classes_: np.ndarray  # label names, the columns of coef_
    coef_: np.ndarray  # (labels, dims)
    intercept_: np.ndarray  # (labels,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(clips, labels)."""
        return x @ self.coef_.T + self.intercept_  # type: ignore[no-any-return]


def fit_masked(
    x: np.ndarray, y: np.ndarray, mask: np.ndarray, weights: np.ndarray, labels: list[str], c: float
) -> Head:
    """Weighted softmax regression, each row's softmax over its `mask` labels only, with L2
    1 / (2 C n) as sklearn's C; full-batch L-BFGS."""
    xt = torch.from_numpy(x.astype(np.float32))
    target = torch.from_numpy(_index(y, labels))
    blocked = torch.from_numpy(~mask)
    w = torch.from_numpy(weights.astype(np.float32))
    coef = torch.zeros(len(labels), x.shape[1], requires_grad=True)
    bias = torch.zeros(len(labels), requires_grad=True)
    optimiser = torch.optim.LBFGS([coef, bias], max_iter=LBFGS_STEPS, line_search_fn="strong_wolfe")
    l2 = 1.0 / (2 * c * len(x))

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = masked_loss(xt @ coef.T + bias, target, blocked, w) + l2 * (coef**2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    unseen = ~mask.any(axis=0)  # labels no training corpus has: never predicted
    intercept = bias.detach().numpy().astype(np.float64)
    intercept[unseen] = -30.0
    return Head(np.array(labels), coef.detach().numpy().astype(np.float64), intercept)


def masked_loss(
    logits: torch.Tensor, target: torch.Tensor, blocked: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted mean cross-entropy, each row's softmax over its unblocked labels only."""
    masked = logits.masked_fill(blocked, -1e9)
    losses = torch.nn.functional.cross_entropy(masked, target, reduction="none")
    return (losses * weights).mean()


def _index(y: np.ndarray, labels: list[str]) -> np.ndarray:
    lookup = {label: i for i, label in enumerate(labels)}
    return np.array([lookup[label] for label in y], dtype=np.int64)


@dataclass
class Fitted:
    """A head with the adaptation card it was trained under."""

    head: Head
    card: AdaptationCard


def train_recipe(config: dict[str, Any], x: np.ndarray, data: ts.Data, rows: np.ndarray) -> Fitted:
    """The recipe's head fitted on `rows` (a boolean mask over the clips)."""
    labels, adapt = config["labels"], config["adaptation"]
    y, speakers, corpora = data.labels()[rows], data.speakers()[rows], data.corpora()[rows]
    weights = adapt_weights(x[rows], speakers, y, adapt["adapt_fraction"])
    card = make_card(x[rows], adapt, weights)
    rng = np.random.default_rng(config["seed"])
    orders = adapt["train_orders"]
    xt = np.concatenate([ts.causal_normalise(x[rows], speakers, rng.permutation(len(y)), card)
                         for _ in range(orders)])  # fmt: skip
    covers = corpus_labels(data, labels) if config["training"]["loss"] == "masked" else {}
    present = [lb for lb in labels if lb in set(y)]
    mask = label_mask(corpora, covers, labels) if covers else np.isin(labels, present)[None]
    mask = np.broadcast_to(mask, (len(y), len(labels))) & np.isin(labels, present)[None]
    weights_ = sample_weights(y, corpora, config["training"]["corpus_weighting"])
    head = fit_masked(
        xt, np.tile(y, orders), np.tile(mask, (orders, 1)), np.tile(weights_, orders), labels,
        config["head"]["c"],
    )  # fmt: skip
    return Fitted(head, card)


def predict(
    fitted: Fitted, x: np.ndarray, speakers: np.ndarray, order: np.ndarray, allowed: list[str]
) -> np.ndarray:
    """Logits restricted to `allowed` (in that order), causal replay in `order`."""
    logits = fitted.head.logits(ts.causal_normalise(x, speakers, order, fitted.card))
    columns = [list(fitted.head.classes_).index(label) for label in allowed]
    return logits[:, columns]


# --------------------------------------------------------------------------- scores


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def scores(logits: np.ndarray, truth: np.ndarray, temperature: float = 1.0) -> tuple[float, float]:
    """(UAR, ECE) of logits / temperature against label indices."""
    probabilities = softmax(logits / temperature)
    predicted = probabilities.argmax(1)
    uar = unweighted_average_recall(confusion_matrix(truth, predicted, logits.shape[1]))
    return uar, expected_calibration_error(probabilities.max(1), predicted == truth)


def best_temperature(parts: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """The temperature in 0.5, 0.6, ... 4.0 minimising the NLL over all (logits, truth) parts
    (each part its own label subset), every clip counted once."""
    grid = np.round(np.arange(0.5, 4.001, 0.1), 2)
    nll = [sum(ts.negative_log_likelihood(lg / t, tr) * len(tr) for lg, tr in parts) for t in grid]
    return float(grid[int(np.argmin(nll))])


# --------------------------------------------------------------------------- LOCO


@dataclass
class HeldOut:
    """A corpus's predictions by a head that never saw it (or its test speakers, `within`)."""

    corpus: str
    truth: np.ndarray  # label indices into `allowed`
    mixed: np.ndarray  # logits, replay in the seeded mixed order
    blocked: np.ndarray  # logits, each speaker's clips emotion by emotion
    none: np.ndarray  # logits, population statistics only (no adaptation)


def held_out(
    config: dict[str, Any], data: ts.Data, x: np.ndarray, fitted: Fitted, target: np.ndarray,
    corpus: str, scored: list[str],
) -> HeldOut:  # fmt: skip
    """Scores of `fitted` on the `target` clips whose label is in `scored`, in the three replay
    modes."""
    y, speakers = data.labels()[target], data.speakers()[target]
    trained = [lb for lb, b in zip(fitted.head.classes_, fitted.head.intercept_, strict=True)
               if b > -30.0]  # fmt: skip
    allowed = [lb for lb in scored if lb in set(y) and lb in trained]
    keep = np.isin(y, allowed)
    x, y, speakers = x[target][keep], y[keep], speakers[keep]
    order = data.order[target][keep]
    blocked = blocked_order(y, speakers, config["seed"])
    none = np.arange(len(y)).astype(str)  # every clip its own stream: warm-up only
    return HeldOut(
        corpus, _index(y, allowed), predict(fitted, x, speakers, order, allowed),
        predict(fitted, x, speakers, blocked, allowed),
        predict(fitted, x, none, order, allowed),
    )  # fmt: skip


def loco(config: dict[str, Any], data: ts.Data, x: np.ndarray) -> list[HeldOut]:
    """Each LOCO corpus scored (all its clips) by the recipe trained on the other training
    corpora's non-test speakers."""
    corpora = data.corpora()
    allowed = np.isin(corpora, config["training"]["corpora"]) & (data.split != "test")
    results = []
    for corpus in config["loco"]["corpora"]:
        fitted = train_recipe(config, x, data, allowed & (corpora != corpus))
        scored = config["loco"]["labels"]  # the same label set for every recipe
        results.append(held_out(config, data, x, fitted, corpora == corpus, corpus, scored))
        log.info("LOCO %s done", corpus)
    return results


def within(config: dict[str, Any], data: ts.Data, x: np.ndarray) -> tuple[Fitted, list[HeldOut]]:
    """The recipe on every training corpus's non-test speakers, scored on each corpus's test
    speakers."""
    corpora, labels = data.corpora(), config["labels"]
    fitted = train_recipe(
        config, x, data, np.isin(corpora, config["training"]["corpora"]) & (data.split != "test")
    )
    results = [
        held_out(config, data, x, fitted, (corpora == c) & (data.split == "test"), c, labels)
        for c in config["data"]["corpora"]
        if ((corpora == c) & (data.split == "test")).any()
    ]
    return fitted, results


def report(loco_results: list[HeldOut], within_results: list[HeldOut]) -> dict[str, Any]:
    """Per corpus: LOCO UAR (mixed, blocked, none), ECE with the temperature fitted on the other
    LOCO corpora (and at T = 1), within-corpus test UAR; their means; the LOCO temperature."""
    parts = [(r.mixed, r.truth) for r in loco_results]
    table: dict[str, Any] = {}
    for i, r in enumerate(loco_results):
        temperature = best_temperature(parts[:i] + parts[i + 1 :])
        table[r.corpus] = {
            "n": len(r.truth),
            "loco_uar": scores(r.mixed, r.truth)[0],
            "loco_uar_blocked": scores(r.blocked, r.truth)[0],
            "loco_uar_none": scores(r.none, r.truth)[0],
            "loco_ece": scores(r.mixed, r.truth, temperature)[1],
            "loco_ece_t1": scores(r.mixed, r.truth)[1],
            "loco_temperature": temperature,
        }
    for r in within_results:
        table.setdefault(r.corpus, {}).update(
            test_n=len(r.truth),
            test_uar=scores(r.mixed, r.truth)[0],
            test_uar_blocked=scores(r.blocked, r.truth)[0],
            test_uar_none=scores(r.none, r.truth)[0],
        )
    keys = sorted({k for row in table.values() for k in row if k not in ("n", "test_n")})
    mean = {k: float(np.mean([row[k] for row in table.values() if k in row])) for k in keys}
    return {"corpora": table, "mean": mean, "temperature": best_temperature(parts)}


def save_logits(path: Path, loco_results: list[HeldOut], within_results: list[HeldOut]) -> None:
    """Every logit and truth behind the table (re-scoring without retraining)."""
    arrays = {}
    for kind, results in (("loco", loco_results), ("test", within_results)):
        for r in results:
            for field in ("truth", "mixed", "blocked", "none"):
                arrays[f"{kind}_{r.corpus}_{field}"] = getattr(r, field)
    np.savez_compressed(path, **arrays)


def print_report(result: dict[str, Any]) -> None:
    """The selection table."""
    columns = ("loco_uar", "loco_uar_blocked", "loco_uar_none", "loco_ece", "loco_ece_t1",
               "test_uar", "test_uar_blocked", "test_uar_none")  # fmt: skip
    heads = ("LOCO", "blocked", "none", "ECE", "ECE T1", "test", "blocked", "none")
    print(f"{'corpus':<8} {'n':>5} " + " ".join(f"{h:>7}" for h in heads))
    for corpus, row in [*result["corpora"].items(), ("mean", result["mean"])]:
        cells = " ".join(f"{row[k]:>7.3f}" if k in row else f"{'-':>7}" for k in columns)
        print(f"{corpus:<8} {row.get('n', ''):>5} {cells}")
    print(f"temperature fitted on all LOCO predictions: {result['temperature']:.1f}", flush=True)


# --------------------------------------------------------------------------- export and main


def export(config: dict[str, Any], data: ts.Data, fitted: Fitted, temperature: float) -> Path:
    """model.onnx (int8 unless --float32), window.onnx (adopted) and card.json."""
    output = ts.resolve(config["output_dir"])
    head = fitted.head
    head.coef_ /= temperature
    head.intercept_ = np.where(head.intercept_ > -30.0, head.intercept_ / temperature, -30.0)
    feats = config["features"]
    whisper = load_pooled_whisper(encoder=feats.get("encoder", "tiny.en"))
    model = ts.StrongModel(whisper, feats, head, config["labels"])
    keep = np.isin(data.corpora(), config["training"]["corpora"]) & (data.split != "test")
    extra = {"training": {
        "corpora": config["training"]["corpora"], "clips": int(keep.sum()),
        "test_speakers_excluded": True, "loco_temperature": temperature,
    }}  # fmt: skip
    ts.export(config, output, model, None, fitted.card, extra)
    exp = config["export"]
    ts.adopt_window_model(ts.resolve(exp["window_source"]), exp["window_labels"], config, output)
    ts.check_export(output, model, data, config)
    if exp.get("quantize_int8"):
        ts.quantize(output / "model.onnx")
    return output


def write_manifests(config: dict[str, Any], data: ts.Data, folder: Path) -> None:
    """<corpus>-test.csv (test speakers) and <corpus>-all.csv per corpus, in the seeded replay
    order, with a corpus column: `stream-ser eval` reproduces the tables on the exported model."""
    folder.mkdir(parents=True, exist_ok=True)
    for corpus in config["data"]["corpora"]:
        picked = [i for i, row in enumerate(data.rows) if row.corpus == corpus]
        test = [i for i in picked if data.split[i] == "test"]
        for name, rows in (("test", test), ("all", picked)):
            ts.write_manifest(
                folder / f"{corpus}-{name}.csv", data, sorted(rows, key=lambda i: data.order[i])
            )


def override(config: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """`--set section.key=TOML-value` overrides, in place."""
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        *path, last = key.split(".")
        table = config
        for part in path:
            table = table[part]
        table[last] = tomllib.loads(f"v = {value}")["v"]
    return config


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--loco", action="store_true", help="print the LOCO table, no export")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (TOML), e.g. head.c=0.02")  # fmt: skip
    parser.add_argument("--name", default="recipe", help="name of this run's JSON in runs_dir")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--float32", action="store_true", help="skip the int8 quantisation")
    args = parser.parse_args(argv)
    config = override(tomllib.loads(Path(args.config).read_text()), args.set)
    if args.output_dir:
        config["output_dir"] = args.output_dir
    if args.float32:
        config["export"]["quantize_int8"] = False
    runs = ts.resolve(config["runs_dir"])
    runs.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    torch.manual_seed(config["seed"])
    torch.set_num_threads(config["threads"])
    log.info("config %s %s", args.config, json.dumps(config))
    data = load(config)
    write_manifests(config, data, runs / "manifests")
    x = ts.embedding(data, ts.feature_parts(config["features"]))
    fitted, within_results = within(config, data, x)
    loco_results = loco(config, data, x)
    result = report(loco_results, within_results) | {"config": config}
    save_logits(runs / f"loco-{args.name}.npz", loco_results, within_results)
    (runs / f"loco-{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print_report(result)
    if not args.loco:
        log.info("exported %s", export(config, data, fitted, result["temperature"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
