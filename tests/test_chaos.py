"""`tools/bench/chaos.py` runs an attack end to end and reports it (smoke test of the script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_chaos_script_runs_one_attack_and_writes_its_row(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "chaos.json"
    done = subprocess.run(
        [sys.executable, "-m", "tools.bench.chaos", "--model", str(tiny_model),
         "--only", "truncated-file", "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )  # fmt: skip
    (row,) = json.loads(out.read_text())
    assert row["attack"] == "6 truncated-file"
    expected = int(row["expected"].split()[0])
    assert expected >= 20  # most of the 32 utterances lie before the cut
    assert row["exit_codes"] == [1] and row["tracebacks"] == 0
    assert row["ok"] is (int(row["delivered"].split()[0]) >= expected)
    assert done.returncode == (0 if row["ok"] else 1)
    assert "| 6 truncated-file |" in done.stdout  # the Markdown table
