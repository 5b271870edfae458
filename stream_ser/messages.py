"""The published message format (schema version 1), documented in the README."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from stream_ser.events import Recognition

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


def result_message(stream: StreamInfo, result: Recognition) -> dict[str, Any]:
    """The JSON object published for a window or utterance result."""
    probabilities = np.asarray(result.probabilities, dtype=np.float64)
    top = int(probabilities.argmax())
    message: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "type": result.kind,
        "id": f"{stream.session_id}:{stream.stream_id}:{result.utterance_id}:"
        f"{result.kind}:{result.end_ms}",
        "stream_id": stream.stream_id,
        "utterance_id": result.utterance_id,
        "start_ms": result.start_ms,
        "end_ms": result.end_ms,
        "wall_time": wall_time(),
        "distribution": {
            label: round(float(p), 6) for label, p in zip(stream.labels, probabilities, strict=True)
        },
        "top_label": stream.labels[top],
        "top_probability": round(float(probabilities[top]), 6),
        "entropy": round(entropy_bits(probabilities), 6),
        "model_id": stream.model_id,
        "latency_ms": round(result.latency_ms, 3),
        "final": result.kind == "utterance",
    }
    if result.reason is not None:
        message["end_reason"] = result.reason
    return message


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
