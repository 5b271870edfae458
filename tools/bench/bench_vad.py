"""Benchmark: the voice detectors (webrtcvad, Silero) on the same labelled audio.

    .venv/bin/python -m tools.bench.bench_vad [--clips 40] [--snr-db 20 10] [--seed 0] [--json FILE]

Labelled audio, built in memory from real speech (never written to the repo):
- speech: `--clips` clips alternating RAVDESS (one per actor, cycling) and EmoDB, each trimmed
  to its speech extent: the first to the last 10 ms frame whose RMS is within 35 dB of the
  clip's loudest frame. That extent is labelled speech as a whole (short pauses between
  words inside it count as speech, as a VAD that must keep an utterance whole should treat
  them); everything between clips is non-speech;
- gaps of 1.0-2.5 s (seeded) between clips;
- every clip scaled so its speech extent has an RMS of -26 dBFS (RAVDESS is recorded ~20 dB
  quieter than EmoDB; without this one SNR would mean two);
- conditions over the same clips and gaps: `clean` (digital silence in the gaps), `white`
  (white noise over the whole stream, each `--snr-db` below the speech power) and `babble`
  (6 overlapping nEMO Polish talkers, a different corpus, over the whole stream at the same
  SNRs: the gaps hold background talk, labelled non-speech).

Per backend and condition, with the default settings of each backend (webrtc: 30 ms,
aggressiveness 2; silero: 32 ms, threshold 0.5):
- frame level, from the detector's raw flags on a 10 ms grid: accuracy, speech precision,
  recall and F1;
- onset delay: end of the first voiced detector frame at or after a clip's labelled start,
  minus that start (only clips where one is found within the clip);
- offset delay: end of the last voiced detector frame from the clip's start to 500 ms after
  its labelled end, minus that end (negative: the detector stopped early; 500 = still voiced
  half a gap later, e.g. in babble; the next clip is at least 1 s away, so its onset frame
  is never counted);
- utterances from the full segmenter (onset, hangover, pre-roll, min length): clips covered
  by at least one utterance, and utterances overlapping no clip (false alarms);
- CPU: the detector's process time per audio second (one thread, numpy + onnxruntime).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from stream_ser.events import AudioChunk, UtteranceEnd
from stream_ser.settings import VadSettings
from stream_ser.vad import Segmenter
from stream_ser.vad_backends import make_detector
from tools.bench import bench_common as bc

RATE = bc.SAMPLE_RATE
GRID = RATE // 100  # 10 ms label grid
SPEECH_SHARE = 0.5
"""A grid cell counts as detected speech when at least this share of its samples is voiced."""
SPEECH_RMS = 10 ** (-26 / 20)  # every clip's speech extent is scaled to -26 dBFS RMS
BACKENDS = ("webrtc", "silero")


@dataclass
class Labelled:
    """One test stream: audio and its speech extents in samples."""

    audio: np.ndarray
    spans: list[tuple[int, int]]

    def mask(self) -> np.ndarray:
        """Speech label per 10 ms grid frame."""
        labels = np.zeros(len(self.audio) // GRID, dtype=bool)
        for start, end in self.spans:
            labels[start // GRID : end // GRID] = True
        return labels


def speech_bounds(audio: np.ndarray, db: float = 35.0) -> tuple[int, int]:
    """First and last 10 ms frame within `db` of the loudest one, as samples."""
    frames = audio[: len(audio) // GRID * GRID].reshape(-1, GRID)
    level = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    loud = np.flatnonzero(level > level.max() - db)
    return int(loud[0]) * GRID, (int(loud[-1]) + 1) * GRID


def clip_paths(count: int) -> list[Path]:
    """RAVDESS (one clip per actor, cycling) and EmoDB clips, alternating."""
    actors = sorted(p for p in bc.RAVDESS.glob("Actor_*") if p.is_dir())
    emodb = sorted((bc.DATASETS / "emodb" / "audio").glob("*.flac"))
    if not actors or not emodb:
        raise SystemExit(f"datasets not found under {bc.DATASETS}")
    paths: list[Path] = []
    for index in range(count):
        if index % 2 == 0:
            clips = sorted(actors[(index // 2) % len(actors)].glob("*.flac"))
            paths.append(clips[(index * 7) % len(clips)])
        else:
            paths.append(emodb[(index * 13) % len(emodb)])
    return paths


def read(path: Path) -> np.ndarray:
    """A 16 kHz mono clip as float32."""
    audio, rate = soundfile.read(path, dtype="float32")
    assert rate == RATE, f"{path}: {rate} Hz"
    return np.asarray(audio)


def clean_stream(count: int, seed: int) -> Labelled:
    """Trimmed clips at -26 dBFS joined by silent gaps of 1.0-2.5 s; the first gap too."""
    rng = np.random.default_rng(seed)
    pieces: list[np.ndarray] = []
    spans: list[tuple[int, int]] = []
    position = 0
    for path in clip_paths(count):
        audio = read(path)
        start, end = speech_bounds(audio)
        audio = audio * (SPEECH_RMS / np.sqrt(np.mean(audio[start:end] ** 2)))
        gap = np.zeros(int(rng.uniform(1.0, 2.5) * RATE), dtype=np.float32)
        pieces += [gap, audio[start:end]]
        spans.append((position + len(gap), position + len(gap) + end - start))
        position += len(gap) + end - start
    pieces.append(np.zeros(2 * RATE, dtype=np.float32))
    return Labelled(np.concatenate(pieces), spans)


def babble(samples: int, seed: int, talkers: int = 6) -> np.ndarray:
    """Overlapping nEMO talkers (each a loop of its clips), summed, unit power."""
    rng = np.random.default_rng(seed)
    speakers = sorted(p for p in (bc.DATASETS / "nemo" / "audio").iterdir() if p.is_dir())
    mix = np.zeros(samples, dtype=np.float64)
    for speaker in speakers[:talkers]:
        clips = sorted(speaker.glob("*.opus"))[:40]
        track = np.concatenate([speech_slice(read(path)) for path in clips])
        track = np.tile(track, samples // len(track) + 2)
        offset = int(rng.integers(0, len(track) - samples))
        mix += track[offset : offset + samples]
    return np.asarray(mix / np.sqrt(np.mean(mix**2)), dtype=np.float32)


def speech_slice(audio: np.ndarray) -> np.ndarray:
    """The clip trimmed to its speech extent."""
    start, end = speech_bounds(audio)
    return audio[start:end]


def with_noise(stream: Labelled, kind: str, snr_db: float, seed: int) -> Labelled:
    """The stream plus unit-power noise `snr_db` below the speech power (every clip's)."""
    speech_power = SPEECH_RMS**2
    if kind == "white":
        noise = np.random.default_rng(seed).standard_normal(len(stream.audio))
    else:
        noise = babble(len(stream.audio), seed)
    scale = np.sqrt(speech_power / 10 ** (snr_db / 10))
    mixed = np.clip(stream.audio + scale * noise, -1.0, 1.0).astype(np.float32)
    return Labelled(mixed, stream.spans)


def detector_flags(backend: str, audio: np.ndarray) -> tuple[np.ndarray, int, float]:
    """(voiced flag per sample, frame samples, detector CPU seconds); ~100 ms per call."""
    detector = make_detector(VadSettings(backend=backend))
    size = detector.frame_samples
    frames = audio[: len(audio) // size * size].reshape(-1, size)
    flags: list[bool] = []
    started = time.process_time()
    step = max(1, 1600 // size)
    for first in range(0, len(frames), step):
        flags += detector.classify(frames[first : first + step])
    cpu = time.process_time() - started
    per_sample = np.zeros(len(audio), dtype=bool)
    per_sample[: len(frames) * size] = np.repeat(np.array(flags, dtype=bool), size)
    return per_sample, size, cpu


def frame_scores(labels: np.ndarray, voiced: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of speech on the 10 ms grid."""
    grid = voiced[: len(labels) * GRID].reshape(-1, GRID).mean(axis=1) >= SPEECH_SHARE
    hits = float(np.sum(grid & labels))
    precision = hits / max(1.0, float(np.sum(grid)))
    recall = hits / max(1.0, float(np.sum(labels)))
    return {
        "accuracy": float(np.mean(grid == labels)),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(1e-9, precision + recall),
    }


def delays_ms(stream: Labelled, voiced: np.ndarray, size: int) -> tuple[list[float], list[float]]:
    """Onset and offset delays per clip (ms), as defined in the module docstring."""
    onsets: list[float] = []
    offsets: list[float] = []
    nexts = [start for start, _ in stream.spans[1:]] + [len(voiced)]
    for (start, end), next_start in zip(stream.spans, nexts, strict=True):
        inside = np.flatnonzero(voiced[start:end])
        if len(inside):
            first = start + int(inside[0])
            onsets.append((first // size + 1) * size - start)  # decided at its frame's end
        horizon = end + min(RATE // 2, (next_start - end) // 2)  # gaps are >= 1 s
        after = np.flatnonzero(voiced[start:horizon])
        if len(after):
            offsets.append(start + int(after[-1]) + 1 - end)
    return [1000 * d / RATE for d in onsets], [1000 * d / RATE for d in offsets]


def utterance_scores(backend: str, stream: Labelled) -> dict[str, float]:
    """Clips covered by the segmenter's utterances, and utterances covering no clip."""
    segmenter = Segmenter(VadSettings(backend=backend))
    events: list[Any] = []
    for offset in range(0, len(stream.audio), 1600):
        chunk = stream.audio[offset : offset + 1600]
        events += segmenter.process(AudioChunk(chunk, offset // 16))
    events += segmenter.flush()
    found = [(e.start_ms * 16, e.end_ms * 16) for e in events if isinstance(e, UtteranceEnd)]
    covered = sum(any(a < end and b > start for a, b in found) for start, end in stream.spans)
    false = sum(not any(a < end and b > start for start, end in stream.spans) for a, b in found)
    return {"clips": len(stream.spans), "covered": covered, "utterances": len(found),
            "false_utterances": false}  # fmt: skip


def measure(backend: str, stream: Labelled) -> dict[str, Any]:
    """Every figure of one backend on one stream."""
    voiced, size, cpu = detector_flags(backend, stream.audio)
    onsets, offsets = delays_ms(stream, voiced, size)
    return {
        **frame_scores(stream.mask(), voiced),
        "onset_ms_p50_p95": bc.percentiles(onsets, (50, 95)),
        "offset_ms_p50_p95": bc.percentiles(offsets, (50, 95)),
        "onsets_found": len(onsets),
        **utterance_scores(backend, stream),
        "cpu_ms_per_audio_s": 1000 * cpu / (len(stream.audio) / RATE),
    }


def main() -> None:
    """Build the labelled streams, measure both backends, print and optionally save."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=40, help="speech clips per stream")
    parser.add_argument(
        "--snr-db", type=float, nargs="+", default=[20.0, 10.0], help="speech-to-noise ratios (dB)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    facts = bc.machine()
    clean = clean_stream(args.clips, args.seed)
    streams = {"clean": clean}
    for kind in ("white", "babble"):
        for snr in args.snr_db:
            streams[f"{kind} {snr:g} dB"] = with_noise(clean, kind, snr, args.seed)
    results = {
        f"{backend}/{condition}": measure(backend, stream)
        for condition, stream in streams.items()
        for backend in BACKENDS
    }
    seconds = len(clean.audio) / RATE
    print(bc.machine_line(facts))
    print(f"{args.clips} clips, {seconds:.0f} s per stream (speech at -26 dBFS RMS)")
    bc.print_table("Voice detectors on labelled speech (frame level: 10 ms grid)", HEADER,
                   [row(name, figures) for name, figures in results.items()])  # fmt: skip
    bc.write_json(args.json, {"machine": facts, "args": vars(args), "results": results})


HEADER = ("backend/condition", "accuracy", "precision", "recall", "F1",
          "onset ms p50/p95", "offset ms p50/p95", "clips covered", "false utterances",
          "CPU ms per audio s")  # fmt: skip


def row(name: str, figures: dict[str, Any]) -> list[Any]:
    """One table row."""
    onset = "/".join(f"{v:.0f}" for v in figures["onset_ms_p50_p95"])
    offset = "/".join(f"{v:.0f}" for v in figures["offset_ms_p50_p95"])
    return [name, figures["accuracy"], figures["precision"], figures["recall"], figures["f1"],
            onset, offset, f"{figures['covered']}/{figures['clips']}",
            figures["false_utterances"], figures["cpu_ms_per_audio_s"]]  # fmt: skip


if __name__ == "__main__":
    main()
