"""The papers' analyses as one `stream-ser eval` command, end to end on real clips: cue probes,
per-template UAR, vote metrics (also for the specialist alone) and the text-level baseline, with
the fake OpenAI-compatible server and the tiny local Qwen2-Audio."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_ser.alm import prompts
from tests.conftest import DATASETS, LABELS, run_cli
from tests.fakes import fake_openai_alm as fake

PROBES = "aligned,none,shuffled,corrupted,conflicting"
ROOT = str(DATASETS / "ravdess")


def write_manifest(path: Path, per_speaker: int, vote_labels: tuple[str, ...] | None) -> Path:
    """Real RAVDESS clips of two actors; votes (made up: they test the plumbing) for
    `vote_labels`, which may lack scored labels and hold unscored ones."""
    with (DATASETS / "ravdess" / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    rng = np.random.default_rng(0)
    votes = vote_labels or ()
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "speaker", *(f"votes_{label}" for label in votes)])
        for speaker in ("Actor_17", "Actor_18"):
            mine = [r for r in rows if r["speaker"] == speaker][:: 60 // per_speaker][:per_speaker]
            for row in mine:
                counts = [int(rng.integers(0, 3)) + 6 * (label == row["label"]) for label in votes]
                writer.writerow([row["path"], row["label"], speaker, *counts])
    return path


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    with fake.FakeOpenAIServer() as running:
        yield running


def eval_json(manifest: Path, *args: str) -> dict[str, Any]:
    done = run_cli("eval", str(manifest), "--root", ROOT, "--json", "--no-progress", *args,
                   timeout_s=400)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def check_probe_table(table: dict[str, Any]) -> None:
    assert list(table) == PROBES.split(",")
    none = table["none"]
    assert none["alm_uar_vs_none"] == 0.0 and none["neutral_share_vs_none"] == 0.0
    for row in table.values():
        assert 0.0 <= row["alm_uar"] <= 1.0 and 0.0 <= row["fused_uar"] <= 1.0
        assert 0.0 <= row["neutral_share"] <= 1.0 and 0.0 < row["neutral_mean_p"] < 1.0
        assert row["alm_uar_vs_none"] == pytest.approx(row["alm_uar"] - none["alm_uar"])
        assert row["neutral_mean_p_vs_none"] == pytest.approx(
            row["neutral_mean_p"] - none["neutral_mean_p"])


@pytest.mark.slow
def test_probe_table_and_templates_with_the_remote_alm(tmp_path: Path, server: Any) -> None:
    manifest = write_manifest(tmp_path / "m.csv", 6, LABELS)
    before = len(server.requests)
    result = eval_json(manifest, "--alm", f"openai:{server.url}", "--probes", PROBES)
    check_probe_table(result["probes"])
    asked = server.requests[before:]
    assert len(asked) == 12 * 3 * 5  # clips x templates x probes (its own mode "none" reused)
    texts = [r["messages"][1]["content"][-1]["text"] for r in asked]
    cued = [t for t in texts if "Acoustic cues" in t]
    assert len(cued) == 12 * 3 * 4
    # each speaker's first three clips are relative to the population, later ones to the speaker
    assert sum("this speaker's earlier speech" in t for t in cued) == 4 * 3 * (12 - 2 * 3)
    alm = result["sources"]["alm"]
    assert [t["template"] for t in alm["templates"]] == list(
        prompts.load_generative(None, "default").questions)
    assert all(t["n"] == 12 and 0.0 <= t["uar"] <= 1.0 for t in alm["templates"])
    assert len({t["uar"] for t in alm["templates"]} | {alm["uar"]}) > 1 or alm["uar"] == 0.0

    table = run_cli("eval", str(manifest), "--root", ROOT, "--no-progress", "--alm",
                    f"openai:{server.url}", "--probes", "conflicting,aligned")  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "== cue probes" in table.stdout and "template 3: UAR" in table.stdout
    lines = table.stdout.split("== cue probes")[1].splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["conflicting", "aligned", "none"]


@pytest.mark.slow
def test_probe_table_with_the_tiny_qwen2_audio(tmp_path: Path, tiny_qwen: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", 4, None)
    result = eval_json(manifest, "--alm", f"qwen2-audio:{tiny_qwen}", "--alm-prompt-set",
                       "single", "--alm-cpu-threads", "1", "--probes", PROBES)  # fmt: skip
    check_probe_table(result["probes"])
    rows = result["probes"]
    assert len({row["neutral_mean_p"] for row in rows.values()}) > 1  # the cues reach the model
    assert len(result["sources"]["alm"]["templates"]) == 1


def test_votes_for_the_specialist_alone_with_missing_and_unscored_columns(
    tmp_path: Path, tiny_model: Path
) -> None:
    votes = (*(label for label in LABELS if label != "sad"), "boredom")
    manifest = write_manifest(tmp_path / "m.csv", 12, votes)
    result = eval_json(manifest, "--model", str(tiny_model))
    figures = result["votes"]
    assert figures["missing_columns"] == ["sad"] and figures["n"] == 24
    assert 0.0 < figures["dropped_vote_mass"] < 0.3  # the boredom votes
    assert 0.0 <= figures["jsd"] <= 1.0 and 0.0 <= figures["bhattacharyya"] <= 1.0
    done = run_cli("eval", str(manifest), "--root", ROOT, "--model", str(tiny_model),
                   "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "votes: JSD" in done.stdout and "no votes column for sad" in done.stdout
    assert "counted as zero votes" in done.stderr


def test_text_level_baseline_in_eval(tmp_path: Path, server: Any) -> None:
    manifest = write_manifest(tmp_path / "m.csv", 4, None)
    result = eval_json(manifest, "--alm", f"openai:{server.url}", "--alm-scoring", "text")
    alm = result["sources"]["alm"]
    assert alm["n"] == 8 and alm["n_failed"] == 0
    (template,) = alm["templates"]
    assert template["template"].startswith("How likely is each emotion")


@pytest.mark.slow
def test_probes_need_a_generative_alm(tmp_path: Path, tiny_clap: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", 2, None)
    for extra in ((), ("--alm", f"clap:{tiny_clap}")):
        done = run_cli("eval", str(manifest), "--root", ROOT, "--probes", "aligned", *extra)
        assert done.returncode == 2, done.stderr
        assert "--probes" in done.stderr
