"""The two-speaker benchmark's clip sets and cache (tools/bench/speaker_cache.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_ser.evaluate import load_audio
from stream_ser.speakers import SpeakerEmbedder
from stream_ser.specialist import Specialist, bundled_model_dir, load_card
from tests.conftest import DATASETS
from tools.bench.speaker_cache import (
    TRAIN_CONFIG,
    ClipSet,
    StaleCache,
    build,
    cached_model,
    clip_sets,
    held_out_speakers,
    load,
    select,
)

BUNDLED_ID = load_card(bundled_model_dir()).model_id


def _needs(corpus: str) -> None:
    if not (DATASETS / corpus / "manifest.csv").is_file():
        pytest.skip(f"dataset not found: {DATASETS / corpus}")


def test_test_sets_hold_only_the_bundled_models_test_speakers() -> None:
    config = tomllib.loads(TRAIN_CONFIG.read_text(encoding="utf-8"))
    assert config["export"]["model_id"] == BUNDLED_ID
    listed = config["data"]["test_speakers"]
    sets = {s.name: s for s in clip_sets(held_out_speakers())}
    for corpus in ("ravdess", "emodb", "nemo", "ased", "korean"):
        _needs(corpus)
        found = {row["speaker"] for row in select(sets[f"test-{corpus}"])}
        assert found == set(listed[corpus]), corpus
    # nEMO and ASED were trained on every other speaker: none of them may be a test speaker
    assert {row["speaker"] for row in select(sets["test-nemo"])} == {"KS0", "MK0"}


def test_sets_carry_the_training_configs_label_corrections() -> None:
    _needs("korean")
    sets = {s.name: s for s in clip_sets(held_out_speakers())}
    labels = {row["path"]: row["label"] for row in select(sets["test-korean"])}
    # nek00203 reads "... I'm so depressed", nek00303 "is it that hard to turn the radio down?"
    assert (labels["audio/nek/nek00203.opus"], labels["audio/nek/nek00303.opus"]) == (
        "sad",
        "angry",
    )


def test_tune_sets_hold_no_test_speaker() -> None:
    test = held_out_speakers()
    for clip_set in clip_sets(test):
        if clip_set.name.startswith("tune-"):
            _needs(clip_set.corpus)
            found = {row["speaker"] for row in select(clip_set)}
            assert found and not found & set(test[clip_set.corpus]), clip_set.name


def test_test_speakers_of_another_models_config_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "other.toml"
    config.write_text('[export]\nmodel_id = "some-other-model"\n\n'
                      '[data.test_speakers]\nravdess = ["Actor_01"]\n')
    with pytest.raises(ValueError, match="some-other-model"):
        held_out_speakers(config)


def _write_cache(path: Path, **extra: Any) -> None:
    arrays: dict[str, Any] = {"paths": np.array(["a.flac"]), "speakers": np.array(["s"]),
              "labels": np.array(["sad"]), "speaker_embeddings": np.zeros((1, 256)),
              "model_embeddings": np.zeros((1, 4))}
    np.savez_compressed(path, **arrays, **extra)


def test_a_cache_of_another_model_is_not_read(tmp_path: Path) -> None:
    _write_cache(tmp_path / "old.npz")  # made before ids were stored (v1.1)
    _write_cache(tmp_path / "other.npz", model_id=np.array("some-other-model"))
    _write_cache(tmp_path / "ours.npz", model_id=np.array(BUNDLED_ID))
    with pytest.raises(StaleCache, match="before ids"):
        load("old", tmp_path)
    with pytest.raises(StaleCache, match="some-other-model"):
        load("other", tmp_path)
    assert load("ours", tmp_path).labels == ["sad"]


def test_a_stale_cache_is_rebuilt_with_the_bundled_model(tmp_path: Path) -> None:
    _needs("ravdess")
    clip_set = ClipSet("tiny", "ravdess", ("Actor_17",), per_speaker=2)
    target = tmp_path / "tiny.npz"
    _write_cache(target)
    specialist = Specialist(bundled_model_dir())
    assert build(clip_set, SpeakerEmbedder(), specialist, tmp_path) == target
    assert cached_model(target) == BUNDLED_ID
    cached = load("tiny", tmp_path)
    assert cached.speakers == ["Actor_17", "Actor_17"]
    assert cached.model_embeddings is not None
    rows = select(clip_set)
    assert cached.paths == [row["path"] for row in rows]
    _, embeddings = specialist.analyze([load_audio(DATASETS / "ravdess" / rows[0]["path"])])
    assert embeddings is not None
    np.testing.assert_allclose(cached.model_embeddings[0], embeddings[0], atol=1e-5)
