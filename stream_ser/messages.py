"""The published message format (schema version 1), documented in the README."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from stream_ser.acoustics import Analysis, AnalysisSkipped
from stream_ser.alm.base import AlmResult
from stream_ser.events import Recognition
from stream_ser.fusion import FusionConfig, arousal_valence, fuse

SCHEMA_VERSION = 1


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


STAGE_ID_SUFFIX = {"window": "w", "provisional": "p", "final": "f"}


def result_message(
    stream: StreamInfo,
    result: Recognition,
    stage: str,
    labels: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """The JSON object published for a result; `stage` is window, provisional or final."""
    labels = labels or stream.labels
    probabilities = np.asarray(result.probabilities, dtype=np.float64)
    top = int(probabilities.argmax())
    suffix = STAGE_ID_SUFFIX[stage] + (str(result.end_ms) if stage == "window" else "")
    distribution = {
        label: round(float(p), 6) for label, p in zip(labels, probabilities, strict=True)
    }
    message: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "type": result.kind,
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
    }
    affect: dict[str, float | None] = {"arousal": None, "valence": None}
    message |= arousal_valence(distribution) or affect
    if result.reason is not None:
        message["end_reason"] = result.reason
    return message


def speaking_message(
    stream: StreamInfo, utterance_id: int, speaking: bool, at_ms: int
) -> dict[str, Any]:
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


def final_fields(  # noqa: PLR0913, PLR0917  (replaced by a mapping of stage results, issue #16)
    stream: StreamInfo,
    fusion: FusionConfig,
    scored: Any,
    specialist_error: str | None,
    alm_expected: bool,
    alm: AlmResult | Exception | None,
    analysis: Analysis | Exception | None,
    side: Mapping[str, Mapping[str, float]] | None = None,
    descriptors_expected: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The fused distribution of a final utterance result and its extra fields.

    `scored` is the specialist's Scored outcome (None if it failed); `alm` is the ALM's
    result, an exception, or None if it did not answer by the deadline (or is not used).
    """
    distributions: dict[str, dict[str, float]] = {}
    sources: dict[str, Any] = {}
    flags: list[str] = []
    if scored is not None:
        distributions["specialist"] = dict(
            zip(stream.labels, map(float, scored.probabilities), strict=True)
        )
        sources["specialist"] = {
            "model_id": stream.model_id,
            "distribution": _rounded(distributions["specialist"]),
        }
    else:
        flags.append("specialist_failed")
        sources["specialist"] = {"model_id": stream.model_id, "error": specialist_error}
    for name, distribution in (side or {}).items():
        distributions[name] = dict(distribution)
        sources[name] = {"distribution": _rounded(distribution)}
    if alm_expected:
        sources["alm"] = _alm_source(alm)
        if isinstance(alm, AlmResult) and alm.ok:
            distributions["alm"] = dict(alm.distribution)
        else:
            flags.append("alm_deadline" if alm is None else "alm_failed")
            if scored is not None:
                flags.append("specialist_only")
    extras: dict[str, Any] = {"sources": sources, "flags": flags}
    if distributions:
        fused, dropped = fuse(distributions, fusion)
        extras["fusion"] = {
            "rule": fusion.rule,
            "sources": list(distributions),
            "dropped_mass": {name: round(mass, 6) for name, mass in dropped.items()},
        }
    else:
        fused = np.full(len(fusion.labels), 1.0 / len(fusion.labels))
        flags.append("no_recognition")
    if isinstance(analysis, Analysis):
        extras["descriptors"] = analysis.descriptors_message()
    elif isinstance(analysis, Exception):
        skipped = isinstance(analysis, AnalysisSkipped)
        flags.append("descriptors_skipped" if skipped else "descriptors_failed")
    elif descriptors_expected:
        flags.append("descriptors_deadline")
    return fused, extras


def _alm_source(alm: AlmResult | Exception | None) -> dict[str, Any]:
    if alm is None:
        return {"ok": False, "error": "no answer by the fusion deadline"}
    if isinstance(alm, Exception):
        return {"ok": False, "error": str(alm)}
    fields = {
        "ok": alm.ok,
        "backend": alm.backend,
        "prompt_set": alm.prompt_set,
        "audio_repeats": alm.audio_repeats,
        "text_repeats": alm.text_repeats,
        "cue_mode": alm.cue_mode,
        "cues": alm.cues,
        "cue_baseline": alm.cue_baseline,
        "latency_ms": alm.latency_ms,
        "batch_size": alm.batch_size,
    }
    if alm.ok:
        fields["distribution"] = _rounded(alm.distribution)
    else:
        fields["error"] = alm.error
    if alm.rationale is not None:
        fields["rationale"] = alm.rationale
    if alm.templates:  # explain mode: the prompt ensemble's members, in template order
        fields["templates"] = [_rounded(member) for member in alm.templates]
    return fields


def _rounded(distribution: Mapping[str, float]) -> dict[str, float]:
    return {label: round(float(p), 6) for label, p in distribution.items()}


def status_message(
    state: str,
    stream_ids: list[str],
    counters: dict[str, int],
    per_stream: dict[str, dict[str, int]] | None = None,
) -> dict[str, Any]:
    """The retained status: 'online' while running, 'offline' after exit (also the last will)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "status",
        "state": state,
        "streams": stream_ids,
        "wall_time": wall_time(),
        "counters": counters,
        "per_stream": per_stream or {},
    }


def encode(message: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; NaN is never valid here."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
