"""Late fusion (ZS-Fuse style) of several recognizers' distributions into one.

Each source (the specialist, an ALM, further specialists) gives a distribution over its own
labels. A fusion file says how each maps onto the output labels, how much each counts, and
how to sharpen or soften it:

    labels = ["neutral", "happy", "sad", "angry"]   # output labels (default: the specialist's)
    rule = "geometric"          # "geometric" (log-linear pool) or "mean" (weighted arithmetic)
    deadline_ms = 3000          # how long the final result waits for slow sources
    [sources.specialist]
    weight = 0.6
    temperature = 1.4           # p ** (1 / T), renormalised: T > 1 softens, T < 1 sharpens
    [sources.specialist.class_weights]
    happy = 1.3                 # per output label, multiplies `weight`
    [sources.alm]
    weight = 0.4
    [sources.alm.mapping]       # source label -> output label; "" drops that label's mass
    calm = "neutral"
    surprise = ""

Label alignment rules (explicit, never silent):
- A source label maps to the output label of the same name unless `mapping` says otherwise;
  a source label with neither a same-named output label nor a mapping is a configuration
  error. Several source labels may map to one output label (their probabilities add up).
- Mass on labels mapped to "" is removed and the source's remaining mass renormalised; the
  dropped mass is reported per result (`dropped_mass`).
- An output label that a source cannot produce gets no vote from that source. Rule "mean":
  the fused score of each label is the weighted mean over the sources that cover it, then
  normalised. Rule "geometric": the source counts at its mean log-probability over the labels
  it covers for that label (no push either way). A label no available source covers gets 0.

The rules:
- "geometric" (default): log-linear pooling, fused ∝ prod_i p_i ** w_i with the weights NOT
  divided by their sum. With the default weights (1 each) every source keeps its own temperature:
  a near-uniform ALM leaves the specialist's distribution (and its calibration) as it is, and an
  informative one sharpens it where they agree. (Dividing by the weight sum, as a weighted
  geometric mean does, raises the specialist's temperature to n_sources x T.) Weights that sum
  to one (what `stream-ser calibrate` fits, after fitting each source's temperature) give the
  weighted geometric mean.
- "mean": weighted arithmetic mean (a mixture), sum_i w_i p_i / sum_i w_i per label.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stream_ser.errors import ConfigError
from stream_ser.kinds import FusionRule, values

RULES = values(FusionRule)
FLOOR = 1e-6  # probabilities are floored here before logs (geometric rule, temperatures)
MIN_LABELS = 2
MAX_DEADLINE_MS = 600_000


@dataclass(frozen=True)
class SourceFusion:
    """How one source enters the fusion."""

    weight: float = 1.0
    temperature: float = 1.0
    class_weights: Mapping[str, float] = field(default_factory=dict)  # output label -> factor
    mapping: Mapping[str, str] = field(default_factory=dict)  # source label -> output label

    def check(self, name: str, outputs: Sequence[str]) -> None:
        """Raise ConfigError for values that make no sense."""
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise ConfigError(f"fusion: sources.{name}.weight must be >= 0")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"fusion: sources.{name}.temperature must be > 0")
        for label, factor in self.class_weights.items():
            if label not in outputs or not factor >= 0:
                raise ConfigError(f"fusion: sources.{name}.class_weights.{label} is invalid")
        for target in self.mapping.values():
            if target and target not in outputs:
                raise ConfigError(f"fusion: sources.{name}.mapping names unknown label {target!r}")


@dataclass(frozen=True)
class FusionConfig:
    """The fusion file, validated."""

    labels: tuple[str, ...]
    rule: str = "geometric"
    deadline_ms: int = 3000
    sources: Mapping[str, SourceFusion] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.labels) < MIN_LABELS or len(set(self.labels)) != len(self.labels):
            raise ConfigError("fusion: labels must be at least two distinct names")
        if self.rule not in RULES:
            raise ConfigError(f"fusion: rule must be one of {RULES}")
        if not 0 <= self.deadline_ms <= MAX_DEADLINE_MS:
            raise ConfigError(f"fusion: deadline_ms must be 0..{MAX_DEADLINE_MS}")
        for name, source in self.sources.items():
            source.check(name, self.labels)

    def source(self, name: str) -> SourceFusion:
        """The settings of a source; a source not in the file gets weight 1, temperature 1."""
        return self.sources.get(name, SourceFusion())


def load_fusion(path: Path, default_labels: Sequence[str]) -> FusionConfig:
    """Read a fusion file (TOML)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read fusion file {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from err
    return fusion_from_dict(raw, default_labels, str(path))


def fusion_from_dict(
    raw: Mapping[str, Any], default_labels: Sequence[str], where: str = "fusion"
) -> FusionConfig:
    """Build a FusionConfig from parsed TOML (as written by `stream-ser calibrate`)."""
    known = {"labels", "rule", "deadline_ms", "sources"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    sources = {}
    for name, table in raw.get("sources", {}).items():
        extra = set(table) - {"weight", "temperature", "class_weights", "mapping"}
        if extra:
            raise ConfigError(f"{where}: unknown keys {sorted(extra)} in [sources.{name}]")
        try:
            sources[name] = SourceFusion(
                weight=float(table.get("weight", 1.0)),
                temperature=float(table.get("temperature", 1.0)),
                class_weights={k: float(v) for k, v in table.get("class_weights", {}).items()},
                mapping={str(k): str(v) for k, v in table.get("mapping", {}).items()},
            )
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: [sources.{name}]: {err}") from err
    return FusionConfig(
        labels=tuple(raw.get("labels", default_labels)),
        rule=str(raw.get("rule", "geometric")),
        deadline_ms=int(raw.get("deadline_ms", 3000)),
        sources=sources,
    )


def fusion_to_toml(config: FusionConfig) -> str:
    """The fusion file text for `config` (what `stream-ser calibrate` writes)."""
    lines = [
        f"labels = [{', '.join(_quote(label) for label in config.labels)}]",
        f"rule = {_quote(config.rule)}",
        f"deadline_ms = {config.deadline_ms}",
    ]
    for name, source in config.sources.items():
        lines += [
            "",
            f"[sources.{_key(name)}]",
            f"weight = {source.weight:.6g}",
            f"temperature = {source.temperature:.6g}",
        ]
        if source.class_weights:
            lines += [f"[sources.{_key(name)}.class_weights]"]
            lines += [f"{_key(k)} = {v:.6g}" for k, v in source.class_weights.items()]
        if source.mapping:
            lines += [f"[sources.{_key(name)}.mapping]"]
            lines += [f"{_key(k)} = {_quote(v)}" for k, v in source.mapping.items()]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _key(text: str) -> str:
    return text if text.replace("_", "").replace("-", "").isalnum() else _quote(text)


@dataclass(frozen=True)
class Aligned:
    """A source's distribution on the output labels."""

    probabilities: np.ndarray  # over output labels; 0 where not covered
    covered: np.ndarray  # bool per output label
    dropped_mass: float  # mass on labels mapped to ""


def align(
    distribution: Mapping[str, float], source: SourceFusion, outputs: Sequence[str], name: str
) -> Aligned:
    """Map a source's distribution onto the output labels (rules in the module docstring)."""
    index = {label: i for i, label in enumerate(outputs)}
    probabilities = np.zeros(len(outputs))
    covered = np.zeros(len(outputs), dtype=bool)
    dropped = 0.0
    for label, p in distribution.items():
        target = source.mapping.get(label, label if label in index else None)
        if target is None:
            raise ConfigError(
                f"fusion: source {name!r} label {label!r} is not an output label; map it "
                f'(sources.{name}.mapping) or drop it with ""'
            )
        if target == "":
            dropped += p
            continue
        probabilities[index[target]] += p
        covered[index[target]] = True
    kept = probabilities.sum()
    if kept > 0:
        probabilities /= kept
    return Aligned(probabilities, covered, dropped)


def temper(probabilities: np.ndarray, covered: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling on the covered labels: p ** (1/T), renormalised."""
    if temperature == 1.0:
        return probabilities
    scaled = np.where(covered, np.maximum(probabilities, FLOOR) ** (1.0 / temperature), 0.0)
    return scaled / scaled.sum()  # type: ignore[no-any-return]


def fuse(
    distributions: Mapping[str, Mapping[str, float]], config: FusionConfig
) -> tuple[np.ndarray, dict[str, float]]:
    """The fused distribution over config.labels, and the dropped mass per source."""
    if not distributions:
        raise ValueError("fuse needs at least one source")
    scores = np.zeros(len(config.labels))
    weights = np.zeros(len(config.labels))
    dropped = {}
    for name, distribution in distributions.items():
        source = config.source(name)
        aligned = align(distribution, source, config.labels, name)
        dropped[name] = aligned.dropped_mass
        p = temper(aligned.probabilities, aligned.covered, source.temperature)
        w = source.weight * np.array([source.class_weights.get(k, 1.0) for k in config.labels])
        if config.rule == "mean":
            scores += np.where(aligned.covered, w * p, 0.0)
        else:
            scores += w * _log_votes(p, aligned.covered)
        weights += np.where(aligned.covered, w, 0.0)
    return _normalise(scores, weights, config.rule), dropped


def _log_votes(p: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Log-probabilities; a label the source does not cover gets its mean over those it does."""
    logs = np.log(np.maximum(p, FLOOR))
    return np.where(covered, logs, logs[covered].mean() if covered.any() else 0.0)


def _normalise(scores: np.ndarray, weights: np.ndarray, rule: str) -> np.ndarray:
    voted = weights > 0
    if not voted.any():
        raise ValueError("fusion: every source has weight 0")
    if rule == "mean":
        fused = np.where(voted, scores / np.where(voted, weights, 1.0), 0.0)
    else:
        fused = np.where(voted, np.exp(scores - scores[voted].max()), 0.0)
    return fused / fused.sum()  # type: ignore[no-any-return]


# Arousal (activation) and valence (pleasantness) of each label on [-1, 1], after Russell's
# circumplex model of affect (placements as in common SER dashboards; documented in the README).
AROUSAL_VALENCE: dict[str, tuple[float, float]] = {
    "neutral": (0.0, 0.0),
    "calm": (-0.6, 0.4),
    "happy": (0.5, 0.8),
    "sad": (-0.5, -0.7),
    "angry": (0.8, -0.6),
    "fearful": (0.7, -0.7),
    "disgust": (0.3, -0.7),
    "surprise": (0.7, 0.3),
    "boredom": (-0.7, -0.3),
}


def arousal_valence(distribution: Mapping[str, float]) -> dict[str, float] | None:
    """Expected arousal and valence under the distribution (labels without a placement are
    left out and the rest renormalised); None if no label has one."""
    placed = {k: p for k, p in distribution.items() if k in AROUSAL_VALENCE}
    mass = sum(placed.values())
    if mass <= 0:
        return None
    arousal = sum(p * AROUSAL_VALENCE[k][0] for k, p in placed.items()) / mass
    valence = sum(p * AROUSAL_VALENCE[k][1] for k, p in placed.items()) / mass
    return {"arousal": round(arousal, 4), "valence": round(valence, 4)}
