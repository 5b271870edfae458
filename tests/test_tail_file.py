"""`stream-ser tail FILE` / `tail -`: JSON Lines from a file or stdin, bad lines skipped."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from stream_ser.tail import TailOptions, TailView, read_jsonl
from tests.conftest import REPO, run_cli
from tests.test_tail import result, speaking

DESCRIPTORS = {"pitch": {"level": "high", "z": 1.1, "value": 40.0}, "baseline": "speaker"}


def jsonl(*messages: dict[str, Any] | bytes) -> bytes:
    return b"".join(
        (m if isinstance(m, bytes) else json.dumps(m).encode()) + b"\n" for m in messages
    )


GOOD = (
    result("room1", 1, 0, 1000, type="window"),
    result("room1", 1, 0, 2000, descriptors=DESCRIPTORS),
    json.loads(speaking("room1", 2, True)),
    result("kitchen", 1, 0, 900),
)
BAD = (b"not json", b"[1, 2]", b'{"no": "type"}', json.dumps(
    result("room1", 3, 0, 900) | {"top_probability": "high"}).encode())  # fmt: skip


def test_lines_are_rendered_and_bad_ones_reported_and_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = io.StringIO()
    data = jsonl(GOOD[0], BAD[0], GOOD[1], BAD[1], BAD[2], GOOD[2], b"", BAD[3], GOOD[3])
    with caplog.at_level(logging.WARNING, "stream_ser.tail"):
        skipped = read_jsonl(io.BytesIO(data), TailView(TailOptions()), out)
    assert skipped == 4
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings[:4] == [
        "line 2: not JSON; skipped",
        "line 4: not a JSON object; skipped",
        "line 5: no message type; skipped",
        "line 8: field 'top_probability' is not of type int/float; skipped",
    ]
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines  # the window is left out without --windows
    assert "room1" in lines[0] and "final" in lines[0] and "#1" in lines[0]
    assert lines[1].strip() == "descriptors: pitch high (vs this speaker)"
    assert lines[2].split()[1:] == ["room1", "speaking"]
    assert "kitchen" in lines[3]


def test_filters_and_count_apply_as_on_a_broker() -> None:
    out = io.StringIO()
    view = TailView(TailOptions(stream="room1", windows=True, count=2, json=True))
    read_jsonl(io.BytesIO(jsonl(*GOOD, *GOOD)), view, out)
    shown = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(m["type"], m["stream_id"]) for m in shown] == [("window", "room1")] * 1 + [
        ("utterance", "room1")
    ]


@pytest.mark.slow
def test_tail_reads_a_file_and_stdin(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(jsonl(GOOD[1], BAD[0], GOOD[3]))
    for args, stdin in (((str(path),), None), (("--file", str(path)), None),
                        (("-",), path.read_bytes())):  # fmt: skip
        done = run_cli("tail", *args, stdin=stdin, timeout_s=60)
        assert done.returncode == 0, done.stderr
        assert "line 2: not JSON; skipped" in done.stderr and "Traceback" not in done.stderr
        assert [line.split()[1] for line in done.stdout.splitlines() if "final" in line] == [
            "room1", "kitchen"]  # fmt: skip


@pytest.mark.slow
def test_tail_needs_exactly_one_input(tmp_path: Path) -> None:
    for args in ((), ("-", "--mqtt", "mqtt://127.0.0.1:1"), ("-", "--file", "x")):
        done = run_cli("tail", *args, timeout_s=60)
        assert done.returncode == 2 and "stream-ser: error:" in done.stderr, args
    missing = run_cli("tail", str(tmp_path / "missing.jsonl"), timeout_s=60)
    assert missing.returncode == 2 and "cannot read" in missing.stderr


WRITER = textwrap.dedent("""
    import json, signal, sys, time
    def last(*_):  # like `stream-ser run`: Ctrl-C still sends the utterance in flight
        print(json.dumps(json.loads(sys.argv[2])), flush=True)
        sys.exit(0)
    signal.signal(signal.SIGINT, last)
    print(sys.argv[1], flush=True)
    time.sleep(60)
""")


def test_ctrl_c_on_a_pipeline_still_shows_the_writers_last_results() -> None:
    """Ctrl-C reaches every process of a shell pipeline; `tail -` must not die before its
    writer has sent what was in flight."""
    first, last = result("mic", 1, 0, 900), result("mic", 2, 1000, 2000)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, json.dumps(first), json.dumps(last)],
        stdout=subprocess.PIPE, process_group=0,
    )  # fmt: skip
    assert writer.stdout is not None
    tail = subprocess.Popen(
        [sys.executable, "-m", "stream_ser", "tail", "-"], stdin=writer.stdout,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, process_group=writer.pid,
    )  # fmt: skip
    writer.stdout.close()
    try:
        assert tail.stdout is not None
        assert "#1" in tail.stdout.readline().decode()  # both run; the first result is shown
        os.killpg(writer.pid, signal.SIGINT)  # the terminal's Ctrl-C: the whole group
        out, err = tail.communicate(timeout=30)
    finally:
        for process in (writer, tail):
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
    assert writer.returncode == 0 and tail.returncode == 0, err.decode()
    assert "#2" in out.decode() and b"Traceback" not in err
