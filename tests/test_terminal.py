"""Readable output on a terminal: `stream-ser run` in a real pseudo-terminal, and its pieces."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest

from stream_ser.app import make_sink
from stream_ser.messages import ResultMessage, StreamInfo, speaking_message
from stream_ser.publish import JsonlSink, MqttSink, TeeSink
from stream_ser.render import describe, format_details
from stream_ser.settings import MqttSettings, OutputSettings, Settings
from stream_ser.terminal import CLEAR_LINE, TerminalSink
from tests.conftest import LABELS, REPO
from tests.test_tail import result

DESCRIPTORS = {
    "pitch": {"level": "high", "z": 1.2, "value": 40.0},
    "pitch variability": {"level": "moderate", "z": 0.1, "value": 0.1},
    "loudness": {"level": "loud", "z": 0.9, "value": 0.8},
    "voice quality": {"level": "modal", "z": 0.0, "value": 6.0},
    "baseline": "speaker",
    "voiced": True,
}


def final(**extra: Any) -> ResultMessage:
    return cast(ResultMessage, result("mic", 2, 1000, 3000, **extra))


def window() -> ResultMessage:
    return cast(ResultMessage, result("mic", 2, 1000, 2000, type="window"))


def test_descriptors_in_words_name_only_what_stands_out() -> None:
    assert describe(DESCRIPTORS) == "pitch high, loudness loud (vs this speaker)"
    usual = {"pitch": {"level": "mid", "z": 0.0, "value": 1.0}, "baseline": "population"}
    assert describe(usual) == "none stands out (vs the population)"
    assert describe({"voiced": False}) == "none stands out, unvoiced"


def test_details_show_speaker_transcript_and_descriptors_when_present() -> None:
    assert format_details(final()) == []  # none of the optional fields
    transcript = {"text": " I told you ", "language": "en"}
    lines = format_details(final(descriptors=DESCRIPTORS, speaker="spk-1", transcript=transcript))
    assert [line.strip() for line in lines] == [
        'spk-1: "I told you"',
        "descriptors: pitch high, loudness loud (vs this speaker)",
    ]
    assert format_details(final(transcript="hello"))[0].strip() == '"hello"'  # a plain string
    assert format_details(final(speaker="spk-2"))[0].strip() == "spk-2"


async def test_terminal_sink_keeps_one_live_line_until_the_final() -> None:
    out = io.StringIO()
    sink = TerminalSink(out, unicode=True, width=lambda: 40)
    stream = StreamInfo("mic", "s", "model", LABELS)
    async with asyncio.timeout(5), sink:
        await sink.speaking("mic", speaking_message(stream, 2, True, 1000))
        await sink.speaking("mic", speaking_message(stream, 2, False, 3000))
        await sink.result("mic", window())
        await sink.result("mic", final(descriptors=DESCRIPTORS, transcript="hi there"))
        await sink.result("mic", window())
    text = out.getvalue()
    live = [part for part in text.split(CLEAR_LINE) if part and "\n" not in part]
    assert "speaking" in live[0] and "win" in live[1] and len(live) == 3
    assert all(len(part) <= 39 for part in live)  # cut to the width: never wraps
    lines = text.split(CLEAR_LINE)[3].splitlines()  # the final replaced the live line
    assert "final" in lines[0] and "A " not in lines[0] and "1.00-3.00 s" in lines[0]
    assert lines[1].strip() == '"hi there"' and "pitch high" in lines[2]
    assert text.endswith(CLEAR_LINE)  # the last live line is erased at exit
    assert "{" not in text


def sink_kinds(settings: Settings, terminal: bool) -> set[type]:
    """The kinds of sink make_sink builds (spools closed again)."""
    sink = make_sink(settings, "c", ["mic"], terminal=terminal)
    inner = sink._sinks if isinstance(sink, TeeSink) else (sink,)  # noqa: SLF001
    for part in inner:
        if isinstance(part, MqttSink):
            part.spool.close()
    return {type(part) for part in inner}


def test_make_sink_readable_only_on_a_terminal_without_jsonl(tmp_path: Path) -> None:
    plain, jsonl = Settings(), Settings(output=OutputSettings(jsonl=True))
    assert sink_kinds(plain, terminal=True) == {TerminalSink}
    assert sink_kinds(plain, terminal=False) == {JsonlSink}
    assert sink_kinds(jsonl, terminal=True) == {JsonlSink}
    broker = MqttSettings(url="mqtt://127.0.0.1:1", spool_dir=str(tmp_path))
    assert sink_kinds(Settings(mqtt=broker), terminal=False) == {MqttSink}
    assert sink_kinds(Settings(mqtt=broker), terminal=True) == {MqttSink, TerminalSink}
    both = Settings(mqtt=broker, output=OutputSettings(jsonl=True))
    assert sink_kinds(both, terminal=True) == {MqttSink, JsonlSink}


def run_in_pty(*args: str, timeout_s: float = 120.0) -> tuple[int, str]:
    """`python -m stream_ser ARGS` with stdout on a real pseudo-terminal; (exit code, output)."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "stream_ser", *args],
        stdin=subprocess.DEVNULL, stdout=terminal, stderr=subprocess.DEVNULL, cwd=REPO,
        env=os.environ | {"COLUMNS": "100"},
    )  # fmt: skip
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not data:
                break
            output += data
        return process.wait(timeout=max(1.0, deadline - time.monotonic())), output.decode()
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_run_on_a_terminal_prints_readable_lines_and_json_when_piped(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clips = speech_with_pauses
    args = ("run", "--input", str(path), "--model", str(tiny_model))
    code, shown = run_in_pty(*args)
    assert code == 0
    kept = [line for line in shown.split("\r\n") if line]  # what stays on screen
    finals = [line.split(CLEAR_LINE)[-1] for line in kept if " final " in line]
    assert len(finals) == clips and all(line.split()[1] == path.stem for line in finals)
    assert all("%" in line and "█" in line for line in finals)  # probability, bars
    assert len([line for line in kept if line.strip().startswith("descriptors: ")]) == clips
    assert " win " in shown and " prov " in shown  # on the live line only ...
    assert not any(" win " in line.split(CLEAR_LINE)[-1] for line in kept)  # ... replaced
    assert "{" not in shown

    code, jsonl = run_in_pty(*args, "--jsonl")
    assert code == 0
    messages = [json.loads(line) for line in jsonl.split("\r\n") if line]
    assert sum(m["final"] for m in messages) == clips

    piped = subprocess.run(
        [sys.executable, "-m", "stream_ser", *args], capture_output=True, text=True,
        timeout=120, cwd=REPO, check=True,
    )  # fmt: skip
    messages = [json.loads(line) for line in piped.stdout.splitlines()]
    assert sum(m["final"] for m in messages) == clips and any(
        m["type"] == "window" for m in messages
    )
