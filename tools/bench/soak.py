"""Soak test: hours of audio through `stream-ser run --realtime --speed N` to a local mosquitto.

Builds a long recording from real RAVDESS clips and silences (in a temporary folder, never
committed), streams it at an accelerated pace through the CLI, samples the process's
resident memory (VmRSS from /proc) as it goes, and checks that a QoS 1 subscriber got every
utterance result exactly once (after dropping duplicates by message id), in order.

    .venv/bin/python -m tools.bench.soak --hours 1 --speed 20
    .venv/bin/python -m tools.bench.soak --hours 0.05 --speed 40 --model tests/tiny --json

Exit status 0 when every check passes, 1 otherwise. Needs mosquitto on PATH and the
datasets folder (../shared/datasets/ravdess by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import soundfile

from tools.net import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
RAVDESS = REPO.parent / "shared" / "datasets" / "ravdess" / "audio"
RATE = 16000
PREFIX = "soak"
CLIENT_ID = "soak-ser"
# RSS is measured from the first utterance result (everything loaded and run once) or this
# share of the run, whichever is later: before that it is start-up (model, allocator arenas).
WARM_UP_FRACTION = 0.1
MIN_FIT_POINTS = 3
"""Memory samples needed before a growth slope is fitted (fewer: slope 0)."""


@dataclass
class Report:
    """The soak run's figures."""

    audio_hours: float
    speed: float
    wall_s: float
    exit_code: int
    utterances_reported: int  # by the final status
    utterances_received: int  # unique ids seen by the subscriber
    duplicates: int  # redelivered copies dropped by id
    in_order: bool
    windows_received: int
    rss_start_mb: float  # after the warm-up (see WARM_UP_FRACTION)
    rss_peak_mb: float
    rss_end_mb: float
    rss_growth_mb: float  # highest after the warm-up - start (the end is at shutdown)
    rss_slope_mb_per_audio_hour: float  # least-squares over the samples after the warm-up
    samples: list[tuple[float, float]] = field(repr=False)  # (wall s, RSS MB)
    counters: dict[str, int] = field(default_factory=dict)

    def checks(self, max_growth_mb: float) -> dict[str, bool]:
        """Named pass/fail checks."""
        return {
            "exit code 0": self.exit_code == 0,
            "every utterance exactly once": self.utterances_received == self.utterances_reported
            and self.utterances_reported > 0,
            "in order": self.in_order,
            f"RSS growth <= {max_growth_mb:g} MB": self.rss_growth_mb <= max_growth_mb,
        }


def build_recording(path: Path, hours: float, seed: int = 0) -> float:
    """Real clips (all actors, shuffled) with 0.5-3 s silences until `hours`; returns hours."""
    clips = sorted(RAVDESS.glob("Actor_*/*.flac"))
    if not clips:
        raise SystemExit(f"no RAVDESS clips under {RAVDESS}")
    rng = np.random.default_rng(seed)
    target = int(hours * 3600 * RATE)
    written = 0
    with soundfile.SoundFile(path, "w", RATE, 1, subtype="PCM_16", format="FLAC") as out:
        while written < target:
            clip = clips[int(rng.integers(len(clips)))]
            audio, rate = soundfile.read(clip, dtype="float32")
            assert rate == RATE and audio.ndim == 1, clip
            gap = np.zeros(int(rng.uniform(0.5, 3.0) * RATE), dtype=np.float32)
            piece = np.concatenate([audio, gap])[: target - written]
            out.write(piece)
            written += len(piece)
    return written / RATE / 3600


def start_broker(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    """mosquitto on a free loopback port."""
    port = free_port()
    config = folder / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_port(port)
    except TimeoutError:
        broker.kill()
        raise SystemExit("mosquitto did not start") from None
    return broker, port


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process (VmRSS), in MB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


class Subscriber:
    """QoS 1 subscriber on the soak prefix, gathering results until the offline status."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ids: list[str] = []
        self.utterance_ids: list[int] = []
        self.windows = 0
        self.duplicates = 0
        self.final_status: dict[str, Any] | None = None
        self.first_utterance_at: float | None = None  # time.monotonic()
        self.ready = asyncio.Event()
        self.done = asyncio.Event()

    async def run(self) -> None:
        seen: set[str] = set()
        async with aiomqtt.Client("127.0.0.1", self.port, max_queued_incoming_messages=0) as client:
            await client.subscribe(f"{PREFIX}/#", qos=1)
            self.ready.set()
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                payload = json.loads(message.payload)
                kind = payload.get("type")
                if kind == "status" and payload["state"] == "offline" and payload["counters"]:
                    self.final_status = payload
                    self.done.set()
                if kind not in ("utterance", "window"):
                    continue
                if payload["id"] in seen:
                    self.duplicates += 1
                    continue
                seen.add(payload["id"])
                if kind == "utterance" and payload["final"]:
                    self.utterance_ids.append(payload["utterance_id"])
                    self.first_utterance_at = self.first_utterance_at or time.monotonic()
                else:
                    self.windows += 1


async def soak(args: argparse.Namespace, folder: Path) -> Report:
    """Run the CLI over the recording while sampling its memory; gather the figures."""
    recording = folder / "soak.flac"
    print(f"building {args.hours:g} h of audio in {recording} ...", file=sys.stderr)
    hours = build_recording(recording, args.hours)
    broker, port = start_broker(folder)
    subscriber = Subscriber(port)
    listening = asyncio.create_task(subscriber.run(), name="subscriber")
    try:
        async with asyncio.timeout(10):
            await subscriber.ready.wait()
        command = [sys.executable, "-m", "stream_ser", "run", "--input", str(recording),
                   "--realtime", "--speed", str(args.speed), "--mqtt", f"mqtt://127.0.0.1:{port}",
                   "--mqtt-topic-prefix", PREFIX, "--mqtt-client-id", CLIENT_ID,
                   "--mqtt-spool-dir", str(folder / "spool"), "--mqtt-status-interval-s", "5",
                   "--stream-id", "soak", "--log-level", "warning"]  # fmt: skip
        if args.model:
            command += ["--model", args.model]
        command += args.extra
        print(" ".join(command[1:]), file=sys.stderr)
        started = time.monotonic()
        process = launch(command, folder / "stderr.log")
        samples = await sample_rss(process, started, args.sample_s)
        wall_s = time.monotonic() - started
        async with asyncio.timeout(60):
            await subscriber.done.wait()
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        broker.terminate()
        broker.wait(timeout=10)
    warm_s = max(WARM_UP_FRACTION * wall_s, (subscriber.first_utterance_at or started) - started)
    tail = (folder / "stderr.log").read_text(errors="replace")[-2000:]
    if process.returncode != 0:
        print(tail, file=sys.stderr)
    return summarise(
        hours, args.speed, wall_s, warm_s=warm_s, exit_code=process.returncode,
        subscriber=subscriber, samples=samples,
    )  # fmt: skip


def launch(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start the CLI with its stderr in a file."""
    with log.open("wb") as stderr:
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)


async def sample_rss(
    process: subprocess.Popen[bytes], started: float, every_s: float
) -> list[tuple[float, float]]:
    """(elapsed s, RSS MB) every `every_s` until the process exits."""
    samples: list[tuple[float, float]] = []
    while process.poll() is None:
        if (rss := rss_mb(process.pid)) is not None:
            samples.append((time.monotonic() - started, rss))
        await asyncio.sleep(every_s)
    return samples


def summarise(
    hours: float,
    speed: float,
    wall_s: float,
    *,
    warm_s: float,
    exit_code: int,
    subscriber: Subscriber,
    samples: list[tuple[float, float]],
) -> Report:
    """The report from what was measured."""
    status = subscriber.final_status or {"counters": {}}
    counters = {k: v for k, v in status["counters"].items() if isinstance(v, int)}
    steady = [s for s in samples if s[0] >= warm_s] or samples or [(0.0, 0.0)]
    times = np.array([t for t, _ in steady])
    values = np.array([v for _, v in steady])
    slope = float(np.polyfit(times, values, 1)[0]) if len(steady) >= MIN_FIT_POINTS else 0.0
    audio_s_per_wall_s = hours * 3600 / max(wall_s, 1e-9)
    ids = subscriber.utterance_ids
    return Report(
        audio_hours=round(hours, 3),
        speed=speed,
        wall_s=round(wall_s, 1),
        exit_code=exit_code,
        utterances_reported=int(counters.get("utterances", 0)),
        utterances_received=len(ids),
        duplicates=subscriber.duplicates,
        in_order=ids == list(range(1, len(ids) + 1)),
        windows_received=subscriber.windows,
        rss_start_mb=round(float(values[0]), 1),
        rss_peak_mb=round(max(v for _, v in samples) if samples else 0.0, 1),
        rss_end_mb=round(float(values[-1]), 1),
        rss_growth_mb=round(float(values.max() - values[0]), 1),
        rss_slope_mb_per_audio_hour=round(slope * 3600 / audio_s_per_wall_s, 2),
        samples=[(round(t, 1), round(v, 1)) for t, v in samples],
        counters=counters,
    )


def print_table(report: Report, max_growth_mb: float) -> None:
    """Human-readable figures and checks."""
    rows = [
        ("audio", f"{report.audio_hours:.3f} h at speed {report.speed:g}"),
        ("wall time", f"{report.wall_s:.0f} s"),
        ("utterances", f"{report.utterances_received} received / "
                       f"{report.utterances_reported} reported, {report.duplicates} duplicates"),
        ("windows received", str(report.windows_received)),
        ("RSS start (after warm-up)", f"{report.rss_start_mb:.1f} MB"),
        ("RSS peak", f"{report.rss_peak_mb:.1f} MB"),
        ("RSS end", f"{report.rss_end_mb:.1f} MB"),
        ("RSS growth", f"{report.rss_growth_mb:+.1f} MB "
                       f"(trend {report.rss_slope_mb_per_audio_hour:+.2f} MB per audio hour)"),
        ("drops", ", ".join(f"{k}={v}" for k, v in report.counters.items()
                            if ("drop" in k or "denied" in k or "error" in k) and v) or "none"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for name, passed in report.checks(max_growth_mb).items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=1.0, help="audio to stream (hours)")
    parser.add_argument("--speed", type=float, default=20.0, help="pace: N x real time")
    parser.add_argument("--model", help="model directory (default: the bundled model)")
    parser.add_argument("--sample-s", type=float, default=1.0, help="RSS sampling period (s)")
    parser.add_argument("--max-growth-mb", type=float, default=30.0, help="RSS growth allowed")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("extra", nargs="*", help="more `stream-ser run` flags, after --")
    args = parser.parse_args(argv)
    if shutil.which("mosquitto") is None:
        raise SystemExit("mosquitto is not installed")
    folder = Path(tempfile.mkdtemp(prefix="stream-ser-soak-"))
    try:
        report = asyncio.run(soak(args, folder))
    finally:
        if args.keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(asdict(report) | {"checks": report.checks(args.max_growth_mb)}))
    else:
        print_table(report, args.max_growth_mb)
    return 0 if all(report.checks(args.max_growth_mb).values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
