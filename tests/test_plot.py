"""`stream-ser plot`: a timeline PNG from recorded results."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from stream_ser.cli import main
from stream_ser.plot import final_utterances, read_results
from tests.conftest import LABELS, run_cli
from tests.test_tail import result

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def session(path: Path) -> Path:
    """Two streams; one with arousal/valence; a window, a duplicate and a torn last line."""
    lines = []
    for i in range(1, 7):
        start = i * 3000
        affect = {"arousal": round(0.1 * i, 3), "valence": round(-0.1 * i, 3)}
        lines.append(result("room1", i, start, start + 2000, **affect))
        lines.append(result("room1", i, start, start + 1000, type="window"))
        lines.append(result("hall", i, start + 500, start + 1800))
    lines.append(lines[0])  # delivered twice (QoS 1)
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"type": "utter'
    path.write_text(text)
    return path


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_final_utterances_are_deduplicated_and_ordered(tmp_path: Path) -> None:
    utterances = final_utterances(read_results(session(tmp_path / "s.jsonl")))
    assert [(u.stream_id, u.start_s) for u in utterances][:2] == [("hall", 3.5), ("hall", 6.5)]
    room = [u for u in utterances if u.stream_id == "room1"]
    assert len(room) == 6  # the window and the duplicate are left out
    assert room[0].affect == pytest.approx((0.1, -0.1))
    assert room[0].top_label == LABELS[1]


@pytest.mark.slow
def test_plot_writes_a_png_of_sensible_size(tmp_path: Path) -> None:
    results = session(tmp_path / "session.jsonl")
    done = run_cli("plot", str(results), timeout_s=60)
    assert done.returncode == 0, done.stderr
    output = tmp_path / "session.png"
    assert done.stdout.strip() == str(output)
    assert "skipped 1 line" in done.stderr
    width, height = png_size(output)
    assert 800 <= width <= 4000 and 500 <= height <= 3000
    assert output.stat().st_size > 20_000  # bars, labels and legend, not an empty canvas


@pytest.mark.slow
def test_plot_one_stream_to_a_chosen_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = session(tmp_path / "session.jsonl")
    output = tmp_path / "out" / "hall.png"
    assert main(["plot", str(results), "--stream", "hall", "-o", str(output)]) == 0
    assert capsys.readouterr().out.strip() == str(output)
    _, height = png_size(output)
    assert main(["plot", str(results), "-o", str(tmp_path / "both.png")]) == 0
    _, both_height = png_size(tmp_path / "both.png")
    assert height < both_height  # one panel instead of three


def test_plot_reports_unknown_stream_and_empty_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = session(tmp_path / "session.jsonl")
    assert main(["plot", str(results), "--stream", "nope"]) == 2
    assert "streams in" in (err := capsys.readouterr().err) and "hall, room1" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps(result("room1", 1, 0, 1000, type="window")) + "\n")
    assert main(["plot", str(empty)]) == 1
    assert "no final utterance results" in capsys.readouterr().err
    assert not (tmp_path / "empty.png").exists()


@pytest.mark.slow
def test_plot_reads_results_piped_on_stdin(tmp_path: Path) -> None:
    results = session(tmp_path / "session.jsonl")
    assert main(["plot", str(results), "-o", str(tmp_path / "from-file.png")]) == 0
    output = tmp_path / "piped.png"
    done = run_cli("plot", "-", "-o", str(output), stdin=results.read_bytes(), timeout_s=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(output)
    assert png_size(output) == png_size(tmp_path / "from-file.png")  # the same panels
    refused = run_cli("plot", "-", stdin=results.read_bytes(), timeout_s=60)
    assert refused.returncode == 2
    assert "need -o PNG" in refused.stderr
