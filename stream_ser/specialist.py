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

Optional cheap window model: `window_model = "window.onnx"` names a second ONNX file in the
directory (same input and output names and labels, no adaptation inputs) that
`Specialist.predict_windows` runs on the sliding windows, so a heavy utterance model runs only
once per utterance. Without it, windows use `model.onnx`.

Optional speaker adaptation (see `stream_ser.adaptation`): the model also outputs a pooled
`embedding` and takes the stream's baseline statistics, with which it normalises that embedding
before its classifier head. Cards without this section keep working unchanged.

    [adaptation]
    embedding_output = "embedding"      # float32 [batch, dims]
    mean_input = "baseline_mean"        # float32 [dims]
    std_input = "baseline_std"          # float32 [dims]
    warmup_utterances = 3               # utterances before the stream's own statistics count
    prior_weight = 10.0                 # pseudo-utterances of population statistics
    population_mean = [...]             # dims floats: the training population's statistics
    population_std = [...]
    adapt_weights = [...]               # optional: dims numbers in 0..1 (see adaptation.py)
    emotion_offsets = [[...], ...]      # optional: one dims-long row per label (see below)
    offset_scale = 0.5                  # how much of the expected offset to take away

With `emotion_offsets` (each label's mean displacement of the embedding from the speaker's
centre, training speakers) a stream's statistics are updated with the embedding minus
`offset_scale` x the offset its recognised label distribution expects, so that a speaker
who stays in one mood does not pull the baseline toward that mood.

The wrapper is synchronous (numpy in, numpy out) and knows nothing of asyncio.
"""

from __future__ import annotations

import json
import logging
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
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
MIN_LABELS = 2


@dataclass(frozen=True)
class Baseline:
    """Feature statistics an adaptive model normalises its embedding with."""

    mean: np.ndarray  # float32 [dims]
    std: np.ndarray  # float32 [dims], > 0


@dataclass(frozen=True)
class AdaptationCard:
    """How a model takes a per-stream baseline; absent for models without adaptation."""

    embedding_output: str
    mean_input: str
    std_input: str
    warmup_utterances: int
    prior_weight: float
    population: Baseline = field(repr=False, compare=False)
    # per dimension 0..1: how much of the stream's statistics to use (the rest: population's);
    # None: every dimension adapts fully
    weights: np.ndarray | None = field(default=None, repr=False, compare=False)
    # (labels, dims): each label's mean offset from the speaker's centre; None: not used
    offsets: np.ndarray | None = field(default=None, repr=False, compare=False)
    offset_scale: float = 1.0  # share of the expected offset taken off an update

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str) -> AdaptationCard:
        """Validate the [adaptation] table of a card."""
        try:
            mean = np.asarray(raw["population_mean"], dtype=np.float32)
            std = np.asarray(raw["population_std"], dtype=np.float32)
            card = cls(
                embedding_output=str(raw.get("embedding_output", "embedding")),
                mean_input=str(raw.get("mean_input", "baseline_mean")),
                std_input=str(raw.get("std_input", "baseline_std")),
                warmup_utterances=int(raw.get("warmup_utterances", 3)),
                prior_weight=float(raw.get("prior_weight", 10.0)),
                population=Baseline(mean, std),
                weights=(
                    np.asarray(raw["adapt_weights"], dtype=np.float64)
                    if "adapt_weights" in raw
                    else None
                ),
                offsets=(
                    np.asarray(raw["emotion_offsets"], dtype=np.float64)
                    if "emotion_offsets" in raw
                    else None
                ),
                offset_scale=float(raw.get("offset_scale", 1.0)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(f"{source}: invalid [adaptation] ({err!r})") from err
        if mean.ndim != 1 or mean.shape != std.shape or not (std > 0).all():
            raise ModelError(
                f"{source}: adaptation population_mean/std must be equal-length lists, std > 0"
            )
        weights = card.weights
        if weights is not None and (weights.shape != mean.shape or not _unit(weights)):
            raise ModelError(f"{source}: adapt_weights must be {len(mean)} numbers in 0..1")
        if card.warmup_utterances < 0 or card.prior_weight < 0:
            raise ModelError(f"{source}: adaptation warmup_utterances and prior_weight >= 0")
        card._check_offsets(source)
        return card

    def _check_offsets(self, source: str) -> None:
        offsets = self.offsets
        rows_of_dims = offsets is None or offsets.shape[1:] == (self.dims,)
        if offsets is not None and not (rows_of_dims and np.isfinite(offsets).all()):
            raise ModelError(f"{source}: emotion_offsets must be rows of {self.dims} finite values")
        if not 0.0 <= self.offset_scale <= 1.0:
            raise ModelError(f"{source}: offset_scale must be in 0..1")

    @property
    def dims(self) -> int:
        """Length of the embedding."""
        return int(self.population.mean.shape[0])


def _unit(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all())


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
    adaptation: AdaptationCard | None = None
    window_model: str | None = None  # file name in the model directory

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
                adaptation=(
                    AdaptationCard.from_dict(raw["adaptation"], source)
                    if "adaptation" in raw
                    else None
                ),
                window_model=str(raw["window_model"]) if "window_model" in raw else None,
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
        if len(self.labels) < MIN_LABELS or len(set(self.labels)) != len(self.labels):
            problems.append("labels must be at least two distinct names")
        if self.sample_rate != SAMPLE_RATE:
            problems.append(f"sample_rate must be {SAMPLE_RATE}")
        if not 0 < self.hop_ms <= self.window_ms:
            problems.append("need 0 < hop_ms <= window_ms")
        if self.input_normalize not in INPUT_NORMALIZATIONS:
            problems.append(f"input.normalize must be one of {INPUT_NORMALIZATIONS}")
        if self.window_model is not None and Path(self.window_model).name != self.window_model:
            problems.append("window_model must be a file name in the model directory")
        if self.output_kind not in OUTPUT_KINDS:
            problems.append(f"output.kind must be one of {OUTPUT_KINDS}")
        problems += self._adaptation_problems()
        if problems:
            raise ModelError(f"{source}: " + "; ".join(problems))

    def _adaptation_problems(self) -> list[str]:
        offsets = self.adaptation.offsets if self.adaptation else None
        if offsets is not None and offsets.shape[0] != len(self.labels):
            return ["adaptation.emotion_offsets needs one row per label"]
        return []


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
        self._session = open_session(
            model_dir / "model.onnx", providers, intra_op_threads, inter_op_threads
        )
        self._window_session = (
            open_session(
                model_dir / self.card.window_model, providers, intra_op_threads, inter_op_threads
            )
            if self.card.window_model
            else None
        )
        self.providers = tuple(self._session.get_providers())
        self._min_samples = self.card.min_input_ms * SAMPLE_RATE // 1000
        self._check_io(model_dir)

    @property
    def labels(self) -> tuple[str, ...]:
        """Output label order."""
        return self.card.labels

    def predict(self, batch: Sequence[np.ndarray], baseline: Baseline | None = None) -> np.ndarray:
        """Probabilities, shape (len(batch), len(labels)), for 16 kHz mono float32 clips.

        `baseline` is the stream's feature statistics for adaptive models (None: the
        population's); models without adaptation ignore it.
        """
        return self.analyze(batch, baseline)[0]

    def predict_windows(
        self, batch: Sequence[np.ndarray], baseline: Baseline | None = None
    ) -> np.ndarray:
        """Like `predict`, for sliding windows: the card's cheap window model when it has one."""
        if self._window_session is None:
            return self.predict(batch, baseline)
        prepared = [self._prepare(clip) for clip in batch]
        probabilities = np.empty((len(batch), len(self.labels)), dtype=np.float64)
        by_length: dict[int, list[int]] = {}
        for index, clip in enumerate(prepared):
            by_length.setdefault(clip.shape[0], []).append(index)
        for indices in by_length.values():
            stacked = _stack([prepared[i] for i in indices])
            probabilities[indices] = self._run_window(stacked)
        return probabilities

    def analyze(
        self, batch: Sequence[np.ndarray], baseline: Baseline | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, embeddings): embeddings (len(batch), dims) only for adaptive models.

        Clips of equal length share one session call; others run one by one, because
        zero-padding would change the result of models without an attention mask.
        """
        probabilities = np.empty((len(batch), len(self.labels)), dtype=np.float64)
        adaptation = self.card.adaptation
        embeddings = (
            np.empty((len(batch), adaptation.dims), dtype=np.float32) if adaptation else None
        )
        by_length: dict[int, list[int]] = {}
        prepared = [self._prepare(clip) for clip in batch]
        for index, clip in enumerate(prepared):
            by_length.setdefault(clip.shape[0], []).append(index)
        for indices in by_length.values():
            stacked = _stack([prepared[i] for i in indices])
            probabilities[indices], embedded = self._run(stacked, baseline)
            if embeddings is not None:
                embeddings[indices] = embedded
        return probabilities, embeddings

    def _prepare(self, clip: np.ndarray) -> np.ndarray:
        clip = np.asarray(clip, dtype=np.float32).reshape(-1)
        if clip.shape[0] < self._min_samples:
            clip = np.pad(clip, (0, self._min_samples - clip.shape[0]))
        if self.card.input_normalize == "zero_mean_unit_var":
            clip = (clip - clip.mean()) / np.sqrt(clip.var() + 1e-7)
        return np.ascontiguousarray(clip, dtype=np.float32)

    def _run(
        self, stacked: np.ndarray, baseline: Baseline | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        names = [self.card.output_name]
        feeds = {self.card.input_name: stacked}
        adaptation = self.card.adaptation
        if adaptation is not None:
            names.append(adaptation.embedding_output)
            used = baseline or adaptation.population
            feeds[adaptation.mean_input] = np.asarray(used.mean, dtype=np.float32)
            feeds[adaptation.std_input] = np.asarray(used.std, dtype=np.float32)
        try:
            outputs = self._session.run(names, feeds)
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ModelError(f"{self.card.model_id}: inference failed: {err}") from err
        output = np.asarray(outputs[0], dtype=np.float64)
        embedded = np.asarray(outputs[1], dtype=np.float32) if adaptation else None
        return self._to_probabilities(output), embedded

    def _run_window(self, stacked: np.ndarray) -> np.ndarray:
        try:
            (output,) = self._window_session.run(  # type: ignore[union-attr]
                [self.card.output_name], {self.card.input_name: stacked}
            )
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ModelError(f"{self.card.model_id}: window inference failed: {err}") from err
        return self._to_probabilities(np.asarray(output, dtype=np.float64))

    def _to_probabilities(self, output: np.ndarray) -> np.ndarray:
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
        if self._window_session is not None:
            window_inputs = {node.name for node in self._window_session.get_inputs()}
            window_outputs = {node.name for node in self._window_session.get_outputs()}
            if self.card.input_name not in window_inputs or (
                self.card.output_name not in window_outputs
            ):
                raise ModelError(
                    f"{model_dir}: {self.card.window_model} needs the input "
                    f"{self.card.input_name!r} and the output {self.card.output_name!r}"
                )
        adaptation = self.card.adaptation
        if adaptation is not None:
            for name in (adaptation.mean_input, adaptation.std_input):
                if name not in inputs:
                    raise ModelError(f"{model_dir}: model has no adaptation input {name!r}")
            if adaptation.embedding_output not in outputs:
                raise ModelError(
                    f"{model_dir}: model has no output {adaptation.embedding_output!r}"
                )


def _stack(clips: list[np.ndarray]) -> np.ndarray:
    """[batch, samples]; a single clip becomes a view, not a copy."""
    return clips[0][np.newaxis] if len(clips) == 1 else np.stack(clips)


def open_session(
    path: Path, providers: Sequence[str], intra_op_threads: int, inter_op_threads: int = 1
) -> Any:
    """An onnxruntime session on the first available of `providers` (CPU if none); ModelError
    when onnxruntime or the file is missing or the model does not load."""
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
