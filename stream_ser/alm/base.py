"""What every ALM backend shares: options, results, errors and the backend interface."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from stream_ser import acoustics
from stream_ser.acoustics import CUE_MODES, CueTokens
from stream_ser.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

KINDS = ("qwen2-audio", "clap", "openai")
DEVICES = ("cpu", "cuda")
DTYPES = ("fp32", "bf16", "fp16")
TOKEN_MODES = ("auto", "first", "sequence", "mean")
SCORINGS = ("logits", "text")
INSTALL_HINT = "pip install 'stream-ser[alm]'"
MAX_TOP_LOGPROBS = 20  # the most OpenAI-compatible servers return

# one line of `--alm-*` help per AlmOptions field (docs/alm.md has the details)
ALM_HELP = {
    "max_batch": "utterances per ALM call",
    "max_wait_ms": "a partial batch goes when its oldest utterance has waited this long (ms)",
    "max_queue": "utterances waiting for the ALM; when full the oldest is dropped (counted)",
    "device": "torch device of a local ALM: cpu or cuda",
    "dtype": "weights of a local ALM: fp32, bf16 or fp16 (fp16 needs cuda)",
    "cpu_threads": "torch intra-op threads, process-wide; 0: torch's own choice",
    "prompts": "prompt templates file (default: the bundled alm_prompts.toml)",
    "prompt_set": "which set of the prompt templates file to use",
    "audio_repeats": "prompt amplification: the audio appears this many times",
    "text_repeats": "prompt amplification: the question or class text repeats this many times",
    "cues": "acoustic cue tokens in the prompt: aligned, none, shuffled, corrupted or conflicting",
    "token_mode": "label score: auto, first (first token), sequence (all its tokens) or mean",
    "scoring": "logits (token probabilities) or text (the model writes a distribution, parsed)",
    "text_tokens": "with --alm-scoring text: most tokens the written distribution may take",
    "explain": "also generate a short rationale (never used for the distribution)",
    "explain_tokens": "longest rationale, in tokens (with --alm-explain)",
    "timeout_s": "openai backend: HTTP timeout per request (s)",
    "top_logprobs": "openai backend: top tokens asked for per position (at most 20)",
    "api_key": "openai backend: bearer token (TOML only; else $OPENAI_API_KEY)",
    "model_name": "openai backend: the served model name (default: the first of /v1/models)",
}


class AlmUnavailableError(ModelError):
    """The `alm` extra (torch, transformers) is not installed."""


class AlmOutOfMemoryError(ModelError):
    """The device ran out of memory for a batch; the batcher splits the batch and retries."""


@dataclass(frozen=True)
class AlmOptions:
    """Settings of the ALM stage; CLI flags `--alm-*` and the TOML table `[alm]` use these names."""

    max_batch: int = 8
    """Utterances per model call."""
    max_wait_ms: int = 200
    """A batch goes when it is full or its oldest utterance has waited this long."""
    max_queue: int = 64
    """Waiting utterances; when full the oldest waiting one is dropped (counted, flagged result)."""
    device: str = "cpu"
    dtype: str = "fp32"
    cpu_threads: int = 0
    """torch intra-op threads (process-wide); 0 leaves torch's default."""
    prompts: str | None = None
    """Path of the templates file; None is the bundled `stream_ser/data/alm_prompts.toml`."""
    prompt_set: str = "default"
    """Which set of the templates file to use."""
    audio_repeats: int = 1
    """Prompt amplification: the audio appears this many times in the input."""
    text_repeats: int = 1
    """Prompt amplification: the question (or CLAP class description) repeats this many times."""
    cues: str = "none"
    """Acoustic cue tokens in the prompt: aligned, none, shuffled, corrupted or conflicting."""
    token_mode: str = "auto"
    """first: each label's first-token probability; sequence: the probability of all its tokens
    (the multi-token mode); mean: their mean log-probability (length-normalised, biased); auto:
    sequence when any spelling of a label spans several tokens, else first (then the same)."""
    scoring: str = "logits"
    """logits: the distribution from token probabilities; text: the model writes a distribution
    that is parsed (the text-level baseline, generative backends only)."""
    text_tokens: int = 64
    """scoring "text": how many tokens the written distribution may take."""
    explain: bool = False
    """Also generate a short free-text rationale (never used for the distribution)."""
    explain_tokens: int = 48
    timeout_s: float = 30.0
    """Remote backend: HTTP timeout per request."""
    top_logprobs: int = 20
    """Remote backend: how many top tokens the server returns (OpenAI allows at most 20)."""
    api_key: str | None = field(default=None, repr=False)
    """Remote backend: bearer token; None reads OPENAI_API_KEY when set."""
    model_name: str | None = None
    """Remote backend: the served model name; None asks the server's /v1/models."""

    def __post_init__(self) -> None:
        problems = [
            *_positive(
                self,
                (
                    "max_batch",
                    "max_queue",
                    "audio_repeats",
                    "text_repeats",
                    "explain_tokens",
                    "text_tokens",
                    "top_logprobs",
                ),
            ),
            *_choice(
                self,
                {
                    "device": DEVICES,
                    "dtype": DTYPES,
                    "cues": CUE_MODES,
                    "token_mode": TOKEN_MODES,
                    "scoring": SCORINGS,
                },
            ),
        ]
        if self.max_wait_ms < 0 or self.cpu_threads < 0 or self.timeout_s <= 0:
            problems.append("max_wait_ms and cpu_threads must be >= 0, timeout_s > 0")
        if self.top_logprobs > MAX_TOP_LOGPROBS:
            problems.append(f"top_logprobs must be at most {MAX_TOP_LOGPROBS}")
        if self.device.startswith("cpu") and self.dtype == "fp16":
            problems.append("dtype fp16 needs device cuda (use fp32 or bf16 on cpu)")
        if problems:
            raise ConfigError("alm: " + "; ".join(problems))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> AlmOptions:
        """Build from a TOML table or keyword options; unknown keys are a ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"alm: unknown option(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**dict(raw))
        except TypeError as err:
            raise ConfigError(f"alm: {err}") from err


def _positive(options: AlmOptions, names: Sequence[str]) -> list[str]:
    return [
        f"{name} must be a positive integer"
        for name in names
        if not isinstance(getattr(options, name), int) or getattr(options, name) < 1
    ]


def _choice(options: AlmOptions, choices: Mapping[str, Sequence[str]]) -> list[str]:
    return [
        f"{name} must be one of {tuple(allowed)}, not {getattr(options, name)!r}"
        for name, allowed in choices.items()
        if getattr(options, name) not in allowed
    ]


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
