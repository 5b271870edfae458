"""The dual-encoder backend on a tiny random CLAP: 48 kHz resampling, fixed windows, templates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stream_ser import alm  # noqa: E402
from stream_ser.alm.clap import ClapBackend  # noqa: E402
from stream_ser.errors import ConfigError  # noqa: E402

from .alm_helpers import LABELS, noise  # noqa: E402


def _load(tiny_clap: Path, **overrides: Any) -> ClapBackend:
    """`alm.load` of the tiny model, narrowed to the class these white-box tests look into."""
    loaded = alm.load(f"clap:{tiny_clap}", LABELS, **overrides)
    assert isinstance(loaded, ClapBackend)
    return loaded


@pytest.fixture(scope="module")
def backend(tiny_clap: Path) -> ClapBackend:
    return _load(tiny_clap, cpu_threads=1)


def _values(dists: list[dict[str, float]]) -> np.ndarray:
    return np.array([[d[label] for label in LABELS] for d in dists])


@pytest.mark.slow
def test_model_rate_and_window(backend: ClapBackend) -> None:
    assert backend._sample_rate == 48000 and backend._window == 2 * 48000
    windows = backend._windows(noise(4.5, 1))  # 4.5 s -> 2 s + 2 s + 0.5 s at 48 kHz
    assert [w.shape[0] for w in windows] == [96000, 96000, 24000]


def test_text_ensemble_shape(backend: ClapBackend) -> None:
    templates = backend.prompts.templates
    assert backend._text.shape[:2] == (len(templates), len(LABELS))
    np.testing.assert_allclose(np.linalg.norm(backend._text, axis=-1), 1.0, atol=1e-6)


def test_distribution_is_mean_of_per_template_softmax(backend: ClapBackend) -> None:
    clip = noise(1.0, 4)
    audio = backend._embed_audio(backend._windows(clip))[0]
    logits = backend._scale * backend._text @ audio
    per_template = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(_values(backend.predict([clip]))[0], per_template.mean(0), atol=1e-9)


def test_long_audio_is_deterministic_and_fully_covered(
    backend: ClapBackend, mixed_clips: list[np.ndarray]
) -> None:
    long_clip = mixed_clips[2]  # 9 s: rand_trunc would crop it at random
    runs = _values([backend.predict([long_clip])[0] for _ in range(3)])
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])
    head = long_clip[: 2 * 16000]
    assert np.abs(runs[0] - _values(backend.predict([head]))[0]).max() > 1e-7


def test_mixed_length_batch_equals_one_by_one(
    backend: ClapBackend, mixed_clips: list[np.ndarray]
) -> None:
    batched = _values(backend.predict(mixed_clips))
    alone = _values([backend.predict([clip])[0] for clip in mixed_clips])
    np.testing.assert_allclose(batched, alone, atol=1e-6)
    np.testing.assert_allclose(batched.sum(-1), 1.0, atol=1e-12)


def test_audio_amplification_gives_distinct_views(tiny_clap: Path, backend: ClapBackend) -> None:
    """Tiling a short clip was a no-op (the extractor repeat-pads it anyway); rotated views are
    not: k = 2 and k = 3 change the distribution of a 0.6 s utterance (the tiny model's window
    is 2 s; for the real 10 s window that is a 3 s utterance), text repeats held fixed."""
    short = noise(0.6, 5)
    at_48k = backend._windows(short)[0]
    features = [backend._processor.feature_extractor(w, sampling_rate=48000)["input_features"]
                for w in (at_48k, np.tile(at_48k, 3))]
    np.testing.assert_array_equal(features[0], features[1])  # the old tiling: a no-op, shown
    base = _values(backend.predict([short]))
    for k in (2, 3):
        amplified = _load(tiny_clap, audio_repeats=k, cpu_threads=1)
        got = _values(amplified.predict([short]))
        assert np.abs(got - base).max() > 1e-6  # identical input gave exactly 0
        np.testing.assert_allclose(got.sum(), 1.0)
        views = amplified._views(short)
        assert len(views) == k and all(v.shape == short.shape for v in views)
        shift = len(short) // k
        np.testing.assert_array_equal(views[1][: len(short) - shift], short[shift:])
        # several clips in one batch give what each gives alone
        other = noise(2.7, 6)
        np.testing.assert_allclose(
            _values(amplified.predict([short, other])),
            _values([amplified.predict([short])[0], amplified.predict([other])[0]]), atol=1e-6)


def test_text_amplification(tiny_clap: Path, backend: ClapBackend) -> None:
    amplified = _load(tiny_clap, text_repeats=3, prompt_set="single", cpu_threads=1)
    assert amplified._text.shape[0] == 1
    clip = noise(0.7, 5)
    assert not np.allclose(_values(amplified.predict([clip])), _values(backend.predict([clip])))


def test_per_template_distributions_average_to_the_prediction(backend: ClapBackend) -> None:
    clips = [noise(0.9, 8), noise(1.7, 9)]
    members = backend.predict_templates(clips)
    assert [len(m) for m in members] == [len(backend.template_names())] * 2
    mean = np.array([[np.mean([d[k] for d in m]) for k in LABELS] for m in members])
    np.testing.assert_allclose(_values(backend.predict(clips)), mean, atol=1e-12)
    assert np.abs(_values(members[0]) - _values(members[0])[0]).max() > 1e-6  # they differ


def test_text_scoring_is_refused(tiny_clap: Path) -> None:
    with pytest.raises(ConfigError, match="generative"):
        alm.load(f"clap:{tiny_clap}", LABELS, scoring="text")


def test_cues_are_refused(tiny_clap: Path) -> None:
    with pytest.raises(ConfigError, match="generative"):
        alm.load(f"clap:{tiny_clap}", LABELS, cues="aligned")
