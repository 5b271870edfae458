"""Train and export the strong specialist: pooled Whisper encoder + log-mel stats, adaptive head.

Usage (repository root; the `tools` extra brings the encoder weights):

    .venv/bin/python -m tools.train.train_strong tools/train/configs/strong.toml  # to runs/strong
    .venv/bin/python -m tools.train.train_strong tools/train/configs/strong.toml --experiments
    .venv/bin/python -m tools.train.train_strong tools/train/configs/strong.toml \
        --without emodb --output-dir runs/strong/without-emodb  # cross-corpus

Recipe: features are computed once per clip and cached (tools/train/strong_features.py). The head is
a class-balanced logistic regression on the embedding normalised with a causal per-speaker
baseline (stream_ser.adaptation.StreamBaseline), simulated over several random utterance orders
per training speaker - exactly what `stream-ser eval --adapt stream` and the live pipeline do.
Settings are chosen on the validation speakers; the final head is fitted on training +
validation speakers; the test speakers are never used. The export is one model directory:
`model.onnx` (waveform + baseline -> logits + embedding), `window.onnx` (a cheap log-mel head for
sliding windows) and `card.json`. Evaluate it with `stream-ser eval` on the test manifests this
script writes to `<runs_dir>/manifests/`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]

from stream_ser.adaptation import StreamBaseline  # noqa: E402
from stream_ser.evaluate import confusion_matrix, unweighted_average_recall  # noqa: E402
from stream_ser.specialist import AdaptationCard, Baseline  # noqa: E402
from tools.train.strong_features import (  # noqa: E402
    AUGMENTATIONS,
    SPEECH_DB,
    WHISPER_KINDS,
    WIDTHS,
    Row,
    cached_features,
    logmel_stats,
    read_corpus,
    speech_logmel_stats,
)
from tools.train.whisper_encoder import (  # noqa: E402
    LogMel,
    PooledWhisper,
    encoder_frames,
    load_pooled_whisper,
    mean_std_pool,
    quiet_export,
    speech_frames,
)

CORPORA = ("ravdess", "emodb")
TINY_KINDS = ("whisper_speech", "logmel_speech")  # the kinds with augmented copies
# The tiny.en recipe (the v1 bundled model), compared against in --experiments and --cv.
TINY_FEATURES = {"encoder": "tiny.en", "whisper_layers": [0, 1, 2, 3], "logmel_stats": True,
                 "pooling": "speech", "speech_db": SPEECH_DB}  # fmt: skip
WIDTH = WIDTHS["whisper"]  # Whisper tiny hidden size; a layer's mean+std pool is 2 * WIDTH
log = logging.getLogger("train_strong")


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    """All clips of all corpora with their features and split."""

    rows: list[Row]
    features: dict[str, np.ndarray]  # kind -> (clips, dims)
    split: np.ndarray  # "train", "val" or "test" per clip
    order: np.ndarray  # replay position within the speaker's stream (seeded shuffle)

    def labels(self) -> np.ndarray:
        """Label names per clip."""
        return np.array([row.label for row in self.rows])

    def speakers(self) -> np.ndarray:
        """Speaker ids (corpus-prefixed) per clip."""
        return np.array([row.speaker for row in self.rows])

    def corpora(self) -> np.ndarray:
        """Corpus name per clip."""
        return np.array([row.corpus for row in self.rows])


def load_data(config: dict[str, Any], kinds: tuple[str, ...]) -> Data:
    """Rows, cached features and the speaker split of every corpus."""
    root = resolve(config["data"]["root"])
    cache = resolve(config["cache_dir"])
    rows: list[Row] = []
    features: dict[str, list[np.ndarray]] = {kind: [] for kind in kinds}
    split: list[str] = []
    for corpus in CORPORA:
        corpus_rows = read_corpus(root, corpus)
        rows += corpus_rows
        for kind in kinds:
            features[kind].append(cached_features(root, corpus, kind, cache, config["threads"]))
        test = set(config["data"][f"{corpus}_test_speakers"])
        val = set(config["data"][f"{corpus}_val_speakers"])
        for row in corpus_rows:
            speaker = row.speaker.split(":", 1)[1]
            split.append("test" if speaker in test else "val" if speaker in val else "train")
    rng = np.random.default_rng(config["seed"])
    order = rng.permutation(len(rows))  # replay order: a seeded shuffle within each speaker
    stacked = {kind: np.concatenate(parts) for kind, parts in features.items()}
    return Data(rows, stacked, np.array(split), np.argsort(order))


def embedding(data: Data, parts: list[str]) -> np.ndarray:
    """Concatenated features; a part is a cached kind ("logmel_speech", "egemaps", ...) or
    "whisper:0123" / "whisper_speech:0123" / "whisper_base_speech:012345" for those encoder
    layers' pools."""
    columns = []
    for part in parts:
        kind, _, layers = part.partition(":")
        if layers:
            pools = data.features[kind]
            width = WIDTHS["whisper_base" if kind.startswith("whisper_base") else "whisper"]
            columns += [pools[:, 2 * width * int(i) : 2 * width * (int(i) + 1)] for i in layers]
        else:
            columns.append(data.features[kind])
    return np.concatenate(columns, axis=1).astype(np.float64)


def feature_parts(features: dict[str, Any], copy: str | None = None) -> list[str]:
    """The embedding parts the exported model computes, from the [features] table; with
    `copy` (an AUGMENTATIONS name), the cached augmented copies of those parts (training)."""
    suffix = "_speech" if features["pooling"] == "speech" else ""
    if suffix and features["speech_db"] != SPEECH_DB:
        raise SystemExit(f"speech_db must be {SPEECH_DB} (the feature cache's threshold)")
    encoder = features.get("encoder", "tiny.en")
    if encoder != "tiny.en" and (not suffix or copy is not None):
        raise SystemExit(f"{encoder}: features are cached with speech pooling, no augmented copies")
    if copy is not None:
        if copy not in AUGMENTATIONS:
            raise SystemExit(f"unknown augmented copy {copy!r}: one of {', '.join(AUGMENTATIONS)}")
        suffix += f"@{copy}"
    layers = "".join(str(i) for i in features["whisper_layers"])
    kind = WHISPER_KINDS[encoder].removesuffix("_speech")
    parts = [f"{kind}{suffix}:{layers}"]
    return [*parts, f"logmel{suffix}"] if features["logmel_stats"] else parts


# --------------------------------------------------------------------------- normalisation


def population(x: np.ndarray) -> Baseline:
    """Mean and standard deviation of the training embeddings."""
    return Baseline(x.mean(axis=0).astype(np.float32), (x.std(axis=0) + 1e-6).astype(np.float32))


def adaptation_card(pop: Baseline, warmup: int, prior_weight: float) -> AdaptationCard:
    """The card section the export writes; also drives the training simulation."""
    return AdaptationCard("embedding", "baseline_mean", "baseline_std", warmup, prior_weight, pop)


def causal_normalise(
    x: np.ndarray, speakers: np.ndarray, order: np.ndarray, card: AdaptationCard
) -> np.ndarray:
    """Each clip normalised with the StreamBaseline of its speaker's earlier clips."""
    out = np.empty_like(x)
    for speaker in np.unique(speakers):
        members = np.flatnonzero(speakers == speaker)
        stream = StreamBaseline(card)
        for i in members[np.argsort(order[members], kind="stable")]:
            baseline = stream.current() or card.population
            out[i] = (x[i] - baseline.mean) / baseline.std
            stream.update(x[i])
    return out


def global_normalise(x: np.ndarray, card: AdaptationCard) -> np.ndarray:
    """Normalised with the population statistics (adaptation off)."""
    return (x - card.population.mean) / card.population.std  # type: ignore[no-any-return]


def transductive_normalise(x: np.ndarray, speakers: np.ndarray) -> np.ndarray:
    """Normalised with all of the speaker's clips (an upper bound, not causal)."""
    out = np.empty_like(x)
    for speaker in np.unique(speakers):
        members = speakers == speaker
        out[members] = (x[members] - x[members].mean(0)) / (x[members].std(0) + 1e-6)
    return out


def training_set(
    x: np.ndarray, y: np.ndarray, speakers: np.ndarray, card: AdaptationCard, orders: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Causally normalised copies of the training clips over several random stream orders."""
    rng = np.random.default_rng(seed)
    xs = [causal_normalise(x, speakers, rng.permutation(len(x)), card) for _ in range(orders)]
    return np.concatenate(xs), np.tile(y, orders)


# --------------------------------------------------------------------------- heads and scores


def fit_head(
    x: np.ndarray, y: np.ndarray, c: float, class_weight: str | None
) -> LogisticRegression:
    """Multinomial logistic regression (lbfgs), class-balanced when asked."""
    head = LogisticRegression(C=c, class_weight=class_weight, max_iter=2000)
    return head.fit(x, y)


def uar_on(head: LogisticRegression, x: np.ndarray, y: np.ndarray) -> float:
    """UAR with predictions restricted to the labels present in `y`."""
    present = sorted(set(y))
    columns = [list(head.classes_).index(label) for label in present]
    probabilities = head.predict_proba(x)[:, columns]
    truth = np.array([present.index(label) for label in y])
    matrix = confusion_matrix(truth, probabilities.argmax(1), len(present))
    return unweighted_average_recall(matrix)


def held_out_temperature(
    config: dict[str, Any], data: Data, x: np.ndarray, usable: np.ndarray
) -> float:
    """The logit temperature (0.5..4) minimising the negative log-likelihood of held-out
    speakers: the recipe's head fitted per speaker fold (the --cv folds) and scored on the fold.
    `x` is the recipe's embedding of every clip; only `usable` clips take part (a cross-corpus
    model never sees its test corpus)."""
    y = data.labels()
    logits, truth = [], []
    for fold in speaker_folds(data, config["cv"]["folds"]):
        train, test = usable & (data.split != "test") & ~fold, usable & fold
        fitted, xv = fit_normalised(
            x, y, data.speakers(), data.order, train, test, recipe=Recipe.causal(config)
        )
        logits.append(fitted.decision_function(xv))
        truth.append(np.searchsorted(fitted.classes_, y[test]))
    return best_temperature(np.concatenate(logits), np.concatenate(truth))


def best_temperature(logits: np.ndarray, truth: np.ndarray) -> float:
    """The temperature in 0.5, 0.6, ... 4.0 minimising the NLL of `truth` under logits / T."""
    grid = np.round(np.arange(0.5, 4.001, 0.1), 2)
    nll = [negative_log_likelihood(logits / t, truth) for t in grid]
    best = float(grid[int(np.argmin(nll))])
    log.info("temperature %.1f: held-out NLL %.3f (1.0: %.3f)", best, min(nll), nll[5])
    return best


def negative_log_likelihood(logits: np.ndarray, truth: np.ndarray) -> float:
    """Mean -log softmax(logits)[truth] over rows."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(truth)), truth].mean())


# --------------------------------------------------------------------------- experiments


def experiments(config: dict[str, Any], data: Data) -> None:
    """Validation UAR (per corpus) and cross-corpus UAR (6 shared classes) per recipe.

    The first run extracts extra feature caches (eGeMAPS, augmented copies, 30 s padded Whisper):
    about 30 min on one core."""
    y, speakers, corpora = data.labels(), data.speakers(), data.corpora()
    adapt = config["adaptation"]
    c, weight = config["head"]["c"], config["head"]["class_weight"]
    shared = np.isin(y, ["neutral", "happy", "sad", "angry", "fearful", "disgust"])
    both = ("global", "causal")
    tiny, recipe = feature_parts(TINY_FEATURES), feature_parts(config["features"])
    variants = {
        "egemaps functionals (88)": (["egemaps"], both),
        "log-mel stats, speech frames (240)": (["logmel_speech"], both),
        "whisper L3, all frames (768)": (["whisper:3"], both),
        "whisper L0-3, all frames (3072)": (["whisper:0123"], both),
        "whisper L0-3, speech frames (3072)": (["whisper_speech:0123"], both),
        "whisper L0-3 + log-mel, speech": (tiny, (*both, "transductive")),
        "whisper L0-3 + log-mel + egemaps, speech": ([*tiny, "egemaps"], both),
        "whisper L0-3 + log-mel, speech, + speed aug": (tiny, both),  # experiment_copies
        "whisper L3, speech, 30 s padded input": (["whisper_speech@pad30:3"], both),
        "whisper L0-3 + log-mel, speech, 30 s padded": (
            ["whisper_speech@pad30:0123", "logmel_speech"], both),
        "base L0-5, speech frames (6144)": (["whisper_base_speech:012345"], both),
        "base L0-5 + log-mel, speech": (["whisper_base_speech:012345", "logmel_speech"],
                                        (*both, "transductive")),
        "tiny L0-3 + base L0-5 + log-mel, speech": (
            ["whisper_speech:0123", "whisper_base_speech:012345", "logmel_speech"], both),
        "recipe (config)": (recipe, both),
    }  # fmt: skip
    augmented = [embedding(data, feature_parts(TINY_FEATURES, copy))
                 for copy in config["augment"]["experiment_copies"]]  # fmt: skip
    header = f"{'features':<42} {'norm':<12} {'val RAV':>7} {'val EMO':>7} {'R->E':>7} {'E->R':>7}"
    print(header)
    for name, (parts, norms) in variants.items():
        x = embedding(data, parts)
        copies = augmented if "aug" in name else []
        for norm in norms:
            fit_recipe = Recipe(norm, adapt, c, weight)
            scores = [*_within(data, x, y, speakers, corpora, recipe=fit_recipe, copies=copies)]
            for source, target in (("ravdess", "emodb"), ("emodb", "ravdess")):
                train = (corpora == source) & shared
                test = (corpora == target) & shared
                scores.append(_score(
                    x, y, speakers, data.order, train, test, recipe=fit_recipe, copies=copies
                ))  # fmt: skip
            print(f"{name:<42} {norm:<12} " + " ".join(f"{v:>7.3f}" for v in scores), flush=True)


def _within(
    data: Data, x: np.ndarray, y: np.ndarray, speakers: np.ndarray, corpora: np.ndarray, *,
    recipe: Recipe, copies: Sequence[np.ndarray],
) -> Iterator[float]:  # fmt: skip
    train = data.split == "train"
    for corpus in CORPORA:
        val = (data.split == "val") & (corpora == corpus)
        yield _score(x, y, speakers, data.order, train, val, recipe=recipe, copies=copies)


def with_copies(
    x: np.ndarray, copies: list[np.ndarray], y: np.ndarray, speakers: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The selected rows plus their augmented copies; each copy of a speaker is its own stream."""
    xs, ys, ss = [x[rows]], [y[rows]], [speakers[rows]]
    for i, copy in enumerate(copies):
        xs.append(copy[rows])
        ys.append(y[rows])
        ss.append(np.char.add(speakers[rows].astype(str), f"@{i}"))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ss)


def _score(
    x: np.ndarray, y: np.ndarray, speakers: np.ndarray, order: np.ndarray, train: np.ndarray,
    test: np.ndarray, *, recipe: Recipe, copies: Sequence[np.ndarray] = (),
) -> float:  # fmt: skip
    head, xv = fit_normalised(x, y, speakers, order, train, test, recipe=recipe, copies=copies)
    return uar_on(head, xv, y[test])


@dataclass(frozen=True)
class Recipe:
    """How `fit_normalised` fits the head and normalises the rows it scores."""

    norm: str
    """"global", "transductive" or "causal" (the streaming rule)."""
    adapt: dict[str, Any]
    """The config's [adaptation] table (warmup_utterances, prior_weight, train_orders)."""
    c: float
    """Inverse regularisation strength of the logistic-regression head."""
    weight: str | None
    """Its class_weight ("balanced" or None)."""

    @classmethod
    def causal(cls, config: dict[str, Any]) -> Recipe:
        """The config's own recipe: causal normalisation, its adaptation and head settings."""
        head = config["head"]
        return cls("causal", config["adaptation"], head["c"], head["class_weight"])


def fit_normalised(
    x: np.ndarray, y: np.ndarray, speakers: np.ndarray, order: np.ndarray, train: np.ndarray,
    test: np.ndarray, *, recipe: Recipe, copies: Sequence[np.ndarray] = (),
) -> tuple[LogisticRegression, np.ndarray]:  # fmt: skip
    """The head fitted on `train` and the `test` rows normalised as `recipe.norm` says."""
    norm, adapt = recipe.norm, recipe.adapt
    card = adaptation_card(population(x[train]), adapt["warmup_utterances"], adapt["prior_weight"])
    xa, ya, sa = with_copies(x, list(copies), y, speakers, train)
    if norm == "global":
        xt, yt = global_normalise(xa, card), ya
        xv = global_normalise(x[test], card)
    elif norm == "transductive":
        xt, yt = transductive_normalise(xa, sa), ya
        xv = transductive_normalise(x[test], speakers[test])
    else:
        xt, yt = training_set(xa, ya, sa, card, adapt["train_orders"], 0)
        xv = causal_normalise(x[test], speakers[test], order[test], card)
    return fit_head(xt, yt, recipe.c, recipe.weight), xv


# --------------------------------------------------------------------------- cross-validation


def speaker_folds(data: Data, count: int) -> list[np.ndarray]:
    """`count` disjoint speaker groups covering every non-test speaker of every corpus: each
    corpus's speakers in sorted order, cut into consecutive runs (RAVDESS: actors 1-4, 5-8...)."""
    folds = [np.zeros(len(data.rows), dtype=bool) for _ in range(count)]
    speakers, corpora = data.speakers(), data.corpora()
    for corpus in CORPORA:
        names = sorted(set(speakers[(corpora == corpus) & (data.split != "test")]))
        for k, group in enumerate(np.array_split(np.array(names), count)):
            folds[k] |= np.isin(speakers, group)
    return folds


def cross_validation(config: dict[str, Any], data: Data) -> None:
    """Speaker-fold cross-validation UAR per corpus for recipe variants (causal adaptation).

    Each fold's speakers are scored by a head fitted on the other folds; the test speakers are
    never used. Steadier than one validation split: with 4 speakers per RAVDESS fold, folds
    differ by up to 0.1 UAR."""
    y, speakers, corpora = data.labels(), data.speakers(), data.corpora()
    adapt, head = config["adaptation"], config["head"]
    c, weight = head["c"], head["class_weight"]
    parts, tiny = feature_parts(config["features"]), feature_parts(TINY_FEATURES)
    speeds = config["augment"]["experiment_copies"]  # speed perturbation
    variants = {
        "recipe (config)": (parts, adapt, c, []),
        "recipe, C / 2.5": (parts, adapt, c / 2.5, []),
        "recipe, C x 2": (parts, adapt, c * 2, []),
        "recipe, prior weight 0.5": (parts, adapt | {"prior_weight": 0.5}, c, []),
        "recipe, prior weight 3": (parts, adapt | {"prior_weight": 3.0}, c, []),
        "recipe, 1 training order": (parts, adapt | {"train_orders": 1}, c, []),
        "recipe + egemaps": ([*parts, "egemaps"], adapt, c, []),
        "recipe, whisper only": (parts[:1], adapt, c, []),
        "tiny.en L0-3 + log-mel (v1)": (tiny, adapt, 0.05, []),
        "tiny.en v1 + speed copies": (tiny, adapt, 0.05, speeds),
        "tiny.en v1 + gain copies": (tiny, adapt, 0.05, ["gain"]),
        "tiny.en v1 + noise copies": (tiny, adapt, 0.05, ["noise"]),
        "tiny.en v1 + reverb copies": (tiny, adapt, 0.05, ["reverb"]),
        "tiny.en v1 + SpecAugment copies": (tiny, adapt, 0.05, ["specaugment"]),
        "tiny.en v1 + all 6 copies": (tiny, adapt, 0.05, list(AUGMENTATIONS)),
        "base L2-5 + log-mel": (["whisper_base_speech:2345", "logmel_speech"], adapt, c, []),
        "tiny.en + base + log-mel": (
            ["whisper_speech:0123", "whisper_base_speech:012345", "logmel_speech"], adapt, c, []),
    }  # fmt: skip
    folds = speaker_folds(data, config["cv"]["folds"])
    print(f"{'recipe':<28} {'RAVDESS':>7}  {'per fold':<24} {'EmoDB':>6}")
    for name, (variant_parts, variant_adapt, variant_c, variant_copies) in variants.items():
        x = embedding(data, variant_parts)
        copies = [embedding(data, feature_parts(TINY_FEATURES, f)) for f in variant_copies]
        scores: dict[str, list[float]] = {corpus: [] for corpus in CORPORA}
        for fold in folds:
            train = (data.split != "test") & ~fold
            fit_recipe = Recipe("causal", variant_adapt, variant_c, weight)
            fitted, xv = fit_normalised(
                x, y, speakers, data.order, train, fold, recipe=fit_recipe, copies=copies
            )
            for corpus in CORPORA:
                rows = corpora[fold] == corpus
                scores[corpus].append(uar_on(fitted, xv[rows], y[fold][rows]))
        per_fold = " ".join(f"{v:.3f}" for v in scores["ravdess"])
        print(
            f"{name:<28} {np.mean(scores['ravdess']):>7.3f}  {per_fold:<24} "
            f"{np.mean(scores['emodb']):>6.3f}",
            flush=True,
        )


# --------------------------------------------------------------------------- export


class StrongModel(nn.Module):
    """waveform + baseline -> (logits, embedding): the exported utterance model."""

    def __init__(
        self, whisper: PooledWhisper, features: dict[str, Any], head: LogisticRegression,
        labels: list[str],
    ) -> None:  # fmt: skip
        super().__init__()
        self.whisper = whisper
        self.layers = list(features["whisper_layers"])
        self.logmel = bool(features["logmel_stats"])
        self.speech_db = float(features["speech_db"]) if features["pooling"] == "speech" else None
        self.head = _linear(head, labels)

    def forward(
        self, waveform: torch.Tensor, baseline_mean: torch.Tensor, baseline_std: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (batch, labels) and the embedding (batch, dims) before normalisation."""
        mel = self.whisper.logmel(waveform[:, : 30 * 16000])
        hidden = self.whisper.encoder(mel)
        frames = torch.ones_like(mel[:, 0])
        if self.speech_db is not None:
            frames = speech_frames(mel, self.speech_db)
        weights = encoder_frames(frames, hidden[0].shape[1])
        parts = [mean_std_pool(hidden[i], weights) for i in self.layers]
        if self.logmel:
            parts.append(speech_logmel_stats(mel, frames))
        embedded = torch.cat(parts, dim=-1)
        return self.head((embedded - baseline_mean) / baseline_std), embedded


class WindowModel(nn.Module):
    """waveform -> logits from log-mel statistics: the cheap sliding-window model."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, pop: Baseline, head: LogisticRegression, labels: list[str]) -> None:
        super().__init__()
        self.logmel = LogMel()
        self.register_buffer("mean", torch.from_numpy(pop.mean))
        self.register_buffer("std", torch.from_numpy(pop.std))
        self.head = _linear(head, labels)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """Logits (batch, labels)."""
        stats = logmel_stats(self.logmel, waveform)
        return self.head((stats - self.mean) / self.std)  # type: ignore[no-any-return]


def _linear(head: LogisticRegression, labels: list[str]) -> nn.Linear:
    """The head as a Linear layer with outputs in `labels` order (unseen labels: -30 logit)."""
    classes = list(head.classes_)
    layer = nn.Linear(head.coef_.shape[1], len(labels))
    weight = np.zeros((len(labels), head.coef_.shape[1]), dtype=np.float32)
    bias = np.full(len(labels), -30.0, dtype=np.float32)
    for i, label in enumerate(labels):
        if label in classes:
            weight[i] = head.coef_[classes.index(label)]
            bias[i] = head.intercept_[classes.index(label)]
    layer.weight.data = torch.from_numpy(weight)
    layer.bias.data = torch.from_numpy(bias)
    return layer


def export(
    config: dict[str, Any],
    output: Path,
    model: StrongModel,
    window: WindowModel | None,
    card: AdaptationCard,
    extra_card: dict[str, Any],
) -> None:
    """model.onnx, window.onnx (unless `window` is None: adopt one) and card.json in `output`."""
    output.mkdir(parents=True, exist_ok=True)
    dims = card.dims
    opset = config["export"]["opset"]
    example = (torch.zeros(2, 32000), torch.zeros(dims), torch.ones(dims))
    with quiet_export():
        _export_both(output, model, window, example, opset)
    document = _card_document(config, card) | extra_card
    (output / "card.json").write_text(json.dumps(document, indent=1) + "\n")


def _export_both(
    output: Path, model: nn.Module, window: nn.Module | None, example: Any, opset: int
) -> None:
    torch.onnx.export(
        model.eval(),
        example,
        str(output / "model.onnx"),
        input_names=["waveform", "baseline_mean", "baseline_std"],
        output_names=["logits", "embedding"],
        dynamic_axes={
            "waveform": {0: "batch", 1: "samples"},
            "logits": {0: "batch"},
            "embedding": {0: "batch"},
        },
        opset_version=opset,
        dynamo=False,
    )
    if window is None:
        return
    torch.onnx.export(
        window.eval(),
        (torch.zeros(2, 32000),),
        str(output / "window.onnx"),
        input_names=["waveform"],
        output_names=["logits"],
        dynamic_axes={"waveform": {0: "batch", 1: "samples"}, "logits": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )


def _card_document(config: dict[str, Any], card: AdaptationCard) -> dict[str, Any]:
    exp = config["export"]
    return {
        "format": "stream-ser-model/1",
        "id": exp["model_id"],
        "labels": config["labels"],
        "sample_rate": 16000,
        "window_ms": exp["window_ms"],
        "hop_ms": exp["hop_ms"],
        "min_input_ms": exp["min_input_ms"],
        "input": {"kind": "waveform", "name": "waveform", "normalize": "none"},
        "output": {"name": "logits", "kind": "logits"},
        "window_model": "window.onnx",
        "adaptation": {
            "embedding_output": card.embedding_output,
            "mean_input": card.mean_input,
            "std_input": card.std_input,
            "warmup_utterances": card.warmup_utterances,
            "prior_weight": card.prior_weight,
            "population_mean": [round(float(v), 6) for v in card.population.mean],
            "population_std": [round(float(v), 6) for v in card.population.std],
        }
        | ({} if card.weights is None else {"adapt_weights": card.weights.tolist()}),
    }


def adopt_window_model(
    source: Path, labels: list[str], config: dict[str, Any], output: Path
) -> None:
    """Use another waveform -> logits ONNX model (the baseline CNN) as window.onnx; labels it
    lacks get a logit of -30 (never predicted on windows)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    (logits,) = [o for o in graph.output if o.name == "logits"]
    missing = [label for label in config["labels"] if label not in labels]
    order = [labels.index(label) if label in labels else len(labels) + missing.index(label)
             for label in config["labels"]]  # fmt: skip
    graph.initializer.extend([
        numpy_helper.from_array(np.array([0, 0, 0, len(missing)], np.int64), "window_pads"),
        numpy_helper.from_array(np.array(-30.0, np.float32), "window_pad_value"),
        numpy_helper.from_array(np.array(order, np.int64), "window_order"),
    ])  # fmt: skip
    for node in graph.node:
        node.output[:] = ["source_logits" if o == "logits" else o for o in node.output]
    graph.node.extend([
        helper.make_node("Pad", ["source_logits", "window_pads", "window_pad_value"], ["padded"]),
        helper.make_node("Gather", ["padded", "window_order"], ["logits"], axis=1),
    ])  # fmt: skip
    logits.type.tensor_type.shape.dim[1].dim_value = len(config["labels"])
    onnx.checker.check_model(model)
    onnx.save(model, str(output / "window.onnx"))
    log.info("window model: %s (labels %s, padded with %s)", source, labels, missing)


def quantize(path: Path) -> None:
    """Dynamic int8 quantisation of the weights of `path`, in place."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    before = path.stat().st_size
    float_path = path.with_suffix(".float.onnx")
    path.rename(float_path)
    root = logging.getLogger()
    level = root.level
    root.setLevel("WARNING")  # the quantiser logs every tensor at INFO
    try:
        quantize_dynamic(str(float_path), str(path), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    float_path.unlink()
    log.info("int8: %s %.1f MB -> %.1f MB", path.name, before / 1e6, path.stat().st_size / 1e6)


def write_manifests(config: dict[str, Any], data: Data, folder: Path) -> None:
    """Test-speaker manifests (seeded shuffle within speakers) and whole-corpus manifests."""
    folder.mkdir(parents=True, exist_ok=True)
    for corpus in CORPORA:
        picked = [i for i, row in enumerate(data.rows) if row.corpus == corpus]
        test = sorted((i for i in picked if data.split[i] == "test"), key=lambda i: data.order[i])
        everything = sorted(picked, key=lambda i: data.order[i])
        write_manifest(folder / f"{corpus}-test.csv", data, test)
        write_manifest(folder / f"{corpus}-all.csv", data, everything)
        shared = {"neutral", "happy", "sad", "angry", "fearful", "disgust"}
        common = [i for i in everything if data.rows[i].label in shared]
        write_manifest(folder / f"{corpus}-all-6class.csv", data, common)


def write_manifest(path: Path, data: Data, indices: list[int]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "speaker"])
        for i in indices:
            row = data.rows[i]
            writer.writerow([row.path, row.label, row.speaker.split(":", 1)[1]])


# --------------------------------------------------------------------------- main


def resolve(path: str) -> Path:
    """Paths in the config are relative to the repository root."""
    candidate = Path(path)
    return candidate if candidate.is_absolute() else REPO_ROOT / candidate


def train(config: dict[str, Any], data: Data, output: Path, without: str | None) -> None:
    """Fit the final heads on train + validation speakers (minus `without`) and export."""
    feats, adapt = config["features"], config["adaptation"]
    x = embedding(data, feature_parts(feats))
    y, speakers, corpora = data.labels(), data.speakers(), data.corpora()
    fit = data.split != "test"
    if without is not None:
        fit = corpora != without
    pop = population(x[fit])
    card = adaptation_card(pop, adapt["warmup_utterances"], adapt["prior_weight"])
    copies = [embedding(data, feature_parts(feats, copy)) for copy in config["augment"]["copies"]]
    xa, ya, sa = with_copies(x, copies, y, speakers, fit)
    xt, yt = training_set(xa, ya, sa, card, adapt["train_orders"], config["seed"])
    start = time.monotonic()
    head = fit_head(xt, yt, config["head"]["c"], config["head"]["class_weight"])
    log.info("utterance head: %d rows x %d dims, %.0f s", *xt.shape, time.monotonic() - start)
    temperature = config["head"]["temperature"]
    if temperature == "cv":
        temperature = held_out_temperature(config, data, x, usable=corpora != without)
    head.coef_ /= temperature  # calibration, chosen on validation speakers
    head.intercept_ /= temperature
    mel = data.features["logmel"]
    mel_pop = population(mel[fit])
    window_head = fit_head(
        (mel[fit] - mel_pop.mean) / mel_pop.std,
        y[fit],
        config["window_head"]["c"],
        config["head"]["class_weight"],
    )
    whisper = load_pooled_whisper(encoder=feats.get("encoder", "tiny.en"))
    model = StrongModel(whisper, feats, head, config["labels"])
    trained_on = sorted({row.corpus for row, keep in zip(data.rows, fit, strict=True) if keep})
    extra = {
        "training": {
            "corpora": trained_on,
            "clips": int(fit.sum()),
            "test_speakers_excluded": without is None,
        }
    }
    export(config, output, model, WindowModel(mel_pop, window_head, config["labels"]), card, extra)
    check_export(output, model, data, config)
    exp = config["export"]
    if exp.get("window_source"):
        adopt_window_model(resolve(exp["window_source"]), exp["window_labels"], config, output)
    if exp.get("quantize_int8"):
        quantize(output / "model.onnx")
    log.info("exported %s", output)


def check_export(output: Path, model: StrongModel, data: Data, config: dict[str, Any]) -> None:
    """The ONNX model through stream_ser's Specialist matches torch on a real clip."""
    import soundfile

    from stream_ser.specialist import Specialist

    row = data.rows[0]
    audio, _ = soundfile.read(
        resolve(config["data"]["root"]) / row.corpus / row.path, dtype="float32"
    )
    specialist = Specialist(output)
    probabilities, embedded = specialist.analyze([audio])
    pop = specialist.card.adaptation.population  # type: ignore[union-attr]
    with torch.no_grad():
        logits, expected = model(
            torch.from_numpy(audio)[None], torch.from_numpy(pop.mean), torch.from_numpy(pop.std)
        )
    reference = torch.softmax(logits.double(), -1).numpy()
    log.info(
        "onnx vs torch: probabilities max |diff| %.1e, embedding %.1e",
        np.abs(probabilities - reference).max(),
        np.abs(embedded - expected.numpy()).max(),
    )


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--experiments", action="store_true", help="print the recipe comparison")
    parser.add_argument(
        "--cv", action="store_true", help="print speaker-fold cross-validation of recipe variants"
    )
    parser.add_argument("--without", choices=CORPORA, help="train without this corpus")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--float32", action="store_true", help="skip the int8 quantisation")
    args = parser.parse_args(argv)
    config = tomllib.loads(Path(args.config).read_text())
    runs = resolve(config["runs_dir"])
    runs.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level="INFO",
        format="%(asctime)s %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(runs / "train.log")],
    )
    torch.manual_seed(config["seed"])
    torch.set_num_threads(config["threads"])
    log.info("config %s: %s", args.config, json.dumps(config))
    encoder_kind = WHISPER_KINDS[config["features"].get("encoder", "tiny.en")]
    kinds: tuple[str, ...] = (encoder_kind, "logmel_speech", "logmel")
    kinds += tuple(f"{kind}@{copy}" for copy in config["augment"]["copies"] for kind in kinds[:2])
    if args.experiments or args.cv:
        kinds += (*WHISPER_KINDS.values(), "egemaps")
    if args.cv:
        kinds += tuple(f"{kind}@{copy}" for copy in AUGMENTATIONS for kind in TINY_KINDS)
    if args.experiments:
        copies = config["augment"]["experiment_copies"]
        kinds += tuple(f"{kind}@{copy}" for copy in copies for kind in TINY_KINDS)
        kinds += ("whisper", "whisper_speech@pad30", "logmel_speech@pad30")
    kinds = tuple(dict.fromkeys(kinds))
    data = load_data(config, kinds)
    write_manifests(config, data, runs / "manifests")
    if args.experiments:
        experiments(config, data)
        return 0
    if args.cv:
        cross_validation(config, data)
        return 0
    if args.float32:
        config["export"]["quantize_int8"] = False
    train(config, data, resolve(args.output_dir or config["output_dir"]), args.without)
    return 0


if __name__ == "__main__":
    sys.exit(main())
