"""The result message schema, checked field by field (the README documents it)."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

RESULT_FIELDS = {
    "schema_version",
    "type",
    "id",
    "stream_id",
    "utterance_id",
    "start_ms",
    "end_ms",
    "wall_time",
    "distribution",
    "top_label",
    "top_probability",
    "entropy",
    "model_id",
    "latency_ms",
    "final",
}


def check_result(message: dict[str, Any], labels: tuple[str, ...] | None = None) -> None:
    """Assert that `message` is a valid window or utterance result."""
    missing = RESULT_FIELDS - set(message)
    assert not missing, f"missing fields {missing}"
    assert message["schema_version"] == 1
    assert message["type"] in ("window", "utterance")
    assert isinstance(message["final"], bool)
    if message["type"] == "window":
        assert message["final"] is False
    assert isinstance(message["utterance_id"], int) and message["utterance_id"] >= 1
    assert 0 <= message["start_ms"] < message["end_ms"]
    datetime.fromisoformat(message["wall_time"].replace("Z", "+00:00"))
    distribution = message["distribution"]
    if labels is not None:
        assert tuple(distribution) == labels
    assert all(0.0 <= p <= 1.0 for p in distribution.values())
    assert math.isclose(sum(distribution.values()), 1.0, abs_tol=1e-4)
    top = max(distribution, key=distribution.__getitem__)
    assert message["top_label"] == top
    assert math.isclose(message["top_probability"], distribution[top], abs_tol=1e-6)
    assert 0.0 <= message["entropy"] <= math.log2(len(distribution)) + 1e-6
    assert message["latency_ms"] >= 0
    for axis in ("arousal", "valence"):
        assert message[axis] is None or -1.0 <= message[axis] <= 1.0
    if message["type"] == "utterance":
        assert message["end_reason"] in ("silence", "max_length", "stream_end")
    if message["final"]:
        assert isinstance(message["flags"], list)
        assert "specialist" in message["sources"]


def parse_lines(stdout: str) -> list[dict[str, Any]]:
    """JSON Lines to messages."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def utterances(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Only the final utterance results."""
    return [m for m in messages if m["type"] == "utterance" and m["final"]]
