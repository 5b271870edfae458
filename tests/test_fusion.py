"""Fusion rules, label alignment and calibration on synthetic distributions with known answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_ser.calibration import calibrate, fit_temperature
from stream_ser.errors import ConfigError
from stream_ser.fusion import (
    FusionConfig,
    SourceFusion,
    arousal_valence,
    fuse,
    fusion_from_dict,
    fusion_to_toml,
    load_fusion,
)

LABELS = ("neutral", "happy", "sad", "angry")


def dist(*values: float, labels: tuple[str, ...] = LABELS) -> dict[str, float]:
    return dict(zip(labels, values, strict=True))


def test_weighted_arithmetic_mean() -> None:
    config = FusionConfig(LABELS, rule="mean", sources={
        "a": SourceFusion(weight=3.0), "b": SourceFusion(weight=1.0)})  # fmt: skip
    fused, _ = fuse({"a": dist(0.4, 0.4, 0.1, 0.1), "b": dist(0.0, 0.0, 0.5, 0.5)}, config)
    np.testing.assert_allclose(fused, [0.3, 0.3, 0.2, 0.2])


def test_weighted_geometric_mean() -> None:
    config = FusionConfig(LABELS, rule="geometric", sources={
        "a": SourceFusion(weight=0.5), "b": SourceFusion(weight=0.5)})  # fmt: skip
    a, b = dist(0.5, 0.3, 0.1, 0.1), dist(0.125, 0.3, 0.4, 0.175)
    fused, _ = fuse({"a": a, "b": b}, config)
    expected = np.sqrt(np.array(list(a.values())) * np.array(list(b.values())))
    np.testing.assert_allclose(fused, expected / expected.sum())


def test_per_class_weights_change_only_their_label() -> None:
    config = FusionConfig(LABELS, rule="mean", sources={
        "a": SourceFusion(class_weights={"sad": 0.0}), "b": SourceFusion()})  # fmt: skip
    fused, _ = fuse({"a": dist(0.7, 0.1, 0.1, 0.1), "b": dist(0.1, 0.1, 0.7, 0.1)}, config)
    # sad comes from b alone (0.7); the others are the mean of a and b; then normalised
    raw = np.array([0.4, 0.1, 0.7, 0.1])
    np.testing.assert_allclose(fused, raw / raw.sum())


def test_temperature_softens_and_sharpens() -> None:
    config = FusionConfig(LABELS, sources={"a": SourceFusion(temperature=2.0)})
    fused, _ = fuse({"a": dist(0.64, 0.16, 0.16, 0.04)}, config)
    raw = np.sqrt([0.64, 0.16, 0.16, 0.04])
    np.testing.assert_allclose(fused, raw / raw.sum())


def test_mapping_merges_and_drops_labels_explicitly() -> None:
    alm_labels = ("neutral", "calm", "happy", "sad", "angry", "surprise")
    alm = SourceFusion(mapping={"calm": "neutral", "surprise": ""})
    config = FusionConfig(LABELS, rule="mean", sources={"alm": alm})
    fused, dropped = fuse({"alm": dist(0.1, 0.2, 0.2, 0.1, 0.2, 0.2, labels=alm_labels)}, config)
    np.testing.assert_allclose(fused, np.array([0.3, 0.2, 0.1, 0.2]) / 0.8)
    assert dropped == {"alm": pytest.approx(0.2)}


def test_a_label_a_source_lacks_gets_no_vote_from_it() -> None:
    outputs = ("neutral", "happy", "sad", "angry", "surprise")
    config = FusionConfig(outputs, rule="mean")
    full = dist(0.1, 0.1, 0.1, 0.1, 0.6, labels=outputs)
    partial = dist(0.25, 0.25, 0.25, 0.25)  # no "surprise"
    fused, _ = fuse({"full": full, "partial": partial}, config)
    raw = np.array([0.175, 0.175, 0.175, 0.175, 0.6])  # surprise: only "full" votes
    np.testing.assert_allclose(fused, raw / raw.sum())


def test_unmapped_source_label_is_a_clear_error() -> None:
    config = FusionConfig(LABELS)
    with pytest.raises(ConfigError, match="'boredom' is not an output label"):
        fuse({"alm": {"neutral": 0.5, "boredom": 0.5}}, config)


def test_fusion_file_round_trip(tmp_path: Path) -> None:
    config = FusionConfig(LABELS, rule="mean", deadline_ms=1500, sources={
        "specialist": SourceFusion(weight=0.7, temperature=1.5, class_weights={"sad": 2.0}),
        "alm": SourceFusion(weight=0.3, mapping={"calm": "neutral", "surprise": ""}),
    })  # fmt: skip
    path = tmp_path / "fusion.toml"
    path.write_text(fusion_to_toml(config))
    assert load_fusion(path, ["x", "y"]) == config


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"rule": "max"}, "rule must be"),
        ({"sources": {"a": {"weight": -1}}}, "weight must be >= 0"),
        ({"sources": {"a": {"temperature": 0}}}, "temperature must be > 0"),
        ({"sources": {"a": {"mapping": {"calm": "zen"}}}}, "unknown label 'zen'"),
        ({"sources": {"a": {"wieght": 1}}}, "unknown keys"),
        ({"colour": "red"}, "unknown keys"),
    ],
)
def test_bad_fusion_files(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        fusion_from_dict(raw, LABELS)


def synthetic_dev_set(seed: int = 0, n: int = 400) -> tuple[list[str], np.ndarray]:
    """True labels drawn from calibrated distributions softmax(z); returns labels and z."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, len(LABELS)))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    truth = [LABELS[rng.choice(len(LABELS), p=p)] for p in probabilities]
    return truth, logits


def softmax_rows(logits: np.ndarray) -> list[dict[str, float]]:
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return [dist(*row) for row in p]


@pytest.mark.slow
def test_temperature_fit_recovers_overconfidence() -> None:
    truth, logits = synthetic_dev_set()
    overconfident = softmax_rows(3.0 * logits)  # the calibrated answer is T = 3
    t = fit_temperature(overconfident, truth, SourceFusion(), LABELS, "s")
    assert 2.4 <= t <= 3.7
    calibrated = fit_temperature(softmax_rows(logits), truth, SourceFusion(), LABELS, "s")
    assert 0.8 <= calibrated <= 1.25


@pytest.mark.slow
def test_calibration_learns_to_ignore_an_uninformative_source() -> None:
    truth, logits = synthetic_dev_set(seed=1)
    noise = np.random.default_rng(7).normal(0, 2, logits.shape)
    per_source = {"good": softmax_rows(logits), "noise": softmax_rows(noise)}
    config = calibrate(per_source, truth, FusionConfig(LABELS, rule="mean"))
    assert config.source("good").weight >= 0.85
    assert config.source("noise").weight <= 0.15
    per_class = calibrate(per_source, truth, FusionConfig(LABELS, rule="mean"), per_class=True)
    assert set(per_class.source("good").class_weights) == set(LABELS)


def test_arousal_valence_is_the_expectation() -> None:
    assert arousal_valence({"angry": 1.0, "happy": 0.0}) == {"arousal": 0.8, "valence": -0.6}
    mixed = arousal_valence({"angry": 0.5, "sad": 0.5})
    assert mixed == {"arousal": 0.15, "valence": -0.65}
    assert arousal_valence({"unknown": 1.0}) is None
