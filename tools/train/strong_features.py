"""Cached utterance features for tools/train/train_strong.py: Whisper pools, log-mel stats, eGeMAPS.

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
from functools import partial
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile
import soxr
import torch

from stream_ser import SAMPLE_RATE
from tools.train.whisper_encoder import (
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


AudioTransform = Callable[[np.ndarray, np.random.Generator], np.ndarray]
MelTransform = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]


def _speech_pooled(
    pad_to_s: float = 0.0,
    encoder: str = "tiny.en",
    copy: str = "",
    audio_transform: AudioTransform | None = None,
    mel_transform: MelTransform | None = None,
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Speech-frame pools; with `pad_to_s`, the input is zero-padded to that length first (Whisper
    itself always encodes 30 s windows). An augmented `copy` (cached as `<kind>@<copy>`) passes
    the audio through `audio_transform` and/or the log-mels through `mel_transform`, each
    drawing from one seeded generator (clips in manifest order: reproducible); its speech frames
    are those of the unmasked log-mels."""
    model = load_pooled_whisper(encoder=encoder)
    suffix = f"@pad{pad_to_s:g}" if pad_to_s else f"@{copy}" if copy else ""
    name = WHISPER_KINDS[encoder]
    rng = np.random.default_rng(0)

    def extract(audio: np.ndarray) -> dict[str, np.ndarray]:
        if pad_to_s:
            audio = np.pad(audio, (0, max(0, int(pad_to_s * 16000) - len(audio))))
        if audio_transform is not None:
            audio = audio_transform(audio, rng).astype(np.float32)
        with torch.no_grad():
            mel = model.logmel(torch.from_numpy(audio)[None])
            frames = speech_frames(mel, SPEECH_DB)
            if mel_transform is not None:
                mel = mel_transform(mel, rng)
            hidden = model.encoder(mel)
            weights = encoder_frames(frames, hidden[0].shape[1])
            pooled = torch.cat([mean_std_pool(h, weights) for h in hidden], dim=-1)
            return {
                name + suffix: pooled[0].numpy(),
                "logmel_speech" + suffix: speech_logmel_stats(mel, frames)[0].numpy(),
            }

    return extract


def speed(factor: float) -> AudioTransform:
    """Played `factor` times faster (pitch shifts too)."""
    return lambda audio, rng: soxr.resample(audio, round(16000 * factor), 16000)


def gain(low_db: float, high_db: float) -> AudioTransform:
    """Louder or quieter by a random low..high dB (Whisper's log-mel shifts with the level)."""
    return lambda audio, rng: audio * 10 ** (rng.uniform(low_db, high_db) / 20)


def noise(low_db: float, high_db: float) -> AudioTransform:
    """White noise at a random low..high dB signal-to-noise ratio (over the whole clip)."""

    def add(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        snr_db = rng.uniform(low_db, high_db)
        power = float(np.mean(audio**2)) or 1e-10
        return audio + rng.normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)), len(audio))

    return add


def reverb(low_s: float, high_s: float) -> AudioTransform:
    """Convolved with a synthetic room response (exponentially decaying noise after the direct
    sound, a random RT60 of low..high s), peak level kept."""

    def convolve(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        rt60_s = rng.uniform(low_s, high_s)
        t = np.arange(int(rt60_s * 16000)) / 16000
        response = rng.normal(0.0, 1.0, len(t)) * 10 ** (-3 * t / rt60_s)  # -60 dB at rt60
        response *= 0.3 / np.sqrt(np.sum(response**2))
        response[0] = 1.0
        wet = scipy.signal.fftconvolve(audio, response)[: len(audio)]
        return np.asarray(wet * (np.abs(audio).max() / max(np.abs(wet).max(), 1e-9)))

    return convolve


def spec_augment(mel: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """SpecAugment masks: 2 bands of up to 8 mel bins and 2 spans of up to 10 % of the frames,
    set to the clip's mean log-mel."""
    masked = mel.clone()
    fill = float(mel.mean())
    bins, frames = mel.shape[1], mel.shape[2]
    for _ in range(2):
        width = int(rng.integers(0, 9))
        start = int(rng.integers(0, bins - width + 1))
        masked[:, start : start + width] = fill
        span = int(rng.integers(0, max(1, frames // 10) + 1))
        start = int(rng.integers(0, frames - span + 1))
        masked[:, :, start : start + span] = fill
    return masked


# augmented copies of the training clips: name -> (audio transform, log-mel transform)
AUGMENTATIONS: dict[str, tuple[AudioTransform | None, MelTransform | None]] = {
    "0.9": (speed(0.9), None),
    "1.1": (speed(1.1), None),
    "gain": (gain(-6.0, 6.0), None),
    "noise": (noise(10.0, 20.0), None),
    "reverb": (reverb(0.2, 0.7), None),
    "specaugment": (None, spec_augment),
}


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


EXTRACTORS["whisper_base_speech"] = lambda: _speech_pooled(encoder="base")
EXTRACTORS["whisper_speech@pad30"] = lambda: _speech_pooled(30.0)
EXTRACTORS["logmel_speech@pad30"] = lambda: _speech_pooled(30.0)
for _copy, (_audio, _mel) in AUGMENTATIONS.items():
    for _kind in ("whisper_speech", "logmel_speech"):
        EXTRACTORS[f"{_kind}@{_copy}"] = partial(
            _speech_pooled, copy=_copy, audio_transform=_audio, mel_transform=_mel
        )


def cached_features(
    root: Path, corpus: str, kind: str, cache: Path, threads: int = 1
) -> np.ndarray:
    """(clips, dims) features of one corpus, from the cache or computed now."""
    path = cache / f"{corpus}-{kind}.npy"
    if path.is_file():
        return np.asarray(np.load(path))
    torch.set_num_threads(threads)
    rows = read_corpus(root, corpus)
    extract = EXTRACTORS[kind]()
    columns: dict[str, list[np.ndarray]] = {}
    start = time.monotonic()
    for i, row in enumerate(rows):
        audio, rate = soundfile.read(root / corpus / row.path, dtype="float32")
        assert rate == SAMPLE_RATE, row.path
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
    return np.asarray(np.load(path))


if __name__ == "__main__":
    import sys

    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    root = Path(__file__).resolve().parents[3] / "shared/datasets"
    for corpus in sys.argv[3:] or ("emodb", "ravdess"):
        cached_features(root, corpus, sys.argv[1], Path(sys.argv[2]))
