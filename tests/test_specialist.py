"""The ONNX specialist wrapper with real onnxruntime sessions on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_ser.errors import ModelError
from stream_ser.specialist import Specialist, bundled_model_dir, load_card
from tests.conftest import LABELS, build_tiny_model
from tests.signals import buzz, noise


def test_predict_gives_one_distribution_per_clip(tiny_model: Path) -> None:
    specialist = Specialist(tiny_model)
    probabilities = specialist.predict([buzz(1.0), noise(0.5), buzz(2.0, level=0.3)])
    assert probabilities.shape == (3, len(LABELS))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    assert (probabilities >= 0).all()
    assert not np.allclose(probabilities[0], probabilities[2])  # the input matters


def test_batched_equals_one_by_one(tiny_model: Path) -> None:
    specialist = Specialist(tiny_model)
    clips = [buzz(1.0), noise(1.0), buzz(0.5, level=0.2), noise(1.0, seed=3)]
    together = specialist.predict(clips)
    alone = np.vstack([specialist.predict([clip]) for clip in clips])
    np.testing.assert_allclose(together, alone, atol=1e-6)


def test_short_input_is_padded_to_the_minimum(tiny_model: Path) -> None:
    specialist = Specialist(tiny_model)
    clip = buzz(0.02)
    padded = np.pad(clip, (0, 1600 - len(clip)))  # min_input_ms = 100
    np.testing.assert_allclose(specialist.predict([clip]), specialist.predict([padded]))


def test_reports_the_active_provider(tiny_model: Path) -> None:
    specialist = Specialist(tiny_model, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert specialist.providers == ("CPUExecutionProvider",)


def test_toml_card_is_accepted(tmp_path: Path, tiny_model: Path) -> None:
    directory = tmp_path / "toml-model"
    shutil.copytree(tiny_model, directory)
    card = json.loads((directory / "card.json").read_text())
    (directory / "card.json").unlink()
    labels = ", ".join(f'"{label}"' for label in card["labels"])
    (directory / "card.toml").write_text(
        f'format = "stream-ser-model/1"\nid = "toml-model"\nlabels = [{labels}]\n'
        'window_ms = 1500\nhop_ms = 250\n[input]\nname = "waveform"\n'
    )
    loaded = load_card(directory)
    assert loaded.model_id == "toml-model"
    assert (loaded.window_ms, loaded.hop_ms) == (1500, 250)
    assert Specialist(directory).predict([buzz(0.5)]).shape == (1, len(LABELS))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": ["only-one"]}, "labels must be"),
        ({"sample_rate": 8000}, "sample_rate must be 16000"),
        ({"hop_ms": 5000}, "hop_ms <= window_ms"),
        ({"output": {"name": "logits", "kind": "scores"}}, "output.kind"),
        ({"input": {"name": "audio"}}, "no input 'audio'"),
        ({"labels": ["a", "b", "c"]}, "gives 8 outputs but the card lists 3"),
    ],
)
def test_bad_cards_are_clear_errors(
    tmp_path: Path, tiny_model: Path, change: dict[str, Any], message: str
) -> None:
    directory = tmp_path / "bad"
    shutil.copytree(tiny_model, directory)
    card = json.loads((directory / "card.json").read_text()) | change
    (directory / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match=message):
        Specialist(directory)


def test_missing_card_and_model_are_clear_errors(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(ModelError, match="no model card"):
        Specialist(tmp_path)
    directory = build_tiny_model(tmp_path / "no-onnx")
    (directory / "model.onnx").unlink()
    with pytest.raises(ModelError, match="model file not found"):
        Specialist(directory)
    (directory / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match="cannot load ONNX model"):
        Specialist(directory)


def test_bundled_model_loads_with_the_required_labels() -> None:
    directory = bundled_model_dir()
    if not (directory / "model.onnx").is_file():
        pytest.fail(f"the bundled model is missing: {directory}")
    specialist = Specialist(directory)
    required = {"neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprise"}
    assert required <= set(specialist.labels)
    probabilities = specialist.predict([buzz(2.0), buzz(0.3)])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
