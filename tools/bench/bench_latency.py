"""Benchmark: end of speech -> utterance result at an MQTT subscriber, real-time pacing.

    .venv/bin/python -m tools.bench.bench_latency [--streams 1 25] [--duration 60] [--json FILE]

Each run is the default pipeline (tools/bench/bench_pipeline.py builds it like `stream-ser run
--mqtt`) on real RAVDESS speech paced at real time (`--realtime`), publishing to a real local
mosquitto; a separate subscriber process timestamps every arrival (CLOCK_MONOTONIC, shared by
processes).
For every utterance:

    end of speech   the time the last voiced frame was due from the paced source
    decision        the VAD decided the utterance ended (UtteranceEnd; hangover elapsed)
    model done      its probabilities are ready (queue wait + inference)
    to sink         the result message was built and handed to the sink (in stream order)
    arrival         the subscriber received it (spool, aiomqtt, broker, subscriber)

Every utterance gets a *provisional* result (`"final": false`, right after the specialist) and a
*final* one (`"final": true`, after the eGeMAPS descriptors / ALM / fusion); with nothing to wait
for (`--no-descriptors`, no ALM) only the final. Both are timed, each split into hangover
(decision - end of speech: the VAD's hangover plus up to one capture chunk), model (model done -
decision), publish (to sink - model done: for the final, the wait for the descriptors) and
transport (arrival - to sink). The target (utterance result p95 <= 50 ms after the decision) is
on the provisional result's decision -> arrival.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from tools.bench import bench_common as bc
from tools.bench import bench_pipeline as bp

STAGES = (
    ("hangover", "due", "ready"),
    ("model", "ready", "model_done"),
    ("publish", "model_done", "sink"),
    ("transport", "sink", "arrival"),
    ("decision -> subscriber", "ready", "arrival"),
    ("end of speech -> subscriber", "due", "arrival"),
)
# result kind -> (job kind, timing field of the hand-over to the sink, arrival key suffix)
KINDS = {
    "provisional utterance": ("utterance", "sink_provisional", bc.PROVISIONAL),
    "final utterance": ("utterance", "sink", ""),
    "window": ("window", "sink", ""),
}


def measure(streams: int, args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    """One paced run; latency percentiles per stage for each kind of result."""
    files = [
        bc.speech_file(ctx["audio"], i, args.duration, dense=args.dense) for i in range(streams)
    ]
    folder = ctx["workdir"] / f"latency-{streams}"
    with bc.Broker(folder) as broker:
        subscriber = bc.Subscriber(broker.port, folder / "arrivals.tsv")
        config = bp.base_config(ctx["model"], files, 1.0, broker, descriptors=args.descriptors)
        run = bp.run_worker(config, ctx["workdir"])
        arrivals = {a["key"]: a["arrival_s"] for a in subscriber.stop()}
    figures: dict[str, Any] = {"streams": streams, "counters": run["counters"],
                               "peak_rss_mb": run["peak_rss_mb"], "loadavg": _load()}  # fmt: skip
    for kind, (job_kind, sink_field, suffix) in KINDS.items():
        timings = [
            t | {"sink": t[sink_field], "arrival": arrivals.get(key + suffix)}
            for key, t in run["timings"].items()
            if t["kind"] == job_kind and t.get(sink_field) is not None
        ]
        missing = sum(1 for t in timings if t["arrival"] is None)
        timings = [t for t in timings if t["arrival"] is not None]
        per_stage = {}
        for name, start, end in STAGES:
            values = [(t[end] - t[start]) * 1000 for t in timings]
            p50, p95, p99 = bc.percentiles(values)
            per_stage[name] = {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
                               "max_ms": max(values, default=float("nan"))}  # fmt: skip
        figures[kind] = {"count": len(timings), "missing": missing, "stages": per_stage}
    return figures


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def print_figures(figures: dict[str, Any], duration: float) -> None:
    """One table per kind of result and stream count."""
    for kind in KINDS:
        part = figures[kind]
        rows = [
            [name, s["p50_ms"], s["p95_ms"], s["p99_ms"], s["max_ms"]]
            for name, s in part["stages"].items()
            if kind != "window"
            or name in ("model", "publish", "transport", "decision -> subscriber")
        ]
        label = "decision = window filled" if kind == "window" else "decision = end of utterance"
        bc.print_table(
            f"{kind} results, {figures['streams']} real-time stream(s), {duration:.0f} s each, "
            f"n = {part['count']} ({part['missing']} not received); {label}; milliseconds "
            f"(load average after the run: {' '.join(map(str, figures['loadavg']))})",
            ["stage", "p50", "p95", "p99", "max"],
            rows,
        )


def main(argv: list[str] | None = None) -> None:
    """Run the latency benchmark for each stream count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1], help="stream counts")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of audio per run")
    parser.add_argument("--dense", action="store_true", help="continuous speech (worst case)")
    parser.add_argument(
        "--no-descriptors", dest="descriptors", action="store_false", default=None,
        help="without the eGeMAPS descriptors (default: the CLI's default, on)",
    )  # fmt: skip
    parser.add_argument("--model", help="model directory (default: the bundled model)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    facts = bc.machine()
    model, note = bc.resolve_model(args.model)
    print(bc.machine_line(facts))
    print(f"model: {bc.model_id(model)} ({note})")
    results = []
    with tempfile.TemporaryDirectory(prefix="stream-ser-latency-") as tmp:
        ctx = {"workdir": Path(tmp), "audio": Path(tmp) / "audio", "model": model}
        for streams in args.streams:
            figures = measure(streams, args, ctx)
            print_figures(figures, args.duration)
            results.append(figures)
    facts["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nload average at the end: {' '.join(map(str, facts['loadavg_end']))}")
    bc.write_json(args.json, {
        "machine": facts, "model_id": bc.model_id(model), "model_note": note,
        "command": " ".join(["tools/bench/bench_latency.py", *(argv or sys.argv[1:])]),
        "figures": results,
    })  # fmt: skip


if __name__ == "__main__":
    main()
