"""What every ALM backend shares: options, results, errors and the backend interface."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from stream_ser import acoustics
from stream_ser.acoustics import CueTokens
from stream_ser.errors import ConfigError, ModelError
from stream_ser.options import ALM_HELP as ALM_HELP  # noqa: PLC0414 - the ALM package's own names for them
from stream_ser.options import AlmOptions as AlmOptions  # noqa: PLC0414

log = logging.getLogger(__name__)

KINDS = ("qwen2-audio", "clap", "openai")
INSTALL_HINT = "pip install 'stream-ser[alm]'"
MAX_TOP_LOGPROBS = 20  # the most OpenAI-compatible servers return


class AlmUnavailableError(ModelError):
    """The `alm` extra (torch, transformers) is not installed."""


class AlmOutOfMemoryError(ModelError):
    """The device ran out of memory for a batch; the batcher splits the batch and retries."""


@dataclass(frozen=True)
class AlmResult:
    """The ALM's answer for one utterance, as the batcher delivers it."""

    distribution: Mapping[str, float]
    """label -> probability, summing to 1; empty when not ok."""
    ok: bool
    error: str | None
    """Why there is no distribution (queue overflow, out of memory, model error); None when ok."""
    backend: str
    """The spec, "KIND:PATH"."""
    prompt_set: str
    audio_repeats: int
    text_repeats: int
    cue_mode: str
    latency_ms: float
    """From submit to result: queueing plus inference."""
    inference_ms: float
    """The model call of the batch that held this utterance (0 when it never ran)."""
    batch_size: int
    """Utterances in that model call (after any split)."""
    cues: str | None = None
    """The cue phrase put in the prompt, if any."""
    cue_baseline: str | None = None
    """What the cues are relative to: "speaker" or "population"; None without cues."""
    rationale: str | None = None
    """Free-text rationale (explain mode only)."""
    templates: tuple[Mapping[str, float], ...] = ()
    """Per prompt template, its distribution (explain mode only): the ensemble's members."""


class AlmBackend(Protocol):
    """A batch of 16 kHz mono float32 utterances in, one distribution per utterance out."""

    kind: str
    spec: str
    labels: tuple[str, ...]
    options: AlmOptions

    def predict(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None = None
    ) -> list[dict[str, float]]:
        """One label -> probability dict per utterance; raises ModelError on failure."""
        ...

    def predict_templates(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None = None
    ) -> list[list[dict[str, float]]]:
        """Per utterance, one distribution per prompt template (`predict` is their mean)."""
        ...

    def template_names(self) -> list[str]:
        """The prompt templates, in the order of `predict_templates`."""
        ...

    def explain(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None = None
    ) -> list[str]:
        """A short free-text rationale per utterance."""
        ...

    def cue_phrases(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None = None
    ) -> list[str | None]:
        """The cue phrase each utterance's prompt carries (after the probe), or None."""
        ...


MIN_LABELS = 2
"""A distribution needs at least two labels."""


def check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """At least two distinct, non-empty label words."""
    cleaned = tuple(str(label).strip() for label in labels)
    if len(cleaned) < MIN_LABELS or len(set(cleaned)) != len(cleaned) or not all(cleaned):
        raise ConfigError(f"alm: labels must be at least two distinct words, got {list(labels)}")
    return cleaned


def check_batch(batch: Sequence[np.ndarray]) -> list[np.ndarray]:
    """1-D float32 copies; empty clips are an error."""
    clips = [np.ascontiguousarray(np.asarray(clip, dtype=np.float32).reshape(-1)) for clip in batch]
    if any(clip.size == 0 for clip in clips):
        raise ModelError("alm: empty utterance")
    return clips


def resolve_cues(
    batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None, mode: str
) -> list[CueTokens | None]:
    """Probed cues per utterance; missing ones are computed against the population baseline."""
    if mode == "none":
        return [None] * len(batch)
    given = list(cues) if cues is not None else [None] * len(batch)
    if len(given) != len(batch):
        raise ModelError(f"alm: {len(given)} cue sets for {len(batch)} utterances")
    resolved = []
    for clip, known in zip(batch, given, strict=True):
        tokens = known or acoustics.cue_tokens(acoustics.analyse_functionals(clip))
        resolved.append(acoustics.probe(tokens, mode, acoustics.audio_seed(clip)))
    return resolved


def warn_cue_collisions(labels: Sequence[str]) -> None:
    """Warn when a cue word equals or starts like a label (it would prime that label)."""
    collisions = acoustics.cue_label_collisions(labels)
    if collisions:
        log.warning(
            "alm: cue words %s start like labels %s: cue sentences would prime those labels",
            sorted({word for word, _ in collisions}),
            sorted({label for _, label in collisions}),
        )


def local_or_hub(path: str) -> tuple[str, bool]:
    """(path, local_files_only): an existing directory loads offline; `org/name` may be a hub id."""
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        return str(candidate), True
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelError(f"alm: model directory not found: {path}")
    return path, False


def torch_dtype(name: str) -> Any:
    """fp32/bf16/fp16 -> the torch dtype."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def import_torch_stack() -> tuple[Any, Any]:
    """(torch, transformers), or AlmUnavailableError with the install hint."""
    try:
        import torch
        import transformers
    except ImportError as err:
        raise AlmUnavailableError(
            f"the ALM stage needs torch and transformers: {INSTALL_HINT} ({err})"
        ) from err
    return torch, transformers


@contextmanager
def torch_guard(torch: Any, device: Any, spec: str) -> Iterator[None]:
    """inference_mode; torch errors become ModelError, out-of-memory AlmOutOfMemoryError
    (after freeing the CUDA cache, so the batcher's split retry has room)."""
    try:
        with torch.inference_mode():
            yield
    except RuntimeError as err:
        if is_out_of_memory(err):
            if device.type == "cuda":
                torch.cuda.empty_cache()
            raise AlmOutOfMemoryError(f"{spec}: out of memory: {err}") from err
        raise ModelError(f"{spec}: inference failed: {err}") from err


def is_out_of_memory(err: BaseException) -> bool:
    """Whether a torch error is a device out-of-memory condition."""
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def set_threads(options: AlmOptions) -> None:
    """Apply cpu_threads (torch's setting is process-wide)."""
    if options.cpu_threads:
        import torch

        torch.set_num_threads(options.cpu_threads)


def softmax_rows(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    shifted = scores.astype(np.float64) - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]


def template_means(
    labels: Sequence[str], per_template: Sequence[Sequence[Mapping[str, float]]]
) -> list[dict[str, float]]:
    """The ensemble's distribution per utterance: the mean over its templates (one template's
    distribution is returned as it is)."""
    if all(len(row) == 1 for row in per_template):
        return [dict(row[0]) for row in per_template]
    rows = np.array([[[d[label] for label in labels] for d in row] for row in per_template])
    return as_distributions(labels, rows.mean(axis=1))


def per_template(
    labels: Sequence[str], rows: np.ndarray, n_templates: int
) -> list[list[dict[str, float]]]:
    """(utterances x templates, labels) probabilities -> per utterance, per template dicts."""
    grouped = rows.reshape(-1, n_templates, len(labels))
    return [as_distributions(labels, group) for group in grouped]


def as_distributions(labels: Sequence[str], rows: np.ndarray) -> list[dict[str, float]]:
    """Rows of probabilities -> label dicts, renormalised to sum exactly to 1."""
    rows = rows / rows.sum(axis=-1, keepdims=True)
    return [dict(zip(labels, (float(p) for p in row), strict=True)) for row in rows]
