"""Emotion offsets: a stream's statistics follow the speaker, not the mood they stay in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from stream_ser.adaptation import StreamBaseline
from stream_ser.errors import ModelError
from stream_ser.evaluate import Clip, load_audio, recognize
from stream_ser.specialist import AdaptationCard, ModelCard, Specialist
from tests.signals import buzz, noise
from tests.test_evaluate import build_adaptive_model

OFFSETS = [[4.0, -2.0, 0.0], [-4.0, 2.0, 0.0]]  # label 0 ("angry"), label 1 ("sad")
RAW = {"warmup_utterances": 1, "prior_weight": 2.0, "population_mean": [0.0, 1.0, 2.0],
       "population_std": [1.0, 2.0, 3.0]}  # fmt: skip
WITH_OFFSETS = RAW | {"emotion_offsets": OFFSETS, "offset_scale": 0.5}


def stream_of(raw: dict[str, Any]) -> StreamBaseline:
    return StreamBaseline(AdaptationCard.from_dict(raw, "test"))


def mean_of(stream: StreamBaseline) -> np.ndarray:
    current = stream.current()
    assert current is not None
    return current.mean.astype(np.float64)


def test_update_takes_away_the_expected_offset() -> None:
    values = np.array([[3.0, 5.0, -1.0], [5.0, 9.0, 1.0], [4.0, 7.0, 0.0]])
    probabilities = np.array([[1.0, 0.0], [0.25, 0.75], [0.5, 0.5]])
    compensated = values - 0.5 * probabilities @ np.array(OFFSETS)
    with_offsets, plain = stream_of(WITH_OFFSETS), stream_of(RAW)
    for value, p, expected in zip(values, probabilities, compensated, strict=True):
        with_offsets.update(value, p)
        plain.update(expected)
    np.testing.assert_allclose(mean_of(with_offsets), mean_of(plain), rtol=1e-6)
    assert with_offsets.current().std == pytest.approx(plain.current().std, rel=1e-6)  # type: ignore[union-attr]


def test_a_speaker_in_one_mood_keeps_their_centre() -> None:
    """Ten angry utterances: without offsets the baseline moves to the angry mean (so anger
    reads as neutral), with offsets it stays at the speaker's centre."""
    centre = np.array([1.0, 0.0, 2.0])
    angry = centre + np.array(OFFSETS[0])
    full = RAW | {"emotion_offsets": OFFSETS, "offset_scale": 1.0, "prior_weight": 0.0}
    with_offsets, plain = stream_of(full), stream_of(RAW | {"prior_weight": 0.0})
    for _ in range(10):
        with_offsets.update(angry, np.array([1.0, 0.0]))
        plain.update(angry, np.array([1.0, 0.0]))  # a card without offsets ignores them
    np.testing.assert_allclose(mean_of(with_offsets), centre, atol=1e-9)
    np.testing.assert_allclose(mean_of(plain), angry, atol=1e-9)


UNUSABLE = [None, np.array([1.0, 0.0, 0.0]), np.array([np.nan, 1.0])]


@pytest.mark.parametrize("probabilities", UNUSABLE)
def test_without_a_usable_distribution_the_update_is_plain(probabilities: Any) -> None:
    value = np.array([3.0, 5.0, -1.0])
    with_offsets, plain = stream_of(WITH_OFFSETS), stream_of(RAW)
    with_offsets.update(value, probabilities)
    plain.update(value)
    np.testing.assert_allclose(mean_of(with_offsets), mean_of(plain))


@pytest.mark.parametrize(
    "change",
    [{"emotion_offsets": [[1.0, 2.0]]}, {"emotion_offsets": [[1.0, float("inf"), 0.0]]},
     {"emotion_offsets": [1.0, 2.0, 3.0]}, {"offset_scale": 1.5}, {"offset_scale": -0.1}],
)  # fmt: skip
def test_invalid_offsets_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ModelError, match=r"emotion_offsets|offset_scale"):
        AdaptationCard.from_dict(WITH_OFFSETS | change, "test")


def test_offsets_need_one_row_per_label() -> None:
    card = {"id": "m", "labels": ["angry", "sad", "happy"], "adaptation": WITH_OFFSETS}
    with pytest.raises(ModelError, match="one row per label"):
        ModelCard.from_dict(card, "test")
    assert ModelCard.from_dict(card | {"labels": ["angry", "sad"]}, "test").adaptation is not None


def with_offsets(directory: Path, scale: float) -> Path:
    """The tiny adaptive model of test_evaluate with emotion offsets in its card."""
    build_adaptive_model(directory)
    card = json.loads((directory / "card.json").read_text())
    rows = len(card["labels"])
    offsets = [[0.02 * (i + 1), -0.03 * (i % 2)] for i in range(rows)]
    card["adaptation"] |= {"emotion_offsets": offsets, "offset_scale": scale}
    (directory / "card.json").write_text(json.dumps(card))
    return directory


def test_eval_replay_updates_with_the_recognised_distribution(tmp_path: Path) -> None:
    """`stream-ser eval`'s causal replay gives each update the clip's probabilities."""
    audios = [buzz(1.0), noise(1.0), buzz(1.0, level=0.3), noise(0.5), buzz(0.5, level=0.6)]
    clips = []
    for index, audio in enumerate(audios):
        path = tmp_path / f"clip{index}.wav"
        soundfile.write(path, audio, 16000)
        clips.append(Clip(path, "neutral", "speaker-a"))
    specialist = Specialist(with_offsets(tmp_path / "model", 1.0))
    card = specialist.card.adaptation
    assert card is not None
    expected, rows = StreamBaseline(card), []
    for clip in clips:
        probabilities, embeddings = specialist.analyze([load_audio(clip.path)], expected.current())
        assert embeddings is not None
        expected.update(embeddings[0], probabilities[0])
        rows.append(probabilities[0])
    outcomes = [outcome for _, outcome in recognize(specialist, clips, "stream")]
    np.testing.assert_allclose(np.vstack(outcomes), np.vstack(rows), rtol=1e-6)  # type: ignore[arg-type]
    plain = Specialist(build_adaptive_model(tmp_path / "plain"))
    different = [outcome for _, outcome in recognize(plain, clips, "stream")]
    assert not np.allclose(np.vstack(different)[2:], np.vstack(rows)[2:])  # type: ignore[arg-type]


def test_training_tool_offsets_are_label_means_from_each_speakers_centre() -> None:
    """tools/train/adapt_offsets.py: per label, the mean over speakers of the label's mean
    minus the mean of that speaker's label means (so a speaker's loudness cancels)."""
    pytest.importorskip("torch")
    from tools.train.adapt_offsets import emotion_offsets

    x = np.array([[1.0, 0.0], [3.0, 0.0], [3.0, 0.0], [11.0, 2.0], [13.0, 2.0]])
    y = np.array(["angry", "sad", "sad", "angry", "sad"])
    speakers = np.array(["a", "a", "a", "b", "b"])
    offsets = emotion_offsets(x, y, speakers, ["angry", "sad", "calm"])
    np.testing.assert_allclose(offsets, [[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
