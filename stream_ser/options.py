"""Options of the ALM stage that the settings tree embeds: plain values, no stage code.

`stream_ser.settings` builds `[alm]` / `--alm-*` from these fields; keeping them apart from the
ALM package keeps `import stream_ser.settings` (and every stage that reads settings) light.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from stream_ser.errors import ConfigError
from stream_ser.kinds import CueMode, values

CUE_MODES = values(CueMode)
MAX_TOP_LOGPROBS = 20  # the most OpenAI-compatible servers return
DEVICES = ("cpu", "cuda")
DTYPES = ("fp32", "bf16", "fp16")
TOKEN_MODES = ("auto", "first", "sequence", "mean")
SCORINGS = ("logits", "text")

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
