"""`stream-ser eval`: metrics on known cases, the command on real clips, causal adaptation."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from stream_ser.adaptation import StreamBaseline
from stream_ser.evaluate import (
    Clip,
    Failure,
    confusion_matrix,
    evaluate,
    expected_calibration_error,
    macro_f1,
    read_manifest,
    recognize,
    restrict,
    unweighted_average_recall,
)
from stream_ser.specialist import Specialist, bundled_model_dir
from tests.conftest import DATASETS, LABELS, build_tiny_model, run_cli
from tests.signals import buzz, noise

RAVDESS = DATASETS / "ravdess"
EMODB = DATASETS / "emodb"


def build_adaptive_model(directory: Path, labels: tuple[str, ...] = LABELS) -> Path:
    """Tiny adaptive model: embedding = (mean square, mean |x|), normalised, then linear."""
    from onnx import TensorProto, helper, save

    rng = np.random.default_rng(1)
    weight = rng.normal(0, 2, (2, len(labels))).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["waveform", "waveform"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["power"], axes=[1], keepdims=1),
        helper.make_node("Abs", ["waveform"], ["magnitude"]),
        helper.make_node("ReduceMean", ["magnitude"], ["level"], axes=[1], keepdims=1),
        helper.make_node("Concat", ["power", "level"], ["embedding"], axis=1),
        helper.make_node("Sub", ["embedding", "baseline_mean"], ["centred"]),
        helper.make_node("Div", ["centred", "baseline_std"], ["normalised"]),
        helper.make_node("MatMul", ["normalised", "weight"], ["logits"]),
    ]
    floats = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "tiny-adaptive",
        [
            helper.make_tensor_value_info("waveform", floats, ["batch", "samples"]),
            helper.make_tensor_value_info("baseline_mean", floats, [2]),
            helper.make_tensor_value_info("baseline_std", floats, [2]),
        ],
        [
            helper.make_tensor_value_info("logits", floats, ["batch", len(labels)]),
            helper.make_tensor_value_info("embedding", floats, ["batch", 2]),
        ],
        initializer=[helper.make_tensor("weight", floats, weight.shape, weight.ravel())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    directory.mkdir(parents=True, exist_ok=True)
    save(model, str(directory / "model.onnx"))
    card = {
        "id": "tiny-adaptive",
        "labels": list(labels),
        "min_input_ms": 100,
        "adaptation": {
            "warmup_utterances": 1,
            "prior_weight": 2.0,
            "population_mean": [0.01, 0.05],
            "population_std": [0.01, 0.05],
        },
    }
    (directory / "card.json").write_text(json.dumps(card))
    return directory


@pytest.fixture(scope="module")
def adaptive_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of the tiny adaptive model."""
    return build_adaptive_model(tmp_path_factory.mktemp("adaptive"))


def ravdess_rows(
    per_label: int = 1, actors: tuple[str, ...] = ("Actor_01", "Actor_02")
) -> list[dict[str, str]]:
    """A few RAVDESS manifest rows: `per_label` clips per label per actor."""
    manifest = RAVDESS / "manifest.csv"
    if not manifest.is_file():
        pytest.skip(f"dataset not found: {manifest}")
    with manifest.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["speaker"] in actors]
    picked: list[dict[str, str]] = []
    for actor in actors:
        for label in LABELS:
            picked += [r for r in rows if r["speaker"] == actor and r["label"] == label][:per_label]
    return picked


def probabilities(outcome: np.ndarray | Failure) -> np.ndarray:
    """A clip's probabilities; a failed clip fails the test with its reason."""
    assert isinstance(outcome, np.ndarray), outcome
    return outcome


def write_manifest(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...]) -> Path:
    """A manifest CSV with the given columns."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------- metrics


def test_metrics_on_a_known_confusion() -> None:
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 2, 2])
    matrix = confusion_matrix(y_true, y_pred, 3)
    assert matrix.tolist() == [[3, 1, 0], [1, 1, 0], [0, 0, 2]]
    assert unweighted_average_recall(matrix) == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    f1 = [2 * 3 / (4 + 4), 2 * 1 / (2 + 2), 1.0]
    assert macro_f1(matrix) == pytest.approx(np.mean(f1))


def test_uar_ignores_classes_without_examples_and_f1_counts_missed_ones() -> None:
    matrix = confusion_matrix(np.array([0, 0, 1]), np.array([0, 2, 2]), 3)
    assert unweighted_average_recall(matrix) == pytest.approx(0.25)
    assert macro_f1(matrix) == pytest.approx((2 / 3 + 0.0) / 2)


def test_ece_of_perfect_and_overconfident_predictions() -> None:
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([1, 1])) == 0.0
    confident = np.full(10, 0.9)
    half_right = np.array([1, 0] * 5)
    assert expected_calibration_error(confident, half_right) == pytest.approx(0.4)
    assert expected_calibration_error(np.array([0.7] * 4), np.array([1, 1, 0, 1])) == (
        pytest.approx(0.05)
    )


def test_restrict_renormalises_the_subset_in_order() -> None:
    probabilities = np.array([[0.5, 0.3, 0.2]])
    kept = restrict(probabilities, ("a", "b", "c"), ("a", "c"))
    np.testing.assert_allclose(kept, [[0.5 / 0.7, 0.2 / 0.7]])


# --------------------------------------------------------------------------- adaptation


def test_stream_baseline_is_population_during_warmup_then_shrinks(adaptive_model: Path) -> None:
    card = Specialist(adaptive_model).card.adaptation
    assert card is not None
    stream = StreamBaseline(card)
    assert stream.current() is None
    values = np.array([[0.03, 0.1], [0.05, 0.2]])
    for value in values:
        stream.update(value)
    baseline = stream.current()
    assert baseline is not None
    expected_mean = (2 * values.mean(axis=0) + 2 * np.array([0.01, 0.05])) / 4
    np.testing.assert_allclose(baseline.mean, expected_mean, rtol=1e-6)
    expected_var = (2 * values.var(axis=0) + 2 * np.array([0.01, 0.05]) ** 2) / 4
    np.testing.assert_allclose(baseline.std, np.sqrt(expected_var), rtol=1e-5)
    stream.update(np.array([np.nan, 1.0]))  # ignored
    assert stream.utterances == 2


def test_adaptive_model_uses_the_baseline_it_is_given(adaptive_model: Path) -> None:
    specialist = Specialist(adaptive_model)
    clip = buzz(1.0)
    plain, embedding = specialist.analyze([clip])
    assert embedding is not None and embedding.shape == (1, 2)
    population = specialist.card.adaptation.population  # type: ignore[union-attr]
    np.testing.assert_allclose(specialist.predict([clip], population), plain)
    shifted = type(population)(embedding[0], population.std)
    assert not np.allclose(specialist.predict([clip], shifted), plain)


def test_stream_replay_is_causal(adaptive_model: Path, tmp_path: Path) -> None:
    """A clip's result depends only on the same speaker's earlier clips."""
    clips = []
    audios = [buzz(1.0), noise(1.0), buzz(1.0, level=0.3), noise(0.5)]
    for index, (audio, label) in enumerate(zip(audios, LABELS, strict=False)):
        path = tmp_path / f"clip{index}.wav"
        soundfile.write(path, audio, 16000)
        clips.append(Clip(path, label, "speaker-a"))
    specialist = Specialist(adaptive_model)

    def replay(items: list[Clip], mode: str = "stream") -> np.ndarray:
        outcomes = recognize(specialist, items, mode)
        return np.vstack([probabilities(outcome) for _, outcome in outcomes])

    full = replay(clips)
    np.testing.assert_allclose(full[:2], replay(clips[:2]))  # the future changes nothing
    other = [clips[0], Clip(clips[3].path, clips[3].label, "speaker-b"), *clips[1:3]]
    np.testing.assert_allclose(replay(other)[[0, 2, 3]], full[:3])  # nor does another speaker
    plain = replay(clips, "none")
    np.testing.assert_allclose(plain[0], full[0])  # warm-up: the population's statistics
    assert not np.allclose(plain[1:], full[1:])
    assert evaluate(specialist, clips, progress=False).adaptation == "stream"


def test_window_model_runs_on_windows_only(tmp_path: Path, adaptive_model: Path) -> None:
    directory = tmp_path / "with-window"
    shutil.copytree(adaptive_model, directory)
    build_tiny_model(tmp_path / "window", seed=5)
    shutil.copy(tmp_path / "window" / "model.onnx", directory / "window.onnx")
    card = json.loads((directory / "card.json").read_text()) | {"window_model": "window.onnx"}
    (directory / "card.json").write_text(json.dumps(card))
    clips = [buzz(1.0), noise(1.0)]
    expected = Specialist(tmp_path / "window").predict(clips)
    specialist = Specialist(directory)
    np.testing.assert_allclose(specialist.predict_windows(clips), expected)
    np.testing.assert_allclose(specialist.predict(clips), Specialist(adaptive_model).predict(clips))
    np.testing.assert_allclose(
        Specialist(adaptive_model).predict_windows(clips), specialist.predict(clips)
    )


# --------------------------------------------------------------------------- the command


def test_eval_json_on_real_clips(tiny_model: Path, tmp_path: Path) -> None:
    rows = ravdess_rows()
    manifest = write_manifest(tmp_path / "m.csv", rows, ("path", "label", "speaker"))
    done = run_cli(
        "eval", str(manifest), "--root", str(RAVDESS), "--model", str(tiny_model), "--json"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["n"] == 16 and report["n_failed"] == 0
    assert report["adaptation"] == "none"  # the tiny model is not adaptive
    assert report["confusion"]["labels"] == list(LABELS)
    assert np.asarray(report["confusion"]["matrix"]).sum() == 16
    for key in ("uar", "wa", "macro_f1", "ece"):
        assert 0.0 <= report[key] <= 1.0
    assert set(report["per_class_recall"]) == set(LABELS)


@pytest.mark.slow
def test_eval_table_subset_unreadable_clip_and_plots(tiny_model: Path, tmp_path: Path) -> None:
    rows = [r for r in ravdess_rows() if r["label"] in ("happy", "sad", "angry", "neutral")]
    folder = tmp_path / "clips"
    folder.mkdir()
    for row in rows:
        (folder / row["path"].replace("/", "_")).symlink_to(RAVDESS / row["path"])
        row["path"] = row["path"].replace("/", "_")
    (folder / "broken.wav").write_bytes(b"RIFF not really")
    rows.append({"path": "broken.wav", "label": "sad"})
    manifest = write_manifest(folder / "four.csv", rows, ("path", "label"))
    plots = tmp_path / "plots"
    done = run_cli("eval", str(manifest), "--model", str(tiny_model), "--plots", str(plots))
    assert done.returncode == 0, done.stderr
    assert "UAR" in done.stdout and "failed: " in done.stdout and "broken.wav" in done.stderr
    assert "calm" not in done.stdout  # predictions restricted to the manifest's four labels
    assert (plots / "confusion.png").stat().st_size > 1000
    assert (plots / "reliability.png").stat().st_size > 1000
    clips = read_manifest(manifest)
    report = evaluate(Specialist(tiny_model), clips, progress=False)
    assert report.labels == ("neutral", "happy", "sad", "angry")
    assert report.to_dict()["n_failed"] == 1


@pytest.mark.slow
def test_eval_usage_errors(tiny_model: Path, tmp_path: Path) -> None:
    unknown = write_manifest(
        tmp_path / "boredom.csv", [{"path": "x.wav", "label": "boredom"}], ("path", "label")
    )
    done = run_cli("eval", str(unknown), "--model", str(tiny_model))
    assert done.returncode == 2 and "cannot produce" in done.stderr
    (tmp_path / "bad.csv").write_text("file,emotion\nx.wav,sad\n")
    done = run_cli("eval", str(tmp_path / "bad.csv"), "--model", str(tiny_model))
    assert done.returncode == 2 and "path,label" in done.stderr
    done = run_cli("eval", str(unknown), "--model", str(tiny_model), "--adapt", "stream")
    assert done.returncode == 2


@pytest.mark.slow
def test_eval_of_the_bundled_model_on_unseen_speakers() -> None:
    """The bundled model on a few clips of RAVDESS test speakers (never used in training)."""
    if not (bundled_model_dir() / "model.onnx").is_file():
        pytest.skip("no bundled model yet")
    rows = ravdess_rows(per_label=2, actors=("Actor_19",))
    clips = [Clip(RAVDESS / r["path"], r["label"], r["speaker"]) for r in rows]
    specialist = Specialist(bundled_model_dir())
    report = evaluate(specialist, clips, progress=False).to_dict()
    assert report["n"] == 16
    assert report["uar"] > 0.3  # well above chance (0.125) even on 16 clips
    if specialist.card.adaptation is not None:
        assert report["adaptation"] == "stream"
    windows = specialist.predict_windows([buzz(2.0), noise(2.0)])
    np.testing.assert_allclose(windows.sum(axis=1), 1.0, atol=1e-9)
