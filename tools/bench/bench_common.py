"""Shared helpers of the benchmark scripts (`tools/bench/bench_*.py`); not a benchmark itself.

- machine facts recorded beside every figure (nproc, CPU model, load average, versions);
- the model to measure: `--model DIR`, else the bundled one, else (no model bundled yet) a
  stand-in of the bundled architecture with random weights (timing does not depend on weights);
- long speech files made of real RAVDESS clips, written to a temporary folder (never the repo);
- a real mosquitto on a free loopback port and a subscriber process that timestamps arrivals;
- probes around a stream: source pacing lag, VAD decision, model done, handed to the sink;
- the multi-stream runner every script uses, built by `stream_ser.app.open_runtime` as
  `stream-ser run` is;
- table printing and `--json` output.

Run as a script only for its two helper modes (used by the other scripts):
    bench_common.py standin OUT_DIR          build the stand-in model (imports torch)
    bench_common.py subscribe PORT OUT_FILE  subscribe to stream-ser/# and log arrival times
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from tools.net import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
DATASETS = REPO.parent / "shared" / "datasets"
RAVDESS = DATASETS / "ravdess" / "audio"
MODULE = "tools.bench.bench_common"
"""This module, run as `python -m MODULE` from REPO for its helper subprocesses."""
STANDIN_DIR = REPO / "runs" / "bench" / "standin-model"  # /runs/ is git-ignored
SAMPLE_RATE = 16000


# --------------------------------------------------------------------------- machine facts


def machine() -> dict[str, Any]:
    """Facts to print beside the numbers: the box is shared and noisy."""
    cpu = "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import onnxruntime

    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
        check=False,
    )  # fmt: skip
    return done.stdout.strip() or "unknown"


def machine_line(facts: dict[str, Any]) -> str:
    """One line for the top of a table."""
    load = " ".join(f"{x:.2f}" for x in facts["loadavg"])
    return (
        f"machine: {facts['nproc']} x {facts['cpu']}, load average {load}, "
        f"Python {facts['python']}, onnxruntime {facts['onnxruntime']}, "
        f"commit {facts['commit']}, {facts['date_utc']} UTC"
    )


# --------------------------------------------------------------------------- the model


def resolve_model(path: str | None) -> tuple[Path, str]:
    """(model directory, a note on where it came from)."""
    if path:
        return Path(path), "given with --model"
    from stream_ser.specialist import bundled_model_dir

    bundled = bundled_model_dir()
    if (bundled / "model.onnx").is_file():
        return bundled, "bundled"
    if not (STANDIN_DIR / "model.onnx").is_file():
        # A subprocess, so that the measuring process never imports torch.
        subprocess.run(
            [sys.executable, "-m", MODULE, "standin", str(STANDIN_DIR)],
            check=True, cwd=REPO,
        )
    return (
        STANDIN_DIR,
        "no bundled model yet: stand-in of the baseline architecture, random weights",
    )


def build_standin(out_dir: Path) -> None:
    """The baseline network of tools/train/train_specialist.py, random weights, exported like it."""
    import torch

    from tools.train import train_specialist as ts

    cfg = ts.load_config(REPO / "tools" / "train" / "configs" / "baseline.toml")
    torch.manual_seed(0)
    model = ts.EmotionNet(cfg.features, cfg.model).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    ts.export_onnx(model, out_dir / "model.onnx", cfg.export.opset)
    ts.write_card(out_dir, cfg.export)
    card = json.loads((out_dir / "card.json").read_text())
    card["id"] = f"{card['id']}+random-weights-standin"
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")


def model_id(model_dir: Path) -> str:
    """The id on the model card."""
    from stream_ser.specialist import load_card

    return load_card(model_dir).model_id


# --------------------------------------------------------------------------- audio


def ravdess_clips(index: int) -> list[Path]:
    """All clips of one RAVDESS actor: the index-th (cyclically) of those present."""
    actors = sorted(p for p in RAVDESS.glob("Actor_*") if p.is_dir())
    if not actors:
        raise SystemExit(f"dataset not found: {RAVDESS} (see ../shared/datasets)")
    return sorted(actors[index % len(actors)].glob("*.flac"))


def speech_file(
    directory: Path, index: int, seconds: float, gap_s: float = 0.5, dense: bool = False
) -> Path:
    """A 16 kHz WAV of real speech: clips of the index-th actor (cyclic), rotated by index, with
    `gap_s` of silence after each clip (RAVDESS clips also hold ~1 s of their own silence).

    `dense`: each clip trimmed to its speech (frames within 35 dB of its loudest) and joined
    with 0.2 s gaps, shorter than the VAD hangover: continuous speech, the worst case (long
    utterances, a window every hop)."""
    if dense:
        gap_s = 0.2
    path = directory / f"speech-{index:03d}-{int(seconds)}s{'-dense' if dense else ''}.wav"
    if path.exists():
        return path
    clips = ravdess_clips(index)
    offset = (index * 7) % len(clips)
    clips = clips[offset:] + clips[:offset]
    pieces: list[np.ndarray] = []
    total = 0
    gap = np.zeros(int(gap_s * SAMPLE_RATE), dtype=np.float32)
    for clip in clips * 10:
        audio, rate = soundfile.read(clip, dtype="float32")
        assert rate == SAMPLE_RATE, f"{clip}: {rate} Hz"
        if dense:
            audio = _trim(audio)
        pieces += [audio, gap]
        total += len(audio) + len(gap)
        if total >= seconds * SAMPLE_RATE:
            break
    directory.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.concatenate(pieces)[: int(seconds * SAMPLE_RATE)], SAMPLE_RATE)
    return path


def _trim(audio: np.ndarray, db: float = 35.0) -> np.ndarray:
    frame = SAMPLE_RATE * 30 // 1000
    frames = audio[: len(audio) // frame * frame].reshape(-1, frame)
    level = 10 * np.log10((frames**2).mean(axis=1) + 1e-12)
    loud = np.flatnonzero(level > level.max() - db)
    return audio[loud[0] * frame : (loud[-1] + 1) * frame]


def audio_seconds(path: Path) -> float:
    """Duration of an audio file."""
    return float(soundfile.info(str(path)).duration)


# --------------------------------------------------------------------------- broker, subscriber


class Broker:
    """A real mosquitto on a free loopback port (like tests/conftest.py), optionally pinned."""

    def __init__(self, directory: Path, cpus: Sequence[int] | None = None) -> None:
        if shutil.which("mosquitto") is None:
            raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        )
        self.cpus = cpus
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def __enter__(self) -> Broker:
        self.process = subprocess.Popen(
            [*_pinned(self.cpus), "mosquitto", "-c", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)


def _pinned(cpus: Sequence[int] | None) -> list[str]:
    """A command prefix that pins what it runs to `cpus` (taskset: no pre-exec hook in a
    threaded parent); empty when not pinned."""
    return ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []


class Subscriber:
    """A separate process subscribed to `stream-ser/#`; logs the arrival time of each result."""

    def __init__(self, port: int, out_file: Path, cpus: Sequence[int] | None = None) -> None:
        self.out_file = out_file
        self.process = subprocess.Popen(
            [*_pinned(cpus), sys.executable, "-m", MODULE, "subscribe", str(port), str(out_file)],
            stdout=subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != b"ready":
            raise SystemExit("the benchmark subscriber did not start")

    def stop(self) -> list[dict[str, Any]]:
        """Stop after a short grace period; arrivals as dicts (key, kind, arrival_s)."""
        time.sleep(0.5)
        self.process.terminate()
        self.process.wait(timeout=10)
        arrivals = []
        for line in self.out_file.read_text().splitlines():
            arrival, key = line.split("\t")
            arrivals.append({"arrival_s": float(arrival), "key": key})
        return arrivals


async def _subscribe(port: int, out_file: Path) -> None:
    import signal

    import aiomqtt

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    with out_file.open("w") as out:
        async with aiomqtt.Client("127.0.0.1", port, identifier=f"bench-sub-{os.getpid()}") as c:
            await c.subscribe("stream-ser/+/utterance", qos=1)
            await c.subscribe("stream-ser/+/window", qos=0)
            print("ready", flush=True)
            messages = aiter(c.messages)
            while not stop.is_set():
                waiter = asyncio.ensure_future(anext(messages))
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if not waiter.done():
                    waiter.cancel()
                    break
                now = time.monotonic()
                payload = json.loads(bytes(waiter.result().payload))
                out.write(f"{now:.6f}\t{result_key_from_message(payload)}\n")
            out.flush()


# --------------------------------------------------------------------------- probes


def result_key(stream_id: str, kind: str, utterance_id: int, end_ms: int) -> str:
    """Identifies one result across the probes and the subscriber."""
    return f"{stream_id}:{kind}:{utterance_id}:{end_ms}"


PROVISIONAL = "#p"  # suffix of a provisional utterance result's key


def result_key_from_message(message: dict[str, Any]) -> str:
    """The key of a published result message: a window, a final utterance result (the job's
    key), or a provisional utterance result (the job's key + PROVISIONAL)."""
    key = result_key(
        message["stream_id"], message["type"], message["utterance_id"], message["end_ms"]
    )
    if message["type"] == "utterance" and message.get("final") is False:
        return key + PROVISIONAL
    return key


@dataclass
class Probe:
    """Monotonic timestamps collected around the pipeline (all in seconds)."""

    started_s: dict[str, float] = field(default_factory=dict)  # stream -> source start
    speed: float | None = None
    chunk_lag_s: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    ready_s: dict[str, float] = field(default_factory=dict)  # key -> audio complete (VAD/window)
    model_done_s: dict[str, float] = field(default_factory=dict)  # key -> probabilities ready
    sink_s: dict[str, float] = field(default_factory=dict)  # message key -> handed to the sink
    kinds: dict[str, str] = field(default_factory=dict)
    end_ms: dict[str, int] = field(default_factory=dict)
    stream_of: dict[str, str] = field(default_factory=dict)
    run_wall_s: float = 0.0  # streams only (model already loaded, sink connected)
    run_cpu_s: float = 0.0

    def due_s(self, key: str) -> float | None:
        """When the last sample of a result's audio was due (paced runs only)."""
        if self.speed is None:
            return None
        return self.started_s[self.stream_of[key]] + self.end_ms[key] / 1000 / self.speed


async def paced(
    stream_id: str, source: AsyncIterator[Any], probe: Probe, delay_s: float
) -> AsyncIterator[Any]:
    """The source's chunks, logging pacing lag (release time - due time) per chunk."""
    if delay_s:
        await asyncio.sleep(delay_s)
    started = time.monotonic()
    probe.started_s[stream_id] = started
    lags = probe.chunk_lag_s.setdefault(stream_id, [])
    async for chunk in source:
        now = time.monotonic()
        if probe.speed is not None:
            end_s = (chunk.start_ms + len(chunk.samples) * 1000 / SAMPLE_RATE) / 1000
            lags.append((now - started, now - (started + end_s / probe.speed)))
        yield chunk


class RecognizerProbe:
    """Stands in for the shared Recognizer: logs each job (by its stream), then delegates."""

    def __init__(self, recognizer: Any, probe: Probe) -> None:
        self.recognizer = recognizer
        self.probe = probe

    def submit(self, job: Any) -> Any:
        """Log the job's ready time and when its probabilities arrive."""
        key = result_key(job.stream_id, job.kind, job.utterance_id, job.end_ms)
        probe = self.probe
        probe.ready_s[key] = job.ready_s
        probe.kinds[key] = job.kind
        probe.end_ms[key] = job.end_ms
        probe.stream_of[key] = job.stream_id
        future = self.recognizer.submit(job)
        future.add_done_callback(lambda _: probe.model_done_s.__setitem__(key, time.monotonic()))
        return future

    def __getattr__(self, name: str) -> Any:
        return getattr(self.recognizer, name)  # `specialist` and anything else


class SinkProbe:
    """Wraps the real sink; logs when each result is handed to it."""

    def __init__(self, sink: Any, probe: Probe) -> None:
        self.sink = sink
        self.probe = probe

    async def __aenter__(self) -> SinkProbe:
        await self.sink.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.sink.__aexit__(*exc)

    async def result(self, stream_id: str, message: dict[str, Any]) -> None:
        """Log, then deliver."""
        self.probe.sink_s[result_key_from_message(message)] = time.monotonic()
        await self.sink.result(stream_id, message)

    async def status(self, message: dict[str, Any]) -> None:
        """Deliver."""
        await self.sink.status(message)

    def counters(self) -> dict[str, int]:
        """The real sink's counters."""
        return dict(self.sink.counters())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)  # any other Sink method the pipeline grows


class NullSink:
    """Encodes each message (as every real sink does) and throws it away."""

    async def __aenter__(self) -> NullSink:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    async def result(self, stream_id: str, message: dict[str, Any]) -> None:
        """Encode only."""
        from stream_ser.messages import encode

        encode(message)

    async def status(self, message: dict[str, Any]) -> None:
        """Nothing."""

    def counters(self) -> dict[str, int]:
        """Nothing."""
        return {}

    def __getattr__(self, name: str) -> Any:
        async def ignore(*args: Any, **kwargs: Any) -> None:
            return None

        return ignore  # any other Sink method the pipeline grows


# --------------------------------------------------------------------------- the runner


@dataclass(frozen=True)
class RunConfig:
    """One pipeline run: N streams sharing one Recognizer and one sink."""

    model_dir: str
    files: list[str]  # one per stream
    speed: float | None  # None: as fast as possible; 1.0: real time
    broker_url: str | None  # None: NullSink (JSON encoding only)
    windows: bool = True
    max_pending_windows_per_stream: int = 8
    stagger_s: float = 1.0  # paced runs: streams start at random offsets in [0, stagger_s)
    intra_op_threads: int = 1
    spool_dir: str | None = None
    descriptors: bool | None = None  # None: the CLI's default, where the pipeline has them
    chunk_ms: int = 100


async def run_streams_probed(config: RunConfig) -> tuple[Probe, dict[str, Any]]:
    """Run the default pipeline on every file; returns the probe and per-run counters."""
    from stream_ser.app import load_specialist, open_runtime
    from stream_ser.pipeline import run_streams
    from stream_ser.settings import ModelSettings, MqttSettings, OutputSettings, Settings
    from stream_ser.source import SourceStats, file_source

    wanted = descriptors_default() if config.descriptors is None else config.descriptors
    settings = Settings(
        model=ModelSettings(
            path=config.model_dir, intra_op_threads=config.intra_op_threads,
            windows=config.windows,
        ),
        output=OutputSettings(
            max_pending_windows=config.max_pending_windows_per_stream * len(config.files),
            descriptors=bool(wanted),
        ),
    )  # fmt: skip
    specialist = load_specialist(config.model_dir, settings=settings)
    probe = Probe(speed=config.speed)
    stream_ids = [f"s{i:03d}" for i in range(len(config.files))]
    sink: Any = NullSink()
    if config.broker_url is not None:
        from stream_ser.publish import MqttSink
        from stream_ser.spool import Spool

        spool_dir = Path(config.spool_dir or "/tmp")
        client = f"bench-{os.getpid()}"
        spool = Spool(spool_dir / f"{client}.sqlite3")
        sink = MqttSink(MqttSettings(url=config.broker_url), client, stream_ids, spool)
    sink = SinkProbe(sink, probe)
    rng = random.Random(0)
    stop = asyncio.Event()
    if wanted:  # a one-off start-up cost (~1 s: pandas), not per audio second
        from stream_ser.acoustics import analyse_functionals

        analyse_functionals(np.zeros(SAMPLE_RATE, dtype=np.float32))
    async with open_runtime(settings, specialist, sink) as runtime:
        runtime.recognizer = RecognizerProbe(runtime.recognizer, probe)  # type: ignore[assignment]
        streams = []
        for stream_id, name in zip(stream_ids, config.files, strict=True):
            stats = SourceStats()
            source = file_source(
                Path(name), soundfile.SoundFile(name), config.chunk_ms, config.speed, stats
            )
            delay = rng.uniform(0, config.stagger_s) if config.speed else 0.0
            streams.append(
                runtime.pipeline(stream_id, paced(stream_id, source, probe, delay), stats)
            )
        async with sink:
            wall, cpu = time.monotonic(), cpu_seconds()
            await run_streams(streams, sink, stop, 10.0)
            probe.run_wall_s, probe.run_cpu_s = time.monotonic() - wall, cpu_seconds() - cpu
    counters = {s.stream_id: s.status_counters() for s in streams}
    totals: dict[str, int] = {}
    for per_stream in counters.values():
        for name, value in per_stream.items():
            totals[name] = totals.get(name, 0) + value
    return probe, totals | sink.counters()


def descriptors_default() -> bool | None:
    """The CLI's default for per-utterance descriptors."""
    from stream_ser.settings import OutputSettings

    return OutputSettings().descriptors


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- statistics, output


def percentiles(values: Sequence[float], points: Sequence[int] = (50, 95, 99)) -> list[float]:
    """Percentiles (nan when empty)."""
    if not values:
        return [float("nan")] * len(points)
    return [float(np.percentile(values, p)) for p in points]


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table (also valid Markdown)."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


SMALL, LARGE = 0.1, 1000
"""Table cells: below SMALL four decimals, below LARGE three significant digits, else integers."""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) < SMALL:
            return f"{value:.4f}"
        return f"{value:.3g}" if value < LARGE else f"{value:.0f}"
    return str(value)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write the figures as JSON when `--json FILE` was given."""
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=float) + "\n")
        print(f"\nwrote {path}")


def main(argv: Sequence[str]) -> None:
    """The helper modes."""
    match argv:
        case ["standin", out_dir]:
            build_standin(Path(out_dir))
        case ["subscribe", port, out_file]:
            asyncio.run(_subscribe(int(port), Path(out_file)))
        case _:
            raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
