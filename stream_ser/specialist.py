"""The specialist: an ONNX emotion classifier described by a model card.

A model directory holds `model.onnx` and a card, `card.json` or `card.toml`:

    format = "stream-ser-model/1"
    id = "my-model-v1"                  # reported as model_id in every result
    labels = ["neutral", "happy", ...]  # order of the model's output columns
    sample_rate = 16000
    window_ms = 2000                    # sliding window while speech is active
    hop_ms = 500                        # one window result per hop of speech
    min_input_ms = 250                  # shorter inputs are zero-padded to this length
    [input]
    kind = "waveform"                   # float32 [batch, samples]
    name = "waveform"
    normalize = "none"                  # or "zero_mean_unit_var" (per clip, as wav2vec2)
    [output]
    name = "logits"
    kind = "logits"                     # or "probabilities"

The wrapper is synchronous (numpy in, numpy out) and knows nothing of asyncio.
"""

from __future__ import annotations

import json
import logging
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from stream_ser import SAMPLE_RATE
from stream_ser.errors import ModelError

log = logging.getLogger(__name__)

CARD_FORMAT = "stream-ser-model/1"
CARD_NAMES = ("card.json", "card.toml")
INPUT_NORMALIZATIONS = ("none", "zero_mean_unit_var")
OUTPUT_KINDS = ("logits", "probabilities")


@dataclass(frozen=True)
class ModelCard:
    """What stream-ser needs to know to run a model directory."""

    model_id: str
    labels: tuple[str, ...]
    sample_rate: int
    window_ms: int
    hop_ms: int
    min_input_ms: int
    input_name: str
    input_normalize: str
    output_name: str
    output_kind: str

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str) -> ModelCard:
        """Validate a parsed card; `source` names the file in error messages."""
        try:
            card = cls(
                model_id=str(raw["id"]),
                labels=tuple(str(label) for label in raw["labels"]),
                sample_rate=int(raw.get("sample_rate", SAMPLE_RATE)),
                window_ms=int(raw.get("window_ms", 2000)),
                hop_ms=int(raw.get("hop_ms", 500)),
                min_input_ms=int(raw.get("min_input_ms", 250)),
                input_name=str(raw.get("input", {}).get("name", "waveform")),
                input_normalize=str(raw.get("input", {}).get("normalize", "none")),
                output_name=str(raw.get("output", {}).get("name", "logits")),
                output_kind=str(raw.get("output", {}).get("kind", "logits")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(f"{source}: invalid model card ({err!r})") from err
        card._check(raw, source)
        return card

    def _check(self, raw: dict[str, Any], source: str) -> None:
        problems = []
        if raw.get("format", CARD_FORMAT) != CARD_FORMAT:
            problems.append(f"format must be {CARD_FORMAT!r}")
        if raw.get("input", {}).get("kind", "waveform") != "waveform":
            problems.append("input.kind must be 'waveform'")
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            problems.append("labels must be at least two distinct names")
        if self.sample_rate != SAMPLE_RATE:
            problems.append(f"sample_rate must be {SAMPLE_RATE}")
        if not 0 < self.hop_ms <= self.window_ms:
            problems.append("need 0 < hop_ms <= window_ms")
        if self.input_normalize not in INPUT_NORMALIZATIONS:
            problems.append(f"input.normalize must be one of {INPUT_NORMALIZATIONS}")
        if self.output_kind not in OUTPUT_KINDS:
            problems.append(f"output.kind must be one of {OUTPUT_KINDS}")
        if problems:
            raise ModelError(f"{source}: " + "; ".join(problems))


def bundled_model_dir() -> Path:
    """The default specialist shipped inside the package."""
    return Path(str(resources.files("stream_ser.models") / "default"))


def load_card(model_dir: Path) -> ModelCard:
    """Read and validate the card of a model directory."""
    for name in CARD_NAMES:
        path = model_dir / name
        if path.is_file():
            return ModelCard.from_dict(_parse_card(path), str(path))
    raise ModelError(f"{model_dir}: no model card ({' or '.join(CARD_NAMES)})")


def _parse_card(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        parsed = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot read model card: {err}") from err
    if not isinstance(parsed, dict):
        raise ModelError(f"{path}: model card must be an object")
    return parsed


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for large logits."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]


class Specialist:
    """An onnxruntime session for one model directory; thread-confined, not async."""

    def __init__(
        self,
        model_dir: Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
    ) -> None:
        self.card = load_card(model_dir)
        self._session = _open_session(
            model_dir / "model.onnx", providers, intra_op_threads, inter_op_threads
        )
        self.providers = tuple(self._session.get_providers())
        self._min_samples = self.card.min_input_ms * SAMPLE_RATE // 1000
        self._check_io(model_dir)

    @property
    def labels(self) -> tuple[str, ...]:
        """Output label order."""
        return self.card.labels

    def predict(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities, shape (len(batch), len(labels)), for 16 kHz mono float32 clips.

        Clips of equal length share one session call; others run one by one, because
        zero-padding would change the result of models without an attention mask.
        """
        probabilities = np.empty((len(batch), len(self.labels)), dtype=np.float64)
        by_length: dict[int, list[int]] = {}
        prepared = [self._prepare(clip) for clip in batch]
        for index, clip in enumerate(prepared):
            by_length.setdefault(clip.shape[0], []).append(index)
        for indices in by_length.values():
            stacked = np.stack([prepared[i] for i in indices])
            probabilities[indices] = self._run(stacked)
        return probabilities

    def _prepare(self, clip: np.ndarray) -> np.ndarray:
        clip = np.asarray(clip, dtype=np.float32).reshape(-1)
        if clip.shape[0] < self._min_samples:
            clip = np.pad(clip, (0, self._min_samples - clip.shape[0]))
        if self.card.input_normalize == "zero_mean_unit_var":
            clip = (clip - clip.mean()) / np.sqrt(clip.var() + 1e-7)
        return np.ascontiguousarray(clip, dtype=np.float32)

    def _run(self, stacked: np.ndarray) -> np.ndarray:
        try:
            (output,) = self._session.run([self.card.output_name], {self.card.input_name: stacked})
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ModelError(f"{self.card.model_id}: inference failed: {err}") from err
        output = np.asarray(output, dtype=np.float64)
        if self.card.output_kind == "logits":
            return softmax(output)
        return output / output.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]

    def _check_io(self, model_dir: Path) -> None:
        inputs = {node.name for node in self._session.get_inputs()}
        outputs = {node.name: node.shape for node in self._session.get_outputs()}
        if self.card.input_name not in inputs:
            raise ModelError(f"{model_dir}: model has no input {self.card.input_name!r}")
        if self.card.output_name not in outputs:
            raise ModelError(f"{model_dir}: model has no output {self.card.output_name!r}")
        width = outputs[self.card.output_name][-1]
        if isinstance(width, int) and width != len(self.labels):
            raise ModelError(
                f"{model_dir}: model gives {width} outputs but the card lists "
                f"{len(self.labels)} labels"
            )


def _open_session(
    path: Path, providers: Sequence[str], intra_op_threads: int, inter_op_threads: int
) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ModelError(
            "onnxruntime is not installed: pip install 'stream-ser[cpu]' (or [gpu])"
        ) from err
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.log_severity_level = 3
    available = set(ort.get_available_providers())
    usable = [name for name in providers if name in available] or ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=usable)
    except Exception as err:  # onnxruntime raises its own untyped errors
        raise ModelError(f"{path}: cannot load ONNX model: {err}") from err
    active = session.get_providers()
    missing = [name for name in providers if name not in active]
    if missing:
        log.warning("providers %s not active, running on %s", missing, active)
    return session
