"""The Python API (stream_ser.recognize / listen, typed results) on real speech and a tiny model."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import soundfile

import stream_ser
from stream_ser.api import _results as results_of
from stream_ser.errors import AudioInputError, ConfigError, StreamSerError
from stream_ser.hub import ResultHub
from stream_ser.messages import ResultMessage
from stream_ser.results import Descriptor, Result
from tests.conftest import LABELS, run_cli
from tests.test_tail import result as message


def test_import_stays_light_and_names_load_on_first_use() -> None:
    code = (
        "import sys, json, stream_ser; before = sorted(m for m in sys.modules "
        "if m.startswith(('stream_ser', 'numpy', 'onnxruntime'))); stream_ser.listen; "
        "print(json.dumps([before, 'stream_ser.api' in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert json.loads(out) == [["stream_ser"], True]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = stream_ser.nothing
    assert stream_ser.Result is Result and stream_ser.Descriptor is Descriptor


def test_result_from_each_kind_of_message() -> None:
    window = Result.from_message(message("mic", 2, 1000, 2000, type="window"))
    assert (window.stage, window.final, window.duration_ms, window.descriptors) == (
        "window", False, 1000, {})  # fmt: skip
    provisional = Result.from_message(message("mic", 2, 0, 900) | {"final": False})
    assert provisional.stage == "provisional" and provisional.flags == ()
    final = Result.from_message(message(
        "mic", 3, 0, 900, arousal=0.5, valence=-0.25, flags=["alm_deadline"],
        descriptors={"pitch": {"level": "high", "z": 1.5, "value": 40.0}, "voiced": True},
        transcript={"text": " Hello there ", "language": "en"}, speaker="spk-2",
    ))  # fmt: skip
    assert final.final and final.top_label == LABELS[3] and final.top_probability == 0.65
    assert (final.arousal, final.valence, final.flags) == (0.5, -0.25, ("alm_deadline",))
    assert final.descriptors == {"pitch": Descriptor("high", 1.5, 40.0)}
    assert (final.transcript, final.speaker) == ("Hello there", "spk-2")
    assert final.message["descriptors"]["voiced"] is True  # the rest stays in the message
    with pytest.raises(TypeError):
        final.distribution["happy"] = 1.0  # type: ignore[index]  # read-only
    assert "final" in str(final) and '"Hello there"' in str(final)
    for bad in ({"type": "status"}, message("mic", 1, 0, 9) | {"start_ms": "soon"}):
        with pytest.raises(ValueError, match="result message"):
            Result.from_message(bad)


@pytest.mark.slow
def test_recognize_a_file_gives_what_run_publishes(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clips = speech_with_pauses
    done = run_cli("run", "--input", str(path), "--model", str(tiny_model))
    assert done.returncode == 0, done.stderr
    published = [json.loads(line) for line in done.stdout.splitlines()]
    results = stream_ser.recognize(path, model=tiny_model, stages=["window", "final"])
    expected = [m for m in published if m["type"] == "window" or m["final"]]
    assert len([r for r in results if r.final]) == clips
    assert sorted(r.id.split(":", 1)[1] for r in results) == sorted(
        m["id"].split(":", 1)[1] for m in expected
    )  # the same results (the session part of the id is random per run)
    by_id = {m["id"].split(":", 1)[1]: m for m in expected}
    for result in results:
        twin = by_id[result.id.split(":", 1)[1]]
        assert result.distribution == twin["distribution"] and result.stream_id == path.stem
        assert set(result.descriptors) == (
            {k for k, v in twin.get("descriptors", {}).items() if isinstance(v, dict)}
        )


async def captured(
    path: Path, rate: int, block_s: float, speed: float
) -> AsyncIterator[np.ndarray]:
    """Real speech as int16 stereo blocks at `rate`, paced like a capture `speed` times
    faster than real time."""
    import soxr

    audio, source_rate = soundfile.read(path, dtype="float32")
    audio = soxr.resample(audio, source_rate, rate)
    stereo = (np.stack([audio, audio * 0.5], axis=1) * 32767).astype(np.int16)
    step = int(rate * block_s)
    for start in range(0, len(stereo), step):
        yield stereo[start : start + step]
        await asyncio.sleep(block_s / speed)


@pytest.mark.slow
async def test_listen_to_live_arrays_at_another_rate(
    tiny_model: Path, speech_with_pauses: tuple[Path, int], ravdess_clips: list[Path]
) -> None:
    path, clips = speech_with_pauses
    arrays = captured(path, 44100, 0.05, speed=8.0)
    async with asyncio.timeout(60):
        results = [r async for r in stream_ser.listen(
            arrays, sample_rate=44100, channels=2, live=True, stream_id="room",
            model=tiny_model, descriptors=False, stages=["provisional", "final"],
        )]  # fmt: skip
    # with nothing to wait for (no descriptors, no ALM) only the finals are published
    assert [(r.stage, r.utterance_id) for r in results] == [
        ("final", n) for n in range(1, clips + 1)
    ]
    assert {r.stream_id for r in results} == {"room"} and all(not r.descriptors for r in results)
    starts_ms, at_ms = [], 0.0  # where each clip begins in the file (1.5 s of silence after each)
    for clip in ravdess_clips[:clips]:
        starts_ms.append(at_ms)
        at_ms += soundfile.info(clip).duration * 1000 + 1500
    for result, start_ms in zip(results, starts_ms, strict=True):  # no audio lost or shifted
        assert start_ms - 100 < result.start_ms + 300 < start_ms + 1500, (result, start_ms)


@pytest.mark.slow
async def test_stop_ends_after_the_utterance_in_flight(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, _ = speech_with_pauses
    stop = asyncio.Event()
    seen: list[Result] = []
    async with asyncio.timeout(60):
        async for result in stream_ser.listen(path, realtime=True, stop=stop, model=tiny_model,
                                              descriptors=False):  # fmt: skip
            seen.append(result)
            if result.stage == "window":
                stop.set()  # mid-utterance: its final must still come
    assert seen[-1].final and seen[-1].utterance_id == 1
    assert seen[-1].message["end_reason"] == "stream_end"  # cut by the stop, still final
    assert max(r.end_ms for r in seen) < 8000  # stopped well before the file's end


async def test_leaving_the_loop_early_stops_at_once(tiny_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "noise.wav"
    rng = np.random.default_rng(0)
    soundfile.write(path, (rng.normal(0, 0.3, 16000 * 30)).astype(np.float32), 16000)
    async with asyncio.timeout(30):
        results = stream_ser.listen(path, realtime=True, model=tiny_model, descriptors=False)
        async for _ in results:
            break  # the first window of 30 s of paced audio
        await results.aclose()  # type: ignore[attr-defined]
    names = {task.get_name() for task in asyncio.all_tasks() if not task.done()}
    assert not {name for name in names if name.startswith(("listen", "stream-"))}, names


async def test_errors_are_raised_from_the_loop(tiny_model: Path, tmp_path: Path) -> None:
    async def arrays(*blocks: Any) -> AsyncIterator[Any]:
        for block in blocks:
            yield block

    async with asyncio.timeout(30):
        with pytest.raises(AudioInputError, match="shape"):
            good = np.zeros(1600, np.float32)
            async for _ in stream_ser.listen(arrays(good, np.zeros((10, 3))), sample_rate=16000,
                                             model=tiny_model):  # fmt: skip
                pass
        with pytest.raises(AudioInputError):
            async for _ in stream_ser.listen(tmp_path / "missing.wav", model=tiny_model):
                pass
        with pytest.raises(ConfigError, match="sample_rate"):
            async for _ in stream_ser.listen(arrays(good), model=tiny_model):
                pass
        with pytest.raises(ConfigError, match="stages"):
            async for _ in stream_ser.listen(tmp_path, stages=["everything"]):  # type: ignore[list-item]
                pass
        with pytest.raises(ConfigError, match="listen"):
            stream_ser.recognize(tmp_path / "x.wav")  # inside a running loop

    def array_without_rate() -> None:
        stream_ser.recognize(np.zeros(16000, np.float32))

    with pytest.raises(ConfigError, match="sample_rate"):
        await asyncio.to_thread(array_without_rate)  # no loop runs in that thread


@pytest.mark.slow
async def test_listen_to_a_live_push_source(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    """The voice-agent shape: a producer pushes captured audio (never waiting) while `listen`
    reads the results."""
    path, clips = speech_with_pauses
    source = stream_ser.PushSource(44100, 2, "s16le")

    async def produce() -> None:
        async for block in captured(path, 44100, 0.02, speed=8.0):
            source.push(block.tobytes())  # interleaved little-endian PCM, as a socket gives
        source.end()

    async with asyncio.timeout(60):
        producer = asyncio.create_task(produce())
        results = [r async for r in stream_ser.listen(
            source, live=True, stream_id="call", model=tiny_model, descriptors=False,
        )]  # fmt: skip
        await producer
    assert [r.utterance_id for r in results if r.final] == list(range(1, clips + 1))
    assert any(r.stage == "window" for r in results)  # every stage by default
    assert source.stats.blocks_dropped == 0


async def test_a_consumer_too_slow_for_a_final_gets_an_error() -> None:
    hub = ResultHub()
    subscription = hub.subscribe("mic", max_queued=1)
    first, second = message("mic", 1, 0, 900), message("mic", 2, 1000, 1900)
    for final in (first, second):  # the second does not fit: the hub closes the subscription
        await hub.result("mic", cast(ResultMessage, final))
    seen = []
    async with asyncio.timeout(5):
        with pytest.raises(StreamSerError, match="results were lost: subscriber too slow"):
            async for result in results_of(subscription, frozenset({"final"})):
                seen.append(result.utterance_id)
    assert seen == [1]
