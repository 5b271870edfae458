"""EmotionProcessor in a real Pipecat pipeline (Pipecat's own test runner), on real speech.

Audio goes in as InputAudioRawFrames of 20 ms, as a transport sends them; the bundled model
recognises it; the finals must match what `stream-ser run --input` gives for the same audio.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import soxr

with warnings.catch_warnings():  # Pipecat imports the stdlib's deprecated audioop module
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip("pipecat", reason="needs the pipecat extra: pip install '.[pipecat]'")
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        ErrorFrame,
        Frame,
        InputAudioRawFrame,
        TranscriptionFrame,
    )
    from pipecat.tests.utils import SleepFrame, run_test

from stream_ser.app import load_specialist, open_runtime
from stream_ser.hub import ResultHub
from stream_ser.integrations.pipecat import (
    EmotionFrame,
    EmotionParams,
    EmotionProcessor,
    TranscriptionEmotionFrame,
)
from stream_ser.pipeline import run_streams
from stream_ser.settings import Settings
from tests.conftest import REPO, SAMPLE, run_cli
from tests.schema import check_result

FRAME_MS = 20
RUN_TIMEOUT_S = 120.0


def pcm_frames(audio: np.ndarray, rate: int) -> list[InputAudioRawFrame]:
    """Float audio, (samples,) or (samples, channels), as 20 ms s16le InputAudioRawFrames."""
    block = audio if audio.ndim == 2 else audio[:, np.newaxis]
    pcm = (np.clip(block, -1.0, 32767 / 32768) * 32768).astype("<i2")
    step = rate * FRAME_MS // 1000
    return [
        InputAudioRawFrame(audio=pcm[i : i + step].tobytes(), sample_rate=rate,
                           num_channels=pcm.shape[1])
        for i in range(0, len(pcm), step)
    ]  # fmt: skip


def cli_finals(path: Path) -> list[dict[str, Any]]:
    """The final results `stream-ser run --input PATH` prints (bundled model, JSON lines)."""
    done = run_cli("run", "--input", str(path), "--log-level", "warning")
    assert done.returncode == 0, done.stderr
    messages = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return [m for m in messages if m.get("final")]


def emotion_frames(frames: Sequence[Frame], stage: str = "final") -> list[EmotionFrame]:
    return [f for f in frames if isinstance(f, EmotionFrame) and f.stage == stage]


async def run_processor(
    processor: EmotionProcessor, frames: Sequence[Frame], end: bool = True
) -> list[Frame]:
    """The frames that came out downstream of `processor` (the EndFrame too when `end`)."""
    to_send = [*frames, EndFrame()] if end else list(frames)
    async with asyncio.timeout(RUN_TIMEOUT_S):
        down, _ = await run_test(processor, frames_to_send=to_send, send_end_frame=False)
    return list(down)


def assert_passed_through(sent: Sequence[InputAudioRawFrame], down: Sequence[Frame]) -> None:
    """Every audio frame came out, the same object with the same bytes, in the same order."""
    received = [f for f in down if isinstance(f, InputAudioRawFrame)]
    assert len(received) == len(sent)
    assert all(got is want for got, want in zip(received, sent, strict=True))
    assert b"".join(f.audio for f in received) == b"".join(f.audio for f in sent)


def assert_same_finals(got: list[EmotionFrame], want: list[dict[str, Any]]) -> None:
    """One final per utterance of the CLI's, with the same boundaries; schema-valid."""
    assert len(got) == len(want) > 0
    for frame, expected in zip(got, want, strict=True):
        check_result(dict(frame.message), tuple(expected["distribution"]))
        assert frame.final and frame.message["type"] == "utterance"
        for key in ("utterance_id", "start_ms", "end_ms", "end_reason", "top_label"):
            assert frame.message[key] == expected[key], key
        assert (frame.result.stage, frame.result.top_label) == ("final", expected["top_label"])


def lossless() -> EmotionProcessor:
    """A processor that loses no audio: the test feeds frames faster than real time."""
    return EmotionProcessor(params=EmotionParams(lossless=True))


@pytest.mark.slow  # over 2 s: real speech through the bundled model
async def test_16k_mono_passes_audio_and_gives_the_cli_finals() -> None:
    audio, rate = soundfile.read(SAMPLE, dtype="float32")
    assert rate == 16000
    frames = pcm_frames(audio, rate)
    processor = lossless()
    down = await run_processor(processor, frames)
    assert_passed_through(frames, down)
    assert_same_finals(emotion_frames(down), cli_finals(SAMPLE))
    assert emotion_frames(down, "window") == []  # windows are off by default
    assert isinstance(down[-1], EndFrame)
    assert processor.counters()["blocks_dropped"] == 0


@pytest.mark.slow  # over 2 s: real speech through the bundled model
async def test_48k_stereo_is_converted_and_gives_the_cli_finals(tmp_path: Path) -> None:
    mono, rate = soundfile.read(SAMPLE, dtype="float32")
    resampled = soxr.resample(mono, rate, 48000).astype(np.float32)
    stereo = np.stack([resampled, 0.5 * resampled], axis=1)  # channels differ: mixed, not picked
    path = tmp_path / "speech-48k-stereo.wav"
    soundfile.write(path, stereo, 48000, subtype="PCM_16")
    frames = pcm_frames(stereo, 48000)
    assert frames[0].num_channels == 2 and frames[0].num_frames == 960
    down = await run_processor(lossless(), frames)
    assert_passed_through(frames, down)
    finals = emotion_frames(down)
    want = cli_finals(path)
    assert len(finals) == len(want)
    for frame, expected in zip(finals, want, strict=True):
        check_result(dict(frame.message), tuple(expected["distribution"]))
        assert abs(frame.message["start_ms"] - expected["start_ms"]) <= FRAME_MS
        assert abs(frame.message["end_ms"] - expected["end_ms"]) <= FRAME_MS


@pytest.mark.slow  # over 2 s: real speech through the bundled model
async def test_end_frame_flushes_the_utterance_in_progress(tmp_path: Path) -> None:
    audio, rate = soundfile.read(SAMPLE, dtype="float32")
    whole = cli_finals(SAMPLE)
    cut_ms = (whole[-1]["start_ms"] + whole[-1]["end_ms"]) // 2  # mid last utterance
    cut = audio[: rate * cut_ms // 1000]
    path = tmp_path / "cut.wav"
    soundfile.write(path, cut, rate)
    frames = pcm_frames(cut, rate)
    down = await run_processor(lossless(), frames)
    finals = emotion_frames(down)
    assert_same_finals(finals, cli_finals(path))
    assert len(finals) == len(whole)
    assert finals[-1].message["end_reason"] == "stream_end"
    # the last utterance's final came out before the EndFrame, which came last
    assert isinstance(down[-1], EndFrame)
    assert down.index(finals[-1]) < len(down) - 1


async def test_windows_when_asked(ravdess_clips: list[Path]) -> None:
    audio, rate = soundfile.read(ravdess_clips[0], dtype="float32")
    frames = pcm_frames(np.concatenate([audio, np.zeros(rate, np.float32)]), rate)
    processor = EmotionProcessor(params=EmotionParams(lossless=True, windows=True))
    seen: list[EmotionFrame] = []

    async def on_emotion(_: EmotionProcessor, frame: EmotionFrame) -> None:
        seen.append(frame)

    processor.add_event_handler("on_emotion", on_emotion)
    down = await run_processor(processor, frames)
    windows, finals = emotion_frames(down, "window"), emotion_frames(down)
    assert len(finals) == 1 and len(windows) >= 1
    for frame in windows:
        check_result(dict(frame.message))
        assert frame.message["utterance_id"] == 1
    assert seen == [f for f in down if isinstance(f, EmotionFrame)]


def transcription(text: str) -> TranscriptionFrame:
    return TranscriptionFrame(text=text, user_id="user", timestamp="2026-12-03T00:00:00Z")


@pytest.mark.slow  # over 2 s: real speech through the bundled model
async def test_each_transcription_gets_the_finals_of_its_utterances(
    speech_with_pauses: tuple[Path, int],
) -> None:
    path, clips = speech_with_pauses
    audio, rate = soundfile.read(path, dtype="float32")
    piece = len(audio) // clips  # each piece: a clip and 1.5 s of silence
    frames: list[Frame] = []
    for index in range(clips):
        frames += pcm_frames(audio[index * piece : (index + 1) * piece], rate)
        # Pipecat's system frames (audio) overtake data frames (transcriptions): the sleeps
        # keep each transcription after its clip's audio and before the next clip's
        frames += [SleepFrame(sleep=0.5), transcription(f"clip {index + 1}"), SleepFrame(0.3)]
    processor = EmotionProcessor()  # live: the pauses let it keep up without dropping
    down = await run_processor(processor, frames)
    finals = emotion_frames(down)
    assert len(finals) == clips
    attached = [f for f in down if isinstance(f, TranscriptionEmotionFrame)]
    assert [f.transcription.text for f in attached] == [f"clip {i + 1}" for i in range(clips)]
    for index, frame in enumerate(attached):
        assert down[down.index(frame) - 1] is frame.transcription  # right after it
        assert [m["utterance_id"] for m in frame.finals] == [index + 1]
        assert frame.finals[0] == finals[index].message
        assert frame.label == finals[index].label
    assert processor.counters()["blocks_dropped"] == 0


async def test_an_unreadable_model_is_reported_upstream(tmp_path: Path) -> None:
    """Pipecat reports a processor's set-up failure as an ErrorFrame upstream; audio still flows."""
    settings = Settings()
    missing = replace(settings.model, path=str(tmp_path / "missing"))
    processor = EmotionProcessor(settings=replace(settings, model=missing))
    frames = pcm_frames(np.zeros(16000, np.float32), 16000)
    async with asyncio.timeout(RUN_TIMEOUT_S):
        down, up = await run_test(processor, frames_to_send=frames)
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "no such model directory" in errors[0].error
    assert_passed_through(frames, down)
    assert emotion_frames(down) == []


@pytest.mark.slow  # over 2 s: real speech through the bundled model
async def test_two_calls_share_one_runtime(ravdess_clips: list[Path]) -> None:
    """Two Pipecat pipelines, one runtime and hub (one model): each gets its stream's finals."""
    audio, rate = soundfile.read(SAMPLE, dtype="float32")
    clip, _ = soundfile.read(ravdess_clips[1], dtype="float32")
    clip = np.concatenate([clip, np.zeros(rate, np.float32)])
    hub, stop = ResultHub(), asyncio.Event()
    specialist = load_specialist(None)
    async with hub, open_runtime(Settings(), specialist, hub) as runtime:
        serve = asyncio.create_task(run_streams([], hub, stop, arriving=aiter(runtime.arrivals)))
        params = [EmotionParams(stream_id=f"call-{i}", lossless=True) for i in (1, 2)]
        first, second = (EmotionProcessor(params=p, runtime=runtime, hub=hub) for p in params)
        downs = await asyncio.gather(
            run_processor(first, pcm_frames(audio, rate)),
            run_processor(second, pcm_frames(clip, rate)),
        )
        runtime.arrivals.close()
        async with asyncio.timeout(RUN_TIMEOUT_S):
            await serve
    one, two = (emotion_frames(down) for down in downs)
    assert {f.message["stream_id"] for f in one} == {"call-1"}
    assert {f.message["stream_id"] for f in two} == {"call-2"}
    assert len(one) == len(cli_finals(SAMPLE)) and len(two) == 1


async def test_cancel_frame_flushes_and_closes(ravdess_clips: list[Path]) -> None:
    """CancelFrame mid-utterance: the last utterance is still recognised (on_emotion sees its
    final), and the processor's runtime is shut down."""
    audio, rate = soundfile.read(ravdess_clips[2], dtype="float32")
    frames = pcm_frames(audio[: len(audio) * 3 // 4], rate)  # cut inside the speech
    processor = lossless()
    seen: list[EmotionFrame] = []

    async def on_emotion(_: EmotionProcessor, frame: EmotionFrame) -> None:
        seen.append(frame)

    processor.add_event_handler("on_emotion", on_emotion)
    async with asyncio.timeout(RUN_TIMEOUT_S):
        down, _ = await run_test(
            processor, frames_to_send=[*frames, SleepFrame(0.5), CancelFrame()],
            send_end_frame=False,
        )  # fmt: skip
    assert_passed_through(frames, down)
    assert [f.message["end_reason"] for f in seen if f.final] == ["stream_end"]
    assert processor.closed


@pytest.mark.slow  # over 2 s: real speech through the bundled model
async def test_a_second_stream_with_a_live_id_is_refused() -> None:
    """Two calls on one runtime with the same stream id: the second gets an ErrorFrame
    upstream and passes its audio on unrecognised; the first is not disturbed."""
    audio, rate = soundfile.read(SAMPLE, dtype="float32")
    hub, stop = ResultHub(), asyncio.Event()
    async with hub, open_runtime(Settings(), load_specialist(None), hub) as runtime:
        serve = asyncio.create_task(run_streams([], hub, stop, arriving=aiter(runtime.arrivals)))
        processors = [
            EmotionProcessor(params=EmotionParams(stream_id="same", lossless=True),
                             runtime=runtime, hub=hub)
            for _ in range(2)
        ]  # fmt: skip
        frames = [pcm_frames(audio, rate) for _ in processors]
        async with asyncio.timeout(RUN_TIMEOUT_S):
            results = await asyncio.gather(
                *(run_test(p, frames_to_send=f) for p, f in zip(processors, frames, strict=True))
            )
            runtime.arrivals.close()
            await serve
    errors = [[f for f in up if isinstance(f, ErrorFrame)] for _, up in results]
    assert sorted(len(e) for e in errors) == [0, 1]
    refused = next(i for i, e in enumerate(errors) if e)
    assert "in use" in errors[refused][0].error
    for (down, _), sent in zip(results, frames, strict=True):
        assert_passed_through(sent, down)
    assert processors[refused].counters() == {"frames_ignored": 0}  # it never had a stream
    assert len(emotion_frames(results[1 - refused][0])) == len(cli_finals(SAMPLE))


@pytest.mark.slow  # over 2 s: real speech through the bundled model
def test_the_docs_example_runs_and_prints_the_cli_finals() -> None:
    """docs/pipecat.md's first example, run as written from the repository root."""
    text = (REPO / "docs" / "pipecat.md").read_text(encoding="utf-8")
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    done = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", example],
        capture_output=True, text=True, cwd=REPO, timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    want = [
        f"{m['utterance_id']} {m['top_label']} {m['top_probability']:.2f}"
        for m in cli_finals(SAMPLE)
    ]
    assert done.stdout.splitlines() == want


@pytest.mark.slow  # over 2 s: real speech through the bundled model
@pytest.mark.parametrize("attach_timeout_s", [1.0, 0.0])
async def test_a_transcription_waits_for_the_utterance_still_open(
    ravdess_clips: list[Path], attach_timeout_s: float
) -> None:
    """The transcription comes while the VAD still waits for the hang-over silence: it waits
    for that utterance's final (at most attach_timeout_s); with 0 the final goes with the next."""
    audio, rate = soundfile.read(ravdess_clips[3], dtype="float32")
    (final,) = cli_finals(ravdess_clips[3])
    audio = audio[: rate * (final["end_ms"] + 100) // 1000]  # less silence than the hang-over
    silence = np.zeros(rate, np.float32)
    frames: list[Frame] = [*pcm_frames(audio, rate), SleepFrame(0.3), transcription("one")]
    frames += [SleepFrame(0.1), *pcm_frames(silence, rate), SleepFrame(0.5), transcription("two")]
    params = EmotionParams(attach_timeout_s=attach_timeout_s)
    down = await run_processor(EmotionProcessor(params=params), frames)
    finals = emotion_frames(down)
    assert len(finals) == 1
    attached = [f for f in down if isinstance(f, TranscriptionEmotionFrame)]
    got = [[m["utterance_id"] for m in f.finals] for f in attached]
    assert got == ([[1], []] if attach_timeout_s else [[], [1]])


async def test_audio_in_another_format_passes_but_is_not_recognised() -> None:
    """The first frame fixes the stream's format; later frames in another one are counted."""
    first = pcm_frames(np.zeros(3200, np.float32), 16000)  # 200 ms at 16 kHz mono
    other = pcm_frames(np.zeros((9600, 2), np.float32), 48000)  # 200 ms at 48 kHz stereo
    processor = EmotionProcessor()
    down = await run_processor(processor, [*first, *other])
    assert_passed_through([*first, *other], down)
    assert processor.counters()["frames_ignored"] == len(other)


async def test_a_rate_stream_ser_does_not_take_is_reported_upstream() -> None:
    frames = pcm_frames(np.zeros(9600, np.float32), 96000)
    processor = EmotionProcessor()
    async with asyncio.timeout(RUN_TIMEOUT_S):
        down, up = await run_test(processor, frames_to_send=frames)
    errors = [f.error for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "96000 Hz" in errors[0]
    assert_passed_through(frames, down)
