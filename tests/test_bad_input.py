"""Bad input: a clear one-line message, the right exit code, no traceback, no hang."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.conftest import LABELS, REPO, run_cli
from tests.schema import check_result, parse_lines, utterances
from tests.signals import buzz, silence


def assert_clean_failure(done, code: int, text: str) -> None:  # type: ignore[no-untyped-def]
    assert done.returncode == code, done.stderr
    assert text in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


@pytest.mark.slow
def test_missing_file(tiny_model: Path, tmp_path: Path) -> None:
    done = run_cli("run", "--input", str(tmp_path / "nope.wav"), "--model", str(tiny_model))
    assert_clean_failure(done, 1, "nope.wav: no such file")


@pytest.mark.slow
def test_unsupported_format(tiny_model: Path, tmp_path: Path) -> None:
    fake = tmp_path / "notes.wav"
    fake.write_text("this is not audio at all\n" * 20)
    done = run_cli("run", "--input", str(fake), "--model", str(tiny_model))
    assert_clean_failure(done, 1, "notes.wav: cannot decode audio")


@pytest.mark.slow
def test_truncated_file_keeps_what_was_readable(tiny_model: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole.wav"
    soundfile.write(whole, np.concatenate([silence(0.5), buzz(1.5), silence(1.0), buzz(3)]), 16000)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[: 44 + 2 * 16000 * 4])  # header + 4 s of 6 s
    done = run_cli("run", "--input", str(cut), "--model", str(tiny_model))
    assert done.returncode == 0, done.stderr
    finals = utterances(parse_lines(done.stdout))
    assert len(finals) == 2  # the second burst is cut off but still recognised
    assert finals[-1]["end_reason"] == "stream_end"


@pytest.mark.slow
def test_empty_and_all_zero_audio(tiny_model: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, dtype=np.float32), 16000)
    done = run_cli("run", "--input", str(empty), "--model", str(tiny_model))
    assert done.returncode == 0
    assert done.stdout == ""
    assert "holds no audio" in done.stderr
    zeros = tmp_path / "zeros.flac"
    soundfile.write(zeros, silence(3), 16000)
    done = run_cli("run", "--input", str(zeros), "--model", str(tiny_model))
    assert done.returncode == 0
    assert done.stdout == ""


@pytest.mark.slow
def test_directory_instead_of_file(tiny_model: Path, tmp_path: Path) -> None:
    done = run_cli("run", "--input", str(tmp_path), "--model", str(tiny_model))
    assert_clean_failure(done, 1, "is a directory")


@pytest.mark.slow
def test_stdin_with_wrong_channel_count_warns(tiny_model: Path) -> None:
    pcm = (np.concatenate([silence(0.5), buzz(1.5), silence(1)]) * 32767).astype("<i2")
    odd = pcm.tobytes() + b"\x01\x02"  # 2 stray bytes: not a whole stereo frame
    done = run_cli("run", "--input", "-", "--channels", "2", "--model", str(tiny_model), stdin=odd)
    assert done.returncode == 0
    assert "stray bytes" in done.stderr and "check --channels" in done.stderr


@pytest.mark.slow
def test_nan_and_clipped_samples_are_sanitised(tiny_model: Path, tmp_path: Path) -> None:
    audio = np.concatenate([silence(0.5), buzz(1.5, level=0.9) * 3, silence(1)])
    audio[20000:20100] = np.nan
    audio[21000:21010] = np.inf
    path = tmp_path / "nan.wav"
    soundfile.write(path, audio, 16000, subtype="FLOAT")
    done = run_cli("run", "--input", str(path), "--model", str(tiny_model))
    assert done.returncode == 0, done.stderr
    (final,) = utterances(parse_lines(done.stdout))
    check_result(final, LABELS)


@pytest.mark.slow
def test_wrong_model_directory(tmp_path: Path) -> None:
    done = run_cli("run", "--input", "x.wav", "--model", str(tmp_path / "none"))
    assert_clean_failure(done, 2, "no such model directory")
    done = run_cli("run", "--input", "x.wav", "--model", str(tmp_path))
    assert_clean_failure(done, 1, "no model card")


@pytest.mark.slow
def test_a_closed_stdout_ends_the_run_with_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    """`stream-ser run | head -1`: once the reader has gone, one line on stderr, exit 1."""
    path = tmp_path / "long.wav"
    soundfile.write(path, np.concatenate([silence(0.5), buzz(8), silence(0.5)]), 16000)
    with subprocess.Popen(
        [sys.executable, "-m", "stream_ser", "run", "--input", str(path), "--realtime",
         "--speed", "2", "--model", str(tiny_model)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as process:  # fmt: skip
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.readline()  # a window result, with more to come
        process.stdout.close()
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=60) == 1, stderr
    check_result(json.loads(first), LABELS)
    assert "stream-ser: error: stdout was closed" in stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr


def test_a_closed_stdin_is_a_clear_error(tiny_model: Path) -> None:
    """`stream-ser run --input - <&-`: no standard input at all."""
    done = subprocess.run(
        ["sh", "-c", 'exec "$0" -m stream_ser run --input - --model "$1" <&-', sys.executable,
         str(tiny_model)],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert_clean_failure(done, 1, "--input -: standard input is closed")


@pytest.mark.slow
def test_a_damaged_flac_publishes_everything_before_the_damage(
    tiny_model: Path, tmp_path: Path, ravdess_clips: list[Path]
) -> None:
    """A FLAC cut at 90 %: every utterance before the damage gets its final result (as from
    the whole file), then the error is reported (exit 1)."""
    pieces = []
    for index in range(16):
        audio, _ = soundfile.read(ravdess_clips[index % len(ravdess_clips)], dtype="float32")
        pieces += [audio, silence(1)]
    whole = tmp_path / "whole.flac"
    soundfile.write(whole, np.concatenate(pieces), 16000)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 9 // 10])
    expected = utterances(parse_lines(run_cli("run", "--input", str(whole), "--model",
                                              str(tiny_model)).stdout))  # fmt: skip
    done = run_cli("run", "--input", str(cut), "--model", str(tiny_model))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("stream-ser: error: ") and "decoding failed after" in last
    duration_ms = sum(len(piece) for piece in pieces) / 16
    before = [(m["utterance_id"], m["start_ms"], m["end_ms"]) for m in expected
              if m["end_ms"] < 0.8 * duration_ms]  # well within the first 90 % of the bytes
    assert len(before) >= 12
    got = [(m["utterance_id"], m["start_ms"], m["end_ms"]) for m in utterances(
        parse_lines(done.stdout))]  # fmt: skip
    assert got[: len(before)] == before
