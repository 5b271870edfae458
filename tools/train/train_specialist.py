"""Train, export and evaluate the bundled default specialist (log-mel CNN on raw waveform).

Usage (from the repository root):

    .venv/bin/python -m tools.train.train_specialist tools/train/configs/baseline.toml

Reads RAVDESS and EmoDB from the shared dataset folder, trains on a speaker-independent split,
picks the epoch with the best validation UAR, exports `model.onnx` + `card.json` to the output
directory, checks ONNX/torch parity through `stream_ser.specialist.Specialist`, evaluates the
held-out test speakers through that same wrapper and writes `metrics.json` and `train.log`.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import platform
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]

from stream_ser.specialist import Specialist  # noqa: E402

SAMPLE_RATE = 16000
LABELS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprise")
CORPORA = ("ravdess", "emodb")
MIN_BATCH = 2
"""Smaller batches are skipped: batch norm needs two examples."""

log = logging.getLogger("train_specialist")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DataConfig:
    """Where the corpora are and how speakers are split."""

    root: str
    ravdess_test_speakers: list[str]
    ravdess_val_speakers: list[str]
    emodb_test_speakers: list[str]
    emodb_val_speakers: list[str]
    trim_db: float  # speech region threshold below the loudest frame, dB


@dataclass(frozen=True)
class FeatureConfig:
    """Log-mel front end; lengths in samples at 16 kHz."""

    n_fft: int
    win_length: int
    hop_length: int
    n_mels: int
    fmin_hz: float
    fmax_hz: float
    speech_range_db: float  # frames this far below the loudest frame get half weight
    weight_softness_db: float  # width of the sigmoid from low to full weight


@dataclass(frozen=True)
class ModelConfig:
    """CNN size."""

    channels: list[int]
    dropout: float


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and augmentation; times in seconds, levels in dB."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    label_smoothing: float
    min_crop_s: float
    max_crop_s: float
    max_margin_s: float
    gain_db: list[float]
    noise_prob: float
    noise_snr_db: list[float]
    freq_masks: int
    freq_mask_bins: int
    time_masks: int
    time_mask_frac: float


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export, model card fields and checks."""

    model_id: str
    opset: int
    window_ms: int
    hop_ms: int
    min_input_ms: int
    parity_tolerance: float
    timing_calls: int


@dataclass(frozen=True)
class Config:
    """The whole training configuration, read from one TOML file."""

    seed: int
    threads: int
    output_dir: str
    data: DataConfig
    features: FeatureConfig
    model: ModelConfig
    train: TrainConfig
    export: ExportConfig


def _section(cls: type[Any], raw: dict[str, Any], name: str) -> Any:
    expected = {f.name for f in fields(cls)}
    if set(raw) != expected:
        raise SystemExit(
            f"config [{name}]: missing {sorted(expected - set(raw))}, "
            f"unknown {sorted(set(raw) - expected)}"
        )
    return cls(**raw)


def load_config(path: Path) -> Config:
    """Parse and validate the TOML config; exits with a message on any problem."""
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    sections = {
        "data": DataConfig,
        "features": FeatureConfig,
        "model": ModelConfig,
        "train": TrainConfig,
        "export": ExportConfig,
    }
    parsed = {name: _section(cls, raw.pop(name, {}), name) for name, cls in sections.items()}
    return _section(Config, {**raw, **parsed}, "top level")  # type: ignore[no-any-return]


def resolve(path: str) -> Path:
    """A config path, relative paths taken from the repository root."""
    candidate = Path(path)
    return candidate if candidate.is_absolute() else (REPO_ROOT / candidate).resolve()


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Clip:
    """One labelled utterance held in memory."""

    audio: np.ndarray  # float32, mono, 16 kHz
    label: int  # index into LABELS
    corpus: str
    speaker: str
    speech_start: int  # samples, start of the energy-trimmed speech region
    speech_end: int  # samples, end (exclusive)


def speech_region(audio: np.ndarray, trim_db: float) -> tuple[int, int]:
    """Sample range from the first to the last 25 ms frame within `trim_db` of the loudest."""
    frame, hop = 400, 160
    if audio.shape[0] < frame:
        return 0, audio.shape[0]
    count = 1 + (audio.shape[0] - frame) // hop
    index = np.arange(frame)[None, :] + hop * np.arange(count)[:, None]
    energy_db = 10.0 * np.log10(np.mean(audio[index] ** 2, axis=1) + 1e-12)
    active = np.flatnonzero(energy_db >= energy_db.max() - trim_db)
    return int(active[0] * hop), int(min(audio.shape[0], active[-1] * hop + frame))


def read_manifest(root: Path, corpus: str) -> list[dict[str, str]]:
    """Rows of a corpus manifest."""
    with (root / corpus / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def load_corpus(root: Path, corpus: str, trim_db: float) -> list[Clip]:
    """All clips of a corpus whose label is in LABELS (EmoDB boredom is dropped)."""
    clips, dropped = [], 0
    for row in read_manifest(root, corpus):
        if row["label"] not in LABELS:
            dropped += 1
            continue
        audio, rate = sf.read(root / corpus / row["path"], dtype="float32")
        if rate != SAMPLE_RATE or audio.ndim != 1:
            raise SystemExit(f"{row['path']}: expected 16 kHz mono, got {rate} Hz {audio.shape}")
        start, end = speech_region(audio, trim_db)
        clips.append(Clip(audio, LABELS.index(row["label"]), corpus, row["speaker"], start, end))
    log.info(
        "%s: %d clips loaded, %d dropped (label not in the label set)", corpus, len(clips), dropped
    )
    return clips


def split_clips(clips: list[Clip], cfg: DataConfig) -> dict[str, list[Clip]]:
    """Speaker-disjoint train / val / test lists."""
    test = set(cfg.ravdess_test_speakers) | set(cfg.emodb_test_speakers)
    val = set(cfg.ravdess_val_speakers) | set(cfg.emodb_val_speakers)
    if test & val:
        raise SystemExit(f"speakers in both test and validation: {sorted(test & val)}")
    parts: dict[str, list[Clip]] = {"train": [], "val": [], "test": []}
    for clip in clips:
        name = "test" if clip.speaker in test else "val" if clip.speaker in val else "train"
        parts[name].append(clip)
    for name, part in parts.items():
        speakers = speaker_names(part)
        log.info(
            "%s: %d clips, %d speakers: %s", name, len(part), len(speakers), " ".join(speakers)
        )
    return parts


def speaker_names(clips: Sequence[Clip]) -> list[str]:
    """Sorted `corpus:speaker` names in a clip list."""
    return sorted({f"{c.corpus}:{c.speaker}" for c in clips})


def corpus_labels(clips: Sequence[Clip], corpus: str) -> list[int]:
    """Label indices that occur in a corpus."""
    return sorted({c.label for c in clips if c.corpus == corpus})


# --------------------------------------------------------------------------- model


def dft_basis(n_fft: int, win_length: int) -> np.ndarray:
    """Hann-windowed real/imaginary DFT kernels, shape (2 * (n_fft // 2 + 1), 1, win_length)."""
    n = np.arange(win_length)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)  # periodic Hann
    angle = 2.0 * np.pi * np.arange(n_fft // 2 + 1)[:, None] * n[None, :] / n_fft
    kernels = np.concatenate([window * np.cos(angle), -window * np.sin(angle)])
    return kernels[:, None, :].astype(np.float32)


def mel_filterbank(cfg: FeatureConfig) -> np.ndarray:
    """HTK-mel triangular filters, shape (n_mels, n_fft // 2 + 1)."""

    def to_mel(hz: float) -> float:
        return 2595.0 * math.log10(1.0 + hz / 700.0)

    edges_mel = np.linspace(to_mel(cfg.fmin_hz), to_mel(cfg.fmax_hz), cfg.n_mels + 2)
    edges = 700.0 * (10.0 ** (edges_mel / 2595.0) - 1.0)
    bins = np.arange(cfg.n_fft // 2 + 1) * SAMPLE_RATE / cfg.n_fft
    rising = (bins[None, :] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    falling = (edges[2:, None] - bins[None, :]) / (edges[2:, None] - edges[1:-1, None])
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the last axis of [batch, channels, frames] with weights [batch, frames]."""
    normalised = weights / weights.sum(dim=1, keepdim=True)
    return (values * normalised.unsqueeze(1)).sum(dim=2)


class LogMel(nn.Module):
    """Waveform [batch, samples] -> normalised log-mel [batch, n_mels, frames], frame weights.

    Frame weights [batch, frames] are a soft speech/silence mask from frame energy relative to the
    loudest frame of the clip; the per-clip mean is taken over weighted frames, so leading and
    trailing silence shift neither the normalisation nor (in Backbone) the pooled statistics.
    """

    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        self.hop_length = cfg.hop_length
        self.bins = cfg.n_fft // 2 + 1
        nepers_per_db = math.log(10.0) / 10.0  # energies below are natural logs of power
        self.speech_range = cfg.speech_range_db * nepers_per_db
        self.softness = cfg.weight_softness_db * nepers_per_db
        self.basis: torch.Tensor
        self.mel: torch.Tensor
        self.register_buffer("basis", torch.from_numpy(dft_basis(cfg.n_fft, cfg.win_length)))
        self.register_buffer("mel", torch.from_numpy(mel_filterbank(cfg)))

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed STFT (strided Conv1d), power, mel, log, weighted per-bin mean removed."""
        spec = F.conv1d(waveform.unsqueeze(1), self.basis, stride=self.hop_length)
        real, imag = spec[:, : self.bins], spec[:, self.bins :]
        melpower = torch.matmul(self.mel, real * real + imag * imag)
        energy = torch.log(melpower.sum(dim=1) + 1e-6)
        floor = energy.amax(dim=1, keepdim=True) - self.speech_range
        weights = torch.sigmoid((energy - floor) / self.softness)
        logmel = torch.log(melpower + 1e-6)
        return logmel - weighted_mean(logmel, weights).unsqueeze(2), weights


def conv_block(c_in: int, c_out: int, pool: tuple[int, int]) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU, optional max-pool over (mel, time)."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]
    if pool != (1, 1):
        layers.append(nn.MaxPool2d(pool))
    return nn.Sequential(*layers)


class Backbone(nn.Module):
    """Log-mel [batch, n_mels, frames] -> logits [batch, classes]: CNN, weighted mean+std, head."""

    def __init__(self, cfg: ModelConfig, n_classes: int) -> None:
        super().__init__()
        pools = [(2, 2), (2, 2), (2, 2), (2, 1)] + [(1, 1)] * max(0, len(cfg.channels) - 4)
        widths = [1, *cfg.channels]
        self.blocks = nn.Sequential(
            *(conv_block(widths[i], widths[i + 1], pools[i]) for i in range(len(cfg.channels)))
        )
        self.time_pools = sum(1 for pool in pools[: len(cfg.channels)] if pool[1] > 1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(2 * cfg.channels[-1], n_classes)

    def forward(self, logmel: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Logits from normalised log-mel and frame weights: weighted mean+std pooling."""
        hidden = self.blocks(logmel.unsqueeze(1)).mean(dim=2)  # [batch, channels, frames]
        pooled = weights.unsqueeze(1)
        for _ in range(self.time_pools):  # follow the CNN's time max-pooling
            pooled = F.max_pool1d(pooled, 2)
        mean = weighted_mean(hidden, pooled[:, 0])
        variance = weighted_mean((hidden - mean.unsqueeze(2)) ** 2, pooled[:, 0])
        std = torch.sqrt(variance + 1e-5)
        return self.head(self.dropout(torch.cat([mean, std], dim=1)))  # type: ignore[no-any-return]


class EmotionNet(nn.Module):
    """Raw 16 kHz waveform [batch, samples] -> emotion logits [batch, len(LABELS)]."""

    def __init__(self, features: FeatureConfig, model: ModelConfig) -> None:
        super().__init__()
        self.frontend = LogMel(features)
        self.backbone = Backbone(model, len(LABELS))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of equal-length waveforms."""
        return self.backbone(*self.frontend(waveform))  # type: ignore[no-any-return]


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (the DFT and mel matrices are fixed buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- training


def crop_start(clip: Clip, length: int, margin: int, rng: np.random.Generator) -> int:
    """Random start of a `length`-sample crop around the speech region (within `margin`)."""
    total = clip.audio.shape[0]
    low, high = max(0, clip.speech_start - margin), min(total, clip.speech_end + margin)
    if high - low >= length:
        return int(rng.integers(low, high - length + 1))
    # The region is shorter than the crop: the crop covers all of it, placed at random.
    return int(rng.integers(max(0, high - length), min(low, total - length) + 1))


def augment(audio: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> np.ndarray:
    """Random gain and, sometimes, white noise at a random SNR."""
    gain_low, gain_high = cfg.gain_db
    out = audio * float(10.0 ** (rng.uniform(gain_low, gain_high) / 20.0))
    if rng.random() < cfg.noise_prob:
        power = float(np.mean(out**2)) + 1e-10
        snr_low, snr_high = cfg.noise_snr_db
        snr = rng.uniform(snr_low, snr_high)
        noise = rng.standard_normal(out.shape[0])
        out = out + noise * float(np.sqrt(power / 10.0 ** (snr / 10.0)))
    return np.asarray(out, dtype=np.float32)


def make_batch(
    clips: Sequence[Clip], cfg: TrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-length augmented crops (one crop length drawn per batch) and their labels."""
    length = int(rng.uniform(cfg.min_crop_s, cfg.max_crop_s) * SAMPLE_RATE)
    length = min(length, *(c.audio.shape[0] for c in clips))
    margin = int(rng.uniform(0.0, cfg.max_margin_s) * SAMPLE_RATE)
    crops = []
    for clip in clips:
        start = crop_start(clip, length, margin, rng)
        crops.append(augment(clip.audio[start : start + length], cfg, rng))
    labels = torch.tensor([c.label for c in clips], dtype=torch.long)
    return torch.from_numpy(np.stack(crops)), labels


def spec_augment(logmel: torch.Tensor, cfg: TrainConfig, rng: np.random.Generator) -> torch.Tensor:
    """Zero (= the clip mean) random mel bands and time spans, per example."""
    out = logmel.clone()
    n_mels, frames = out.shape[1], out.shape[2]
    max_span = max(1, int(frames * cfg.time_mask_frac))
    for row in out:
        for _ in range(cfg.freq_masks):
            width = int(rng.integers(0, cfg.freq_mask_bins + 1))
            start = int(rng.integers(0, n_mels - width + 1))
            row[start : start + width, :] = 0.0
        for _ in range(cfg.time_masks):
            width = int(rng.integers(0, max_span + 1))
            start = int(rng.integers(0, frames - width + 1))
            row[:, start : start + width] = 0.0
    return out


def class_weights(clips: Sequence[Clip]) -> torch.Tensor:
    """Inverse-frequency loss weights, mean 1 over the classes present."""
    counts = np.bincount([c.label for c in clips], minlength=len(LABELS)).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1.0), 0.0)
    weights = weights / weights[counts > 0].mean()
    log.info(
        "class counts (train): %s", dict(zip(LABELS, counts.astype(int).tolist(), strict=True))
    )
    return torch.tensor(weights, dtype=torch.float32)


def train_epoch(
    model: EmotionNet,
    clips: Sequence[Clip],
    weights: torch.Tensor,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    rng: np.random.Generator,
) -> float:
    """One pass over the training clips in random order; returns the mean loss."""
    model.train()
    order = rng.permutation(len(clips))
    losses = []
    for start in range(0, len(order) - 1, cfg.batch_size):
        batch = [clips[i] for i in order[start : start + cfg.batch_size]]
        if len(batch) < MIN_BATCH:
            continue
        waveform, labels = make_batch(batch, cfg, rng)
        with torch.no_grad():
            logmel, frame_weights = model.frontend(waveform)
            logmel = spec_augment(logmel, cfg, rng)
        logits = model.backbone(logmel, frame_weights)
        loss = F.cross_entropy(
            logits, labels, weight=weights, label_smoothing=cfg.label_smoothing
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def steps_per_epoch(n_clips: int, batch_size: int) -> int:
    """Optimizer steps in one epoch (matches train_epoch's batching)."""
    starts = range(0, n_clips - 1, batch_size)
    return sum(1 for s in starts if min(batch_size, n_clips - s) >= MIN_BATCH)


# --------------------------------------------------------------------------- evaluation


def recall_report(
    truth: Sequence[int], predicted: Sequence[int], labels: Sequence[int]
) -> dict[str, Any]:
    """UAR (macro recall over `labels`), accuracy and per-class recall."""
    truth_arr, pred_arr = np.asarray(truth), np.asarray(predicted)
    recalls = {LABELS[k]: float(np.mean(pred_arr[truth_arr == k] == k)) for k in labels}
    return {
        "n": int(truth_arr.shape[0]),
        "uar": float(np.mean(list(recalls.values()))),
        "accuracy": float(np.mean(pred_arr == truth_arr)),
        "per_class_recall": recalls,
    }


def restricted_argmax(scores: np.ndarray, allowed: Sequence[int]) -> np.ndarray:
    """Argmax over the allowed label columns only, as indices into LABELS."""
    allowed_arr = np.asarray(allowed)
    return allowed_arr[np.argmax(scores[:, allowed_arr], axis=1)]  # type: ignore[no-any-return]


def torch_scores(model: EmotionNet, clips: Sequence[Clip]) -> np.ndarray:
    """Torch softmax for each whole clip, one clip per forward pass."""
    model.eval()
    with torch.no_grad():
        rows = [
            torch.softmax(model(torch.from_numpy(c.audio)[None]).double(), dim=1)[0] for c in clips
        ]
    return torch.stack(rows).numpy()


def corpus_reports(
    clips: Sequence[Clip], scores: np.ndarray, all_clips: Sequence[Clip]
) -> dict[str, dict[str, Any]]:
    """Per-corpus recall reports; each corpus restricted to its own labels."""
    reports = {}
    for corpus in CORPORA:
        rows = [i for i, c in enumerate(clips) if c.corpus == corpus]
        if not rows:
            continue
        allowed = corpus_labels(all_clips, corpus)
        predicted = restricted_argmax(scores[rows], allowed)
        reports[corpus] = recall_report([clips[i].label for i in rows], predicted.tolist(), allowed)
        reports[corpus]["labels"] = [LABELS[k] for k in allowed]
    return reports


def selection_score(reports: dict[str, dict[str, Any]]) -> float:
    """Mean UAR over corpora: the model-selection criterion on the validation speakers."""
    return float(np.mean([r["uar"] for r in reports.values()]))


def speech_segment(clip: Clip, pad: int) -> np.ndarray:
    """The energy-trimmed speech region padded by `pad` samples: roughly what a VAD delivers."""
    return clip.audio[max(0, clip.speech_start - pad) : clip.speech_end + pad]


def speech_windows(clip: Clip, window: int, hop: int, pad: int) -> list[np.ndarray]:
    """Sliding windows over the speech region (padded by `pad` samples), as while VAD is active."""
    total = clip.audio.shape[0]
    low, high = max(0, clip.speech_start - pad), min(total, clip.speech_end + pad)
    if high - low < window:
        low = max(0, min(low, total - window))
        high = min(total, low + window)
        return [clip.audio[low:high]]
    starts = range(low, high - window + 1, hop)
    return [clip.audio[s : s + window] for s in starts]


# --------------------------------------------------------------------------- export and checks


def export_onnx(model: EmotionNet, path: Path, opset: int) -> None:
    """Export with dynamic batch and time axes, as one self-contained file."""
    model = copy.deepcopy(model).eval()
    example = torch.zeros(2, 2 * SAMPLE_RATE)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["waveform"],
        output_names=["logits"],
        dynamic_axes={"waveform": {0: "batch", 1: "samples"}, "logits": {0: "batch"}},
    )
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))


def write_card(out_dir: Path, cfg: ExportConfig) -> None:
    """card.json in the stream-ser-model/1 format."""
    card = {
        "format": "stream-ser-model/1",
        "id": cfg.model_id,
        "labels": list(LABELS),
        "sample_rate": SAMPLE_RATE,
        "window_ms": cfg.window_ms,
        "hop_ms": cfg.hop_ms,
        "min_input_ms": cfg.min_input_ms,
        "input": {"kind": "waveform", "name": "waveform", "normalize": "none"},
        "output": {"name": "logits", "kind": "logits"},
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def parity_inputs(clips: Sequence[Clip]) -> list[np.ndarray]:
    """Real test audio at 0.25 s, 2 s, whole-clip and 20 s lengths."""
    inputs = [c.audio for c in clips[:3]]
    first = clips[0].audio
    inputs.append(first[clips[0].speech_start : clips[0].speech_start + SAMPLE_RATE // 4])
    inputs.append(first[: 2 * SAMPLE_RATE])
    inputs.append(np.tile(np.concatenate([c.audio for c in clips[:6]]), 4)[: 20 * SAMPLE_RATE])
    return inputs


def check_parity(
    model: EmotionNet, specialist: Specialist, clips: Sequence[Clip], tolerance: float
) -> float:
    """Max |Specialist.predict - torch softmax| over a few inputs; exits if above tolerance."""
    model.eval()
    worst = 0.0
    for audio in parity_inputs(clips):
        with torch.no_grad():
            expected = torch.softmax(model(torch.from_numpy(audio)[None]).double(), dim=1).numpy()
        worst = max(worst, float(np.abs(specialist.predict([audio]) - expected).max()))
        log.info(
            "parity: %.2f s input, max abs diff so far %.2e", audio.shape[0] / SAMPLE_RATE, worst
        )
    batch = [clips[0].audio[: 2 * SAMPLE_RATE], clips[1].audio[: 2 * SAMPLE_RATE]]
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(np.stack(batch))).double(), dim=1).numpy()
    worst = max(worst, float(np.abs(specialist.predict(batch) - expected).max()))
    log.info("parity: max abs difference ONNX vs torch = %.3e (tolerance %.0e)", worst, tolerance)
    if worst > tolerance:
        raise SystemExit(f"parity check failed: {worst:.3e} > {tolerance:.0e}")
    return worst


def time_calls(specialist: Specialist, audio: np.ndarray, calls: int) -> dict[str, float]:
    """Median and mean wall time of `Specialist.predict([audio])`, milliseconds per call."""
    for _ in range(10):
        specialist.predict([audio])
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        specialist.predict([audio])
        times.append((time.perf_counter() - start) * 1000.0)
    return {
        "median_ms": float(np.median(times)),
        "mean_ms": float(np.mean(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "calls": calls,
    }


def evaluate_specialist(
    specialist: Specialist, test: Sequence[Clip], all_clips: Sequence[Clip], cfg: ExportConfig
) -> dict[str, Any]:
    """Test-speaker figures through the Specialist: whole clips, trimmed clips, 2 s windows."""
    utterance = corpus_reports(test, specialist.predict([c.audio for c in test]), all_clips)
    trimmed = [speech_segment(c, pad=SAMPLE_RATE // 5) for c in test]
    utterance_trimmed = corpus_reports(test, specialist.predict(trimmed), all_clips)
    window, hop = cfg.window_ms * SAMPLE_RATE // 1000, cfg.hop_ms * SAMPLE_RATE // 1000
    window_clips, window_audio = [], []
    for clip in test:
        for audio in speech_windows(clip, window, hop, pad=SAMPLE_RATE // 5):
            window_clips.append(clip)
            window_audio.append(audio)
    windows = corpus_reports(window_clips, specialist.predict(window_audio), all_clips)
    return {"utterance": utterance, "utterance_trimmed": utterance_trimmed, "window_2s": windows}


def log_reports(title: str, reports: dict[str, dict[str, Any]]) -> None:
    """One line per corpus plus its per-class recalls."""
    for corpus, report in reports.items():
        recalls = " ".join(f"{k}={v:.2f}" for k, v in report["per_class_recall"].items())
        log.info(
            "%s %s: n=%d UAR=%.3f acc=%.3f | %s",
            title,
            corpus,
            report["n"],
            report["uar"],
            report["accuracy"],
            recalls,
        )


# --------------------------------------------------------------------------- main


def setup(cfg: Config, out_dir: Path) -> None:
    """Seeds, threads and logging to stdout and out_dir/train.log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [
        logging.StreamHandler(sys.stdout),
        logging.FileHandler(out_dir / "train.log", mode="w", encoding="utf-8"),
    ]
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", handlers=handlers
    )
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)


def fit(
    cfg: Config, parts: dict[str, list[Clip]], all_clips: list[Clip]
) -> tuple[EmotionNet, dict[str, Any]]:
    """Train for the configured epochs; keep the weights with the best validation score."""
    rng = np.random.default_rng(cfg.seed)
    model = EmotionNet(cfg.features, cfg.model)
    log.info("model: %d trainable parameters", count_parameters(model))
    weights = class_weights(parts["train"])
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=cfg.train.lr,
        pct_start=0.1,
        total_steps=cfg.train.epochs * steps_per_epoch(len(parts["train"]), cfg.train.batch_size),
    )
    best: dict[str, Any] = {"score": -1.0}
    for epoch in range(1, cfg.train.epochs + 1):
        start = time.perf_counter()
        loss = train_epoch(
            model, parts["train"], weights, cfg.train, optimizer, scheduler, rng=rng
        )
        reports = corpus_reports(parts["val"], torch_scores(model, parts["val"]), all_clips)
        score = selection_score(reports)
        uars = " ".join(f"{k}={r['uar']:.3f}" for k, r in reports.items())
        log.info(
            "epoch %2d/%d loss %.3f val UAR %s mean %.3f (%.0f s)",
            epoch,
            cfg.train.epochs,
            loss,
            uars,
            score,
            time.perf_counter() - start,
        )
        if score > best["score"]:
            best = {
                "score": score,
                "epoch": epoch,
                "reports": reports,
                "state": copy.deepcopy(model.state_dict()),
            }
    model.load_state_dict(best.pop("state"))
    log.info("selected epoch %d (val mean UAR %.3f)", best["epoch"], best["score"])
    return model.eval(), best


def main(argv: Sequence[str] | None = None) -> None:
    """Train, export, check and evaluate, as configured by the TOML file given on the CLI."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "config", type=Path, help="TOML config, e.g. tools/train/configs/baseline.toml"
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    out_dir = resolve(cfg.output_dir)
    setup(cfg, out_dir)
    started = time.perf_counter()
    log.info("config %s: %s", args.config, json.dumps(asdict(cfg)))
    root = resolve(cfg.data.root)
    all_clips = [c for corpus in CORPORA for c in load_corpus(root, corpus, cfg.data.trim_db)]
    parts = split_clips(all_clips, cfg.data)
    model, best = fit(cfg, parts, all_clips)
    train_seconds = time.perf_counter() - started

    export_onnx(model, out_dir / "model.onnx", cfg.export.opset)
    write_card(out_dir, cfg.export)
    specialist = Specialist(out_dir, intra_op_threads=1, inter_op_threads=1)
    parity = check_parity(model, specialist, parts["test"], cfg.export.parity_tolerance)
    test = evaluate_specialist(specialist, parts["test"], all_clips, cfg.export)
    log_reports("test utterance", test["utterance"])
    log_reports("test trimmed utterance", test["utterance_trimmed"])
    log_reports("test 2 s window", test["window_2s"])
    window = parts["test"][0].audio[: cfg.export.window_ms * SAMPLE_RATE // 1000]
    timing = {
        "window_2s": time_calls(specialist, window, cfg.export.timing_calls),
        "utterance_5s": time_calls(
            specialist, np.tile(window, 3)[: 5 * SAMPLE_RATE], cfg.export.timing_calls // 4
        ),
    }
    log.info(
        "inference, 1 thread: 2 s window %.2f ms median, 5 s utterance %.2f ms median",
        timing["window_2s"]["median_ms"],
        timing["utterance_5s"]["median_ms"],
    )
    metrics = {
        "model_id": cfg.export.model_id,
        "config": str(args.config),
        "parameters": count_parameters(model),
        "onnx_bytes": (out_dir / "model.onnx").stat().st_size,
        "split": {
            name: {"clips": len(p), "speakers": speaker_names(p)} for name, p in parts.items()
        },
        "selected_epoch": best["epoch"],
        "validation": best["reports"],
        "test": test,
        "parity_max_abs_diff": parity,
        "inference_one_thread": timing,
        "train_wall_s": round(train_seconds, 1),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
        },
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s (total %.0f s)", out_dir, time.perf_counter() - started)


if __name__ == "__main__":
    main()
