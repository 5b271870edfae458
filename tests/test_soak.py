"""A short soak in CI: 3 minutes of real speech at 40x through the CLI to mosquitto.

tools/bench/soak.py streams the audio, samples the process's resident memory and checks delivery;
the full one-hour run and its figures are in docs/reliability.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATASETS, REPO

# Memory after the warm-up (first utterance result) may rise this much at most. Over this run
# it rises ~1 MB (allocator noise, ±4 MB at shutdown); keeping every utterance's audio would
# add ~10 MB (3 min of 16 kHz float32) plus its window copies, so 8 MB catches such a leak.
MAX_GROWTH_MB = 8.0


@pytest.mark.slow
def test_short_soak_delivers_every_utterance_once_with_flat_memory(tiny_model: Path) -> None:
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto)")
    if not (DATASETS / "ravdess" / "audio").is_dir():
        pytest.skip("RAVDESS not found under ../shared/datasets")
    done = subprocess.run(
        [sys.executable, "-m", "tools.bench.soak", "--hours", "0.05", "--speed", "40",
         "--model", str(tiny_model), "--sample-s", "0.25", "--max-growth-mb", str(MAX_GROWTH_MB),
         "--json"],
        capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert done.returncode == 0, (report["checks"], done.stderr[-2000:])
    assert report["audio_hours"] >= 0.05
    assert report["utterances_reported"] >= 25  # ~3.5 s clips with 0.5-3 s pauses
    assert report["utterances_received"] == report["utterances_reported"]
    assert report["in_order"]
    assert report["rss_growth_mb"] <= MAX_GROWTH_MB
    assert len(report["samples"]) >= 10  # memory was really sampled during the run
