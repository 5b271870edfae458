"""Export a transformers audio-classification checkpoint as a stream-ser model directory.

    python -m tools.train.export_hf CHECKPOINT OUT_DIR [--id ID] [--window-ms MS] [--hop-ms MS]
                              [--opset N] [--fp16] [--labels A,B,...] [--labels-from-config]

CHECKPOINT is a local directory saved with `save_pretrained` or, when this machine can reach the
Hugging Face Hub, a hub id. OUT_DIR receives `model.onnx` (input `waveform`, float32 [batch,
samples] of 16 kHz audio, dynamic batch and time axes; output `logits` [batch, labels]) and
`card.json`. The tool ends with a parity check of the directory, loaded through
`stream_ser.specialist.Specialist`, against the torch model fed by the checkpoint's own feature
extractor; it exits 1 when the difference exceeds the tolerance. See docs/export.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional

from stream_ser import SAMPLE_RATE
from stream_ser.errors import StreamSerError
from stream_ser.specialist import ModelCard, Specialist

log = logging.getLogger("export_hf")

WAVEFORM_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio")
"""Models that read the waveform itself (`input_values`)."""
LOGMEL_MODEL_TYPES = ("whisper",)
"""Models that read Whisper log-mel features (`input_features`); the graph computes them."""
HEAD_SUFFIXES = ("ForSequenceClassification", "ForAudioClassification")
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 5e-2
FRONTEND_SCOPE = "/frontend/"
"""ONNX node-name prefix of the log-mel front end, kept in float32 by --fp16."""
REPO = Path(__file__).resolve().parents[2]
PARITY_CLIP = REPO / "samples" / "speech.flac"


class ExportError(StreamSerError):
    """The checkpoint cannot be exported, or the export does not match the torch model."""


@dataclass(frozen=True)
class ExportSettings:
    """What to export and how; built from the command line or by a caller."""

    checkpoint: str
    out_dir: Path
    model_id: str | None = None
    window_ms: int = 2000
    hop_ms: int = 500
    min_input_ms: int = 250
    opset: int = 17
    fp16: bool = False
    labels: tuple[str, ...] | None = None
    labels_from_config: bool = False
    tolerance: float | None = None
    """Largest accepted parity difference; None: 1e-4 (fp32) or 5e-2 (fp16)."""
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    """onnxruntime providers of the parity check (a GPU provider to check --fp16 on a GPU)."""


@dataclass(frozen=True)
class ParityReport:
    """How far the exported directory is from the torch model on the parity clips."""

    clip_samples: tuple[int, ...]
    logits_max_abs: float
    """Raw ONNX logits vs torch logits, same preprocessed input."""
    log_probabilities_max_abs: float
    """log(Specialist.predict) vs torch log-softmax: the logits up to the per-row constant."""
    probabilities_max_abs: float
    tolerance: float

    @property
    def passed(self) -> bool:
        """True when both logit differences are within the tolerance."""
        return max(self.logits_max_abs, self.log_probabilities_max_abs) <= self.tolerance

    def summary(self) -> str:
        """Human-readable lines for the end of the export."""
        verdict = "OK" if self.passed else "FAILED"
        return (
            f"parity on {len(self.clip_samples)} clips of {sorted(set(self.clip_samples))} "
            f"samples (tolerance {self.tolerance:g}): {verdict}\n"
            f"  max |logits onnx - torch|                  = {self.logits_max_abs:.3e}\n"
            f"  max |log-probs Specialist - torch|         = {self.log_probabilities_max_abs:.3e}\n"
            f"  max |probabilities Specialist - torch|     = {self.probabilities_max_abs:.3e}"
        )


# --- loading and checking the checkpoint -------------------------------------------------------


def load_checkpoint(checkpoint: str) -> tuple[Any, Any]:
    """(feature extractor, model in eval mode) of a supported 16 kHz audio classifier."""
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForAudioClassification

    config = _load(AutoConfig, checkpoint)
    check_architecture(config)
    extractor = _load(AutoFeatureExtractor, checkpoint)
    rate = getattr(extractor, "sampling_rate", None)
    if rate != SAMPLE_RATE:
        raise ExportError(
            f"{checkpoint}: the feature extractor expects {rate} Hz audio; stream-ser runs at "
            f"{SAMPLE_RATE} Hz (resampling inside the model is not supported)"
        )
    model, info = _load(AutoModelForAudioClassification, checkpoint, output_loading_info=True)
    if info.get("missing_keys"):
        raise ExportError(
            f"{checkpoint}: weights missing from the checkpoint ({sorted(info['missing_keys'])[:4]}"
            "...): is it a fine-tuned classifier? A random head gives meaningless emotions"
        )
    return extractor, model.eval()


def _load(factory: Any, checkpoint: str, **kwargs: Any) -> Any:
    try:
        return factory.from_pretrained(checkpoint, **kwargs)
    except (OSError, ValueError) as err:
        where = "local directory" if Path(checkpoint).is_dir() else "hub id (network needed)"
        raise ExportError(f"{checkpoint}: cannot load as a {where}: {err}") from err


def check_architecture(config: Any) -> None:
    """Reject model types and heads the exporter does not support, naming what it supports."""
    model_type = getattr(config, "model_type", None)
    supported = WAVEFORM_MODEL_TYPES + LOGMEL_MODEL_TYPES
    if model_type not in supported:
        raise ExportError(
            f"unsupported architecture {model_type!r}: supported model types are "
            f"{', '.join(supported)}"
        )
    heads = list(getattr(config, "architectures", None) or [])
    if heads and not any(name.endswith(HEAD_SUFFIXES) for name in heads):
        raise ExportError(
            f"checkpoint is a {heads[0]}, not an audio classifier (need a "
            f"*ForSequenceClassification or WhisperForAudioClassification checkpoint)"
        )


def choose_labels(config: Any, settings: ExportSettings) -> tuple[str, ...]:
    """Output labels: --labels, else config.id2label ordered by id (placeholders need a flag)."""
    count = int(config.num_labels)
    if settings.labels is not None:
        if len(settings.labels) != count:
            raise ExportError(f"--labels gives {len(settings.labels)} names, the model has {count}")
        return settings.labels
    id2label = {int(key): str(value) for key, value in config.id2label.items()}
    if sorted(id2label) != list(range(count)):
        raise ExportError(f"config.id2label ids {sorted(id2label)} are not 0..{count - 1}")
    labels = tuple(id2label[index] for index in range(count))
    placeholders = labels == tuple(f"LABEL_{index}" for index in range(count))
    if placeholders and not settings.labels_from_config:
        raise ExportError(
            f"config.id2label holds only placeholder names {labels}: give --labels NAME,... "
            "or keep them with --labels-from-config"
        )
    return labels


def input_normalization(extractor: Any, model_type: str) -> str:
    """The card's input.normalize: per-clip zero mean, unit variance where the extractor does it."""
    if model_type in LOGMEL_MODEL_TYPES:
        return "none"
    return "zero_mean_unit_var" if getattr(extractor, "do_normalize", False) else "none"


# --- the exported modules ----------------------------------------------------------------------


def build_wrapper(model: Any, extractor: Any) -> torch.nn.Module:
    """A torch module: waveform float32 [batch, samples] -> logits [batch, labels]."""
    if model.config.model_type in LOGMEL_MODEL_TYPES:
        return _LogMelClassifier(model, extractor).eval()
    return _WaveformClassifier(model).eval()


class _WaveformClassifier(torch.nn.Module):
    """wav2vec2-family classifier on (already normalised) waveform."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_values=waveform).logits
        return logits


class LogMelFrontEnd(torch.nn.Module):
    """WhisperFeatureExtractor as torch ops: pad/truncate, STFT by a DFT conv, log-mel, clamp.

    Matches `_torch_extract_fbank_features`: periodic Hann window, centred frames with reflect
    padding, power spectrum, last frame dropped, Slaney mel filters, log10 of max(x, 1e-10),
    floor at (per-clip max - 8), then (x + 4) / 4.
    """

    basis: torch.Tensor
    mel: torch.Tensor

    def __init__(self, extractor: Any, n_frames: int) -> None:
        super().__init__()
        self.n_fft = int(extractor.n_fft)
        self.n_frames = n_frames
        self.n_samples = n_frames * int(extractor.hop_length)
        self.hop = int(extractor.hop_length)
        self.register_buffer("basis", torch.from_numpy(dft_basis(self.n_fft)))
        mel = np.asarray(extractor.mel_filters, dtype=np.float32).T.copy()
        self.register_buffer("mel", torch.from_numpy(mel))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        # Pad by a constant then cut: zero-pads short clips and truncates long ones alike.
        fixed = functional.pad(waveform, (0, self.n_samples))[:, : self.n_samples]
        half = self.n_fft // 2
        framed = functional.pad(fixed.unsqueeze(1), (half, half), mode="reflect")
        spectrum = functional.conv1d(framed, self.basis, stride=self.hop)[:, :, : self.n_frames]
        real, imag = torch.chunk(spectrum, 2, dim=1)
        power = real * real + imag * imag
        log_mel = torch.log10(torch.clamp(torch.matmul(self.mel, power), min=1e-10))
        peak = torch.amax(log_mel, dim=(1, 2), keepdim=True)
        return (torch.maximum(log_mel, peak - 8.0) + 4.0) / 4.0


class _LogMelClassifier(torch.nn.Module):
    """WhisperForAudioClassification on raw waveform through the in-graph front end."""

    def __init__(self, model: Any, extractor: Any) -> None:
        super().__init__()
        self.frontend = LogMelFrontEnd(extractor, whisper_frames(model, extractor))
        self.model = model

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_features=self.frontend(waveform)).logits
        return logits


def dft_basis(n_fft: int) -> np.ndarray:
    """Conv1d weights [2 * (n_fft // 2 + 1), 1, n_fft]: Hann-windowed cos rows, then -sin rows."""
    n = np.arange(n_fft)
    k = np.arange(n_fft // 2 + 1)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)  # periodic, as torch.hann_window
    angle = 2 * np.pi * k * n / n_fft
    basis = np.concatenate([np.cos(angle) * window, -np.sin(angle) * window])
    return basis[:, None, :].astype(np.float32)


def whisper_frames(model: Any, extractor: Any) -> int:
    """Mel frames the encoder needs (2 * max_source_positions); the extractor must agree."""
    frames = 2 * int(model.config.max_source_positions)
    if int(extractor.nb_max_frames) != frames:
        raise ExportError(
            f"feature extractor gives {extractor.nb_max_frames} frames but the encoder needs "
            f"{frames} (chunk_length {extractor.chunk_length} s vs max_source_positions "
            f"{model.config.max_source_positions})"
        )
    if getattr(extractor, "dither", 0.0):
        log.warning(
            "ignoring the extractor's dither=%s: inference is deterministic", extractor.dither
        )
    return frames


def max_input_ms(model: Any, extractor: Any) -> int | None:
    """Longest input the model sees whole (Whisper: its chunk), None when unbounded."""
    if model.config.model_type not in LOGMEL_MODEL_TYPES:
        return None
    return whisper_frames(model, extractor) * int(extractor.hop_length) * 1000 // SAMPLE_RATE


# --- writing the directory ---------------------------------------------------------------------


def export_onnx(wrapper: torch.nn.Module, path: Path, opset: int) -> None:
    """Trace `wrapper` to ONNX with dynamic batch and time axes (legacy exporter)."""
    example = torch.from_numpy(synthetic_clips((SAMPLE_RATE, SAMPLE_RATE), seed=7)[0])[None]
    example = example.repeat(2, 1)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.onnx.export(
            wrapper.eval(),
            (example,),
            str(path),
            dynamo=False,
            input_names=["waveform"],
            output_names=["logits"],
            dynamic_axes={"waveform": {0: "batch", 1: "samples"}, "logits": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
        )
    for warning in caught:  # tracer notes; the parity check on other lengths is the real test
        log.debug("export: %s", warning.message)


def convert_fp16(path: Path) -> None:
    """Rewrite `path` with float16 weights and float32 inputs/outputs (for GPU providers).

    The log-mel front end stays float32: power spectra overflow float16.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    keep = [node.name for node in model.graph.node if node.name.startswith(FRONTEND_SCOPE)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter warns about values it clamps
        half = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    _drop_duplicate_nodes(half.graph)
    _sort_topologically(half.graph)
    onnx.checker.check_model(half)
    onnx.save(half, str(path))


def _drop_duplicate_nodes(graph: Any) -> None:
    """Remove exact copies of earlier nodes.

    The converter inserts the same Cast twice when one blocked (float32) output feeds several
    nodes; the copies are identical, and ONNX rejects duplicated node names and outputs.
    """
    seen: set[bytes] = set()
    unique = []
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            unique.append(node)
    del graph.node[:]
    graph.node.extend(unique)


def _sort_topologically(graph: Any) -> None:
    """Order nodes so each runs after its producers (the converter appends its casts)."""
    known = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    waiting: list[int] = []
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        needs = {name for name in node.input if name and name not in known}
        waiting.append(len(needs))
        for name in needs:
            consumers.setdefault(name, []).append(index)
    queue = [index for index, count in enumerate(waiting) if count == 0]
    for index in queue:  # the queue grows while it is walked
        for name in graph.node[index].output:
            for consumer in consumers.get(name, []):
                waiting[consumer] -= 1
                if waiting[consumer] == 0:
                    queue.append(consumer)
    if len(queue) != len(graph.node):
        raise ExportError("fp16 conversion left a graph with a cycle or a missing input")
    ordered = [graph.node[index] for index in queue]
    del graph.node[:]
    graph.node.extend(ordered)


def write_card(settings: ExportSettings, card: dict[str, Any]) -> Path:
    """Write card.json into the output directory; returns its path."""
    path = settings.out_dir / "card.json"
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path


def build_card(
    settings: ExportSettings,
    model: Any,
    labels: tuple[str, ...],
    normalize: str,
    longest_ms: int | None,
) -> dict[str, Any]:
    """The stream-ser model card, with a `source` section recording where it came from."""
    if longest_ms is not None and settings.window_ms > longest_ms:
        raise ExportError(
            f"--window-ms {settings.window_ms} exceeds the model's {longest_ms} ms input: "
            "the rest would be cut off"
        )
    source: dict[str, Any] = {
        "checkpoint": settings.checkpoint,
        "architecture": type(model).__name__,
        "precision": "fp16" if settings.fp16 else "fp32",
        "tool": "tools/train/export_hf.py",
    }
    if longest_ms is not None:
        source["max_input_ms"] = longest_ms
    card = {
        "format": "stream-ser-model/1",
        "id": settings.model_id or default_model_id(settings.checkpoint, settings.fp16),
        "labels": list(labels),
        "sample_rate": SAMPLE_RATE,
        "window_ms": settings.window_ms,
        "hop_ms": settings.hop_ms,
        "min_input_ms": settings.min_input_ms,
        "input": {"kind": "waveform", "name": "waveform", "normalize": normalize},
        "output": {"name": "logits", "kind": "logits"},
        "source": source,
    }
    ModelCard.from_dict(card, "card")  # fail before the slow export, as stream-ser would later
    return card


def default_model_id(checkpoint: str, fp16: bool) -> str:
    """`owner-name` for a hub id, the folder name for a directory; `-fp16` when half precision."""
    path = Path(checkpoint)
    base = path.resolve().name if path.is_dir() else checkpoint.strip("/").replace("/", "-")
    return f"{base}-fp16" if fp16 else base


# --- parity ------------------------------------------------------------------------------------


def synthetic_clips(lengths: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """Deterministic speech-like float32 clips: a gliding harmonic buzz, an envelope, noise."""
    rng = np.random.default_rng(seed)
    clips = []
    for samples in lengths:
        t = np.arange(samples) / SAMPLE_RATE
        pitch = 110 + 60 * rng.random() + 30 * np.sin(2 * np.pi * 0.7 * t)
        phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
        buzz = sum(np.sin(h * phase) / h for h in range(1, 8))
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t + rng.random() * 6)
        clip = 0.2 * envelope * buzz + 0.02 * rng.standard_normal(samples)
        clips.append(clip.astype(np.float32))
    return clips


def parity_clips(window_ms: int, min_input_ms: int) -> list[np.ndarray]:
    """Two synthetic clips of one length (a batch of 2), one of another, and real speech.

    All are at least min_input_ms long: the Specialist zero-pads shorter clips, torch would not.
    """
    window = window_ms * SAMPLE_RATE // 1000
    short = max(window * 2 // 5, min_input_ms * SAMPLE_RATE // 1000, 4000)
    other = window + 1234 if window > SAMPLE_RATE // 2 else window - 777
    clips = synthetic_clips((short, short, other))
    if PARITY_CLIP.is_file():
        import soundfile

        speech, rate = soundfile.read(PARITY_CLIP, dtype="float32", frames=window)
        if rate == SAMPLE_RATE:
            clips.append(np.ascontiguousarray(speech))
    return clips


def torch_logits(model: Any, extractor: Any, clips: Sequence[np.ndarray]) -> np.ndarray:
    """Reference logits (float64): the checkpoint's own feature extractor and torch model."""
    rows = []
    with torch.no_grad():
        for clip in clips:
            inputs = _extract(extractor, clip)
            rows.append(model(**inputs).logits[0].double().numpy())
    return np.stack(rows)


def _extract(extractor: Any, clip: np.ndarray) -> dict[str, Any]:
    inputs = extractor(clip, sampling_rate=SAMPLE_RATE, return_tensors="pt")
    return {key: value for key, value in inputs.items() if key != "attention_mask"}


def onnx_logits(
    model_path: Path,
    extractor: Any,
    clips: Sequence[np.ndarray],
    model_type: str,
    providers: Sequence[str],
) -> np.ndarray:
    """Raw ONNX logits (float64) for the same preprocessed input the torch model saw."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    usable = [name for name in providers if name in ort.get_available_providers()]
    session = ort.InferenceSession(
        str(model_path), options, providers=usable or ["CPUExecutionProvider"]
    )
    rows = []
    for clip in clips:
        if model_type in LOGMEL_MODEL_TYPES:
            waveform = clip[None]
        else:
            waveform = _extract(extractor, clip)["input_values"].numpy()
        (logits,) = session.run(["logits"], {"waveform": waveform.astype(np.float32)})
        rows.append(np.asarray(logits[0], dtype=np.float64))
    return np.stack(rows)


def check_parity(
    settings: ExportSettings, model: Any, extractor: Any, clips: Sequence[np.ndarray]
) -> ParityReport:
    """Compare the written directory, loaded as stream-ser loads it, with the torch model."""
    reference = torch_logits(model, extractor, clips)
    raw = onnx_logits(
        settings.out_dir / "model.onnx",
        extractor,
        clips,
        model.config.model_type,
        settings.providers,
    )
    probabilities = Specialist(settings.out_dir, providers=settings.providers).predict(list(clips))
    expected = torch.log_softmax(torch.from_numpy(reference), dim=-1).numpy()
    tolerance = settings.tolerance
    if tolerance is None:
        tolerance = FP16_TOLERANCE if settings.fp16 else FP32_TOLERANCE
    return ParityReport(
        clip_samples=tuple(len(clip) for clip in clips),
        logits_max_abs=float(np.abs(raw - reference).max()),
        log_probabilities_max_abs=float(np.abs(np.log(probabilities) - expected).max()),
        probabilities_max_abs=float(np.abs(probabilities - np.exp(expected)).max()),
        tolerance=tolerance,
    )


# --- the whole export --------------------------------------------------------------------------


def export(settings: ExportSettings) -> ParityReport:
    """Write OUT_DIR (model.onnx + card.json) and return the parity report; raises ExportError."""
    extractor, model = load_checkpoint(settings.checkpoint)
    labels = choose_labels(model.config, settings)
    normalize = input_normalization(extractor, model.config.model_type)
    card = build_card(settings, model, labels, normalize, max_input_ms(model, extractor))
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = settings.out_dir / "model.onnx"
    export_onnx(build_wrapper(model, extractor), model_path, settings.opset)
    if settings.fp16:
        convert_fp16(model_path)
    write_card(settings, card)
    log.info(
        "wrote %s (%s, labels %s, normalize %s)", settings.out_dir, card["id"], labels, normalize
    )
    clips = parity_clips(settings.window_ms, settings.min_input_ms)
    return check_parity(settings, model, extractor, clips)


def parse_args(argv: Sequence[str] | None = None) -> ExportSettings:
    """ExportSettings from command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="local save_pretrained directory or hub id")
    parser.add_argument("out_dir", type=Path, help="stream-ser model directory to write")
    parser.add_argument("--id", dest="model_id", help="card id (default: checkpoint name)")
    parser.add_argument("--window-ms", type=int, default=2000, help="card window_ms")
    parser.add_argument("--hop-ms", type=int, default=500, help="card hop_ms")
    parser.add_argument("--min-input-ms", type=int, default=250, help="card min_input_ms")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="float16 weights, float32 inputs/outputs: for GPU providers",
    )
    parser.add_argument(
        "--labels",
        type=lambda text: tuple(text.split(",")),
        help="comma-separated label names overriding config.id2label",
    )
    parser.add_argument(
        "--labels-from-config",
        action="store_true",
        help="accept placeholder config labels (LABEL_0, ...) as they are",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        help=f"parity tolerance (default {FP32_TOLERANCE:g}, {FP16_TOLERANCE:g} with --fp16)",
    )
    parser.add_argument(
        "--provider",
        action="append",
        dest="providers",
        help="onnxruntime provider for the parity check (repeatable; default CPU)",
    )
    args = parser.parse_args(argv)
    fields = vars(args)
    fields["providers"] = tuple(args.providers or ("CPUExecutionProvider",))
    return ExportSettings(**fields)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 exported and parity OK, 1 parity failed, 2 cannot export."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    settings = parse_args(argv)
    try:
        report = export(settings)
    except StreamSerError as err:
        print(f"export_hf: error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
