"""A microphone that goes away: PulseAudio's null sink is unloaded under a running capture.

Unloading the sink ends the PortAudio stream (what unplugging a USB microphone does);
stream-ser reopens the device with backoff, fills the gap with silence and goes on when it
is back, or gives up with a clear error after the configured number of tries.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_microphone import pulse_env  # noqa: F401  (the PulseAudio fixture)

NULL_SINK = ["module-null-sink", "sink_name=vsink", "rate=16000", "channels=1"]


def pactl(env: dict[str, str], *args: str) -> None:
    subprocess.run(["pactl", *args], env=env, check=True, timeout=30, capture_output=True)


def start_capture(
    env: dict[str, str], model: Path, results: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """stream-ser on the null sink's monitor; results (JSON Lines) go to the file `results`."""
    with results.open("wb") as stdout:
        return subprocess.Popen(
            [sys.executable, "-m", "stream_ser", "run", "--mic", "pulse_mon", "--model", str(model),
             "--no-model-windows", "--source-mic-retry-delay-s", "0.5", *extra],
            env=env, stdout=stdout, stderr=subprocess.PIPE, cwd=REPO,
        )  # fmt: skip


def play(env: dict[str, str], path: Path) -> None:
    subprocess.run(["paplay", "--device=vsink", str(path)], env=env, check=True, timeout=60)


class StderrLines:
    """Collects a process's stderr lines in a thread, so a test can wait for one."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        assert process.stderr is not None
        stream = self._stream = process.stderr
        self._thread = threading.Thread(
            target=lambda: self.lines.extend(line.decode() for line in stream), daemon=True
        )
        self._thread.start()

    def wait_for(self, text: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, f"no {text!r} in {self.lines}"
            time.sleep(0.1)

    def text(self) -> str:
        """Everything, once the process has closed its stderr."""
        self._thread.join(timeout=10)
        self._stream.close()
        return "".join(self.lines)


@pytest.mark.slow
def test_microphone_unplugged_and_back_recovers(
    pulse_env: dict[str, str],  # noqa: F811
    speech_with_pauses: tuple[Path, int],
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    path, clip_count = speech_with_pauses
    results = tmp_path / "results.jsonl"
    recognizer = start_capture(pulse_env, tiny_model, results, "--source-mic-retries", "6")
    stderr = StderrLines(recognizer)
    try:
        stderr.wait_for("capturing 'pulse_mon'")
        time.sleep(2.0)  # PulseAudio's capture starts a little later
        play(pulse_env, path)
        time.sleep(1.0)
        pactl(pulse_env, "unload-module", "module-null-sink")  # unplugged
        stderr.wait_for("stopped delivering audio; reopening it in 0.5 s")
        time.sleep(1.0)
        pactl(pulse_env, "load-module", *NULL_SINK)  # plugged in again
        stderr.wait_for("input device 'pulse_mon' is back after")
        time.sleep(2.0)
        play(pulse_env, path)
        time.sleep(1.5)
        recognizer.send_signal(signal.SIGINT)
        recognizer.wait(timeout=30)
    finally:
        recognizer.kill()
    text = stderr.text()
    assert recognizer.returncode == 0, text
    assert "Traceback" not in text
    finals = [m for m in map(json.loads, results.read_text().splitlines()) if m["final"]]
    assert [m["utterance_id"] for m in finals] == list(range(1, 2 * clip_count + 1))
    gap_start = finals[clip_count - 1]["end_ms"]
    assert finals[clip_count]["start_ms"] - gap_start > 2500  # the outage counted as time


@pytest.mark.slow
def test_microphone_gone_for_good_is_a_clear_error(
    pulse_env: dict[str, str],  # noqa: F811
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    results = tmp_path / "results.jsonl"
    recognizer = start_capture(pulse_env, tiny_model, results, "--source-mic-retries", "2")
    stderr = StderrLines(recognizer)
    try:
        stderr.wait_for("capturing 'pulse_mon'")
        time.sleep(1.0)
        pactl(pulse_env, "unload-module", "module-null-sink")
        recognizer.wait(timeout=30)  # 0.5 + 1 s of retries, then give up
    finally:
        recognizer.kill()
    text = stderr.text()
    assert "attempt 2 of 2" in text
    assert recognizer.returncode == 1, text
    assert "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("stream-ser: error: cannot open input device 'pulse_mon'")
    assert last.endswith("gave up after 2 attempt(s) to reopen it")
