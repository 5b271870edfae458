"""Real-time microphone capture without hardware: PulseAudio null sink, captured via its monitor.

A file is played into the null sink with paplay; stream-ser captures the sink's monitor
through sounddevice (ALSA -> pulse plugin) in real time, at the device's native 44.1 kHz
stereo, and must find the utterances.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LABELS, REPO
from tests.schema import check_result

TOOLS = ("pulseaudio", "paplay")


@pytest.fixture
def pulse_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A private PulseAudio server with a null sink; the environment to reach it."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        message = (
            f"needs {missing} (apt-get install pulseaudio pulseaudio-utils libasound2-plugins)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    socket = tmp_path / "native"
    (tmp_path / "pa.conf").write_text(
        f"load-module module-native-protocol-unix auth-anonymous=1 socket={socket}\n"
        "load-module module-null-sink sink_name=vsink rate=16000 channels=1\n"
    )
    (tmp_path / "asound.conf").write_text(
        '</usr/share/alsa/alsa.conf>\npcm.pulse_mon {\n  type pulse\n  device "vsink.monitor"\n}\n'
    )
    env = os.environ | {
        "HOME": str(tmp_path),
        "XDG_RUNTIME_DIR": str(tmp_path),
        "PULSE_SERVER": f"unix:{socket}",
        "ALSA_CONFIG_PATH": str(tmp_path / "asound.conf"),
    }
    server = subprocess.Popen(
        [
            "pulseaudio",
            "-n",
            "-F",
            str(tmp_path / "pa.conf"),
            "--daemonize=no",
            "--exit-idle-time=-1",
            "--use-pid-file=no",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while not socket.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert socket.exists(), "PulseAudio did not start"
    yield env
    server.terminate()
    server.wait(timeout=10)


@pytest.mark.slow
def test_devices_lists_the_virtual_input(pulse_env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stream_ser", "devices"],
        env=pulse_env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "pulse_mon" in done.stdout


@pytest.mark.slow
def test_realtime_capture_yields_utterances(
    pulse_env: dict[str, str], speech_with_pauses: tuple[Path, int], tiny_model: Path
) -> None:
    path, clip_count = speech_with_pauses
    recognizer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream_ser",
            "run",
            "--mic",
            "pulse_mon",
            "--model",
            str(tiny_model),
            "--no-model-windows",
        ],
        env=pulse_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        time.sleep(2.0)  # let capture start
        started = time.monotonic()
        subprocess.run(
            ["paplay", "--device=vsink", str(path)], env=pulse_env, check=True, timeout=60
        )
        played_s = time.monotonic() - started
        time.sleep(1.5)  # the last hangover
        recognizer.send_signal(signal.SIGINT)
        stdout, stderr = recognizer.communicate(timeout=30)
    finally:
        recognizer.kill()
    assert recognizer.returncode == 0, stderr.decode()
    assert played_s > 5.0, "paplay played in real time"
    assert b"capturing 'pulse_mon' at" in stderr
    messages = [m for m in map(json.loads, stdout.decode().splitlines()) if m["final"]]
    assert [m["utterance_id"] for m in messages] == list(range(1, clip_count + 1))
    for message in messages:
        check_result(message, LABELS)
        assert message["stream_id"] == "mic"
