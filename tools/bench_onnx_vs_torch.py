"""Benchmark: the bundled model run by plain PyTorch eager against our ONNX path, one core.

    .venv/bin/python tools/bench_onnx_vs_torch.py [--calls 200] [--json FILE]

The torch network is rebuilt from `tools/train_specialist.py` (EmotionNet, sized by
tools/configs/baseline.toml) and given the ONNX model's weights: each 2-D Conv's weight and bias
(batch norm is folded into the conv at export; an identity batch norm carries the bias) and the
head's weight and bias, read from the initializers. A parity check on real speech says whether
the two compute the same function; if the bundled model is another architecture, the torch net
keeps random weights and the ONNX side is its own export (timing does not depend on weights).

Rows: one 2 s window (batch 1), 8 windows batched, real utterances (1.5 s to 15 s), measured as
CPU time per call (median of --calls), pinned to one core, 1 thread on each side. Also the
onnxruntime graph optimisation levels, and the process memory each side needs.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc


def rss_mb() -> float:
    """Peak RSS so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_ms_per_call(call: Callable[[], Any], calls: int) -> float:
    """Median CPU time of `call` in milliseconds, after a few warm-up calls."""
    for _ in range(5):
        call()
    times = []
    for _ in range(calls):
        start = time.thread_time()
        call()
        times.append((time.thread_time() - start) * 1000)
    return float(np.median(times))


def onnx_weights(path: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, ...]]:
    """(2-D conv (weight, bias) in graph order, head (weight [out, in], bias))."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    convs, head = [], ()
    for node in graph.node:
        weights = [init[name] for name in node.input if name in init]
        if node.op_type == "Conv" and weights and weights[0].ndim == 4:
            bias = weights[1] if len(weights) > 1 else np.zeros(weights[0].shape[0], np.float32)
            convs.append((weights[0], bias))
        elif node.op_type == "BatchNormalization" and convs:
            scale, shift, mean, var = weights[:4]
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            factor = scale / np.sqrt(var + eps)
            weight, bias = convs[-1]
            convs[-1] = (weight * factor[:, None, None, None], (bias - mean) * factor + shift)
        elif node.op_type in ("Gemm", "MatMul") and weights and weights[0].ndim == 2:
            transposed = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            weight = weights[0] if transposed else weights[0].T
            head = (weight, weights[1] if len(weights) > 1 else init.get(node.input[-1]))
        elif node.op_type == "Add" and head and head[1] is None and weights:
            head = (head[0], weights[0])
    return convs, head


def build_torch(model_dir: Path) -> tuple[Any, Path, str]:
    """The torch EmotionNet with the bundled weights if they fit; else random + own export."""
    import torch
    import train_specialist as ts

    cfg = ts.load_config(bc.REPO / "tools" / "configs" / "baseline.toml")
    torch.manual_seed(0)
    net = ts.EmotionNet(cfg.features, cfg.model).eval()
    convs, head = onnx_weights(model_dir / "model.onnx")
    blocks = [block for block in net.backbone.blocks]
    fits = (
        len(convs) == len(blocks)
        and head
        and head[0].shape == tuple(net.backbone.head.weight.shape)
    )
    if fits:
        fits = all(
            w.shape == tuple(b[0].weight.shape) for (w, _), b in zip(convs, blocks, strict=True)
        )
    if not fits:
        out = Path(tempfile.mkdtemp(prefix="bench-export-"))
        ts.export_onnx(net, out / "model.onnx", cfg.export.opset)
        ts.write_card(out, cfg.export)
        return (
            net,
            out,
            "bundled model is not the baseline architecture: random weights, own export",
        )
    with torch.no_grad():
        for (weight, bias), block in zip(convs, blocks, strict=True):
            conv, norm = block[0], block[1]
            conv.weight.copy_(torch.from_numpy(np.array(weight)))
            norm.weight.fill_(1.0)
            norm.bias.zero_()
            norm.running_mean.copy_(torch.from_numpy(np.array(-bias)))
            norm.running_var.fill_(1.0 - norm.eps)
        net.backbone.head.weight.copy_(torch.from_numpy(np.array(head[0])))
        net.backbone.head.bias.copy_(torch.from_numpy(np.array(head[1])))
    return net, model_dir, "weights loaded from the ONNX initializers"


def inputs() -> dict[str, list[np.ndarray]]:
    """Real speech: a 2 s window, 8 windows, utterances of several lengths."""
    audio = bc.soundfile.read(bc.speech_file(Path(tempfile.gettempdir()) / "bench-audio", 0, 60,
                                             dense=True), dtype="float32")[0]  # fmt: skip
    window = 32000
    return {
        "window 2 s, batch 1": [audio[:window]],
        "8 windows 2 s, batched": [audio[i * 8000 : i * 8000 + window] for i in range(8)],
        "utterance 1.5 s": [audio[:24000]],
        "utterance 4 s": [audio[: 4 * 16000]],
        "utterance 15 s": [audio[: 15 * 16000]],
    }


def main(argv: list[str] | None = None) -> None:
    """Time both sides; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="timed calls per row")
    parser.add_argument("--model", help="model directory (default: the bundled model)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {0})
    facts = bc.machine()
    model_dir, note = bc.resolve_model(args.model)
    print(bc.machine_line(facts))
    print(f"model: {bc.model_id(model_dir)} ({note})")

    import onnxruntime as ort

    from stream_ser.specialist import Specialist

    rss_start = rss_mb()
    cases = inputs()
    specialist = Specialist(model_dir)
    rss_onnx = rss_mb()
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    net, onnx_dir, how = build_torch(model_dir)
    if onnx_dir != model_dir:
        specialist = Specialist(onnx_dir)
    rss_torch = rss_mb()
    print(f"torch network: {how}")

    parity = 0.0
    for batch in cases.values():
        with torch.no_grad():
            logits = net(torch.from_numpy(np.stack(batch)))
        expected = torch.softmax(logits.double(), dim=1).numpy()
        parity = max(parity, float(np.abs(specialist.predict(batch) - expected).max()))
    print(f"parity: max |ONNX - torch| probability difference {parity:.2e}")

    def torch_call(batch: list[np.ndarray]) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return torch.softmax(net(torch.from_numpy(np.stack(batch))), dim=1).numpy()

        return call

    rows, figures = [], {}
    for name, batch in cases.items():
        eager = cpu_ms_per_call(torch_call(batch), args.calls)
        ours = cpu_ms_per_call(lambda b=batch: specialist.predict(b), args.calls)
        per = len(batch)
        figures[name] = {"torch_ms": eager, "onnx_ms": ours, "clips": per}
        rows.append([name, eager, ours, eager / ours, ours / per])
    bc.print_table(
        f"PyTorch eager vs our ONNX path (Specialist.predict), CPU ms per call, median of "
        f"{args.calls}, pinned to one core, 1 thread each",
        ["input", "torch eager ms", "ONNX ms", "torch / ONNX", "ONNX ms per clip"],
        rows,
    )

    levels = {
        "disable all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all (default)": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    window = {"waveform": np.stack(cases["window 2 s, batch 1"])}
    level_rows, level_figures = [], {}
    for name, level in levels.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(onnx_dir / "model.onnx"), options,
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        ms = cpu_ms_per_call(lambda s=session: s.run(None, window), args.calls)
        level_figures[name] = ms
        level_rows.append([name, ms])
    bc.print_table("onnxruntime graph optimisation level, one 2 s window, CPU ms per call",
                   ["level", "ms"], level_rows)  # fmt: skip
    memory = {"before_mb": rss_start, "after_onnx_session_mb": rss_onnx,
              "after_torch_import_and_net_mb": rss_torch}  # fmt: skip
    print(
        f"\nmemory (peak RSS): {rss_start:.0f} MB before, {rss_onnx:.0f} MB with the ONNX session "
        f"(+{rss_onnx - rss_start:.0f}), {rss_torch:.0f} MB after importing torch and building the "
        f"network (+{rss_torch - rss_onnx:.0f} more)"
    )
    bc.write_json(args.json, {
        "machine": facts, "model_id": bc.model_id(model_dir), "model_note": note,
        "torch_network": how, "parity_max_abs_diff": parity, "calls": args.calls,
        "command": " ".join(["tools/bench_onnx_vs_torch.py", *(argv or sys.argv[1:])]),
        "figures": figures, "graph_optimization_ms": level_figures, "memory": memory,
    })  # fmt: skip


if __name__ == "__main__":
    main()
