"""The audio-language-model (ALM) stage: zero-shot emotion distributions for finished utterances.

    backend = stream_ser.alm.load("qwen2-audio:/models/Qwen2-Audio-7B-Instruct",
                                  labels=["neutral", "happy", "sad", "angry"], device="cuda")
    backend.predict([audio])  # -> [{"neutral": 0.1, "happy": 0.6, ...}]

Kinds: `qwen2-audio` (token-level logits of a chat ALM), `clap` (dual encoder), `openai` (an
OpenAI-compatible server such as vLLM). torch and transformers come with the `alm` extra and are
imported only when a local backend is loaded; `import stream_ser.alm` stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from stream_ser.alm.base import (
    INSTALL_HINT,
    KINDS,
    AlmBackend,
    AlmOptions,
    AlmOutOfMemoryError,
    AlmResult,
    AlmUnavailableError,
)
from stream_ser.alm.batcher import AlmBatcher, AlmStats
from stream_ser.errors import ConfigError

__all__ = [
    "INSTALL_HINT",
    "KINDS",
    "AlmBackend",
    "AlmBatcher",
    "AlmOptions",
    "AlmOutOfMemoryError",
    "AlmResult",
    "AlmStats",
    "AlmUnavailableError",
    "load",
    "parse_spec",
]


def parse_spec(spec: str) -> tuple[str, str]:
    """ "KIND:PATH" -> (kind, path); PATH may itself contain colons (URLs)."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in KINDS or not path:
        raise ConfigError(f"--alm must be KIND:PATH with KIND one of {KINDS}, got {spec!r}")
    return kind, path


def load(
    spec: str, labels: Sequence[str], options: AlmOptions | None = None, **overrides: Any
) -> AlmBackend:
    """Load the backend named by "KIND:PATH"; keyword overrides are AlmOptions fields."""
    kind, path = parse_spec(spec)
    base = asdict(options) if options is not None else {}
    options = AlmOptions.from_mapping(base | overrides)
    if kind == "qwen2-audio":
        from stream_ser.alm.qwen2_audio import Qwen2AudioBackend

        return Qwen2AudioBackend(path, labels, options)
    if kind == "clap":
        from stream_ser.alm.clap import ClapBackend

        return ClapBackend(path, labels, options)
    from stream_ser.alm.openai_remote import OpenAIRemoteBackend

    return OpenAIRemoteBackend(path, labels, options)
