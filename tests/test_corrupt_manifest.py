"""tools/train/corrupt_manifest.py: degraded copies of a manifest's clips for `stream-ser eval`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.conftest import run_cli
from tests.signals import buzz, silence

pytest.importorskip("torch")

from tools.train import corrupt_manifest


@pytest.mark.slow
def test_noise_and_gain_at_the_asked_levels_with_every_column_kept(
    tmp_path: Path, tiny_model: Path
) -> None:
    clips = tmp_path / "corpus"
    (clips / "a").mkdir(parents=True)
    clean = np.concatenate([silence(0.3), buzz(1.5), silence(0.3)])
    rows = [{"path": f"a/{i}.wav", "label": label, "speaker": "a", "note": f"n{i}"}
            for i, label in enumerate(["happy", "sad"])]  # fmt: skip
    for row in rows:
        soundfile.write(clips / row["path"], clean, 16000)
    manifest = clips / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    out = tmp_path / "degraded"
    code = corrupt_manifest.main(
        [str(manifest), str(out), "--gain-db", "-6", "--noise-snr-db", "10"]
    )
    assert code == 0
    with (out / "manifest.csv").open(newline="") as handle:
        written = list(csv.DictReader(handle))
    assert [r["path"] for r in written] == ["a/0.flac", "a/1.flac"]
    assert [{k: v for k, v in r.items() if k != "path"} for r in written] == [
        {k: v for k, v in r.items() if k != "path"} for r in rows
    ]
    degraded, rate = soundfile.read(out / "a" / "0.flac", dtype="float64")
    assert rate == 16000 and len(degraded) == len(clean)
    quieter = clean * 10 ** (-6 / 20)
    snr_db = 10 * np.log10(np.mean(quieter**2) / np.mean((degraded - quieter) ** 2))
    assert snr_db == pytest.approx(10.0, abs=0.3)
    second, _ = soundfile.read(out / "a" / "1.flac", dtype="float64")
    assert not np.allclose(degraded, second)  # one seeded generator: each clip its own noise

    done = run_cli("eval", str(out / "manifest.csv"), "--model", str(tiny_model), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["n"] == 2 and report["failed"] == []


def test_nothing_asked_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as stopped:
        corrupt_manifest.main([str(tmp_path / "m.csv"), str(tmp_path / "out")])
    assert stopped.value.code == 2
