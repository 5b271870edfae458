"""Readable lines for published messages: one renderer for `stream-ser tail` and the terminal.

    14:02:07.512  room1    #3    final  angry     62%   angry   ████▉    calm    █▋  ...
        ... sad     ▊        A +0.61 V -0.50  1.20-4.80 s
          spk-1: "I told you already"
          descriptors: pitch high, loudness loud, speaking rate fast (vs this speaker)

(stage: `final`, `prov` for a provisional utterance result or `win` for a sliding window;
top label and probability, bars of the top three, arousal/valence when the result has them,
the stream time judged). A final result adds indented detail lines: its speaker and
transcript when it has them, and the descriptors that stand out, in words.
Pure functions: no I/O.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypeGuard

from stream_ser.acoustics import ALL_SPECS
from stream_ser.plot import read_affect

BAR_WIDTH = 8  # characters for probability 1.0
TOP_K = 3
DETAIL_INDENT = " " * 6
_EIGHTHS = " ▏▎▍▌▋▊▉"
USUAL_LEVELS = frozenset(spec.words[1] for spec in ALL_SPECS)
"""The middle level words (`mid`, `moderate`, ...): descriptors at them are not listed."""
BASELINES = {"speaker": "vs this speaker", "population": "vs the population"}


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def bar(probability: float, width: int = BAR_WIDTH, unicode: bool = True) -> str:
    """A horizontal bar `width` characters wide at probability 1, padded to `width`."""
    probability = min(1.0, max(0.0, probability))
    if not unicode:
        return ("#" * round(probability * width)).ljust(width)
    eighths = round(probability * width * 8)
    text = "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")
    return text.ljust(width)


def clock(wall_time: Any) -> str:
    """HH:MM:SS.mmm in local time of an ISO 8601 time (now if missing or invalid)."""
    moment = datetime.now().astimezone()
    if isinstance(wall_time, str):
        with contextlib.suppress(ValueError):
            moment = datetime.fromisoformat(wall_time.replace("Z", "+00:00")).astimezone()
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def format_result(message: Mapping[str, Any], unicode: bool = True) -> str:
    """One readable line for a window or utterance result."""
    distribution = message.get("distribution") or {}
    ranked = sorted(distribution.items(), key=lambda item: -item[1])[:TOP_K]
    width = max((len(label) for label, _ in ranked), default=0)
    top = " ".join(f"{label:<{width}} {bar(p, unicode=unicode)}" for label, p in ranked)
    parts = [
        clock(message.get("wall_time")),
        f"{message.get('stream_id', '?'):<7}",
        f"#{message.get('utterance_id', '?'):<3}",
        stage_tag(message),
        f"{message.get('top_label', '?'):<{max(width, 7)}}",
        f"{float(message.get('top_probability', 0.0)):4.0%} ",
        top,
    ]
    if (affect := read_affect(message)) is not None:
        parts.append(f"A {affect[0]:+.2f} V {affect[1]:+.2f}")
    start, end = message.get("start_ms"), message.get("end_ms")
    if _is_number(start) and _is_number(end):
        parts.append(f"{start / 1000:.2f}-{end / 1000:.2f} s")
    return "  ".join(parts)


def stage_tag(message: Mapping[str, Any]) -> str:
    """`final`, `prov ` (a provisional utterance result) or `win  ` (a sliding window)."""
    kind = message.get("type")
    if message.get("final", kind == "utterance") is True:
        return "final"
    return "win  " if kind == "window" else "prov "


def format_details(message: Mapping[str, Any]) -> list[str]:
    """Indented lines under a final result: speaker and transcript, descriptors in words."""
    lines = []
    said = _said(message)
    if said:
        lines.append(DETAIL_INDENT + said)
    descriptors = message.get("descriptors")
    if isinstance(descriptors, Mapping) and descriptors:
        lines.append(DETAIL_INDENT + "descriptors: " + describe(descriptors))
    return lines


def _said(message: Mapping[str, Any]) -> str:
    """`spk-1: "text"`, `"text"`, `spk-1` or '' (the optional speaker and transcript fields)."""
    speaker, transcript = message.get("speaker"), message.get("transcript")
    if isinstance(speaker, Mapping):
        speaker = speaker.get("label") or speaker.get("id")
    if isinstance(transcript, Mapping):
        transcript = transcript.get("text")
    text = f'"{transcript.strip()}"' if isinstance(transcript, str) and transcript.strip() else ""
    who = str(speaker) if isinstance(speaker, str | int) and not isinstance(speaker, bool) else ""
    return f"{who}: {text}" if who and text else who or text


def describe(descriptors: Mapping[str, Any]) -> str:
    """The descriptors away from the speaker's usual level, in words: `pitch high, loudness
    loud (vs this speaker)`."""
    notable = [
        f"{name} {entry['level']}"
        for name, entry in descriptors.items()
        if isinstance(entry, Mapping)
        and isinstance(entry.get("level"), str)
        and entry["level"] not in USUAL_LEVELS
    ]
    words = ", ".join(notable) if notable else "none stands out"
    if descriptors.get("voiced") is False:
        words += ", unvoiced"
    baseline = BASELINES.get(str(descriptors.get("baseline")))
    return f"{words} ({baseline})" if baseline else words


def format_status(client_id: str, message: Mapping[str, Any]) -> str:
    """One line for a process's status."""
    counters = message.get("counters") or {}
    shown = " ".join(
        f"{name}={counters[name]}"
        for name in ("utterances", "windows", "windows_dropped", "spool_waiting")
        if name in counters
    )
    streams = ",".join(str(s) for s in message.get("streams") or [])
    line = f"{clock(message.get('wall_time'))}  status  {client_id}  {message.get('state', '?')}"
    return f"{line}  ({streams})  {shown}".rstrip()


# the fields shown and the types they must have (absent ones are shown as '?')
RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "stream_id": (str,),
    "utterance_id": (int,),
    "top_label": (str,),
    "top_probability": (int, float),
    "final": (bool,),
    "distribution": (dict,),
}


def _wrong_types(message: Mapping[str, Any], fields: Mapping[str, tuple[type, ...]]) -> str | None:
    for name, types in fields.items():
        value = message.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"field {name!r} is not of type {'/'.join(t.__name__ for t in types)}"
    return None


def result_problem(message: Mapping[str, Any]) -> str | None:
    """Why a result cannot be shown (a field of the wrong type), or None."""
    if (problem := _wrong_types(message, RESULT_FIELDS)) is not None:
        return problem
    distribution = message.get("distribution") or {}
    if not all(isinstance(k, str) and _is_number(v) for k, v in distribution.items()):
        return "field 'distribution' is not an object of label: probability"
    affect = message.get("arousal_valence")
    numbers = [message.get(name) for name in ("top_probability", "start_ms", "end_ms")]
    numbers += [message.get("arousal"), message.get("valence"), *distribution.values()]
    numbers += list(affect.values()) if isinstance(affect, dict) else []
    if not all(_fits_float(value) for value in numbers if _is_number(value)):
        return "a number is too large"
    return None


MAX_ABS_FLOAT = 1e15  # larger values are shown as they came, not formatted


def _fits_float(value: float) -> bool:
    try:
        return math.isfinite(float(value)) and abs(float(value)) < MAX_ABS_FLOAT
    except OverflowError:
        return False


def status_problem(message: Mapping[str, Any]) -> str | None:
    """Why a status cannot be shown (a field of the wrong type), or None."""
    return _wrong_types(message, {"state": (str,), "streams": (list,), "counters": (dict,)})
