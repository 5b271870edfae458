"""The bench `tools/bench/chaos.py` attacks on: a real mosquitto, stream-ser processes, a
subscriber.

Everything here is synchronous and small: processes are `subprocess.Popen`, the subscriber is
a paho-mqtt client on its own thread with a persistent session (it survives broker restarts).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import soundfile
from paho.mqtt.enums import CallbackAPIVersion

from tools.net import free_port

RATE = 16000
REPO = Path(__file__).resolve().parents[2]


def wait_until(condition: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> bool:
    """Poll `condition` until it holds (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step_s)
    return condition()


class Broker:
    """mosquitto on a free loopback port; `extra` config lines (ACL, size limit, persistence)."""

    def __init__(self, directory: Path, extra: Sequence[str] = (), persistence: bool = False):
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = directory / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", *extra]
        if persistence:  # autosave every second: state survives a SIGKILL of the broker
            lines += ["persistence true", f"persistence_location {directory}/",
                      "autosave_interval 1", f"user {os.environ.get('USER', 'root')}"]  # fmt: skip
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Broker:
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if not wait_until(self._listening, 10):
            raise RuntimeError(f"mosquitto did not start on port {self.port}")
        return self

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
        except OSError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL (no last wills, no saving)."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM and wait."""
        self._end(signal.SIGTERM)

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def _end(self, signum: int) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signum)
            self.process.wait(timeout=10)
            self.process = None


class Proc:
    """A stream-ser (or any) process with stdout and stderr kept in files."""

    def __init__(self, name: str, args: Sequence[str], directory: Path, env: dict[str, str]):
        directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.stdout_path = directory / f"{name}.out"
        self.stderr_path = directory / f"{name}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                list(args), cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=os.environ | env,
            )  # fmt: skip

    def wait(self, timeout_s: float) -> int | None:
        """The exit code, or None (and the process killed) if it ran past `timeout_s`."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then wait (killed after `timeout_s`)."""
        if self.process.poll() is None:
            self.process.terminate()
        return self.wait(timeout_s)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def tracebacks(self) -> int:
        return self.stderr.count("Traceback (most recent call last)")

    def rss_mb(self) -> float:
        """Resident memory now (Linux)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


class Subscriber:
    """Collects messages under topic filters (QoS 1, persistent session, auto-reconnect)."""

    def __init__(self, broker: Broker, filters: Sequence[str], name: str = "chaos-sub"):
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._filters = list(filters)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=name, clean_session=False
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        # paho annotates the delays as int, but its backoff only adds and doubles them: seconds
        self.client.reconnect_delay_set(0.2, 1)  # type: ignore[arg-type]
        self.client.connect("127.0.0.1", broker.port, keepalive=5)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the chaos subscriber could not subscribe")

    def _on_connect(self, client: paho.Client, *args: Any) -> None:
        client.subscribe([(topic, 1) for topic in self._filters])

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))

    def results(self, kind: str = "utterance", final: bool | None = True) -> list[dict[str, Any]]:
        """Decoded results of `kind` (final ones only by default)."""
        found = []
        with self._lock:
            messages = list(self.messages)
        for topic, payload, _ in messages:
            if not topic.endswith("/" + kind):
                continue
            try:
                message = json.loads(payload)
            except ValueError:
                continue
            if isinstance(message, dict) and (final is None or message.get("final") is final):
                found.append(message)
        return found

    def last(self, topic: str) -> bytes | None:
        """The latest payload seen on `topic`."""
        with self._lock:
            payloads = [p for t, p, _ in self.messages if t == topic]
        return payloads[-1] if payloads else None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def count_ids(results: list[dict[str, Any]]) -> tuple[int, int]:
    """(distinct ids, duplicates) of results."""
    ids = [str(r.get("id")) for r in results]
    return len(set(ids)), len(ids) - len(set(ids))


def buzz(seconds: float, f0_hz: float = 150.0, level: float = 0.1) -> np.ndarray:
    """A voice-like harmonic buzz: webrtcvad takes it for speech."""
    t = np.arange(int(RATE * seconds)) / RATE
    wave = sum(np.sin(2 * np.pi * f0_hz * k * t) / k for k in range(1, 20))
    assert isinstance(wave, np.ndarray)  # `sum` starts at 0: typed as a possible scalar
    return (level * wave).astype(np.float32)


def bursts(path: Path, count: int, on_s: float = 1.0, off_s: float = 1.0) -> Path:
    """`count` utterances: 0.5 s silence, then (buzz on_s, silence off_s) each; WAV or FLAC."""
    pieces = [np.zeros(RATE // 2, dtype=np.float32)]
    for _ in range(count):
        pieces += [buzz(on_s), np.zeros(int(RATE * off_s), dtype=np.float32)]
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.concatenate(pieces), RATE)
    return path


def stream_ser(*args: str) -> list[str]:
    """The argv of `python -m stream_ser ARGS` with this interpreter."""
    return [sys.executable, "-m", "stream_ser", *args]


@dataclass
class Row:
    """One attack's outcome."""

    attack: str
    expected: str
    delivered: str
    duplicates: int = 0
    tracebacks: int = 0
    exit_codes: list[int | None] = field(default_factory=list)
    ok: bool = False
    note: str = ""


def table(rows: list[Row]) -> str:
    """A Markdown table of the rows."""
    lines = ["| attack | expected | delivered | dup | tb | exit | verdict | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        codes = " ".join("-" if c is None else str(c) for c in r.exit_codes) or "-"
        verdict = "ok" if r.ok else ("skipped" if r.delivered == "skipped" else "FAIL")
        lines.append(f"| {r.attack} | {r.expected} | {r.delivered} | {r.duplicates} | "
                     f"{r.tracebacks} | {codes} | {verdict} | {r.note} |")  # fmt: skip
    return "\n".join(lines)
