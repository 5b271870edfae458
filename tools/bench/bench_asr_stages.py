"""Benchmark: what `--transcribe` and `--speakers` cost a live stream.

    .venv/bin/python -m tools.bench.bench_asr_stages [--speed 1] [--clips 20] [--json OUT]

1. Transcription RTF: the default transcriber (Whisper tiny.en, int8, one thread, as
   `--transcribe` runs it) and the speaker embedder on the first `--clips` clips of RAVDESS actors
   17-20 (held out), each whole clip one call, after one untimed warm-up call.
2. Latency: one file (the two-speaker conversation of the speaker-stage test: RAVDESS actors 17
   and 18, four neutral takes each, taking turns, 1.5 s of silence after each) played through the
   real pipeline in real time (`--realtime --speed S`: a live stream, fusion deadline 3000 ms),
   with the bundled model, windows and descriptors on (the defaults), four times: plain,
   `--transcribe`, `--speakers`, both. Printed: the provisional and final results' `latency_ms`
   (end of the utterance's audio -> published) per utterance, median and max, and the flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from stream_ser import SAMPLE_RATE
from stream_ser.asr_options import AsrSettings, SpeakerSettings
from stream_ser.evaluate import load_audio
from stream_ser.settings import Settings, SourceSettings

REPO = Path(__file__).resolve().parents[2]
RAVDESS = REPO.parent / "shared" / "datasets" / "ravdess" / "audio"
TAKES = ("01-01-01-01", "01-01-01-02", "01-01-02-01", "01-01-02-02")
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "transcribe": {"asr": AsrSettings(transcribe=True)},
    "speakers": {"speakers": SpeakerSettings(enabled=True)},
    "transcribe+speakers": {
        "asr": AsrSettings(transcribe=True),
        "speakers": SpeakerSettings(enabled=True),
    },
}


def held_out_clips(count: int) -> list[Path]:
    """The first `count` clips of actors 17-20, in name order."""
    clips = sorted(p for actor in (17, 18, 19, 20) for p in (RAVDESS / f"Actor_{actor}").glob("*"))
    return clips[:count]


def rtf(call: Any, clips: Sequence[np.ndarray]) -> dict[str, float]:
    """Time of `call(clip)` over the clips / their audio time, after a warm-up call."""
    call(np.zeros(SAMPLE_RATE, dtype=np.float32))
    started = time.perf_counter()
    for clip in clips:
        call(clip)
    spent_s = time.perf_counter() - started
    audio_s = sum(clip.shape[0] for clip in clips) / SAMPLE_RATE
    return {
        "rtf": spent_s / audio_s,
        "per_clip_ms": 1000 * spent_s / len(clips),
        "audio_s": audio_s,
    }


def measure_rtf(count: int) -> dict[str, dict[str, float]]:
    """Transcriber and speaker embedder RTF on held-out RAVDESS clips."""
    from stream_ser.asr import Transcriber
    from stream_ser.speakers import SpeakerEmbedder

    clips = [load_audio(path) for path in held_out_clips(count)]
    transcriber = Transcriber()  # tiny.en, int8, one thread: what --transcribe uses
    return {
        "transcriber": rtf(transcriber.transcribe, clips),
        "speaker_embedder": rtf(SpeakerEmbedder().embed, clips),
    }


def conversation(path: Path) -> Path:
    """Actors 17 and 18 taking turns, 1.5 s of silence after each take."""
    silence = np.zeros(24000, dtype=np.float32)
    pieces = []
    for take in TAKES:
        for actor in (17, 18):
            clip = load_audio(RAVDESS / f"Actor_{actor}" / f"03-01-{take}-{actor}.flac")
            pieces += [clip, silence]
    soundfile.write(path, np.concatenate(pieces), SAMPLE_RATE)
    return path


class Sink:
    """Keeps the utterance results."""

    def __init__(self) -> None:
        self.utterances: list[dict[str, Any]] = []

    async def result(self, stream_id: str, message: dict[str, Any]) -> None:
        """Keep utterance results."""
        if message["type"] == "utterance":
            self.utterances.append(message)

    async def speaking(self, stream_id: str, message: dict[str, Any]) -> None:
        """Nothing."""


async def run_live(path: Path, speed: float, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """The file through the pipeline in real time; its utterance results."""
    from stream_ser.app import load_specialist, open_runtime
    from stream_ser.source import SourceStats, open_source

    settings = replace(Settings(), **extra)
    specialist = load_specialist(None, settings=settings)
    sink = Sink()
    async with open_runtime(settings, specialist, sink) as runtime:  # type: ignore[arg-type]
        stats = SourceStats()
        source = open_source(SourceSettings(input=str(path), realtime=True, speed=speed), stats)
        stream = runtime.pipeline("bench", source, stats)
        await asyncio.wait_for(stream.run(asyncio.Event()), 600)
    return sink.utterances


def summary(utterances: list[dict[str, Any]]) -> dict[str, Any]:
    """Latency of provisional and final results; the finals' flags and fields."""
    provisional = [m["latency_ms"] for m in utterances if not m["final"]]
    finals = [m for m in utterances if m["final"]]
    final_ms = [m["latency_ms"] for m in finals]
    return {
        "utterances": len(finals),
        "provisional_ms": _stats(provisional),
        "final_ms": _stats(final_ms),
        "final_ms_each": [round(ms) for ms in final_ms],
        "flags": sorted({flag for m in finals for flag in m["flags"]}),
        "speakers": [m.get("speaker") for m in finals],
        "transcripts": [m["transcript"]["text"] for m in finals if "transcript" in m],
    }


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 1), "max": round(max(values), 1)}


def main() -> None:
    """Print the RTF and the latency table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", type=float, default=1.0, help="real-time playback speed")
    parser.add_argument("--clips", type=int, default=20, help="clips for the RTF")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    report: dict[str, Any] = {"rtf": measure_rtf(args.clips)}
    for name, figures in report["rtf"].items():
        print(f"{name}: RTF {figures['rtf']:.3f}, {figures['per_clip_ms']:.0f} ms per clip "
              f"({figures['audio_s']:.1f} s of audio)")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        path = conversation(Path(folder) / "conversation.wav")
        for name, extra in CONFIGS.items():
            report[name] = summary(asyncio.run(run_live(path, args.speed, extra)))
            found = report[name]
            print(f"{name:>20}: provisional {found['provisional_ms']}, final {found['final_ms']}, "
                  f"flags {found['flags']}")  # fmt: skip
            print(f"{'':>20}  final each {found['final_ms_each']}")
    print(json.dumps({k: report[k] for k in ("speakers", "transcribe+speakers")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
