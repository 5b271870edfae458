"""Issue #20: the ALM stage, cue probes and fusion do what their papers describe (no torch)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from stream_ser import acoustics
from stream_ser.alm import labels as rules
from stream_ser.alm import prompts, text_scoring
from stream_ser.ambiguity import vote_report
from stream_ser.calibration import calibrate, fit_temperature
from stream_ser.errors import ModelError
from stream_ser.fusion import AROUSAL_VALENCE, FusionConfig, SourceFusion, fuse

KNOWN_LABELS = (*AROUSAL_VALENCE, "fear", "surprised", "disgusted", "excited", "frustrated")
RATE = 16000


def test_no_cue_word_equals_or_starts_like_a_label() -> None:
    starts = {label[:3] for label in KNOWN_LABELS}
    words = [word for spec in acoustics.ALL_SPECS for word in spec.words]
    assert [w for w in words if w.lower()[:3] in starts] == []  # "neutral" was a brightness word
    assert acoustics.cue_label_collisions(KNOWN_LABELS) == []
    assert acoustics.cue_label_collisions(["Moderately"]) == [
        ("moderate", "Moderately"),
        ("modal", "Moderately"),
    ]


def _tokens(baseline: str) -> acoustics.CueTokens:
    return acoustics.CueTokens((acoustics.Cue("pitch", 2, "high", 1.2),), baseline)


def test_the_cue_sentence_names_its_baseline() -> None:
    template = prompts.load_generative(None, "default").cues
    speaker = prompts.cue_sentence(template, _tokens("speaker"))
    population = prompts.cue_sentence(template, _tokens("population"))
    assert speaker == "Acoustic cues relative to this speaker's earlier speech: pitch: high."
    assert population is not None and "relative to this speaker" not in population
    assert "typical adult speech" in population and population.endswith("pitch: high.")
    assert prompts.cue_sentence(template, None) is None


@pytest.fixture(scope="module")
def speech_cues(speech: np.ndarray) -> acoustics.CueTokens:
    return acoustics.cue_tokens(acoustics.analyse_functionals(speech[: 3 * RATE]))


def test_formants_are_a_cue(speech_cues: acoustics.CueTokens) -> None:
    names = [cue.name for cue in speech_cues.cues]
    assert names == [
        "pitch",
        "pitch variability",
        "loudness",
        "speaking rate",
        "brightness",
        "formants",
        "voice quality",
    ]
    formants = next(c for c in speech_cues.cues if c.name == "formants")
    assert formants.word in ("low", "mid", "high") and math.isfinite(formants.z)


def test_shuffled_permutes_the_real_levels(speech_cues: acoustics.CueTokens) -> None:
    true_levels = [cue.level for cue in speech_cues.cues]
    assert len(set(true_levels)) > 1
    for seed in range(20):
        shuffled = acoustics.probe(speech_cues, "shuffled", seed)
        assert shuffled is not None
        levels = [cue.level for cue in shuffled.cues]
        assert sorted(levels) == sorted(true_levels)  # the mix of levels is kept
        assert levels != true_levels  # but not their assignment
        assert [c.name for c in shuffled.cues] == [c.name for c in speech_cues.cues]
    assert acoustics.probe(speech_cues, "shuffled", 4) == acoustics.probe(
        speech_cues, "shuffled", 4
    )


def test_corrupted_draws_random_levels(speech_cues: acoustics.CueTokens) -> None:
    assert "corrupted" in acoustics.CUE_MODES
    drawn = [acoustics.probe(speech_cues, "corrupted", seed) for seed in range(30)]
    mixes = {tuple(sorted(c.level for c in d.cues)) for d in drawn if d is not None}
    assert len(mixes) > 3  # unlike shuffled, the mix of levels changes
    assert acoustics.probe(speech_cues, "corrupted", 7) == drawn[7]


def test_sequence_mode_is_the_probability_of_saying_the_label() -> None:
    """The issue's case: one-token label at p = 0.05, two-token label at 0.0099 x 1.0."""
    one = [[math.log(0.05)]]
    two = [[math.log(0.0099), math.log(1.0)]]
    sequence = np.array([rules.sequence_form_scores(one), rules.sequence_form_scores(two)])
    mean = np.array([rules.mean_form_scores(one), rules.mean_form_scores(two)])
    np.testing.assert_allclose(
        np.exp(sequence) / np.exp(sequence).sum(), [0.05 / 0.0599, 0.0099 / 0.0599]
    )
    np.testing.assert_allclose(np.exp(mean) / np.exp(mean).sum(), [0.334, 0.666], atol=1e-3)
    # several spellings of one label add up as probabilities
    assert rules.sequence_form_scores([[math.log(0.1)], [math.log(0.2), 0.0]]) == pytest.approx(
        math.log(0.3)
    )


def test_default_fusion_keeps_the_specialist_temperature() -> None:
    labels = ("neutral", "happy", "sad", "angry")
    specialist = dict(zip(labels, (0.7, 0.2, 0.06, 0.04), strict=True))
    uniform = dict.fromkeys(labels, 0.25)
    fused, _ = fuse({"specialist": specialist, "alm": uniform}, FusionConfig(labels))
    np.testing.assert_allclose(fused, list(specialist.values()), atol=1e-12)
    informative = dict(zip(labels, (0.4, 0.4, 0.1, 0.1), strict=True))
    fused, _ = fuse({"specialist": specialist, "alm": informative}, FusionConfig(labels))
    product = np.array(list(specialist.values())) * np.array(list(informative.values()))
    np.testing.assert_allclose(fused, product / product.sum(), atol=1e-12)
    # weights on the simplex are the weighted geometric mean
    half = FusionConfig(
        labels, sources={"specialist": SourceFusion(weight=0.5), "alm": SourceFusion(weight=0.5)}
    )
    fused, _ = fuse({"specialist": specialist, "alm": informative}, half)
    np.testing.assert_allclose(fused, np.sqrt(product) / np.sqrt(product).sum(), atol=1e-12)


def test_an_uncovered_label_is_not_pushed_by_the_geometric_rule() -> None:
    labels = ("neutral", "happy", "sad", "angry", "calm")
    specialist = dict(zip(labels, (0.3, 0.2, 0.2, 0.1, 0.2), strict=True))
    partial = {"neutral": 0.25, "happy": 0.25, "sad": 0.25, "angry": 0.25}  # no "calm"
    fused, _ = fuse({"specialist": specialist, "alm": partial}, FusionConfig(labels))
    np.testing.assert_allclose(fused, list(specialist.values()), atol=1e-12)


def _dev_set(seed: int = 0) -> tuple[list[dict[str, float]], list[str], tuple[str, ...]]:
    """Calibrated over (neutral, happy, sad), plus much mass on "calm", never a true label."""
    labels = ("neutral", "calm", "happy", "sad")
    rng = np.random.default_rng(seed)
    rows, truth = [], []
    for _ in range(400):
        logits = rng.normal(0, 1.5, 3)
        p = np.exp(logits) / np.exp(logits).sum()
        truth.append(("neutral", "happy", "sad")[rng.choice(3, p=p)])
        calm = rng.uniform(0.3, 0.6)
        rows.append(
            dict(zip(labels, (p[0] * (1 - calm), calm, *(p[1:] * (1 - calm))), strict=True))
        )
    return rows, truth, labels


def test_calibration_fits_the_labels_eval_scores() -> None:
    rows, truth, labels = _dev_set()
    scored = ("neutral", "happy", "sad")
    on_scored = fit_temperature(rows, truth, SourceFusion(), labels, "s", scored)
    on_all = fit_temperature(rows, truth, SourceFusion(), labels, "s")
    assert 0.8 <= on_scored <= 1.25  # calibrated where eval looks
    assert on_all > 1.5  # the mass on "calm" drags the unrestricted fit
    config = calibrate({"specialist": rows}, truth, FusionConfig(labels), scored=scored)
    assert config.source("specialist").temperature == pytest.approx(on_scored)


def test_votes_missing_columns_and_unscored_labels(caplog: pytest.LogCaptureFixture) -> None:
    votes = [{"neutral": 2.0, "happy": 1.0, "calm": 1.0}, {"neutral": 0.0, "happy": 3.0}]
    predicted = np.array([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1]])
    with caplog.at_level(logging.WARNING):
        report = vote_report(votes, ("neutral", "happy", "sad"), predicted)
    assert "votes_<label> column(s) for sad" in caplog.text
    assert report["missing_columns"] == ["sad"]
    assert report["dropped_vote_mass"] == pytest.approx((0.25 + 0.0) / 2)
    assert report["n"] == 2 and report["n_without_votes"] == 0
    bc = (math.sqrt(2 / 3 * 0.5) + math.sqrt(1 / 3 * 0.3) + math.sqrt(0.8)) / 2
    assert report["bhattacharyya"] == pytest.approx(bc, abs=1e-5)
    only_unscored = vote_report([{"calm": 3.0}], ("neutral", "happy"), np.array([[0.5, 0.5]]))
    assert only_unscored["n"] == 0 and only_unscored["n_without_votes"] == 1
    assert only_unscored["dropped_vote_mass"] == 1.0


def test_clap_descriptions() -> None:
    descriptions = prompts.load_clap(None, "default").descriptions
    assert "calm" not in descriptions["neutral"]
    for label in AROUSAL_VALENCE:
        assert descriptions.get(label), label  # boredom had none ("a boredom speaker")
        others = [other for other in AROUSAL_VALENCE if other != label]
        assert not any(other in descriptions[label] for other in others), label


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("neutral: 40%\nhappy: 30%\nsad: 20%\nangry: 10%", (0.4, 0.3, 0.2, 0.1)),
        ('{"neutral": 0.5, "happy": 0.5}', (0.5, 0.5, 0.0, 0.0)),
        ("Angry = 60, Sad - 20, neutral 20, calm: 10", (0.2, 0.0, 0.2, 0.6)),
        ("happy: 2, sad: 2", (0.0, 0.5, 0.5, 0.0)),
    ],
)
def test_written_distribution_parsing(text: str, expected: tuple[float, ...]) -> None:
    got = text_scoring.parse(["neutral", "happy", "sad", "angry"], text)
    np.testing.assert_allclose(list(got.values()), expected)


def test_unparsable_written_distribution_is_an_error() -> None:
    with pytest.raises(ModelError, match="no distribution"):
        text_scoring.parse(["neutral", "happy"], "The speaker sounds happy.")
