"""eGeMAPS functionals, the speaker baseline, cue tokens and the probes."""

from __future__ import annotations

import numpy as np
import pytest

from stream_ser import acoustics
from stream_ser.errors import ConfigError

RATE = 16000


@pytest.fixture(scope="module")
def speech_functionals(speech: np.ndarray) -> acoustics.Functionals:
    return acoustics.analyse_functionals(speech[: 3 * RATE])


def test_functionals_of_speech(speech_functionals: acoustics.Functionals) -> None:
    values = speech_functionals.values
    assert len(values) == 88 and speech_functionals.duration_ms == 3000
    assert speech_functionals.voiced
    assert all(spec.feature in values for spec in acoustics.CUES)


def test_silence_is_unvoiced_and_has_no_pitch_cues() -> None:
    functionals = acoustics.analyse_functionals(np.zeros(RATE // 2, dtype=np.float32))
    tokens = acoustics.cue_tokens(functionals)
    assert not functionals.voiced
    assert [cue.name for cue in tokens.cues] == ["loudness", "speaking rate"]


def test_welford_matches_numpy() -> None:
    stats = acoustics.Welford()
    values = np.random.default_rng(0).normal(5, 2, 50)
    for value in values:
        stats.add(float(value))
    assert stats.mean == pytest.approx(values.mean())
    assert stats.std == pytest.approx(values.std(ddof=1))


def _functionals(loudness: float, pitch: float = 30.0) -> acoustics.Functionals:
    values = {spec.feature: spec.population_mean for spec in acoustics.ALL_SPECS}
    values[acoustics.VOICING_FEATURE] = pitch
    values["loudness_sma3_amean"] = loudness
    return acoustics.Functionals(values=values, duration_ms=1000)


def test_cues_are_relative_to_the_speaker_once_the_baseline_forms() -> None:
    baseline = acoustics.SpeakerBaseline(min_count=3)
    quiet_speaker = [_functionals(0.1), _functionals(0.12), _functionals(0.15)]
    probe = _functionals(0.4)  # about the population's mean loudness
    assert acoustics.cue_tokens(probe, baseline).levels()["loudness"] == "moderate"
    assert acoustics.cue_tokens(probe, baseline).baseline == "population"
    for functionals in quiet_speaker:
        baseline.update(functionals)
    relative = acoustics.cue_tokens(probe, baseline)
    assert relative.baseline == "speaker" and relative.levels()["loudness"] == "loud"


def test_stream_analysis_compares_before_updating(speech: np.ndarray) -> None:
    stream = acoustics.StreamAcoustics(acoustics.SpeakerBaseline(min_count=2))
    clips = [speech[i * RATE: (i + 2) * RATE] for i in range(0, 8, 2)]
    analyses = [stream.analyse(clip) for clip in clips]
    assert [a.cues.baseline for a in analyses] == ["population", "population", "speaker", "speaker"]
    assert stream.baseline.count("loudness_sma3_amean") == 4
    assert "loudness: " in analyses[-1].cues.text()


def test_probes(speech_functionals: acoustics.Functionals) -> None:
    cues = acoustics.cue_tokens(speech_functionals)
    assert acoustics.probe(cues, "aligned", 1) is cues
    assert acoustics.probe(cues, "none", 1) is None
    conflicting = acoustics.probe(cues, "conflicting", 1)
    assert conflicting is not None
    for true, flipped in zip(cues.cues, conflicting.cues, strict=True):
        assert flipped.level not in (true.level, 1)
        spec = next(s for s in acoustics.CUES if s.name == true.name)
        assert flipped.word == spec.words[flipped.level]
    shuffled = [acoustics.probe(cues, "shuffled", seed) for seed in range(20)]
    assert acoustics.probe(cues, "shuffled", 3) == shuffled[3]  # deterministic per seed
    assert len({s.text() for s in shuffled if s}) > 5  # and varies with the seed
    with pytest.raises(ConfigError):
        acoustics.probe(cues, "inverted", 1)


def test_audio_seed_is_content_based() -> None:
    a = np.arange(100, dtype=np.float32)
    assert acoustics.audio_seed(a) == acoustics.audio_seed(a.copy())
    assert acoustics.audio_seed(a) != acoustics.audio_seed(a[::-1].copy())
