"""Benchmark the ALM backends: utterances per second against batch size.

    python -m tools.bench.bench_alm  # tiny models, CPU, fake server
    python -m tools.bench.bench_alm --device cuda --qwen /models/Qwen2-Audio-7B-Instruct \
        --dtype bf16
    python -m tools.bench.bench_alm --openai-url http://gpu-box:8000 --json bench.json

Without --qwen/--clap, tiny random-initialised models are built in a temporary directory
(tests/fakes/make_tiny_alm.py); without --openai-url, the remote backend talks to the local fake
server (tests/fakes/fake_openai_alm.py) with --fake-latency-ms per request, which measures the
client's request concurrency, not a model. Each cell runs `predict` over the same utterances in
batches of the given size after one warm-up batch, and reports the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tests.fakes import fake_openai_alm, make_tiny_alm

LABELS = ["neutral", "happy", "sad", "angry"]


def utterances(count: int, seconds: float, seed: int = 0) -> list[np.ndarray]:
    """Noise bursts of +-25% around `seconds` (mixed lengths, as a stream gives)."""
    rng = np.random.default_rng(seed)
    lengths = rng.uniform(0.75 * seconds, 1.25 * seconds, count)
    return [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in lengths]


def parameters(backend: Any) -> int | None:
    """Parameter count of a local backend's model."""
    model = getattr(backend, "_model", None)
    return int(sum(p.numel() for p in model.parameters())) if model is not None else None


def measure(backend: Any, clips: list[np.ndarray], batch: int, repeats: int) -> float:
    """Best utterances/s over `repeats` passes through `clips` in batches of `batch`."""
    backend.predict(clips[:batch])  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for offset in range(0, len(clips), batch):
            backend.predict(clips[offset : offset + batch])
        best = max(best, len(clips) / (time.perf_counter() - start))
    return best


@contextmanager
def specs(args: argparse.Namespace) -> Iterator[dict[str, str]]:
    """backend name -> "KIND:PATH", building tiny models / starting the fake server as needed."""
    with ExitStack() as stack:
        chosen: dict[str, str] = {}
        tiny = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if "qwen2-audio" in args.backends:
            path = args.qwen or make_tiny_alm.build_qwen2_audio(tiny / "qwen2-audio")
            chosen["qwen2-audio"] = f"qwen2-audio:{path}"
        if "clap" in args.backends:
            path = args.clap or make_tiny_alm.build_clap(tiny / "clap")
            chosen["clap"] = f"clap:{path}"
        if "openai" in args.backends:
            url = args.openai_url
            if not url:
                server = fake_openai_alm.FakeOpenAIServer(args.fake_latency_ms / 1000)
                url = stack.enter_context(server).url
            chosen["openai"] = f"openai:{url}"
        yield chosen


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """All cells of the table."""
    from stream_ser import alm

    rows = []
    clips = utterances(args.utterances, args.seconds)
    with specs(args) as chosen:
        for name, spec in chosen.items():
            options = {
                "device": args.device,
                "dtype": args.dtype,
                "prompt_set": args.prompt_set,
                "max_batch": max(args.batch_sizes),
            }
            if name != "openai":
                options["cpu_threads"] = args.threads
            if name == "qwen2-audio":
                options["token_mode"] = args.token_mode
            backend = alm.load(spec, LABELS, **options)
            base = None
            for batch in args.batch_sizes:
                rate = measure(backend, clips, batch, args.repeats)
                base = base or rate
                row = {
                    "backend": name,
                    "device": args.device if name != "openai" else "remote",
                    "dtype": args.dtype,
                    "parameters": parameters(backend),
                    "batch": batch,
                    "utterances_per_s": round(rate, 2),
                    "ms_per_utterance": round(1000 / rate, 1),
                    "speedup": round(rate / base, 2),
                }
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    params = f"{row['parameters'] / 1e6:.2f} M" if row["parameters"] else "-"
    return (
        f"| {row['backend']:<11} | {row['device']:<6} | {params:>8} | {row['batch']:>5} | "
        f"{row['utterances_per_s']:>8.2f} | {row['ms_per_utterance']:>8.1f} | "
        f"{row['speedup']:>6.2f}x |"
    )


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends", default="qwen2-audio,clap,openai", type=lambda s: s.split(",")
    )
    parser.add_argument(
        "--batch-sizes", default="1,2,4,8", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--utterances", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0, help="mean utterance length")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--prompt-set", default="single", help="'single' = one template (one forward per utterance)"
    )
    parser.add_argument(
        "--token-mode", default="first", help="qwen2-audio token_mode (the docs' table: first)"
    )
    parser.add_argument("--qwen", help="a real Qwen2-Audio directory or hub id")
    parser.add_argument("--clap", help="a real CLAP directory or hub id")
    parser.add_argument("--openai-url", help="a real OpenAI-compatible server")
    parser.add_argument("--fake-latency-ms", type=float, default=20.0)
    parser.add_argument("--json", type=Path, help="also write the rows and machine info here")
    args = parser.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {args.device}, {args.dtype}, "
        f"{args.threads} torch thread(s), {args.utterances} utterances of ~{args.seconds} s, "
        f"prompt set {args.prompt_set!r}"
    )
    print("| backend     | device | params   | batch |  utt/s   | ms/utt   | speedup |")
    print("|-------------|--------|----------|-------|----------|----------|---------|")
    rows = run(args)
    if args.json:
        info = {
            "machine": platform.platform(),
            "python": platform.python_version(),
            "args": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
        }
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
