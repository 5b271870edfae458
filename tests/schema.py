"""The published message schema: docs/schema/*.schema.json (what subscribers get), plus the
checks a JSON Schema cannot express (sums, top label, entropy bounds)."""

from __future__ import annotations

import functools
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schema"


@functools.cache
def validator(name: str) -> jsonschema.Draft202012Validator:
    """The validator of docs/schema/NAME.schema.json (result, speaking or status)."""
    schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate(name: str, message: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError unless `message` follows the named schema."""
    validator(name).validate(message)

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
    validate("result", message)
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


def check_speaking(message: dict[str, Any]) -> None:
    """Assert that `message` is a valid voice-activity message."""
    validate("speaking", message)
    datetime.fromisoformat(message["wall_time"].replace("Z", "+00:00"))


def check_status(message: dict[str, Any]) -> None:
    """Assert that `message` is a valid status message."""
    validate("status", message)
    datetime.fromisoformat(message["wall_time"].replace("Z", "+00:00"))
    assert set(message["per_stream"]) <= set(message["streams"])


def check_message(message: dict[str, Any]) -> None:
    """Assert that `message` is a valid published message of any kind."""
    if message.get("type") == "speaking":
        check_speaking(message)
    elif message.get("type") == "status":
        check_status(message)
    else:
        check_result(message)


def parse_lines(stdout: str) -> list[dict[str, Any]]:
    """JSON Lines to messages."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def utterances(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Only the final utterance results."""
    return [m for m in messages if m["type"] == "utterance" and m["final"]]
