"""Benchmark of the whole default pipeline: speed, capacity, memory, start-up, optional stages.

    .venv/bin/python -m tools.bench.bench_pipeline [SUBCOMMAND ...] [--json FILE]

Subcommands (default: all of rtf, streams, memory, startup, stages):
    rtf       real-time factor per stream, one process pinned to one core (broker on the other),
              files read as fast as possible; 1 stream and N streams (batched across streams)
    streams   concurrent real-time streams one process sustains (unpinned, 2 cores) while the
              lag stays bounded; each step runs --duration seconds at real-time pace
    memory    peak RSS against the stream count, each count in a fresh process; torch imported?
    startup   command start to first result (`stream-ser run` in a subprocess)
    stages    the pipeline with and without each optional stage, as ratios of CPU time
    profile   where the time goes (py-spy if installed, else cProfile of the event loop thread)

"The default pipeline" is what `stream-ser run --mqtt URL` builds (tools/bench/bench_common.py
builds it the same way through the Python API): 100 ms chunks, webrtcvad segmenter, windows (card's
window and hop) and utterances through the shared Recognizer (1 inference thread, 1 onnxruntime
thread), JSON encoding, MqttSink with its SQLite spool, publishing to a real local mosquitto. Audio:
real
RAVDESS clips joined with 0.5 s gaps ("conversational": about half of it speech, utterances of
1.5-3 s) or trimmed to their speech and joined with 0.2 s gaps ("continuous": one long turn,
split at 15 s, a window every 500 ms: the worst case); see `speech_file` in
tools/bench/bench_common.py.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tools.bench import bench_common as bc

SUBCOMMANDS = ("rtf", "streams", "memory", "startup", "stages", "profile")
DEFAULT_RUN = ("rtf", "streams", "memory", "startup", "stages")


# --------------------------------------------------------------------------- worker (one run)


def worker(spec_file: str) -> None:
    """Run one configuration in this (fresh) process and print its figures as JSON."""
    spec = json.loads(Path(spec_file).read_text())
    if spec.get("cpus"):
        os.sched_setaffinity(0, set(spec["cpus"]))  # threads started later inherit it
    config = bc.RunConfig(**spec["config"])
    probe, counters = asyncio.run(bc.run_streams_probed(config))
    wall, cpu = probe.run_wall_s, probe.run_cpu_s
    audio = sum(bc.audio_seconds(Path(f)) for f in config.files)
    result = {
        "streams": len(config.files),
        "wall_s": wall,
        "cpu_s": cpu,
        "audio_s": audio,
        "peak_rss_mb": bc.peak_rss_mb(),
        "torch_imported": "torch" in sys.modules,
        "heavy_modules": sorted(
            m for m in ("torch", "pandas", "opensmile", "transformers", "scipy") if m in sys.modules
        ),
        "counters": counters,
        "chunk_lag": _lag_summary(probe),
        "timings": {
            key: {
                "kind": probe.kinds[key],
                "ready": probe.ready_s.get(key),
                "model_done": probe.model_done_s.get(key),
                "sink": probe.sink_s.get(key),  # the final result (or the window)
                "sink_provisional": probe.sink_s.get(key + bc.PROVISIONAL),
                "due": probe.due_s(key),
            }
            for key in probe.kinds
        },
    }
    Path(spec["out"]).write_text(json.dumps(result))


def _lag_summary(probe: bc.Probe) -> dict[str, float]:
    """Source pacing lag over all streams: percentiles and growth (last quarter - first)."""
    pairs = [pair for lags in probe.chunk_lag_s.values() for pair in lags]
    if not pairs:
        return {}
    lags = [lag for _, lag in pairs]
    end = max(t for t, _ in pairs)
    first = [lag for t, lag in pairs if t < end / 4]
    last = [lag for t, lag in pairs if t >= 3 * end / 4]
    p50, p95, p99 = bc.percentiles(lags)
    growth = statistics.median(last) - statistics.median(first) if first and last else 0.0
    return {"p50_s": p50, "p95_s": p95, "p99_s": p99, "max_s": max(lags), "growth_s": growth}


def run_worker(
    config: bc.RunConfig,
    workdir: Path,
    cpus: list[int] | None = None,
    wrap: list[str] | None = None,
) -> dict[str, Any]:
    """One configuration in a fresh subprocess (clean peak RSS, clean imports)."""
    spec = workdir / f"spec-{time.monotonic_ns()}.json"
    out = spec.with_suffix(".out.json")
    spec.write_text(json.dumps({"config": config.__dict__, "cpus": cpus, "out": str(out)}))
    command = [sys.executable, "-m", MODULE, "worker", str(spec)]
    subprocess.run([*(wrap or []), *command], check=True, cwd=REPO)
    return dict(json.loads(out.read_text()))


def base_config(
    model_dir: Path, files: list[Path], speed: float | None, broker: bc.Broker | None, **kw: Any
) -> bc.RunConfig:
    """The default pipeline on these files.

    Unpaced runs read a file far faster than real time; the Recognizer's window queue (default
    8 per stream) would then drop windows and the figure would count less work than a live
    stream makes, so unpaced runs never drop (the queue is unbounded for them)."""
    if speed is None:
        kw.setdefault("max_pending_windows_per_stream", 1_000_000)
    return bc.RunConfig(
        model_dir=str(model_dir), files=[str(f) for f in files], speed=speed,
        broker_url=broker.url if broker else None, spool_dir=str(files[0].parent), **kw,
    )  # fmt: skip


# --------------------------------------------------------------------------- rtf


def bench_rtf(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    """Per-stream real-time factor on one core: 1 stream, then N streams batched."""
    rows, figures = [], {}
    with bc.Broker(ctx["workdir"] / "broker-rtf", cpus=[1]) as broker:
        for dense, streams in [(d, n) for d in (False, True) for n in args.rtf_streams]:
            files = [
                bc.speech_file(ctx["audio"], i, args.rtf_seconds, dense=dense)
                for i in range(streams)
            ]
            runs = [
                run_worker(base_config(ctx["model"], files, None, broker), ctx["workdir"], [0])
                for _ in range(args.repeats)
            ]
            best = min(runs, key=lambda r: r["cpu_s"])
            cpu_rtf = best["cpu_s"] / best["audio_s"]
            wall_rtf = min(r["wall_s"] for r in runs) / best["audio_s"]
            speech = "continuous" if dense else "conversational"
            figures[f"{speech}-{streams}"] = {
                "speech": speech, "streams": streams, "cpu_rtf": cpu_rtf, "wall_rtf": wall_rtf,
                "runs": _strip(runs),
            }  # fmt: skip
            rows.append([
                speech, streams, f"{best['audio_s']:.0f}", best["counters"].get("utterances", 0),
                best["counters"].get("windows", 0), cpu_rtf, wall_rtf, 1 / cpu_rtf,
                best["counters"].get("windows_dropped", 0),
                best["counters"].get("descriptors_skipped", "-"),
            ])  # fmt: skip
    bc.print_table(
        f"Real-time factor per stream, one process pinned to CPU 0 (broker on CPU 1), files "
        f"unpaced, best of {args.repeats}; cpu RTF = process CPU s / audio s",
        ["speech", "streams", "audio s", "utterances", "windows", "cpu RTF", "wall RTF",
         "streams/core (1/cpu RTF)", "windows dropped", "descriptors skipped"],
        rows,
    )  # fmt: skip
    if bc.descriptors_default() and max(args.rtf_streams) > 1:
        print(
            "\nnote: with descriptors on, unpaced multi-stream rows undercount: eGeMAPS analyses "
            "queued past the fusion deadline are skipped; use the paced `streams` figures"
        )
    return figures


def _strip(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in run.items() if k != "timings"} for run in runs]


# --------------------------------------------------------------------------- streams


def bench_streams(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    """Real-time streams sustained by one process while the lag stays bounded."""
    rows, figures = [], {}
    sustained = 0
    for streams in args.stream_counts:
        files = [
            bc.speech_file(ctx["audio"], i, args.duration, dense=args.dense) for i in range(streams)
        ]
        folder = ctx["workdir"] / f"broker-streams-{streams}"
        with bc.Broker(folder) as broker:
            subscriber = bc.Subscriber(broker.port, folder / "arrivals.tsv")
            run = run_worker(base_config(ctx["model"], files, 1.0, broker), ctx["workdir"])
            arrivals = subscriber.stop()
        lag = arrival_lags(run, arrivals)
        chunk = run["chunk_lag"]
        dropped = run["counters"].get("windows_dropped", 0)
        bounded = (
            dropped == 0
            and chunk["p99_s"] < BOUNDED_CHUNK_P99_S
            and chunk["growth_s"] < BOUNDED_CHUNK_GROWTH_S
            and lag["window_p99_s"] < 1.0
            and lag["missing"] == 0
        )
        sustained = streams if bounded else sustained
        figures[streams] = {"bounded": bounded, "lag": lag, "run": _strip([run])[0]}
        rows.append([
            streams, run["cpu_s"] / run["wall_s"], chunk["p99_s"] * 1000, chunk["growth_s"] * 1000,
            lag["window_p50_s"] * 1000, lag["window_p99_s"] * 1000, lag["missing"], dropped,
            run["counters"].get("descriptors_skipped", "-"), f"{run['peak_rss_mb']:.0f}",
            "yes" if bounded else "NO",
        ])  # fmt: skip
        if not bounded and args.stop_at_first_failure:
            break
    bc.print_table(
        f"Concurrent real-time streams, one process, {os.cpu_count()} cores, {args.duration:.0f} s "
        f"each, streams started at random offsets in [0, 1) s. Source lag = chunk release - due "
        f"time; window lag = arrival at the subscriber - time the window's last sample was due",
        ["streams", "CPU cores used", "source lag p99 ms", "source lag growth ms",
         "window lag p50 ms", "window lag p99 ms", "results missing", "windows dropped",
         "descriptors skipped", "peak RSS MB", "bounded"],
        rows,
    )  # fmt: skip
    print(
        f"\nsustained: {sustained} real-time streams (bounded = no window dropped, every result "
        f"delivered, source lag p99 < 200 ms and growing < 50 ms, window lag p99 < 1 s)"
    )
    return {"sustained_streams": sustained, "steps": figures}


def arrival_lags(run: dict[str, Any], arrivals: list[dict[str, Any]]) -> dict[str, Any]:
    """Lag of each result at the subscriber behind the time its audio was complete."""
    arrived = {a["key"]: a["arrival_s"] for a in arrivals}
    windows: list[float] = []
    utterances: list[float] = []
    missing = 0
    for key, t in run["timings"].items():
        if t["sink"] is None:
            continue  # dropped window (counted elsewhere)
        if t.get("sink_provisional") is not None and key + bc.PROVISIONAL not in arrived:
            missing += 1  # a provisional utterance result handed to the sink, never received
        if key not in arrived:
            missing += 1
            continue
        lag = arrived[key] - t["due"]
        (windows if t["kind"] == "window" else utterances).append(lag)
    w50, _, w99 = bc.percentiles(windows)
    u50, _, u99 = bc.percentiles(utterances)
    return {
        "window_p50_s": w50, "window_p99_s": w99, "utterance_p50_s": u50, "utterance_p99_s": u99,
        "missing": missing, "windows": len(windows), "utterances": len(utterances),
    }  # fmt: skip


# --------------------------------------------------------------------------- memory


def bench_memory(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of one process against its stream count (fresh process each)."""
    rows, figures = [], {}
    with bc.Broker(ctx["workdir"] / "broker-memory") as broker:
        for streams in args.memory_streams:
            files = [
                bc.speech_file(ctx["audio"], i, args.memory_seconds, dense=args.dense)
                for i in range(streams)
            ]
            run = run_worker(base_config(ctx["model"], files, 1.0, broker), ctx["workdir"])
            figures[streams] = {
                "peak_rss_mb": run["peak_rss_mb"], "torch_imported": run["torch_imported"],
                "heavy_modules": run["heavy_modules"],
            }  # fmt: skip
            rows.append([
                streams, f"{run['peak_rss_mb']:.0f}", run["torch_imported"],
                ", ".join(run["heavy_modules"]) or "-",
            ])  # fmt: skip
    counts = sorted(figures)
    per_stream = (
        (figures[counts[-1]]["peak_rss_mb"] - figures[counts[0]]["peak_rss_mb"])
        / (counts[-1] - counts[0])
        if len(counts) > 1
        else float("nan")
    )
    bc.print_table(
        f"Peak RSS of the default pipeline (one process, {args.memory_seconds:.0f} s of speech "
        f"per stream, real-time pace), after the run: is torch (or another heavy module) imported?",
        ["streams", "peak RSS MB", "torch imported", "heavy modules imported"],
        rows,
    )
    print(f"\ngrowth: {per_stream:.2f} MB per extra stream ({counts[0]} -> {counts[-1]} streams)")
    return {"by_streams": figures, "mb_per_extra_stream": per_stream}


# --------------------------------------------------------------------------- start-up


def bench_startup(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    """`stream-ser run` from process start to its first result, JSONL and MQTT."""
    speech = bc.speech_file(ctx["audio"], 0, 10)
    command = [sys.executable, "-m", "stream_ser", "run", "--input", str(speech)]
    env = os.environ | {"XDG_STATE_HOME": str(ctx["workdir"] / "state")}
    if ctx["model_note"] != "bundled":
        command += ["--model", str(ctx["model"])]
    rows: list[list[Any]] = []
    figures: dict[str, Any] = {}
    jsonl = [_first_stdout_line(command, env) for _ in range(args.repeats)]
    figures["jsonl_first_result_s"] = jsonl
    rows.append(["stdout JSON Lines", statistics.median(jsonl), min(jsonl), max(jsonl)])
    with bc.Broker(ctx["workdir"] / "broker-startup") as broker:
        mqtt = []
        for i in range(args.repeats):
            arrivals = ctx["workdir"] / f"startup-{i}.tsv"
            subscriber = bc.Subscriber(broker.port, arrivals)
            started = time.monotonic()
            subprocess.run([*command, "--mqtt", broker.url], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            got = subscriber.stop()
            mqtt.append(min(a["arrival_s"] for a in got) - started)
        figures["mqtt_first_result_s"] = mqtt
        rows.append(["MQTT, at a subscriber", statistics.median(mqtt), min(mqtt), max(mqtt)])
    imports = _import_breakdown(env)
    figures["imports"] = imports
    bc.print_table(
        f"Start-up: `python -m stream_ser run --input <10 s speech>` from process start to the "
        f"first result, {args.repeats} runs (seconds)",
        ["first result via", "median s", "min s", "max s"],
        rows,
    )
    print(
        f"\nbreakdown (one run): interpreter + `import stream_ser.cli` "
        f"{imports['import_cli_s']:.3f} s, onnxruntime import {imports['import_ort_s']:.3f} s, "
        f"model session {imports['session_s']:.3f} s; torch imported by the CLI: "
        f"{imports['torch_in_importtime']}"
    )
    return figures


def _first_stdout_line(command: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert process.stdout is not None
    process.stdout.readline()
    elapsed = time.monotonic() - started
    process.wait()
    return elapsed


def _import_breakdown(env: dict[str, str]) -> dict[str, Any]:
    code = (
        "import time, json, sys; t0 = time.perf_counter(); import stream_ser.cli; "
        "t1 = time.perf_counter(); import onnxruntime; t2 = time.perf_counter(); "
        "from stream_ser.specialist import Specialist; from pathlib import Path; "
        f"Specialist(Path({str(_model_for_cli())!r})); t3 = time.perf_counter(); "
        "print(json.dumps([t1 - t0, t2 - t1, t3 - t2, 'torch' in sys.modules]))"
    )
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)  # fmt: skip
    whole = time.monotonic() - started
    cli, ort, session, torch_loaded = json.loads(out.stdout)
    importtime = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "stream_ser", "run", "--input",
         str(bc.speech_file(_CTX["audio"], 0, 10)), "--model", str(_model_for_cli())],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    torch_lines = [
        line for line in importtime.stderr.splitlines() if line.rstrip().endswith("| torch")
    ]
    return {
        "import_cli_s": cli, "import_ort_s": ort, "session_s": session,
        "python_c_total_s": whole, "torch_after_session": torch_loaded,
        "torch_in_importtime": bool(torch_lines),
    }  # fmt: skip


_CTX: dict[str, Any] = {}


def _model_for_cli() -> Path:
    return Path(_CTX["model"])


# --------------------------------------------------------------------------- stages


def bench_stages(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    """CPU time per audio second with and without each optional stage (pinned, unpaced)."""
    files = [bc.speech_file(ctx["audio"], 0, args.rtf_seconds, dense=args.dense)]
    in_pipeline = bc.descriptors_default() is not None
    variants: dict[str, dict[str, Any]] = {
        "default": {},
        "without windows": {"windows": False},
        "without MQTT (JSON encoding, no publishing)": {"mqtt": False},
    }
    if in_pipeline:
        variants["without eGeMAPS descriptors"] = {"descriptors": False}
    cpu: dict[str, float] = {}
    with bc.Broker(ctx["workdir"] / "broker-stages", cpus=[1]) as broker:
        for name, variant in variants.items():
            config = base_config(
                ctx["model"], files, None, broker if variant.get("mqtt", True) else None,
                windows=variant.get("windows", True), descriptors=variant.get("descriptors"),
            )  # fmt: skip
            runs = [run_worker(config, ctx["workdir"], [0]) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["cpu_s"])
            cpu[name] = best["cpu_s"] / best["audio_s"]
    default = cpu["default"]
    egemaps = egemaps_cost(files[0])
    descriptor_rtf = egemaps["s_per_audio_s_of_utterances"] * egemaps["utterance_share"]
    rows = [[name, value, value / default, "measured"] for name, value in cpu.items()]
    if not in_pipeline:
        rows.append([
            "with eGeMAPS descriptors per utterance", default + descriptor_rtf,
            (default + descriptor_rtf) / default,
            "NOT in the pipeline yet: default + opensmile cost measured separately",
        ])  # fmt: skip
    rows.append(["with the ALM stage", float("nan"), float("nan"), "see tools/bench/bench_alm.py"])
    bc.print_table(
        f"Optional stages: CPU s per audio s, one stream pinned to CPU 0, best of {args.repeats}; "
        f"ratio to the default pipeline",
        ["pipeline", "cpu RTF", "ratio", "how"],
        rows,
    )
    print(
        f"\neGeMAPS (opensmile, eGeMAPSv02 functionals) per utterance: "
        f"{egemaps['ms_per_utterance']:.1f} ms for {egemaps['mean_utterance_s']:.2f} s on "
        f"average ({egemaps['s_per_audio_s_of_utterances'] * 1000:.1f} ms per audio second); "
        f"first call incl. import {egemaps['first_call_s']:.2f} s, +{egemaps['rss_mb']:.0f} MB RSS"
    )
    return {"cpu_rtf": cpu, "egemaps": egemaps, "descriptors_in_pipeline": in_pipeline,
            "descriptors_default": bc.descriptors_default()}  # fmt: skip


REPO = bc.REPO
MODULE = "tools.bench.bench_pipeline"
BOUNDED_CHUNK_P99_S = 0.2
"""A stream count is sustained when chunk lag p99 stays under this..."""
BOUNDED_CHUNK_GROWTH_S = 0.05
"""...and the lag grows by less than this over the run."""


def egemaps_cost(path: Path) -> dict[str, Any]:
    """opensmile eGeMAPS functionals on each utterance the default VAD finds in `path`."""
    code = f"""
import json, resource, sys, time
import numpy as np, soundfile
from stream_ser.events import AudioChunk, UtteranceEnd
from stream_ser.settings import VadSettings
from stream_ser.vad import Segmenter
audio, rate = soundfile.read({str(path)!r}, dtype="float32")
segmenter = Segmenter(VadSettings())
utterances = []
for start in range(0, len(audio), 1600):
    events = segmenter.process(AudioChunk(audio[start:start + 1600], start // 16))
    utterances += [e.samples for e in events if isinstance(e, UtteranceEnd)]
utterances += [e.samples for e in segmenter.flush() if isinstance(e, UtteranceEnd)]
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from stream_ser.acoustics import analyse_functionals
t = time.perf_counter(); analyse_functionals(utterances[0]); first = time.perf_counter() - t
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
times = []
for clip in utterances * 3:
    t = time.process_time(); analyse_functionals(clip); times.append(time.process_time() - t)
seconds = sum(len(u) for u in utterances) / 16000 * 3
print(json.dumps({{"utterances": len(utterances),
    "ms_per_utterance": 1000 * sum(times) / len(times),
    "mean_utterance_s": seconds / len(times), "s_per_audio_s_of_utterances": sum(times) / seconds,
    "utterance_share": seconds / 3 / (len(audio) / 16000), "first_call_s": first,
    "rss_mb": rss1 - rss0}}))
"""
    out = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    return dict(json.loads(out.stdout))


# --------------------------------------------------------------------------- profile


def bench_profile(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    """Where the CPU goes in a pinned, unpaced run (py-spy over all threads if available)."""
    streams = args.profile_streams
    files = [
        bc.speech_file(ctx["audio"], i, args.rtf_seconds, dense=args.dense) for i in range(streams)
    ]
    pyspy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    raw = ctx["workdir"] / "profile.txt"
    with bc.Broker(ctx["workdir"] / "broker-profile", cpus=[1]) as broker:
        config = base_config(ctx["model"], files, None, broker)
        if pyspy:
            wrap = [pyspy, "record", "-r", "250", "-f", "raw", "-o", str(raw), "--"]
            run = run_worker(config, ctx["workdir"], [0], wrap)
            table = summarise_collapsed(raw.read_text())
            skipped = run["counters"].get("descriptors_skipped", "-")
            print(f"utterances {run['counters'].get('utterances')}, descriptors skipped {skipped}")
        else:
            raise SystemExit("profile needs py-spy: .venv/bin/pip install py-spy")
    rows = [[share * 100, name] for name, share in table["inclusive"][: args.top]]
    bc.print_table(
        f"Profile (py-spy, all threads, {streams} stream(s) pinned to CPU 0, unpaced): "
        f"% of busy samples (idle waits, imports and model loading excluded) that include "
        f"the function",
        ["% samples", "function"], rows,
    )  # fmt: skip
    rows = [[share * 100, name] for name, share in table["self"][: args.top]]
    bc.print_table("Self time (leaf function)", ["% samples", "function"], rows)
    if args.flamegraph:
        shutil.copy(raw, args.flamegraph)
    return table


SETUP = ("_find_and_load", "Specialist.__init__", "MqttSink._connect", "Spool.__init__")
IDLE = ("select (selectors.py", "_worker (concurrent/futures/thread.py", "wait (threading.py",
        "epoll_wait", "_run_once (asyncio/base_events.py)")  # fmt: skip


def summarise_collapsed(text: str) -> dict[str, Any]:
    """Inclusive and self shares per function from py-spy's raw (collapsed) output."""
    inclusive: dict[str, int] = {}
    leaf: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = stack.split(";")
        if not count_text.isdigit() or _idle(frames) or any(marker in stack for marker in SETUP):
            continue
        if _warm_up(frames):  # the one-off opensmile call before the measured run
            continue
        count = int(count_text)
        total += count
        for name in {_short(frame) for frame in frames}:
            inclusive[name] = inclusive.get(name, 0) + count
        leaf[_short(frames[-1])] = leaf.get(_short(frames[-1]), 0) + count

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        return sorted(((k, v / total) for k, v in counts.items()), key=lambda kv: -kv[1])

    return {"samples": total, "inclusive": ranked(inclusive), "self": ranked(leaf)}


def _warm_up(frames: list[str]) -> bool:
    return any(
        first.startswith("run_streams_probed ") and second.startswith("analyse_functionals ")
        for first, second in itertools.pairwise(frames)
    )


def _idle(frames: list[str]) -> bool:
    last = frames[-1]
    return (
        any(marker in last for marker in IDLE)
        or ("select" in last and "selectors" in last)
        or last.startswith("epoll")
        or "futex" in last
        or "pthread_cond" in last
    )


def _short(frame: str) -> str:
    """'function (file)', without the line number, so a function's lines add up."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rpartition(':')[0] or where.rstrip(')')})" if where else frame


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "subcommands",
        nargs="*",
        metavar="SUBCOMMAND",
        help=f"any of {', '.join(SUBCOMMANDS)} (default: {' '.join(DEFAULT_RUN)})",
    )
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--model", help="model directory (default: the bundled model)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (best kept)")
    parser.add_argument("--rtf-seconds", type=float, default=120.0, help="audio per stream, rtf")
    parser.add_argument("--rtf-streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per streams step")
    parser.add_argument("--stream-counts", type=int, nargs="+", default=[10, 25, 50, 75, 100])
    parser.add_argument(
        "--dense",
        action="store_true",
        help="continuous speech (worst case) instead of conversational, except rtf "
        "which measures both",
    )
    parser.add_argument("--stop-at-first-failure", action="store_true")
    parser.add_argument("--memory-streams", type=int, nargs="+", default=[1, 2, 8, 32, 64])
    parser.add_argument("--memory-seconds", type=float, default=20.0)
    parser.add_argument("--profile-streams", type=int, default=1)
    parser.add_argument("--top", type=int, default=25, help="profile rows")
    parser.add_argument("--flamegraph", help="profile: copy py-spy's collapsed stacks here")
    args = parser.parse_args(argv)
    unknown = set(args.subcommands) - set(SUBCOMMANDS)
    if unknown:
        parser.error(f"unknown subcommand(s) {sorted(unknown)}; choose from {SUBCOMMANDS}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the chosen benchmarks; print tables; optionally write JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        worker(argv[1])
        return
    args = parse_args(argv)
    chosen = args.subcommands or list(DEFAULT_RUN)
    facts = bc.machine()
    model, note = bc.resolve_model(args.model)
    print(bc.machine_line(facts))
    print(f"model: {bc.model_id(model)} ({note})")
    with tempfile.TemporaryDirectory(prefix="stream-ser-bench-") as tmp:
        ctx = {"workdir": Path(tmp), "audio": Path(tmp) / "audio", "model": model,
               "model_note": note}  # fmt: skip
        _CTX.update(ctx)
        benches = {
            "rtf": bench_rtf, "streams": bench_streams, "memory": bench_memory,
            "startup": bench_startup, "stages": bench_stages, "profile": bench_profile,
        }  # fmt: skip
        figures = {name: benches[name](args, ctx) for name in chosen}
    facts["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nload average at the end: {' '.join(map(str, facts['loadavg_end']))}")
    bc.write_json(args.json, {
        "machine": facts, "model_id": bc.model_id(model), "model_note": note,
        "command": " ".join(["tools/bench/bench_pipeline.py", *argv]), "figures": figures,
    })  # fmt: skip


if __name__ == "__main__":
    main()
