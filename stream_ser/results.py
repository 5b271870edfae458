"""Typed results for Python code: frozen views of the published messages (schema version 1).

`Result.from_message(message)` reads one published window, provisional or final result (the
JSON object of the README's message format); `result.message` is that object, unchanged, for
every field not lifted here (`sources`, `fusion`, `entropy`, latencies, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

Stage = Literal["window", "provisional", "final"]
STAGES: tuple[Stage, ...] = ("window", "provisional", "final")


@dataclass(frozen=True)
class Descriptor:
    """One eGeMAPS descriptor of an utterance, relative to the speaker's running baseline."""

    level: str  # a word: low/mid/high, quiet/moderate/loud, slow/moderate/fast, ...
    z: float  # z-score against the baseline
    value: float  # the raw eGeMAPS functional


@dataclass(frozen=True)
class Result:
    """One result of one stream: a sliding window, or an utterance (provisional, then final)."""

    stage: Stage
    stream_id: str
    utterance_id: int  # 1, 2, ... per stream; a window carries the utterance in progress
    start_ms: int  # stream time of the audio judged (ms since the stream's first sample)
    end_ms: int
    distribution: Mapping[str, float]  # label -> probability, summing to 1 (read-only)
    top_label: str
    top_probability: float
    arousal: float | None  # [-1, 1] under the distribution; None if no label has a place
    valence: float | None
    descriptors: Mapping[str, Descriptor]  # finals with descriptors; else empty (read-only)
    flags: tuple[str, ...]  # finals: what went wrong, if anything (alm_deadline, ...)
    transcript: str | None  # finals with a transcript stage: the words said
    speaker: str | None  # with a speaker stage: spk-1, spk-2, ...
    id: str  # the message id, unique per result
    wall_time: str  # ISO 8601 UTC time the result was produced
    message: Mapping[str, Any] = field(repr=False, compare=False)
    """The published message itself (read-only view)."""

    @property
    def final(self) -> bool:
        """True for the one final result of an utterance."""
        return self.stage == "final"

    @property
    def duration_ms(self) -> int:
        """Length of the audio judged."""
        return self.end_ms - self.start_ms

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> Result:
        """The typed view of a published result message; ValueError if it is not one."""
        if message.get("type") not in ("window", "utterance"):
            raise ValueError(f"not a result message: type {message.get('type')!r}")
        try:
            return cls(
                stage=stage_of(message),
                stream_id=str(message["stream_id"]),
                utterance_id=int(message["utterance_id"]),
                start_ms=int(message["start_ms"]),
                end_ms=int(message["end_ms"]),
                distribution=MappingProxyType(dict(message["distribution"])),
                top_label=str(message["top_label"]),
                top_probability=float(message["top_probability"]),
                arousal=_number(message.get("arousal")),
                valence=_number(message.get("valence")),
                descriptors=MappingProxyType(_descriptors(message.get("descriptors"))),
                flags=tuple(str(flag) for flag in message.get("flags") or ()),
                transcript=_transcript(message.get("transcript")),
                speaker=_speaker(message.get("speaker")),
                id=str(message.get("id", "")),
                wall_time=str(message.get("wall_time", "")),
                message=MappingProxyType(dict(message)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a valid result message: {err!r}") from err

    def __str__(self) -> str:
        """The line `stream-ser tail` prints, with a final's details under it."""
        from stream_ser.render import format_details, format_result

        details = format_details(self.message) if self.final else []
        return "\n".join([format_result(self.message), *details])


def stage_of(message: Mapping[str, Any]) -> Stage:
    """window, provisional or final."""
    if message.get("type") == "window":
        return "window"
    return "final" if message.get("final") is True else "provisional"


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _descriptors(raw: Any) -> dict[str, Descriptor]:
    """The descriptor entries (not `baseline`/`voiced`, which stay in `message`)."""
    if not isinstance(raw, Mapping):
        return {}
    return {
        name: Descriptor(str(entry["level"]), float(entry["z"]), float(entry["value"]))
        for name, entry in raw.items()
        if isinstance(entry, Mapping)
    }


def _transcript(raw: Any) -> str | None:
    """The text of a `transcript` field: an object with `text`, or a string."""
    text = raw.get("text") if isinstance(raw, Mapping) else raw
    return text.strip() if isinstance(text, str) else None


def _speaker(raw: Any) -> str | None:
    """A `speaker` field: a label string, or an object with one."""
    label = raw.get("label") or raw.get("id") if isinstance(raw, Mapping) else raw
    return str(label) if isinstance(label, str | int) and not isinstance(label, bool) else None
