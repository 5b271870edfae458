"""Exploratory: an attentive-pooling head on Whisper frames, against the bundled recipe.

Usage (repository root, after tools/train/train_strong.py has filled the feature cache):

    .venv/bin/python -m tools.train.frame_head tools/train/configs/strong.toml

The tiny.en recipe (bundled model v1) pools each Whisper tiny.en layer with a fixed mean +
standard deviation and fits a logistic regression. This script asks whether a learned pooling
does better: a small network on the frames of all 4 layers (projection 1536 -> 256, GELU,
attention weights, weighted mean + std, linear output), trained per fold with the same causal
speaker baselines (frames minus the stream's running mean of the layer means) and random frame
dropout. It prints the speaker-fold cross-validation UAR (the folds of `train_strong.py --cv`)
of the frame head, of the tiny.en recipe, and of their late fusion (weighted sum of
log-probabilities). Test speakers are never used.

Frames (float16, speech frames only, ~0.5 GB) are cached as `<cache>/<corpus>-speech-frames*.npy`.
About 15 minutes on 2 cores; not part of the bundled model (it did not do better).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
from torch import nn

from stream_ser.adaptation import StreamBaseline
from stream_ser.specialist import AdaptationCard
from tools.train import train_strong as ts
from tools.train.strong_features import SPEECH_DB, read_corpus
from tools.train.whisper_encoder import encoder_frames, load_pooled_whisper, speech_frames

LAYERS = 4
MIN_FRAMES = 5
"""Frame dropout never leaves a clip with fewer frames than this (it keeps them all)."""
MEANS = np.concatenate([np.arange(2 * ts.WIDTH * i, 2 * ts.WIDTH * i + ts.WIDTH) for i in range(4)])
TINY_C = 0.05  # the tiny.en recipe's head strength (v1)
FUSION_WEIGHTS = (0.0, 0.2, 0.35, 0.5, 1.0)  # frame head's weight in the fusion: 0 recipe, 1 alone


def speech_frame_cache(root: Path, corpus: str, cache: Path) -> list[torch.Tensor]:
    """Per clip, the speech frames of all encoder layers, (frames, 4 * 384) float16."""
    path = cache / f"{corpus}-speech-frames.npy"
    if not path.is_file():
        model = load_pooled_whisper()
        clips = []
        for row in read_corpus(root, corpus):
            audio, _ = soundfile.read(root / corpus / row.path, dtype="float32")
            with torch.no_grad():
                mel = model.logmel(torch.from_numpy(audio[: 30 * 16000])[None])
                hidden = torch.cat(model.encoder(mel), dim=-1)[0]
                speech = encoder_frames(speech_frames(mel, SPEECH_DB), len(hidden))[0] > 0
            clips.append(hidden[speech].numpy().astype(np.float16))
        np.save(
            cache / f"{corpus}-speech-frames-offsets.npy", np.cumsum([0] + [len(c) for c in clips])
        )
        np.save(path, np.concatenate(clips))
    frames, offsets = np.load(path), np.load(cache / f"{corpus}-speech-frames-offsets.npy")
    return [torch.from_numpy(frames[a:b]) for a, b in itertools.pairwise(offsets)]


class FrameHead(nn.Module):
    """Frames (batch, time, 1536) + mask -> logits: projection, attentive mean + std, linear."""

    def __init__(self, labels: int, width: int = 256, dropout: float = 0.3) -> None:
        super().__init__()
        self.project = nn.Sequential(
            nn.Dropout(0.1), nn.Linear(LAYERS * ts.WIDTH, width), nn.GELU()
        )
        self.attention = nn.Sequential(nn.Linear(width, 64), nn.Tanh(), nn.Linear(64, 1))
        self.output = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, labels))

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (batch, labels)."""
        hidden = self.project(frames)
        scores = self.attention(hidden).squeeze(-1).masked_fill(~mask, -1e4)
        weights = scores.softmax(dim=-1)[..., None]
        mean = (hidden * weights).sum(dim=1)
        std = ((hidden - mean[:, None]) ** 2 * weights).sum(dim=1).clamp(min=1e-5).sqrt()
        return self.output(torch.cat([mean, std], dim=-1))  # type: ignore[no-any-return]


def stream_means(
    x: np.ndarray, rows: np.ndarray, speakers: np.ndarray, order: np.ndarray, card: AdaptationCard
) -> dict[int, np.ndarray]:
    """Per clip, the layer means of its stream's baseline before it (causal, as in eval)."""
    means = {}
    for speaker in np.unique(speakers[rows]):
        members = rows[speakers[rows] == speaker]
        stream = StreamBaseline(card)
        for i in members[np.argsort(order[members])]:
            means[int(i)] = (stream.current() or card.population).mean[MEANS]
            stream.update(x[i])
    return means


def batch(
    clips: list[torch.Tensor], ids: np.ndarray, means: dict[int, np.ndarray], scale: torch.Tensor,
    drop: float, rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Padded, speaker-normalised frames and their mask; `drop` of the frames left out at random."""
    chosen = []
    for i in ids:
        frames = (clips[i].float() - torch.from_numpy(means[int(i)])) / scale
        keep = rng.random(len(frames)) >= drop
        chosen.append(frames[torch.from_numpy(keep)] if keep.sum() >= MIN_FRAMES else frames)
    padded = torch.zeros(len(ids), max(len(f) for f in chosen), LAYERS * ts.WIDTH)
    mask = torch.zeros(padded.shape[:2], dtype=torch.bool)
    for j, frames in enumerate(chosen):
        padded[j, : len(frames)] = frames
        mask[j, : len(frames)] = True
    return padded, mask


def train_fold(
    clips: list[torch.Tensor], x: np.ndarray, target: np.ndarray, data: ts.Data,
    train: np.ndarray, test: np.ndarray, *, config: dict[str, Any], labels: int,
) -> np.ndarray:  # fmt: skip
    """Log-probabilities of the `test` clips from a frame head trained on `train`."""
    seed, adapt = config["seed"], config["adaptation"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    speakers = data.speakers()
    card = ts.adaptation_card(ts.population(x[train]), adapt["warmup_utterances"],
                              adapt["prior_weight"])  # fmt: skip
    rows, held = np.flatnonzero(train), np.flatnonzero(test)
    orders = [stream_means(x, rows, speakers, rng.permutation(len(x)), card)
              for _ in range(adapt["train_orders"])]  # fmt: skip
    scale = torch.cat([clips[i].float() for i in rows]).std(dim=0) + 1e-3
    counts = np.bincount(target[rows], minlength=labels).astype(float)
    balance = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / (counts > 0).sum(), 0)
    model = FrameHead(labels)
    epochs, size = 20, 32
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, 1e-3, total_steps=epochs * math.ceil(len(rows) / size)
    )
    for _ in range(epochs):
        model.train()
        shuffled = rng.permutation(rows)
        for k in range(0, len(shuffled), size):
            ids = shuffled[k : k + size]
            frames, mask = batch(clips, ids, orders[rng.integers(len(orders))], scale, 0.2, rng)
            loss = F.cross_entropy(model(frames, mask), torch.from_numpy(target[ids]),
                                   weight=torch.tensor(balance, dtype=torch.float32))  # fmt: skip
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    model.eval()
    means = stream_means(x, held, speakers, data.order, card)
    with torch.no_grad():
        logits = [model(*batch(clips, held[k : k + 64], means, scale, 0.0, rng))
                  for k in range(0, len(held), 64)]  # fmt: skip
    return np.asarray(torch.log_softmax(torch.cat(logits), dim=-1).numpy())


def uar(log_probabilities: np.ndarray, target: np.ndarray) -> float:
    """UAR with predictions restricted to the classes present in `target`."""
    present = np.unique(target)
    predicted = present[log_probabilities[:, present].argmax(axis=1)]
    return float(np.mean([np.mean(predicted[target == k] == k) for k in present]))


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    args = parser.parse_args(argv)
    config = tomllib.loads(Path(args.config).read_text())
    torch.set_num_threads(2)
    data = ts.load_data(config, ("whisper_speech", "logmel_speech"))
    root, cache = ts.resolve(config["data"]["root"]), ts.resolve(config["cache_dir"])
    clips = [clip for corpus in ts.CORPORA for clip in speech_frame_cache(root, corpus, cache)]
    labels = config["labels"]
    target = np.array([labels.index(label) for label in data.labels()])
    x = ts.embedding(data, ts.feature_parts(ts.TINY_FEATURES))  # its frames are tiny.en's
    adapt, head = config["adaptation"], config["head"] | {"c": TINY_C}
    scores: dict[float, dict[str, list[float]]] = {w: {c: [] for c in ts.CORPORA}
                                                   for w in FUSION_WEIGHTS}  # fmt: skip
    for k, fold in enumerate(ts.speaker_folds(data, config["cv"]["folds"])):
        train = (data.split != "test") & ~fold
        frame = train_fold(clips, x, target, data, train, fold, config=config, labels=len(labels))
        fit_recipe = ts.Recipe("causal", adapt, head["c"], head["class_weight"])
        fitted, xv = ts.fit_normalised(
            x, data.labels(), data.speakers(), data.order, train, fold, recipe=fit_recipe
        )
        recipe = np.full_like(frame, -1e9)
        recipe[:, [labels.index(c) for c in fitted.classes_]] = fitted.predict_log_proba(xv)
        corpora = data.corpora()[fold]
        for weight in FUSION_WEIGHTS:
            fused = (1 - weight) * recipe + weight * frame
            for corpus in ts.CORPORA:
                rows = corpora == corpus
                scores[weight][corpus].append(uar(fused[rows], target[fold][rows]))
        print(f"fold {k + 1} done", file=sys.stderr, flush=True)
    print(f"{'frame-head weight':<18} {'RAVDESS':>7}  {'per fold':<24} {'EmoDB':>6}")
    for weight, result in scores.items():
        per_fold = " ".join(f"{v:.3f}" for v in result["ravdess"])
        print(f"{weight:<18} {np.mean(result['ravdess']):>7.3f}  {per_fold:<24} "
              f"{np.mean(result['emodb']):>6.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
