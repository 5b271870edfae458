"""Exploratory: fine-tune the top layer(s) of a Whisper encoder, then score the adaptive recipe.

Usage (repository root, after tools/train/train_strong.py has filled the feature cache):

    .venv/bin/python -m tools.train.finetune_top tools/train/configs/strong-base.toml  # validation
    .venv/bin/python -m tools.train.finetune_top tools/train/configs/strong-base.toml --cv  # folds

The bundled recipe keeps the encoder frozen. This script asks what fine-tuning its top layers
(`--top`, default 1) buys: the frames entering those layers are computed once and cached
(`<cache>/<corpus>-<encoder>-frames-in<layer>.pt`, float16, all frames, ~0.3 GB for base); the
top layers and the final layer norm are trained from the pretrained weights with a linear
classifier on their speech-pooled mean + std. Batches hold up to 16 clips of each of 2 speakers
and normalise the pooled embedding per speaker within the batch (what the causal baseline does
at run time), with frame dropout, dropout and class-balanced cross-entropy. The fine-tuned
layers' pools then replace the frozen ones in the recipe's embedding (lower layers + log-mel),
and the recipe's causal logistic head is fitted and scored as in `train_strong.py`. Test
speakers are never used. Not part of the bundled model (see models/default/README.md).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
from torch import nn

from tools.train import train_strong as ts
from tools.train.strong_features import SPEECH_DB, WHISPER_KINDS, WIDTHS, read_corpus
from tools.train.whisper_encoder import (
    PooledWhisper,
    encoder_frames,
    load_pooled_whisper,
    speech_frames,
)

Clip = tuple[torch.Tensor, torch.Tensor]  # frames entering the top layers (time, width), speech
MIN_PART = 4
"""A speaker's share of a batch: fewer clips and it sits that step out."""
FRAME_DROPOUT = 0.1
"""Share of the frames left out of each pooled clip while fine-tuning."""


def frames_cache(whisper: PooledWhisper, cut: int, root: Path, corpus: str, cache: Path,
                 encoder: str) -> list[Clip]:  # fmt: skip
    """Per clip, the output of encoder layer `cut - 1` and the speech weights of its frames."""
    path = cache / f"{corpus}-{encoder}-frames-in{cut}.pt"
    if path.is_file():
        return torch.load(path)  # type: ignore[no-any-return]
    clips = []
    for row in read_corpus(root, corpus):
        audio, _ = soundfile.read(root / corpus / row.path, dtype="float32")
        with torch.no_grad():
            mel = whisper.logmel(torch.from_numpy(audio[: 30 * 16000])[None])
            x = whisper.encoder.stem(mel)
            for layer in whisper.encoder.layers[:cut]:
                x = layer(x)
            weights = encoder_frames(speech_frames(mel, SPEECH_DB), x.shape[1])[0]
        clips.append((x[0].half(), weights))
    torch.save(clips, path)
    return clips


class TopLayers(nn.Module):
    """Copies of the encoder's top layers and final norm, with a padding mask for batches."""

    def __init__(self, whisper: PooledWhisper, cut: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for layer in whisper.encoder.layers[cut:])
        self.norm = copy.deepcopy(whisper.encoder.norm)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """(batch, time, width) frames, (batch, time) True where not padding -> same shape."""
        mask = real[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)  # type: ignore[no-any-return]


def pool(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean and standard deviation over time, (batch, 2 * width)."""
    w = weights[:, :, None] / weights.sum(dim=1).clamp(min=1.0)[:, None, None]
    mean = (hidden * w).sum(dim=1)
    std = torch.sqrt(((hidden - mean[:, None]) ** 2 * w).sum(dim=1) + 1e-6)
    return torch.cat([mean, std], dim=-1)


def padded(clips: list[Clip], ids: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Frames, padding mask and speech weights of some clips, zero-padded to the longest."""
    steps = max(len(clips[i][0]) for i in ids)
    x = torch.zeros(len(ids), steps, clips[0][0].shape[1])
    real = torch.zeros(len(ids), steps, dtype=torch.bool)
    weights = torch.zeros(len(ids), steps)
    for j, i in enumerate(ids):
        frames, speech = clips[i]
        x[j, : len(frames)] = frames.float()
        real[j, : len(frames)] = True
        weights[j, : len(frames)] = speech
    return x, real, weights


def speaker_batches(
    train: np.ndarray, speakers: np.ndarray, rng: np.random.Generator
) -> list[list[np.ndarray]]:
    """One epoch of batches: each up to 16 clips of each of 2 speakers (>= 4 clips each)."""
    names = list(rng.permutation(sorted(set(speakers[train]))))
    batches = []
    for g in range(0, len(names), 2):
        chunks = []
        for name in names[g : g + 2]:
            members = rng.permutation(np.flatnonzero(train & (speakers == name)))
            chunks.append([members[k : k + 16] for k in range(0, len(members), 16)])
        for step in range(max(len(c) for c in chunks)):
            parts = [c[step] for c in chunks if step < len(c) and len(c[step]) >= MIN_PART]
            if parts:
                batches.append(parts)
    return [batches[i] for i in rng.permutation(len(batches))]


def finetune(
    whisper: PooledWhisper, cut: int, clips: list[Clip], target: np.ndarray,
    speakers: np.ndarray, train: np.ndarray, *, args: argparse.Namespace,
) -> TopLayers:  # fmt: skip
    """The top layers fine-tuned on the `train` clips."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    top = TopLayers(whisper, cut)
    classes = int(target.max()) + 1
    head = nn.Linear(2 * clips[0][0].shape[1], classes)
    counts = np.bincount(target[train], minlength=classes)
    balance = torch.tensor(counts.sum() / np.maximum(counts, 1) / classes, dtype=torch.float32)
    optimizer = torch.optim.AdamW(
        [{"params": top.parameters(), "lr": args.lr}, {"params": head.parameters(), "lr": 1e-3}],
        weight_decay=0.01,
    )
    for epoch in range(args.epochs):
        top.train()
        start, losses = time.monotonic(), []
        for parts in speaker_batches(train, speakers, rng):
            ids = np.concatenate(parts)
            x, real, weights = padded(clips, ids)
            weights = weights * (torch.rand_like(weights) > FRAME_DROPOUT)
            pooled = pool(top(x, real), weights)
            bounds = np.cumsum([0] + [len(p) for p in parts])
            normed = [
                (pooled[a:b] - pooled[a:b].mean(0)) / (pooled[a:b].std(0) + 1e-3)
                for a, b in itertools.pairwise(bounds)
            ]
            logits = head(F.dropout(torch.cat(normed), 0.2, training=True))
            loss = F.cross_entropy(logits, torch.from_numpy(target[ids]), weight=balance)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        print(f"  epoch {epoch}: loss {np.mean(losses):.3f}, {time.monotonic() - start:.0f} s",
              flush=True)  # fmt: skip
    return top


def pooled_all(top: TopLayers, clips: list[Clip]) -> np.ndarray:
    """The fine-tuned last layer's speech pool of every clip, (clips, 2 * width)."""
    top.eval()
    rows = []
    with torch.no_grad():
        for i in range(len(clips)):
            x, real, weights = padded(clips, np.array([i]))
            rows.append(pool(top(x, real), weights)[0].numpy())
    return np.stack(rows)


def recipe_scores(
    config: dict[str, Any], data: ts.Data, frozen: np.ndarray, tuned: np.ndarray,
    train: np.ndarray, test: np.ndarray,
) -> list[float]:  # fmt: skip
    """UAR per corpus of the recipe's causal head on lower frozen pools + tuned pool + log-mel."""
    x = np.concatenate([frozen, tuned, data.features["logmel_speech"]], axis=1)
    y = data.labels()
    fitted, xv = ts.fit_normalised(
        x.astype(np.float64), y, data.speakers(), data.order, train, test,
        recipe=ts.Recipe.causal(config),
    )  # fmt: skip
    corpora = data.corpora()[test]
    return [ts.uar_on(fitted, xv[corpora == c], y[test][corpora == c]) for c in ts.CORPORA]


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--top", type=int, default=1, help="layers to fine-tune")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cv", action="store_true", help="speaker folds instead of validation")
    args = parser.parse_args(argv)
    config = tomllib.loads(Path(args.config).read_text())
    torch.set_num_threads(2)
    encoder = config["features"].get("encoder", "tiny.en")
    kind = WHISPER_KINDS[encoder]
    width = WIDTHS[kind.removesuffix("_speech")]
    data = ts.load_data(config, (kind, "logmel_speech"))
    whisper = load_pooled_whisper(encoder=encoder)
    cut = len(whisper.encoder.layers) - args.top
    root, cache = ts.resolve(config["data"]["root"]), ts.resolve(config["cache_dir"])
    clips = [c for corpus in ts.CORPORA
             for c in frames_cache(whisper, cut, root, corpus, cache, encoder)]  # fmt: skip
    labels = sorted(set(data.labels()))
    target = np.array([labels.index(label) for label in data.labels()])
    frozen = data.features[kind][:, : 2 * width * cut]  # the pools of the layers left frozen
    if args.cv:
        splits = [((data.split != "test") & ~fold, fold)
                  for fold in ts.speaker_folds(data, config["cv"]["folds"])]  # fmt: skip
    else:
        splits = [(data.split == "train", data.split == "val")]
    scores = []
    for train, test in splits:
        top = finetune(whisper, cut, clips, target, data.speakers(), train, args=args)
        scores.append(recipe_scores(config, data, frozen, pooled_all(top, clips), train, test))
        print(f"RAVDESS {scores[-1][0]:.3f}, EmoDB {scores[-1][1]:.3f}", flush=True)
    mean = np.mean(scores, axis=0)
    what = "cross-validation" if args.cv else "validation"
    print(f"{encoder}, top {args.top} fine-tuned: {what} UAR RAVDESS {mean[0]:.3f}, "
          f"EmoDB {mean[1]:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
