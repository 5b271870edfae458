"""Prompt templates (an editable TOML file) and how prompts are assembled.

Prompt ensemble: one prompt per template, distributions averaged. Prompt amplification: the
question (or CLAP class description) is repeated `text_repeats` times; the audio `audio_repeats`
times (handled by each backend). Cue tokens are appended once, after the repeated question.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from stream_ser.acoustics import BASELINE_PHRASES, CueTokens
from stream_ser.errors import ConfigError


@dataclass(frozen=True)
class GenerativePrompts:
    """A prompt set for chat ALMs."""

    name: str
    system: str
    questions: tuple[str, ...]
    cues: str
    explain: str
    distribution: str
    """The text-level baseline's question (scoring "text"): the model writes a distribution."""


@dataclass(frozen=True)
class ClapPrompts:
    """A class-description set for dual-encoder ALMs."""

    name: str
    templates: tuple[str, ...]
    descriptions: Mapping[str, str]


def bundled_prompts_path() -> Path:
    """The templates file shipped in the package."""
    return Path(str(resources.files("stream_ser") / "data" / "alm_prompts.toml"))


def _read(path: str | None) -> tuple[dict[str, Any], str]:
    source = Path(path).expanduser() if path else bundled_prompts_path()
    try:
        return tomllib.loads(source.read_text(encoding="utf-8")), str(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"alm prompts: cannot read {source}: {err}") from err


def _section(path: str | None, family: str, name: str) -> tuple[dict[str, Any], str]:
    raw, source = _read(path)
    sets = raw.get(family, {})
    if name not in sets or not isinstance(sets[name], dict):
        raise ConfigError(f"{source}: no [{family}.{name}] prompt set (have {sorted(sets)})")
    return sets[name], f"{source} [{family}.{name}]"


def _strings(table: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = table.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key} must be a non-empty list of strings")
    return tuple(value)


def load_generative(path: str | None, name: str) -> GenerativePrompts:
    """Read one [generative.NAME] set; every question must contain {labels}."""
    table, where = _section(path, "generative", name)
    questions = _strings(table, "questions", where)
    if not all("{labels}" in question for question in questions):
        raise ConfigError(f"{where}: every question must contain {{labels}}")
    cues = str(table.get("cues", "Acoustic cues {baseline}: {cues}."))
    if "{cues}" not in cues:
        raise ConfigError(f"{where}: cues must contain {{cues}}")
    return GenerativePrompts(
        name=name,
        system=str(table.get("system", "You are a helpful assistant.")),
        questions=questions,
        cues=cues,
        explain=str(table.get("explain", "Briefly explain the speaker's emotion.")),
        distribution=_distribution(table, where),
    )


DEFAULT_DISTRIBUTION = (
    "How likely is each emotion in the speaker's voice: {labels}? Answer with one line per "
    "emotion in the form 'emotion: percent', the percents summing to 100."
)


def _distribution(table: Mapping[str, Any], where: str) -> str:
    question = str(table.get("distribution", DEFAULT_DISTRIBUTION))
    if "{labels}" not in question:
        raise ConfigError(f"{where}: distribution must contain {{labels}}")
    return question


def load_clap(path: str | None, name: str) -> ClapPrompts:
    """Read one [clap.NAME] set; every template must contain {label}."""
    table, where = _section(path, "clap", name)
    templates = _strings(table, "templates", where)
    if not all("{label}" in template for template in templates):
        raise ConfigError(f"{where}: every template must contain {{label}}")
    descriptions = table.get("descriptions", {})
    if not isinstance(descriptions, dict):
        raise ConfigError(f"{where}: descriptions must be a table label -> words")
    return ClapPrompts(
        name=name,
        templates=templates,
        descriptions={str(k): str(v) for k, v in descriptions.items()},
    )


def label_list(labels: Sequence[str]) -> str:
    """ "a, b, c or d"."""
    return f"{', '.join(labels[:-1])} or {labels[-1]}"


def question_text(
    template: str, labels: Sequence[str], repeats: int, cue_sentence: str | None
) -> str:
    """The user text: the question `repeats` times, then the cue sentence if any."""
    question = template.replace("{labels}", label_list(labels))
    text = "\n".join([question] * repeats)
    if cue_sentence:
        text += "\n" + cue_sentence
    return text


def cue_sentence(cue_template: str, tokens: CueTokens | None) -> str | None:
    """The cue sentence of one prompt: {cues} the cue words, {baseline} which baseline they are
    relative to (the speaker's own or the population's); None without cues."""
    if tokens is None or not tokens.cues:
        return None
    baseline = BASELINE_PHRASES.get(tokens.baseline, tokens.baseline)
    return cue_template.replace("{cues}", tokens.text()).replace("{baseline}", baseline)


def class_texts(prompts: ClapPrompts, labels: Sequence[str], repeats: int) -> list[list[str]]:
    """[template][label] class descriptions, each repeated `repeats` times."""
    return [
        [
            ". ".join(
                [template.replace("{label}", prompts.descriptions.get(label, label))] * repeats
            )
            for label in labels
        ]
        for template in prompts.templates
    ]
