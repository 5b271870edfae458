"""The published message format (schema version 1), documented in the README.

Every published message has a TypedDict here; docs/schema/*.schema.json say the same for
subscribers, and the tests validate every message they see against those files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NotRequired, TypedDict

import numpy as np

from stream_ser.events import Recognition
from stream_ser.fusion import arousal_valence
from stream_ser.kinds import CueBaseline, EndReason, Flag, ResultStage, ResultType, StatusState

SCHEMA_VERSION: Literal[1] = 1

Distribution = dict[str, float]  # label -> probability, rounded to 6 decimals


class SourceEntry(TypedDict, total=False):
    """One recognizer in a final result's `sources`: specialist, specialist:<id> or alm."""

    model_id: str  # specialists
    distribution: Distribution  # when it answered
    error: str | None  # when it did not
    ok: bool  # alm
    backend: str
    prompt_set: str
    audio_repeats: int
    text_repeats: int
    cue_mode: str
    cues: str | None
    cue_baseline: CueBaseline | None
    latency_ms: float
    batch_size: int
    rationale: str
    templates: list[Distribution]  # explain mode: the prompt ensemble's members


class FusionInfo(TypedDict):
    """How a final distribution was fused."""

    rule: str
    sources: list[str]
    dropped_mass: dict[str, float]


class Descriptor(TypedDict):
    """One eGeMAPS descriptor of an utterance."""

    level: str
    z: float
    value: float


class TranscriptWord(TypedDict):
    """One word of a transcript; times from the start of the utterance."""

    text: str
    start_ms: int
    end_ms: int
    probability: float


class TranscriptInfo(TypedDict):
    """What was said in an utterance (`--transcribe`)."""

    text: str
    language: str  # ISO 639-1 as Whisper reports it
    avg_logprob: float  # mean log-probability per token (nats)
    words: NotRequired[list[TranscriptWord]]  # with --transcribe-words


class ResultMessage(TypedDict):
    """A window, provisional or final result (`type` window | utterance; `final`).

    Windows and provisionals carry `model_ms`; finals also `sources`, `fusion` (when any
    source answered), `flags` and (with descriptors) `descriptors`: descriptor name ->
    Descriptor, plus "baseline" (CueBaseline) and "voiced" (bool); with --transcribe
    `transcript`. Utterance results (provisional and final) carry `speaker` with --speakers.
    """

    schema_version: Literal[1]
    type: ResultType
    id: str
    stream_id: str
    utterance_id: int
    start_ms: int
    end_ms: int
    wall_time: str  # ISO 8601 UTC, milliseconds
    distribution: Distribution
    top_label: str
    top_probability: float
    entropy: float  # bits
    model_id: str
    latency_ms: float
    final: bool
    arousal: float | None
    valence: float | None
    end_reason: NotRequired[EndReason]  # utterances
    lag_ms: NotRequired[int]
    model_ms: NotRequired[float]  # absent when the specialist failed
    sources: NotRequired[dict[str, SourceEntry]]
    fusion: NotRequired[FusionInfo]
    flags: NotRequired[list[Flag]]
    descriptors: NotRequired[dict[str, Descriptor | CueBaseline | bool]]
    transcript: NotRequired[TranscriptInfo]
    speaker: NotRequired[str]  # "spk-1", "spk-2", ...: only the label leaves the process


class SpeakingMessage(TypedDict):
    """Retained per-stream voice activity."""

    schema_version: Literal[1]
    type: Literal["speaking"]
    stream_id: str
    speaking: bool
    utterance_id: int
    at_ms: int
    wall_time: str


class StatusMessage(TypedDict):
    """The retained status of a process (also its last will)."""

    schema_version: Literal[1]
    type: Literal["status"]
    state: StatusState
    streams: list[str]
    wall_time: str
    counters: dict[str, int | float]
    per_stream: dict[str, dict[str, int | float]]


@dataclass(frozen=True)
class StreamInfo:
    """What every result of one stream shares."""

    stream_id: str
    session_id: str  # random per run: makes message ids unique across restarts
    model_id: str
    labels: tuple[str, ...]


def wall_time() -> str:
    """Now, as ISO 8601 UTC with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def entropy_bits(probabilities: np.ndarray) -> float:
    """Shannon entropy in bits (0 = certain, log2(n) = uniform)."""
    p = probabilities[probabilities > 0]
    return float(-(p * np.log2(p)).sum())


STAGE_ID_SUFFIX: dict[ResultStage, str] = {"window": "w", "provisional": "p", "final": "f"}


def result_message(
    stream: StreamInfo,
    result: Recognition,
    stage: ResultStage,
    labels: tuple[str, ...] | None = None,
) -> ResultMessage:
    """The JSON object published for a result; `stage` is window, provisional or final."""
    labels = labels or stream.labels
    probabilities = np.asarray(result.probabilities, dtype=np.float64)
    top = int(probabilities.argmax())
    suffix = STAGE_ID_SUFFIX[stage] + (str(result.end_ms) if stage == "window" else "")
    distribution = {
        label: round(float(p), 6) for label, p in zip(labels, probabilities, strict=True)
    }
    affect: Mapping[str, float | None] = arousal_valence(distribution) or {
        "arousal": None,
        "valence": None,
    }
    message: ResultMessage = {
        "schema_version": SCHEMA_VERSION,
        "type": "window" if result.kind == "window" else "utterance",
        "id": f"{stream.session_id}:{stream.stream_id}:{result.utterance_id}:{suffix}",
        "stream_id": stream.stream_id,
        "utterance_id": result.utterance_id,
        "start_ms": result.start_ms,
        "end_ms": result.end_ms,
        "wall_time": wall_time(),
        "distribution": distribution,
        "top_label": labels[top],
        "top_probability": round(float(probabilities[top]), 6),
        "entropy": round(entropy_bits(probabilities), 6),
        "model_id": stream.model_id,
        "latency_ms": round(result.latency_ms, 3),
        "final": stage == "final",
        "arousal": affect["arousal"],
        "valence": affect["valence"],
    }
    if result.reason is not None:
        message["end_reason"] = result.reason
    return message


def speaking_message(
    stream: StreamInfo, utterance_id: int, speaking: bool, at_ms: int
) -> SpeakingMessage:
    """Retained per-stream voice activity: true from an utterance's start to its end."""
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "speaking",
        "stream_id": stream.stream_id,
        "speaking": speaking,
        "utterance_id": utterance_id,
        "at_ms": at_ms,
        "wall_time": wall_time(),
    }


def status_message(
    state: StatusState,
    stream_ids: list[str],
    counters: Mapping[str, int | float],
    per_stream: Mapping[str, Mapping[str, int | float]] | None = None,
) -> StatusMessage:
    """The retained status: 'online' while running, 'offline' after exit (also the last will)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "status",
        "state": state,
        "streams": stream_ids,
        "wall_time": wall_time(),
        "counters": dict(counters),
        "per_stream": {name: dict(values) for name, values in (per_stream or {}).items()},
    }


def encode(message: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; NaN is never valid here."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
