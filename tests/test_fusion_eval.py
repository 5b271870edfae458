"""`eval` with several sources and vote metrics, and `calibrate`, on real clips."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from stream_ser.ambiguity import vote_metrics
from stream_ser.fusion import load_fusion
from tests.conftest import DATASETS, LABELS, run_cli
from tests.fakes import fake_openai_alm as fake


def test_vote_metrics_known_answers() -> None:
    same = vote_metrics(np.array([[3.0, 1.0]]), np.array([[0.75, 0.25]]))
    assert same["jsd"] == pytest.approx(0.0, abs=1e-9)
    assert same["kl"] == pytest.approx(0.0, abs=1e-9)
    assert same["bhattacharyya"] == pytest.approx(1.0)
    disjoint = vote_metrics(np.array([[5.0, 0.0]]), np.array([[0.0, 1.0]]))
    assert disjoint["jsd"] == pytest.approx(1.0, abs=1e-4)
    assert disjoint["bhattacharyya"] == pytest.approx(0.0, abs=2e-3)
    half = vote_metrics(np.array([[1.0, 1.0]]), np.array([[1.0, 0.0]]))
    expected_kl = 0.5 * math.log(0.5 / 1.0) + 0.5 * math.log(0.5 / 1e-6)  # p floored at 1e-6
    assert half["kl"] == pytest.approx(expected_kl, rel=1e-3)
    assert half["bhattacharyya"] == pytest.approx(math.sqrt(0.5), abs=1e-3)


def write_manifest(path: Path, speakers: tuple[str, ...], per_speaker: int) -> Path:
    """Real RAVDESS clips with made-up vote columns (the votes only test the plumbing)."""
    with (DATASETS / "ravdess" / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    rng = np.random.default_rng(0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "speaker", *(f"votes_{label}" for label in LABELS)])
        for speaker in speakers:
            mine = [r for r in rows if r["speaker"] == speaker][:: 60 // per_speaker][:per_speaker]
            for row in mine:
                votes = rng.integers(0, 3, len(LABELS))
                votes[LABELS.index(row["label"])] += 6
                writer.writerow([f"audio/{row['path'][len('audio/'):]}", row["label"],
                                 speaker, *votes])  # fmt: skip
    return path


@pytest.fixture(scope="module")
def alm_url() -> Iterator[str]:
    with fake.FakeOpenAIServer() as server:
        yield server.url


@pytest.mark.slow
def test_calibrate_then_eval_every_source(tmp_path: Path, alm_url: str) -> None:
    root = str(DATASETS / "ravdess")
    dev = write_manifest(tmp_path / "dev.csv", ("Actor_13", "Actor_14"), 12)
    test = write_manifest(tmp_path / "test.csv", ("Actor_17",), 12)
    fusion = tmp_path / "fusion.toml"
    done = run_cli("calibrate", str(dev), "--root", root, "-o", str(fusion),
                   "--alm", f"openai:{alm_url}", "--fusion-rule", "mean")  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = load_fusion(fusion, LABELS)
    assert set(config.sources) == {"specialist", "alm"}
    assert config.rule == "mean"
    assert math.isclose(sum(s.weight for s in config.sources.values()), 1.0)
    # the fake ALM's scores ignore the emotion: calibration must not trust it more
    assert config.source("specialist").weight >= config.source("alm").weight

    done = run_cli("eval", str(test), "--root", root, "--json", "--alm", f"openai:{alm_url}",
                   "--fusion", str(fusion))  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result["sources"]) == {"specialist", "alm"}
    for figures in (result, *result["sources"].values()):
        assert figures["n"] == 12
        assert 0.0 <= figures["uar"] <= 1.0 and 0.0 <= figures["ece"] <= 1.0
        assert figures["confusion"]["labels"] == [
            label for label in LABELS if label in figures["per_class_recall"]
        ]
        votes = figures["votes"]
        assert votes["n"] == 12
        assert 0.0 <= votes["jsd"] <= 1.0 and 0.0 <= votes["bhattacharyya"] <= 1.0
    assert result["fusion"]["rule"] == "mean"

    table = run_cli("eval", str(test), "--root", root, "--alm", f"openai:{alm_url}",
                    "--fusion", str(fusion))  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "== specialist ==" in table.stdout and "== fused ==" in table.stdout
    assert "votes: JSD" in table.stdout


@pytest.mark.slow
def test_label_outside_the_fusion_labels_is_a_clear_error(tmp_path: Path, alm_url: str) -> None:
    manifest = write_manifest(tmp_path / "m.csv", ("Actor_17",), 12)
    fusion = tmp_path / "fusion.toml"
    fusion.write_text('labels = ["neutral", "happy"]\n[sources.specialist.mapping]\n'
                      'calm = ""\nsad = ""\nangry = ""\nfearful = ""\ndisgust = ""\n'
                      'surprise = ""\n')  # fmt: skip
    done = run_cli("eval", str(manifest), "--root", str(DATASETS / "ravdess"), "--fusion",
                   str(fusion))  # fmt: skip
    assert done.returncode == 2
    assert "cannot produce" in done.stderr and "Traceback" not in done.stderr
