"""tools/train/train_strong.py: speaker folds for cross-validation, the causal training replay, the
augmented training copies."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

import torch

from tools.train import train_strong as ts
from tools.train.strong_features import (
    AUGMENTATIONS,
    Row,
    gain,
    noise,
    reverb,
    spec_augment,
)


def _data(test_speakers: set[str]) -> ts.Data:
    rows = [
        Row(corpus, f"{speaker}/{i}.flac", "neutral", f"{corpus}:{speaker}")
        for corpus, speakers in (("ravdess", [f"Actor_{n:02d}" for n in range(1, 11)]),
                                 ("emodb", ["03", "08", "09", "10", "11", "12"]))
        for speaker in speakers
        for i in range(3)
    ]  # fmt: skip
    split = np.array(
        ["test" if r.speaker.split(":")[1] in test_speakers else "train" for r in rows]
    )
    return ts.Data(rows, {}, split, np.arange(len(rows)))


def test_speaker_folds_cover_every_non_test_speaker_once_and_no_test_speaker() -> None:
    data = _data({"Actor_09", "Actor_10", "03"})
    folds = ts.speaker_folds(data, 4)
    speakers = data.speakers()
    assert (np.sum(folds, axis=0) == (data.split != "test")).all()  # each clip in <= one fold
    for fold in folds:
        assert fold.any()
        assert not (data.split[fold] == "test").any()
        in_fold = set(speakers[fold])
        assert all((speakers == s).sum() == fold[speakers == s].sum() for s in in_fold)
        assert {s.split(":")[0] for s in in_fold} == {"ravdess", "emodb"}
    first = sorted(set(speakers[folds[0]]))
    assert first == ["emodb:08", "emodb:09", "ravdess:Actor_01", "ravdess:Actor_02"]


def test_causal_normalisation_uses_only_earlier_clips_of_the_same_speaker() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4))
    speakers = np.array(["a", "a", "a", "b", "b", "b"])
    order = np.array([2, 0, 1, 0, 1, 2])
    card = ts.adaptation_card(ts.population(x), warmup=1, prior_weight=1.0)
    out = ts.causal_normalise(x, speakers, order, card)
    pop = card.population
    # the first clip of each stream sees the population only
    np.testing.assert_allclose(out[1], (x[1] - pop.mean) / pop.std, rtol=1e-5)
    np.testing.assert_allclose(out[3], (x[3] - pop.mean) / pop.std, rtol=1e-5)
    # a later clip's result changes when an earlier clip changes, never when a later one does
    later_changed = x.copy()
    later_changed[0] += 10.0  # clip 0 is speaker a's last
    np.testing.assert_allclose(ts.causal_normalise(later_changed, speakers, order, card)[2], out[2])
    earlier_changed = x.copy()
    earlier_changed[1] += 10.0  # clip 1 is speaker a's first
    assert not np.allclose(ts.causal_normalise(earlier_changed, speakers, order, card)[2], out[2])
    other_speaker = x.copy()
    other_speaker[3:] += 10.0
    np.testing.assert_allclose(
        ts.causal_normalise(other_speaker, speakers, order, card)[:3], out[:3]
    )


def test_feature_parts_name_each_encoders_cache_and_slice_its_layer_width() -> None:
    features = {"encoder": "base", "whisper_layers": [1, 5], "logmel_stats": True,
                "pooling": "speech", "speech_db": 35.0}  # fmt: skip
    assert ts.feature_parts(features) == ["whisper_base_speech:15", "logmel_speech"]
    assert ts.feature_parts(ts.TINY_FEATURES) == ["whisper_speech:0123", "logmel_speech"]
    assert ts.feature_parts(ts.TINY_FEATURES, "noise") == [
        "whisper_speech@noise:0123", "logmel_speech@noise"]  # fmt: skip
    with pytest.raises(SystemExit, match="no augmented copies"):
        ts.feature_parts(features, copy="0.9")
    with pytest.raises(SystemExit, match="unknown augmented copy 'echo'"):
        ts.feature_parts(ts.TINY_FEATURES, copy="echo")
    base = np.arange(6 * 1024, dtype=float)[None]  # 6 layers x (mean, std) x width 512
    tiny = np.arange(4 * 768, dtype=float)[None]  # 4 layers x (mean, std) x width 384
    data = ts.Data([], {"whisper_base_speech": base, "whisper_speech": tiny}, np.array([]),
                   np.array([]))  # fmt: skip
    x = ts.embedding(data, ["whisper_base_speech:15", "whisper_speech:3"])
    expected = np.concatenate([base[0, 1024:2048], base[0, 5120:6144], tiny[0, 2304:3072]])
    np.testing.assert_array_equal(x[0], expected)


def test_best_temperature_undoes_overconfident_logits() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, size=(4000, 5))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    truth = np.array([rng.choice(5, p=p) for p in probabilities])
    assert ts.best_temperature(3.0 * logits, truth) == pytest.approx(3.0, abs=0.2)
    assert ts.best_temperature(logits, truth) == pytest.approx(1.0, abs=0.2)
    nll = ts.negative_log_likelihood(np.log(probabilities), truth)
    assert nll < ts.negative_log_likelihood(np.zeros_like(logits), truth)  # beats uniform


def test_augmented_copies_are_seeded_and_change_the_clip_as_described() -> None:
    t = np.arange(32000) / 16000
    clip = (0.5 * np.sin(2 * np.pi * 220 * t) * (t < 1.2)).astype(np.float32)  # 1.2 s tone

    noisy = noise(10.0, 20.0)(clip, np.random.default_rng(1))
    snr_db = 10 * np.log10(np.mean(clip**2) / np.mean((noisy - clip) ** 2))
    assert 9.5 <= snr_db <= 20.5
    np.testing.assert_array_equal(noisy, noise(10.0, 20.0)(clip, np.random.default_rng(1)))

    voiced = clip != 0
    factor = gain(-6.0, 6.0)(clip, np.random.default_rng(1))[voiced] / clip[voiced]
    assert np.ptp(factor) < 1e-6  # one gain for the whole clip
    assert -6.0 <= 20 * np.log10(factor[0]) <= 6.0

    wet = reverb(0.2, 0.7)(clip, np.random.default_rng(1))
    assert wet.shape == clip.shape
    assert np.abs(wet).max() == pytest.approx(np.abs(clip).max())
    assert np.abs(wet[int(1.25 * 16000) :]).max() > 1e-3  # the room rings on after the tone

    mel = torch.randn(1, 80, 300)
    masked = spec_augment(mel, np.random.default_rng(1))
    changed = masked != mel
    bands = changed.all(dim=2)[0]  # whole mel bins masked
    frames = changed.all(dim=1)[0]  # whole frames masked
    assert 0 < int(bands.sum()) <= 16 and int(frames.sum()) <= 60
    assert bool((changed[0] == (bands[:, None] | frames[None, :])).all())  # nothing else
    assert set(AUGMENTATIONS) == {"0.9", "1.1", "gain", "noise", "reverb", "specaugment"}
