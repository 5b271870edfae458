"""`stream-ser eval` over several corpora and in manifest, shuffled and blocked order."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from stream_ser.errors import ConfigError
from stream_ser.eval_corpora import (
    corpus_name,
    evaluate_corpora,
    pooled,
    read_manifests,
    replay_order,
)
from stream_ser.evaluate import Clip, Failure, recognize
from stream_ser.specialist import Specialist
from tests.conftest import DATASETS, run_cli
from tests.test_evaluate import adaptive_model, ravdess_rows, write_manifest  # noqa: F401

RAVDESS = DATASETS / "ravdess"
COLUMNS = ("path", "label", "speaker")


def synthetic_clips() -> list[Clip]:
    """2 speakers x 3 labels x 3 clips, interleaved as a mixed-order manifest would be."""
    return [
        Clip(Path(f"{speaker}-{label}-{take}.wav"), label, speaker)
        for take in range(3)
        for label in ("sad", "happy", "angry")
        for speaker in ("a", "b")
    ]


def label_runs(clips: list[Clip], speaker: str) -> int:
    """How many runs of one label the speaker's clips form, in order."""
    labels = [clip.label for clip in clips if clip.speaker == speaker]
    return 1 + sum(1 for x, y in itertools.pairwise(labels) if x != y)


def test_blocked_order_replays_each_speaker_emotion_by_emotion() -> None:
    clips = synthetic_clips()
    assert label_runs(clips, "a") == 9  # mixed
    blocked = replay_order(clips, "blocked", seed=3)
    assert sorted(map(str, blocked)) == sorted(map(str, clips))  # the same clips
    assert label_runs(blocked, "a") == 3 and label_runs(blocked, "b") == 3
    assert [c.speaker for c in blocked] == ["a"] * 9 + ["b"] * 9
    assert replay_order(clips, "blocked", seed=3) == blocked  # seeded
    others = [replay_order(clips, "blocked", seed=s) for s in range(4, 10)]
    assert any(other != blocked for other in others)


def test_shuffled_and_manifest_order() -> None:
    clips = synthetic_clips()
    assert replay_order(clips, "manifest") == clips
    shuffled = replay_order(clips, "shuffled", seed=1)
    assert shuffled != clips and sorted(map(str, shuffled)) == sorted(map(str, clips))
    assert replay_order(clips, "shuffled", seed=1) == shuffled
    with pytest.raises(ConfigError):
        replay_order(clips, "sorted")


def test_manifests_name_their_corpus(tmp_path: Path) -> None:
    rows = [{"path": "x.wav", "label": "sad", "speaker": "01"}]
    (tmp_path / "emodb").mkdir()
    first = write_manifest(tmp_path / "emodb" / "manifest.csv", rows, COLUMNS)
    second = write_manifest(tmp_path / "ravdess-test.csv", rows, COLUMNS)
    tagged = [{**rows[0], "corpus": "nemo"}, {**rows[0], "corpus": "ased"}]
    third = write_manifest(tmp_path / "mixed.csv", tagged, (*COLUMNS, "corpus"))
    assert corpus_name(first) == "emodb" and corpus_name(second) == "ravdess-test"
    clips = read_manifests([first, second, third])
    assert [c.corpus for c in clips] == ["emodb", "ravdess-test", "nemo", "ased"]
    assert clips[0].path == tmp_path / "emodb" / "x.wav"
    assert read_manifests([second])[0].corpus is None  # one manifest: as before
    assert read_manifests([third])[1].corpus == "ased"  # unless it has a corpus column
    (tmp_path / "other").mkdir()
    again = write_manifest(tmp_path / "other" / "ravdess-test.csv", rows, COLUMNS)
    with pytest.raises(ConfigError, match="ravdess-test"):
        read_manifests([second, again])


def two_corpora(tmp_path: Path) -> list[Clip]:
    """RAVDESS actors 1-2 (8 labels) and actors 3-4 restricted to 4 labels, as two corpora
    whose speaker ids collide (both name theirs "s1", "s2")."""
    first = ravdess_rows(per_label=1, actors=("Actor_01", "Actor_02"))
    second = [
        r for r in ravdess_rows(per_label=1, actors=("Actor_03", "Actor_04"))
        if r["label"] in ("neutral", "happy", "sad", "angry")
    ]  # fmt: skip
    for rows in (first, second):
        for row in rows:
            row["speaker"] = "s1" if row["speaker"] in ("Actor_01", "Actor_03") else "s2"
    write_manifest(tmp_path / "eight.csv", first, COLUMNS)
    write_manifest(tmp_path / "four.csv", second, COLUMNS)
    return read_manifests([tmp_path / "eight.csv", tmp_path / "four.csv"], RAVDESS)


def probabilities(specialist: Specialist, clips: list[Clip], adaptation: str
                  ) -> dict[Clip, np.ndarray]:
    """`recognize` by clip; every clip of these tests is readable, so none is a `Failure`."""
    outcomes: dict[Clip, np.ndarray] = {}
    for clip, outcome in recognize(specialist, clips, adaptation):
        assert not isinstance(outcome, Failure), outcome
        outcomes[clip] = outcome
    return outcomes


def test_each_corpus_is_scored_on_its_own_labels_and_streams(
    adaptive_model: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    clips = two_corpora(tmp_path)
    specialist = Specialist(adaptive_model)
    reports = evaluate_corpora(specialist, clips, progress=False)
    assert list(reports) == ["eight", "four"]
    assert len(reports["eight"].labels) == 8 and reports["eight"].adaptation == "stream"
    assert reports["four"].labels == ("neutral", "happy", "sad", "angry")
    assert np.allclose(reports["four"].probabilities.sum(axis=1), 1.0)
    total = pooled(reports, specialist.labels)
    assert len(total.y_true) == 16 + 8 and len(total.labels) == 8
    four = [total.labels.index(label) for label in reports["four"].labels]
    np.testing.assert_allclose(total.probabilities[16:][:, four], reports["four"].probabilities)
    assert np.all(np.delete(total.probabilities[16:], four, axis=1) == 0)
    # speaker "s1" of corpus "four" is a new stream: its first clip uses the population
    replay = probabilities(specialist, clips, "stream")
    plain = probabilities(specialist, clips, "none")
    first_four = next(c for c in clips if c.corpus == "four" and c.speaker == "s1")
    np.testing.assert_allclose(replay[first_four], plain[first_four])
    assert not np.allclose(replay[clips[1]], plain[clips[1]])  # s1 of "eight", 2nd clip


def test_order_changes_only_adapted_results(adaptive_model: Path, tmp_path: Path) -> None:  # noqa: F811
    clips = two_corpora(tmp_path)
    specialist = Specialist(adaptive_model)
    blocked = replay_order(clips, "blocked", seed=2)
    for mode, same in (("none", True), ("stream", False)):
        mixed = probabilities(specialist, clips, mode)
        other = probabilities(specialist, blocked, mode)
        equal = [np.allclose(mixed[clip], other[clip]) for clip in clips]
        assert all(equal) if same else not all(equal)


def test_eval_command_reports_per_corpus_and_overall(
    adaptive_model: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    two_corpora(tmp_path)
    manifests = [str(tmp_path / "eight.csv"), str(tmp_path / "four.csv")]
    common = ["--root", str(RAVDESS), "--model", str(adaptive_model), "--order", "blocked"]
    done = run_cli("eval", *manifests, *common, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["order"] == "blocked" and report["n"] == 24
    assert set(report["corpora"]) == {"eight", "four"}
    assert report["corpora"]["four"]["n"] == 8
    assert report["corpora"]["four"]["confusion"]["labels"] == ["neutral", "happy", "sad", "angry"]
    mean = np.mean([report["corpora"][c]["uar"] for c in ("eight", "four")])
    assert report["corpus_mean"]["uar"] == pytest.approx(mean)
    text = run_cli("eval", *manifests, *common, "--seed", "5")
    assert text.returncode == 0, text.stderr
    assert "eight" in text.stdout and "four" in text.stdout and "mean" in text.stdout
    single = run_cli("eval", manifests[0], *common[:4], "--json")
    assert "corpora" not in json.loads(single.stdout)  # one manifest: the plain report
