"""Acoustic analysis of one utterance: eGeMAPS functionals, a speaker baseline and cue tokens.

One opensmile computation per utterance (`analyse_functionals`) feeds both the published
descriptors and the ALM's acoustic cue tokens. Cues are categorical words ("pitch: high") taken
from z-scores of six key functionals against the stream's own running speaker baseline
(Welford mean/variance), or against a rough adult-speech population baseline until the stream has
`min_count` voiced utterances.

Probes (from the acoustic-cue paper) replace the true cues to measure how much a model follows them:
`aligned` keeps them, `none` drops them, `shuffled` permutes the utterance's real levels across its
cues (the mix of levels is kept, their assignment broken), `corrupted` draws every level at random,
`conflicting` gives the opposite level. Random choices are seeded from the audio (deterministic).

No cue word equals a label word or shares its first three letters (`cue_label_collisions`): a cue
word like "neutral" would prime the very label whose shift the probes measure.

Synchronous numpy code; opensmile (heavy: pandas, pyarrow) is imported on first use.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from stream_ser import SAMPLE_RATE
from stream_ser.errors import ConfigError, ModelError, StreamSerError
from stream_ser.kinds import CueMode, values

CUE_MODES = values(CueMode)
LEVELS = ("low", "mid", "high")
Z_THRESHOLD = 0.75
"""|z| above this gives `low` or `high`; within it `mid` (about the middle 55% of a speaker)."""


@dataclass(frozen=True)
class CueSpec:
    """One cue: its eGeMAPS functional, words for low/mid/high, whether it needs voicing."""

    name: str
    feature: str
    words: tuple[str, str, str]
    population_mean: float
    population_std: float
    needs_voice: bool


CUES: tuple[CueSpec, ...] = (
    CueSpec(
        "pitch", "F0semitoneFrom27.5Hz_sma3nz_amean", ("low", "mid", "high"), 34.37, 6.812, True
    ),
    CueSpec(
        "pitch variability",
        "F0semitoneFrom27.5Hz_sma3nz_stddevNorm",
        ("flat", "moderate", "varied"),
        0.101,
        0.0497,
        True,
    ),
    CueSpec("loudness", "loudness_sma3_amean", ("quiet", "moderate", "loud"), 0.411, 0.393, False),
    CueSpec(
        "speaking rate", "loudnessPeaksPerSec", ("slow", "moderate", "fast"), 3.093, 1.34, False
    ),
    CueSpec(
        "brightness",
        "alphaRatioV_sma3nz_amean",
        ("dark", "balanced", "bright"),
        -11.69,
        4.935,
        True,
    ),
    CueSpec("formants", "F1frequency_sma3nz_amean", ("low", "mid", "high"), 694.7, 123.0, True),
    # H1-H2: a large first-harmonic lead means a breathy voice, a small one a tense (pressed) voice.
    CueSpec(
        "voice quality",
        "logRelF0-H1-H2_sma3nz_amean",
        ("tense", "modal", "breathy"),
        6.593,
        3.524,
        True,
    ),
)
"""The seven cues: the cue-token paper's six - energy (loudness), pitch, dynamics (pitch
variability), brightness, formants (mean first-formant frequency) and voice quality - plus
speaking rate. Population mean/std (used until a stream has its own baseline) are measured over
RAVDESS + EmoDB, 1735 clips, by `tools/train/population_baseline.py` (formants: every second clip,
868, `--limit 600`): acted speech, so a calm
conversational speaker reads a little low on pitch variability and loudness against them."""

DESCRIPTOR_SPECS: tuple[CueSpec, ...] = (
    CueSpec(
        "pitch range",
        "F0semitoneFrom27.5Hz_sma3nz_pctlrange0-2",
        ("narrow", "moderate", "wide"),
        5.252,
        2.445,
        True,
    ),
    CueSpec(
        "jitter", "jitterLocal_sma3nz_amean", ("low", "moderate", "high"), 0.02494, 0.01224, True
    ),
    CueSpec(
        "shimmer", "shimmerLocaldB_sma3nz_amean", ("low", "moderate", "high"), 1.206, 0.2477, True
    ),
    CueSpec(
        "harmonicity", "HNRdBACF_sma3nz_amean", ("noisy", "moderate", "clear"), 6.978, 2.048, True
    ),
    CueSpec(
        "emphasis",
        "loudness_sma3_stddevNorm",
        ("even", "moderate", "emphatic"),
        1.102,
        0.2616,
        False,
    ),
)
"""Further published descriptors (not prompt cues): pitch range, voice quality from jitter,
shimmer and harmonics-to-noise ratio, and emphasis (loudness variation)."""

ALL_SPECS = CUES + DESCRIPTOR_SPECS

VOICING_FEATURE = "F0semitoneFrom27.5Hz_sma3nz_amean"


@dataclass(frozen=True)
class Functionals:
    """The 88 eGeMAPSv02 functionals of one utterance (name -> value, opensmile's names)."""

    values: Mapping[str, float]
    duration_ms: int

    @property
    def voiced(self) -> bool:
        """Whether opensmile found any voiced frame (otherwise F0-based features are 0)."""
        return self.values.get(VOICING_FEATURE, 0.0) > 0.0


@dataclass(frozen=True)
class Cue:
    """One categorical cue: its name, level index (0 low, 1 mid, 2 high), word and z-score."""

    name: str
    level: int
    word: str
    z: float


@dataclass(frozen=True)
class CueTokens:
    """The cue tokens of one utterance, in `CUES` order; unvoiced speech lacks the F0-based ones."""

    cues: tuple[Cue, ...]
    baseline: str
    """"speaker" (the stream's running baseline) or "population"."""

    def text(self) -> str:
        """The cue words as a phrase: "pitch: high, loudness: loud, ..."."""
        return ", ".join(f"{cue.name}: {cue.word}" for cue in self.cues)

    def levels(self) -> dict[str, str]:
        """Cue name -> word."""
        return {cue.name: cue.word for cue in self.cues}


_SMILE_LOCK = threading.Lock()
_SMILE: list[Any] = []


def _smile() -> Any:
    with _SMILE_LOCK:
        if not _SMILE:
            try:
                import opensmile
            except ImportError as err:
                raise ModelError("opensmile is not installed: pip install opensmile") from err
            _SMILE.append(
                opensmile.Smile(
                    feature_set=opensmile.FeatureSet.eGeMAPSv02,
                    feature_level=opensmile.FeatureLevel.Functionals,
                )
            )
        return _SMILE[0]


def warm_up() -> None:
    """Import and configure opensmile now (about a second) rather than on the first utterance."""
    _smile()


def analyse_functionals(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Functionals:
    """eGeMAPSv02 functionals of one mono utterance (opensmile, ~17 ms per audio second)."""
    clip = np.ascontiguousarray(np.asarray(audio, dtype=np.float32).reshape(-1))
    if clip.shape[0] < sample_rate // 10:  # opensmile needs a few frames; pad very short clips
        clip = np.pad(clip, (0, sample_rate // 10 - clip.shape[0]))
    try:
        frame = _smile().process_signal(clip, sample_rate)
    except Exception as err:  # opensmile raises its own untyped errors
        raise ModelError(f"opensmile failed on a {clip.shape[0]}-sample clip: {err}") from err
    row = frame.iloc[0]
    values = {str(name): _finite(row[name]) for name in frame.columns}
    return Functionals(values=values, duration_ms=clip.shape[0] * 1000 // sample_rate)


def _finite(value: Any) -> float:
    number = float(value)
    return number if math.isfinite(number) else 0.0


@dataclass
class Welford:
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0


@dataclass
class SpeakerBaseline:
    """Running mean/std of the cue features of one stream; population figures until `min_count`."""

    min_count: int = 3
    min_std_fraction: float = 0.25
    """A speaker's std is floored at this fraction of the population std (few, steady samples)."""
    _stats: dict[str, Welford] = field(default_factory=dict)

    def z(self, spec: CueSpec, value: float) -> tuple[float, bool]:
        """The z-score of `value` for one cue, and whether the speaker baseline was used."""
        stats = self._stats.get(spec.feature)
        if stats is None or stats.count < self.min_count:
            return (value - spec.population_mean) / spec.population_std, False
        std = max(stats.std, self.min_std_fraction * spec.population_std)
        return (value - stats.mean) / std, True

    def update(self, functionals: Functionals) -> None:
        """Add one utterance; F0-based features only count when it was voiced."""
        for spec in ALL_SPECS:
            if spec.needs_voice and not functionals.voiced:
                continue
            self._stats.setdefault(spec.feature, Welford()).add(functionals.values[spec.feature])

    def count(self, feature: str) -> int:
        """How many utterances the baseline of one feature holds."""
        stats = self._stats.get(feature)
        return stats.count if stats else 0


def cue_tokens(
    functionals: Functionals,
    baseline: SpeakerBaseline | None = None,
    specs: tuple[CueSpec, ...] = CUES,
) -> CueTokens:
    """Categorical cues of one utterance relative to `baseline` (population when None)."""
    baseline = baseline or SpeakerBaseline()
    cues, used_speaker = [], []
    for spec in specs:
        if spec.needs_voice and not functionals.voiced:
            continue
        z, speaker = baseline.z(spec, functionals.values[spec.feature])
        used_speaker.append(speaker)
        level = 0 if z < -Z_THRESHOLD else 2 if z > Z_THRESHOLD else 1
        cues.append(Cue(spec.name, level, spec.words[level], round(z, 3)))
    source = "speaker" if used_speaker and all(used_speaker) else "population"
    return CueTokens(cues=tuple(cues), baseline=source)


def probe(cues: CueTokens | None, mode: str, seed: int) -> CueTokens | None:
    """Apply a cue probe: aligned, none, shuffled, corrupted or conflicting (module docstring)."""
    if mode not in CUE_MODES:
        raise ConfigError(f"cue mode must be one of {CUE_MODES}, not {mode!r}")
    if cues is None or mode == "none":
        return None
    if mode == "aligned":
        return cues
    rng = np.random.default_rng(seed)
    if mode == "shuffled":
        levels = _permuted([cue.level for cue in cues.cues], rng)
    elif mode == "corrupted":
        levels = [int(level) for level in rng.integers(0, len(LEVELS), size=len(cues.cues))]
    else:
        levels = [_opposite(cue) for cue in cues.cues]
    words = {spec.name: spec.words for spec in CUES}
    changed = tuple(
        replace(cue, level=level, word=words[cue.name][level])
        for cue, level in zip(cues.cues, levels, strict=True)
    )
    return replace(cues, cues=changed)


def _permuted(levels: list[int], rng: np.random.Generator) -> list[int]:
    """A seeded permutation of the levels over the cues that differs from the original order
    whenever the levels are not all equal (then no permutation can change them)."""
    for _ in range(32):
        order = [levels[int(i)] for i in rng.permutation(len(levels))]
        if order != levels:
            return order
    return levels


BASELINE_PHRASES = {
    "speaker": "relative to this speaker's earlier speech",
    "population": "relative to typical adult speech (no history of this speaker yet)",
}
"""How the cue sentence names its baseline (`{baseline}` in the prompt templates)."""


def cue_label_collisions(labels: Sequence[str]) -> list[tuple[str, str]]:
    """(cue word, label) pairs that are equal or share their first three letters."""
    words = dict.fromkeys(word for spec in ALL_SPECS for word in spec.words)
    return [
        (word, label)
        for word in words
        for label in labels
        if word.lower()[:3] == label.strip().lower()[:3]
    ]


def _opposite(cue: Cue) -> int:
    """low <-> high; mid goes to the extreme on the other side of its z-score."""
    if cue.level != 1:
        return 2 - cue.level
    return 0 if cue.z >= 0 else 2


def audio_seed(audio: np.ndarray) -> int:
    """A deterministic seed from the samples (CRC-32 of the float32 bytes)."""
    return zlib.crc32(np.ascontiguousarray(audio, dtype=np.float32).tobytes())


class AnalysisSkipped(StreamSerError):
    """An utterance's acoustics were not computed: the analyser was too far behind."""


@dataclass(frozen=True)
class Analysis:
    """One utterance's functionals, cue tokens (for the ALM) and descriptors (published)."""

    functionals: Functionals
    cues: CueTokens
    descriptors: CueTokens
    """Every spec of ALL_SPECS that applies, relative to the same baseline as the cues."""

    def descriptors_message(self) -> dict[str, Any]:
        """The `descriptors` object of a published result: level word, z-score, raw value."""
        values = self.functionals.values
        features = {spec.name: spec.feature for spec in ALL_SPECS}
        described: dict[str, Any] = {
            cue.name: {"level": cue.word, "z": cue.z, "value": round(values[features[cue.name]], 4)}
            for cue in self.descriptors.cues
        }
        described["baseline"] = self.descriptors.baseline
        described["voiced"] = self.functionals.voiced
        return described


class StreamAcoustics:
    """Per-stream analysis: cues relative to the speaker's earlier utterances, then update."""

    def __init__(self, baseline: SpeakerBaseline | None = None) -> None:
        self.baseline = baseline or SpeakerBaseline()

    def analyse(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Analysis:
        """Functionals and cues of one utterance; the utterance then joins the baseline."""
        functionals = analyse_functionals(audio, sample_rate)
        cues = cue_tokens(functionals, self.baseline)
        descriptors = cue_tokens(functionals, self.baseline, ALL_SPECS)
        self.baseline.update(functionals)
        return Analysis(functionals=functionals, cues=cues, descriptors=descriptors)
