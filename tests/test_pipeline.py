"""The whole pipeline through the CLI on real speech and synthetic signals (JSON Lines out)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from stream_ser.events import AudioChunk, SpeechAudio, UtteranceStart
from stream_ser.pipeline import Windower, until_stopped
from tests.conftest import LABELS, SAMPLE, run_cli
from tests.schema import check_result, parse_lines, utterances
from tests.signals import buzz, silence


@pytest.mark.slow
def test_real_speech_file_gives_one_result_per_utterance(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clip_count = speech_with_pauses
    done = run_cli("run", "--input", str(path), "--model", str(tiny_model))
    assert done.returncode == 0, done.stderr
    messages = parse_lines(done.stdout)
    for message in messages:
        check_result(message, LABELS)
    finals = utterances(messages)
    assert [m["utterance_id"] for m in finals] == list(range(1, clip_count + 1))
    assert all(m["stream_id"] == "three-utterances" for m in messages)
    assert all(m["model_id"] == "tiny-test-model" for m in messages)
    assert len({m["id"] for m in messages}) == len(messages)
    ends = [m["end_ms"] for m in finals]
    assert ends == sorted(ends)
    windows = [m for m in messages if m["type"] == "window"]
    assert windows, "speech longer than a window gives window results"
    for window in windows:
        assert window["end_ms"] - window["start_ms"] == 1000  # the card's window_ms


@pytest.mark.slow
def test_utterance_times_match_the_clip_boundaries(
    tiny_model: Path, ravdess_clips: list[Path]
) -> None:
    """Speech placed at known times in silence is found there."""
    clip, _ = soundfile.read(ravdess_clips[0], dtype="float32")
    audio = np.concatenate([silence(2), clip, silence(2)])
    done = run_cli(
        "run",
        "--input",
        "-",
        "--model",
        str(tiny_model),
        "--no-model-windows",
        stdin=(audio * 32767).astype("<i2").tobytes(),
    )
    assert done.returncode == 0, done.stderr
    (final,) = utterances(parse_lines(done.stdout))
    clip_end_ms = 2000 + len(clip) * 1000 // 16000
    assert 2000 - 400 <= final["start_ms"] <= clip_end_ms
    assert final["end_ms"] <= clip_end_ms + 300


@pytest.mark.slow
def test_bundled_sample_runs_with_the_default_model() -> None:
    done = run_cli("run", "--input", str(SAMPLE))
    assert done.returncode == 0, done.stderr
    finals = utterances(parse_lines(done.stdout))
    assert len(finals) == 3  # three passages separated by pauses
    for message in finals:
        check_result(message)


@pytest.mark.slow
def test_stdin_at_another_rate_and_channel_count(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clip_count = speech_with_pauses
    audio, _ = soundfile.read(path, dtype="float32")
    resampled = soxr.resample(audio, 16000, 44100)
    stereo = np.stack([resampled, resampled * 0.5], axis=1)
    pcm = (stereo * 32767).astype("<i2").tobytes()
    done = run_cli(
        "run",
        "--input",
        "-",
        "--rate",
        "44100",
        "--channels",
        "2",
        "--model",
        str(tiny_model),
        stdin=pcm,
    )
    assert done.returncode == 0, done.stderr
    finals = utterances(parse_lines(done.stdout))
    assert len(finals) == clip_count
    assert all(m["stream_id"] == "stdin" for m in finals)


@pytest.mark.slow
def test_synthetic_signals(tmp_path: Path, tiny_model: Path) -> None:
    cases = {
        "silence": (silence(4), 0),
        "buzz-twice": (
            np.concatenate([silence(1), buzz(1.5), silence(1.5), buzz(1), silence(1)]),
            2,
        ),
    }
    for name, (audio, expected) in cases.items():
        path = tmp_path / f"{name}.flac"
        soundfile.write(path, audio, 16000)
        done = run_cli("run", "--input", str(path), "--model", str(tiny_model))
        assert done.returncode == 0, done.stderr
        messages = parse_lines(done.stdout)
        assert len(utterances(messages)) == expected, name
        for message in messages:
            check_result(message, LABELS)


def test_windower_emits_a_window_every_hop() -> None:
    windower = Windower(window_ms=1000, hop_ms=250)
    windower.start(UtteranceStart(1, start_ms=500))
    audio = buzz(2.0)
    jobs = []
    for offset in range(0, len(audio), 480):  # 30 ms pieces
        jobs += windower.add(SpeechAudio(1, audio[offset : offset + 480], 500 + offset // 16))
    assert [(j.start_ms, j.end_ms) for j in jobs] == [
        (500 + s, 1500 + s) for s in range(0, 1001, 250)
    ]
    np.testing.assert_array_equal(jobs[-1].samples, audio[16000:32000])


@pytest.mark.slow
def test_several_sources_in_one_process(
    tmp_path: Path, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clip_count = speech_with_pauses
    copy = tmp_path / "three-utterances-copy.wav"
    copy.write_bytes(path.read_bytes())
    done = run_cli("run", "--input", str(path), "--input", str(copy), "--input", str(copy),
                   "--model", str(tiny_model))  # fmt: skip
    assert done.returncode == 0, done.stderr
    finals = utterances(parse_lines(done.stdout))
    by_stream: dict[str, list[int]] = {}
    for message in finals:
        check_result(message, LABELS)
        by_stream.setdefault(message["stream_id"], []).append(message["utterance_id"])
    expected = list(range(1, clip_count + 1))
    assert by_stream == {
        "three-utterances": expected,
        "three-utterances-copy": expected,
        "three-utterances-copy-2": expected,  # the same name twice: made unique
    }
    # the same audio gives the same distributions, whichever stream it came in on
    first = [m["distribution"] for m in finals if m["stream_id"] == "three-utterances"]
    second = [m["distribution"] for m in finals if m["stream_id"] == "three-utterances-copy"]
    assert first == second


def test_stream_id_with_several_sources_is_refused(tiny_model: Path) -> None:
    done = run_cli("run", "--input", "a.wav", "--input", "b.wav", "--stream-id", "x",
                   "--model", str(tiny_model))  # fmt: skip
    assert done.returncode == 2
    assert "--stream-id names one stream" in done.stderr


async def test_stop_ends_a_source_whose_chunks_are_always_ready() -> None:
    """A file read as fast as possible never makes the reader wait: stop still ends it."""
    stop = asyncio.Event()

    async def endless() -> AsyncIterator[AudioChunk]:
        start_ms = 0
        while True:
            yield AudioChunk(np.zeros(160, dtype=np.float32), start_ms)
            start_ms += 10

    seen = 0
    async with asyncio.timeout(10):
        async for _ in until_stopped(endless(), stop):
            seen += 1
            if seen == 5:
                stop.set()
    assert seen == 5
