"""Cached utterance features for tools/train_strong.py: Whisper pools, log-mel stats, eGeMAPS.

Each feature kind is computed once per corpus and cached as `<cache>/<corpus>-<kind>.npy`
(rows in manifest order). Caches hold derived numbers only, never audio; keep them out of git
(the default cache is under the gitignored runs/ folder).
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch
from whisper_encoder import (
    LogMel,
    encoder_frames,
    load_pooled_whisper,
    mean_std_pool,
    speech_frames,
)

log = logging.getLogger("train_strong")

WHISPER_LAYERS = (0, 1, 2, 3)  # cached: mean+std of every layer (4 x 768)
WHISPER_KINDS = {"tiny.en": "whisper_speech", "base": "whisper_base_speech"}  # cache names
WIDTHS = {"whisper": 384, "whisper_base": 512}  # hidden size: a layer's pool is 2 x width
SPEECH_DB = 35.0  # speech frames: loudest band within this many dB of the clip's loudest frame


@dataclass(frozen=True)
class Row:
    """One clip of a corpus manifest."""

    corpus: str
    path: str  # relative to the corpus folder
    label: str
    speaker: str


def read_corpus(root: Path, corpus: str) -> list[Row]:
    """The rows of `<root>/<corpus>/manifest.csv`."""
    with (root / corpus / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        return [
            Row(corpus, r["path"], r["label"], f"{corpus}:{r['speaker']}")
            for r in csv.DictReader(handle)
        ]


def logmel_stats(logmel: LogMel, waveform: torch.Tensor) -> torch.Tensor:
    """(batch, 240): mean, std and delta std of Whisper's 80 log-mels over time."""
    mel = logmel(waveform)
    delta = mel[:, :, 1:] - mel[:, :, :-1]
    return torch.cat([mel.mean(-1), mel.std(-1), delta.std(-1)], dim=-1)


def _whisper_and_logmel() -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    model = load_pooled_whisper(tuple(i - 4 for i in WHISPER_LAYERS))

    def extract(audio: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            waveform = torch.from_numpy(audio)[None]
            return {
                "whisper": model(waveform)[0].numpy(),
                "logmel": logmel_stats(model.logmel, waveform)[0].numpy(),
            }

    return extract


def speech_logmel_stats(mel: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(batch, 240): mean, std and delta std of the log-mels over speech frames only."""
    w = weights[:, None, :] / weights.sum(dim=1).clamp(min=1.0)[:, None, None]
    mean = (mel * w).sum(-1)
    std = torch.sqrt(((mel - mean[:, :, None]) ** 2 * w).sum(-1) + 1e-6)
    delta = mel[:, :, 1:] - mel[:, :, :-1]
    wd = weights[:, 1:] * weights[:, :-1]
    wd = wd[:, None, :] / wd.sum(dim=1).clamp(min=1.0)[:, None, None]
    dmean = (delta * wd).sum(-1)
    dstd = torch.sqrt(((delta - dmean[:, :, None]) ** 2 * wd).sum(-1) + 1e-6)
    return torch.cat([mean, std, dstd], dim=-1)


def _speech_pooled(
    pad_to_s: float = 0.0, encoder: str = "tiny.en"
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Speech-frame pools; with `pad_to_s`, the input is zero-padded to that length first (Whisper
    itself always encodes 30 s windows)."""
    model = load_pooled_whisper(encoder=encoder)
    suffix = f"@pad{pad_to_s:g}" if pad_to_s else ""
    name = WHISPER_KINDS[encoder]

    def extract(audio: np.ndarray) -> dict[str, np.ndarray]:
        if pad_to_s:
            audio = np.pad(audio, (0, max(0, int(pad_to_s * 16000) - len(audio))))
        with torch.no_grad():
            mel = model.logmel(torch.from_numpy(audio)[None])
            hidden = model.encoder(mel)
            frames = speech_frames(mel, SPEECH_DB)
            weights = encoder_frames(frames, hidden[0].shape[1])
            pooled = torch.cat([mean_std_pool(h, weights) for h in hidden], dim=-1)
            return {
                name + suffix: pooled[0].numpy(),
                "logmel_speech" + suffix: speech_logmel_stats(mel, frames)[0].numpy(),
            }

    return extract


def _egemaps() -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    import opensmile

    smile = opensmile.Smile(
        feature_set=opensmile.FeatureSet.eGeMAPSv02,
        feature_level=opensmile.FeatureLevel.Functionals,
    )

    def extract(audio: np.ndarray) -> dict[str, np.ndarray]:
        frame = smile.process_signal(audio, 16000)
        return {"egemaps": frame.to_numpy(dtype=np.float32)[0]}

    return extract


EXTRACTORS = {
    "whisper": _whisper_and_logmel,
    "logmel": _whisper_and_logmel,
    "egemaps": _egemaps,
    "whisper_speech": _speech_pooled,
    "logmel_speech": _speech_pooled,
}


def _speed(factor: float) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Speech-pooled features of the clip played `factor` times faster (pitch shifts too)."""
    inner = _speech_pooled()

    def extract(audio: np.ndarray) -> dict[str, np.ndarray]:
        faster = soxr.resample(audio, round(16000 * factor), 16000).astype(np.float32)
        return {f"{name}@{factor}": value for name, value in inner(faster).items()}

    return extract


EXTRACTORS["whisper_base_speech"] = lambda: _speech_pooled(encoder="base")
EXTRACTORS["whisper_speech@pad30"] = lambda: _speech_pooled(30.0)
EXTRACTORS["logmel_speech@pad30"] = lambda: _speech_pooled(30.0)
SPEEDS = (0.9, 1.1)  # speed perturbation for training-set augmentation
for _factor in SPEEDS:
    EXTRACTORS[f"whisper_speech@{_factor}"] = lambda f=_factor: _speed(f)
    EXTRACTORS[f"logmel_speech@{_factor}"] = lambda f=_factor: _speed(f)


def cached_features(
    root: Path, corpus: str, kind: str, cache: Path, threads: int = 1
) -> np.ndarray:
    """(clips, dims) features of one corpus, from the cache or computed now."""
    path = cache / f"{corpus}-{kind}.npy"
    if path.is_file():
        return np.load(path)
    torch.set_num_threads(threads)
    rows = read_corpus(root, corpus)
    extract = EXTRACTORS[kind]()
    columns: dict[str, list[np.ndarray]] = {}
    start = time.monotonic()
    for i, row in enumerate(rows):
        audio, rate = soundfile.read(root / corpus / row.path, dtype="float32")
        assert rate == 16000, row.path
        for name, value in extract(audio).items():
            columns.setdefault(name, []).append(value)
        if (i + 1) % 200 == 0:
            log.info(
                "%s %s: %d/%d clips, %.0f s",
                corpus,
                kind,
                i + 1,
                len(rows),
                time.monotonic() - start,
            )
    cache.mkdir(parents=True, exist_ok=True)
    for name, values in columns.items():
        np.save(cache / f"{corpus}-{name}.npy", np.stack(values).astype(np.float32))
    return np.load(path)


if __name__ == "__main__":
    import sys

    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    root = Path(__file__).resolve().parent.parent.parent / "shared/datasets"
    for corpus in sys.argv[3:] or ("emodb", "ravdess"):
        cached_features(root, corpus, sys.argv[1], Path(sys.argv[2]))
