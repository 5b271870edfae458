"""Fuzzing the input side: any file bytes, any PCM on stdin, any float samples.

The contract: a clean end or an AudioInputError (the CLI: exit 0, or exit 1 with one
`stream-ser: error:` line), never another exception, a traceback or a hang. Most examples
run in-process through the real sources, converter and segmenter; a few go through the CLI.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stream_ser.errors import AudioInputError
from stream_ser.events import AudioChunk, UtteranceEnd
from stream_ser.settings import SourceSettings, VadSettings
from stream_ser.source import Converter, SourceStats, open_source
from stream_ser.vad import Segmenter
from tests.conftest import REPO
from tests.signals import buzz, silence

FUZZ = settings(
    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def _encoded(audio: np.ndarray, rate: int, **options: Any) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, audio, rate, **options)
    return out.getvalue()


SPEECH = np.concatenate([silence(0.2), buzz(0.8), silence(0.3)])
STEREO = np.stack([SPEECH, SPEECH[::-1]], axis=1)
VALID_FILES = [
    _encoded(SPEECH, 16000, format="WAV", subtype="PCM_16"),
    _encoded(SPEECH, 16000, format="WAV", subtype="FLOAT"),
    _encoded(STEREO, 44100, format="WAV", subtype="PCM_24"),
    _encoded(SPEECH, 16000, format="FLAC"),
    _encoded(SPEECH[:8000], 16000, format="OGG", subtype="VORBIS"),
]


@st.composite
def file_bytes(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, or a valid file truncated, with bytes overwritten, or both."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=2048))
    data = bytearray(draw(st.sampled_from(VALID_FILES)))
    for _ in range(draw(st.integers(0, 8))):  # corrupt: headers first (most sensitive)
        at = draw(st.integers(0, min(len(data) - 1, draw(st.sampled_from([64, len(data)])))))
        data[at : at + 4] = draw(st.binary(min_size=1, max_size=4))
    end = draw(st.sampled_from([len(data), draw(st.integers(0, len(data)))]))
    return bytes(data[:end])


async def _drain(source: AsyncIterator[AudioChunk], vad: Segmenter) -> list[object]:
    events: list[object] = []
    async with asyncio.timeout(30):
        async for chunk in source:
            assert chunk.samples.dtype == np.float32
            assert np.isfinite(chunk.samples).all()
            assert np.abs(chunk.samples).max(initial=0.0) <= 1.0
            events += vad.process(chunk)
    return events + vad.flush()


def _run_source(settings: SourceSettings) -> tuple[list[object], SourceStats]:
    """Open and drain a source through the segmenter; AudioInputError passes through."""
    stats = SourceStats()

    async def go() -> list[object]:
        return await _drain(open_source(settings, stats), Segmenter(VadSettings()))

    return asyncio.run(go()), stats


@settings(FUZZ, max_examples=300)
@given(data=file_bytes(), chunk_ms=st.sampled_from([10, 100, 1000]))
@pytest.mark.slow
def test_any_file_bytes_decode_or_fail_cleanly(data: bytes, chunk_ms: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.wav"
        path.write_bytes(data)
        try:
            events, _ = _run_source(SourceSettings(input=str(path), chunk_ms=chunk_ms))
        except AudioInputError as err:
            assert str(err).startswith(str(path))  # names the file, one line
            assert "\n" not in str(err)
            return
    for event in events:
        if isinstance(event, UtteranceEnd):
            assert 0 <= event.start_ms < event.end_ms


class _Stdin:
    """Stands in for sys.stdin: `buffer.fileno()` is the read end of a pipe."""

    def __init__(self, fd: int) -> None:
        self.buffer = self
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


def _feed_stdin(data: bytes, monkeypatch: pytest.MonkeyPatch) -> int:
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, True)
    monkeypatch.setattr(sys, "stdin", _Stdin(read_end))

    def writer() -> None:
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(data)

    import threading

    threading.Thread(target=writer, daemon=True).start()
    return read_end


@settings(FUZZ, max_examples=60)
@given(
    data=st.binary(max_size=8192),
    rate=st.one_of(st.sampled_from([8000, 11025, 16000, 44100, 48000]), st.integers(8000, 384000)),
    channels=st.integers(1, 8),
    chunk_ms=st.integers(10, 1000),
)
def test_any_pcm_on_stdin_is_consumed(
    data: bytes, rate: int, channels: int, chunk_ms: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_end = _feed_stdin(data, monkeypatch)
    try:
        settings_ = SourceSettings(input="-", rate=rate, channels=channels, chunk_ms=chunk_ms)
        _, stats = _run_source(settings_)
    finally:
        os.close(read_end)
    assert stats.bad_samples == 0  # 16-bit PCM has no NaN


finite_or_not = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -1e30, 3.0, -3.0]),
)


@settings(FUZZ, max_examples=80)
@given(
    block=hnp.arrays(
        np.float32, st.tuples(st.integers(0, 4000), st.integers(1, 3)), elements=finite_or_not
    ),
    dc=st.floats(-2, 2),
    rate=st.sampled_from([8000, 16000, 22050, 48000]),
)
@pytest.mark.slow
def test_any_float_samples_are_sanitised(block: np.ndarray, dc: float, rate: int) -> None:
    stats = SourceStats()
    converter = Converter(rate, block.shape[1], stats)
    vad = Segmenter(VadSettings())
    shifted = block + np.float32(dc)  # a DC offset (inf + x stays inf, nan stays nan)
    with np.errstate(invalid="ignore", over="ignore"):
        mono = shifted.mean(axis=1, dtype=np.float32)
    chunks = [converter.convert(half, last=False) for half in np.array_split(shifted, 2)]
    chunks.append(converter.convert(np.zeros((0, block.shape[1]), np.float32), last=True))
    for chunk in chunks:
        if chunk is None:
            continue
        assert chunk.samples.dtype == np.float32
        assert np.isfinite(chunk.samples).all()
        assert np.abs(chunk.samples).max(initial=0.0) <= 1.0
        vad.process(chunk)
    vad.flush()
    assert stats.bad_samples == int((~np.isfinite(mono)).sum())


@pytest.mark.parametrize("rate", [1, 3999, 384001, 2**31 - 1])
def test_absurd_sample_rate_in_a_header_is_refused(rate: int, tmp_path: Path) -> None:
    """A corrupt header's 1 Hz would make 16000 samples of each one (a 35 KB file took 0.5 GB)."""
    data = bytearray(VALID_FILES[0])
    data[24:28] = rate.to_bytes(4, "little")  # the WAV fmt chunk's sample rate
    path = tmp_path / "bad-rate.wav"
    path.write_bytes(data)
    with pytest.raises(AudioInputError, match=f"unsupported sample rate {rate} Hz"):
        _run_source(SourceSettings(input=str(path)))


@pytest.mark.slow
def test_long_silence_and_long_speech_are_bounded() -> None:
    """Ten minutes of silence yields nothing; 125 s of speech is split at the max length."""
    stats = SourceStats()
    converter = Converter(16000, 1, stats)
    vad = Segmenter(VadSettings())
    events: list[object] = []
    quiet = silence(10.0)
    for _ in range(60):
        chunk = converter.convert(quiet)
        assert chunk is not None
        events += vad.process(chunk)
    assert events == []
    talk = buzz(10.0)
    for piece in [talk] * 12 + [talk[: 16000 * 5]]:  # 125 s
        chunk = converter.convert(piece)
        assert chunk is not None
        events += vad.process(chunk)
    events += vad.flush()
    ends = [e for e in events if isinstance(e, UtteranceEnd)]
    assert len(ends) == 9  # split every max_utterance_ms (15 s), never one huge utterance
    assert [e.reason for e in ends[:-1]] == ["max_length"] * 8
    assert all(e.end_ms - e.start_ms <= 15000 for e in ends)
    assert ends[-1].reason == "stream_end"


def _cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "stream_ser", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        cwd=REPO, check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def _assert_clean(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode in (0, 1), done.stderr
    assert "Traceback" not in done.stderr
    if done.returncode == 1:
        assert done.stderr.strip().splitlines()[-1].startswith("stream-ser: error: ")


@settings(FUZZ, max_examples=4)
@given(data=file_bytes())
@pytest.mark.slow
def test_cli_on_fuzzed_files(data: bytes, tiny_model: Path) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.flac"
        path.write_bytes(data)
        _assert_clean(_cli("run", "--input", str(path), "--model", str(tiny_model)))


@settings(FUZZ, max_examples=3)
@given(data=st.binary(max_size=40000), channels=st.integers(1, 6))
@pytest.mark.slow
def test_cli_on_fuzzed_stdin(data: bytes, channels: int, tiny_model: Path) -> None:
    done = _cli("run", "--input", "-", "--rate", "44100", "--channels", str(channels),
                "--model", str(tiny_model), stdin=data)  # fmt: skip
    _assert_clean(done)
    assert done.returncode == 0  # raw PCM is never undecodable
