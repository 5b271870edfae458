"""PushSource, ResultHub and streams started on a running runtime (Runtime.start)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from stream_ser import SAMPLE_RATE
from stream_ser.app import load_specialist, open_runtime
from stream_ser.arrivals import RuntimeClosed, StreamIdInUse, merge
from stream_ser.errors import AudioInputError, ConfigError
from stream_ser.hub import ResultHub
from stream_ser.pipeline import run_streams
from stream_ser.push import PushSource
from stream_ser.settings import OutputSettings, Settings
from stream_ser.source import SourceStats, file_source, open_file
from tests.schema import check_message, utterances


async def collect(source: PushSource) -> np.ndarray:
    """Every sample the source yields until it ends."""
    async with asyncio.timeout(10):
        pieces = [chunk.samples async for chunk in source.chunks()]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


# --------------------------------------------------------------------------- PushSource


async def test_s16le_bytes_at_16k_mono_come_out_unchanged() -> None:
    pcm = (np.arange(-8000, 8000, dtype=np.int16) * 3).astype("<i2")
    source = PushSource(SAMPLE_RATE, 1, "s16le")
    source.push(pcm[:5000].tobytes())
    source.push(pcm[5000:].tobytes())
    source.end()
    assert np.array_equal(await collect(source), pcm.astype(np.float32) / 32768.0)


async def test_f32le_stereo_at_48k_is_mixed_down_and_resampled() -> None:
    seconds = 2.0
    t = np.arange(int(48000 * seconds)) / 48000
    left = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stereo = np.stack([left, left], axis=1).astype("<f4")
    source = PushSource(48000, 2, "f32le")
    for piece in np.array_split(stereo, 7):
        source.push(piece.tobytes())
    source.end()
    out = await collect(source)
    assert len(out) == pytest.approx(SAMPLE_RATE * seconds, abs=2)
    middle = out[4000:-4000]
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(out)) / SAMPLE_RATE)[4000:-4000]
    assert np.max(np.abs(middle - expected)) < 0.01


async def test_arrays_int16_and_float_are_taken() -> None:
    source = PushSource(SAMPLE_RATE, 1)
    source.push(np.full(160, 16384, dtype=np.int16))
    source.push(np.full((160, 1), 0.25, dtype=np.float64))
    source.end()
    out = await collect(source)
    assert np.allclose(out[:160], 0.5) and np.allclose(out[160:], 0.25)


@pytest.mark.parametrize(
    ("args", "pushed", "words"),
    [
        ((SAMPLE_RATE, 1, "s16le"), b"\x00\x01\x02", "3 bytes is not a whole number of frames"),
        ((SAMPLE_RATE, 2, "s16le"), b"\x00" * 6, "a frame of 2 channel(s) of s16le is 4 bytes"),
        ((SAMPLE_RATE, 1, "f32le"), b"\x00" * 6, "of f32le is 4 bytes"),
        ((SAMPLE_RATE, 2, "s16le"), np.zeros(10, np.int16), "expected (frames, 2)"),
        ((SAMPLE_RATE, 1, "s16le"), np.zeros(10, np.int32), "dtype int32"),
    ],
)
def test_audio_that_does_not_fit_the_declared_format_is_refused(
    args: tuple[int, int, Any], pushed: bytes | np.ndarray, words: str
) -> None:
    source = PushSource(*args)
    with pytest.raises(AudioInputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        source.push(pushed)


@pytest.mark.parametrize(
    ("rate", "channels", "sample_format", "words"),
    [
        (4000, 1, "s16le", "sample rate"),
        (16000, 9, "s16le", "channels"),
        (16000, 1, "mp3", "sample format"),
    ],
)
def test_impossible_formats_are_refused(
    rate: int, channels: int, sample_format: Any, words: str
) -> None:
    with pytest.raises(AudioInputError, match=words):
        PushSource(rate, channels, sample_format)


async def test_push_drops_the_oldest_audio_when_full_and_counts_it() -> None:
    source = PushSource(SAMPLE_RATE, 1, max_queued_s=0.5)
    blocks = [np.full(1600, i, dtype=np.int16) for i in range(10)]  # 100 ms each, 1 s in all
    for block in blocks:
        source.push(block)
    source.end()
    out = await collect(source)
    assert source.stats.blocks_dropped == 5
    kept = sorted({round(float(v) * 32768) for v in out})
    assert kept == [5, 6, 7, 8, 9]  # the newest half second


async def test_put_waits_for_room_and_loses_nothing() -> None:
    source = PushSource(SAMPLE_RATE, 1, max_queued_s=0.2)
    blocks = [np.full(1600, i, dtype=np.int16) for i in range(20)]

    async def produce() -> None:
        for block in blocks:
            await source.put(block)
        source.end()

    async with asyncio.timeout(10):
        producer = asyncio.create_task(produce())
        await asyncio.sleep(0.05)
        assert not producer.done()  # 2 s of audio do not fit in 0.2 s: it waits
        assert source.queued_ms <= 300
        out = await collect(source)
        await producer
    assert source.stats.blocks_dropped == 0
    assert np.array_equal(out, np.concatenate(blocks).astype(np.float32) / 32768.0)


async def test_end_delivers_what_is_queued_then_ends_and_refuses_more() -> None:
    source = PushSource(SAMPLE_RATE, 1)
    source.push(np.zeros(320, np.int16))
    source.end()
    source.end()  # twice is harmless
    assert len(await collect(source)) == 320
    with pytest.raises(AudioInputError, match="after the stream ended"):
        source.push(np.zeros(320, np.int16))


async def test_a_waiting_consumer_wakes_on_push_and_on_end() -> None:
    source = PushSource(SAMPLE_RATE, 1)
    chunks = source.chunks()
    async with asyncio.timeout(5):
        waiting = asyncio.ensure_future(anext(chunks))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        source.push(np.ones(160, np.int16))
        assert len((await waiting).samples) == 160
        ending = asyncio.ensure_future(anext(chunks))
        await asyncio.sleep(0.01)
        source.end()
        with pytest.raises(StopAsyncIteration):
            await ending


# --------------------------------------------------------------------------- ResultHub


def window(stream: str, n: int) -> dict[str, Any]:
    return {"type": "window", "stream_id": stream, "n": n, "final": False}


def final(stream: str, n: int) -> dict[str, Any]:
    return {"type": "utterance", "stream_id": stream, "n": n, "final": True}


def status(n: int) -> dict[str, Any]:
    return {"type": "status", "n": n}


async def drain(subscription: Any) -> list[Any]:
    async with asyncio.timeout(5):
        return [message async for message in subscription]


async def test_every_subscriber_gets_every_message_in_publish_order() -> None:
    hub = ResultHub()
    everything, kitchen = hub.subscribe(), hub.subscribe("kitchen")
    sent = [window("kitchen", 1), window("hall", 2), status(3), final("kitchen", 4)]
    for message in sent:
        hub.publish(message)
    hub.close()
    assert await drain(everything) == sent
    assert await drain(kitchen) == [sent[0], sent[2], sent[3]]  # its stream, and the status


async def test_a_slow_subscriber_loses_windows_first_and_counts_them() -> None:
    hub = ResultHub(max_queued=3)
    slow = hub.subscribe()
    hub.publish(window("a", 1))
    hub.publish(final("a", 2))
    hub.publish(window("a", 3))
    hub.publish(final("a", 4))  # full: the oldest window makes room
    hub.publish(window("a", 5))  # full: the window 3 makes room
    hub.publish(status(6))  # full of finals and a window: window 5 goes
    hub.close()
    got = await drain(slow)
    assert [m["n"] for m in got] == [2, 4, 6]
    assert slow.dropped == 3 and hub.dropped == 3
    assert slow.close_reason is None


async def test_a_final_that_does_not_fit_closes_the_subscription_with_a_reason() -> None:
    hub = ResultHub(max_queued=2)
    slow, fast = hub.subscribe(), hub.subscribe()
    hub.publish(final("a", 1))
    hub.publish(final("a", 2))
    assert await anext(fast) == final("a", 1)
    hub.publish(final("a", 3))  # slow has two finals waiting: nothing can make room
    assert await anext(fast) == final("a", 2)
    hub.publish(final("a", 4))
    assert slow.closed and "too slow" in (slow.close_reason or "")
    assert hub.closed_slow == 1 and hub.counters()["hub_subscribers_too_slow"] == 1
    assert [m["n"] for m in await drain(slow)] == [1, 2]  # what was queued is still read
    hub.close()
    assert [m["n"] for m in await drain(fast)] == [3, 4]  # the others miss nothing
    assert not fast.close_reason


async def test_history_replays_retained_messages_then_the_latest_status_then_live() -> None:
    hub = ResultHub()
    hub.publish(status(1))
    hub.publish(final("a", 2))
    hub.publish(final("b", 3))
    hub.publish(status(4))
    late = hub.subscribe(history=True)
    late_a = hub.subscribe("a", history=True)
    hub.publish(window("a", 5))
    hub.close()
    assert [m["n"] for m in await drain(late)] == [2, 3, 4, 5]
    assert [m["n"] for m in await drain(late_a)] == [2, 4, 5]


async def test_history_forgets_old_messages_and_stays_bounded() -> None:
    hub = ResultHub(history_s=0.05)
    hub.publish(final("a", 1))
    await asyncio.sleep(0.1)
    hub.publish(final("a", 2))
    assert [m["n"] for m in hub.history()] == [2]
    bounded = ResultHub(max_history=10)
    for n in range(100):
        bounded.publish(window("a", n) if n % 2 else final("a", n))
    kept = bounded.history()
    assert len(kept) <= 10
    assert kept[-1]["n"] == 99  # the newest is kept
    finals = [m["n"] for m in kept if m["final"]]
    assert finals == list(range(98 - 2 * (len(finals) - 1), 99, 2))  # the newest finals
    assert len(finals) > len(kept) - len(finals)  # windows went first


async def test_closing_a_subscription_unsubscribes_it() -> None:
    hub = ResultHub()
    async with hub.subscribe() as subscription:
        assert hub.subscribers == 1
    assert hub.subscribers == 0
    hub.publish(final("a", 1))
    assert await drain(subscription) == []


async def test_the_hub_is_a_sink() -> None:
    hub = ResultHub()
    subscription = hub.subscribe()
    async with hub:
        await hub.result("a", final("a", 1))  # type: ignore[arg-type]
        await hub.speaking("a", {"type": "speaking", "stream_id": "a"})  # type: ignore[typeddict-item]
        await hub.status(status(2))  # type: ignore[arg-type]
        await hub.announce("homeassistant/x", b"{}")
    assert [m["type"] for m in await drain(subscription)] == ["utterance", "speaking", "status"]


# --------------------------------------------------------------------------- arrivals


async def feed(items: list[int], delay_s: float) -> Any:
    for item in items:
        await asyncio.sleep(delay_s)
        yield item


async def test_merge_yields_every_item_of_every_feed_and_ends_with_them() -> None:
    async with asyncio.timeout(5):
        got = [item async for item in merge([feed([1, 2, 3], 0.01), feed([10, 20], 0.015)])]
    assert sorted(got) == [1, 2, 3, 10, 20]


async def test_merge_passes_an_error_on() -> None:
    async def broken() -> Any:
        yield 1
        raise AudioInputError("boom")

    async with asyncio.timeout(5):
        with pytest.raises(AudioInputError, match="boom"):
            [item async for item in merge([broken(), feed([5], 1.0)])]


# --------------------------------------------------------------------------- Runtime.start


def int16_audio(path: Path) -> np.ndarray:
    audio, rate = soundfile.read(path, dtype="int16")
    assert rate == SAMPLE_RATE
    return np.asarray(audio)


async def test_streams_pushed_into_a_running_runtime_match_the_file_path(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, count = speech_with_pauses
    settings = Settings(output=OutputSettings(descriptors=False))
    hub = ResultHub()
    pcm = int16_audio(path)
    async with asyncio.timeout(120), open_runtime(
        settings, load_specialist(str(tiny_model)), hub
    ) as runtime:  # fmt: skip
        stop = asyncio.Event()
        stats = SourceStats()
        from_file = runtime.pipeline(
            "file", file_source(path, open_file(path), 100, None, stats), stats, lossless=True
        )
        everything = hub.subscribe()
        running = asyncio.create_task(
            run_streams([from_file], hub, stop, 10.0, None, aiter(runtime.arrivals))
        )
        pushed = [PushSource(SAMPLE_RATE, 1) for _ in range(2)]
        pipelines = [
            runtime.start(f"pushed-{i}", source.chunks(), source.stats, lossless=True)
            for i, source in enumerate(pushed)
        ]
        with pytest.raises(StreamIdInUse):
            runtime.start("pushed-0", PushSource(SAMPLE_RATE, 1).chunks(), SourceStats())
        with pytest.raises(StreamIdInUse):
            runtime.start("file", PushSource(SAMPLE_RATE, 1).chunks(), SourceStats())
        with pytest.raises(ConfigError):
            runtime.start("a/b", PushSource(SAMPLE_RATE, 1).chunks(), SourceStats())
        for block in np.array_split(pcm, 37):  # uneven pieces, two producers interleaved
            for source in pushed:
                await source.put(block.tobytes())
        for source in pushed:
            source.end()
        for pipeline in pipelines:
            await pipeline.finished.wait()
        runtime.arrivals.close()
        await running
        with pytest.raises(RuntimeClosed):
            runtime.start("late", PushSource(SAMPLE_RATE, 1).chunks(), SourceStats())
    hub.close()
    messages = await drain(everything)
    for message in messages:
        check_message(message)
    by_stream = {
        name: [(m["utterance_id"], m["start_ms"], m["end_ms"], m["distribution"])
               for m in utterances(messages) if m["stream_id"] == name]
        for name in ("file", "pushed-0", "pushed-1")
    }  # fmt: skip
    assert len(by_stream["file"]) == count
    assert by_stream["pushed-0"] == by_stream["file"] == by_stream["pushed-1"]
    runtime_ids = {m["id"].split(":")[0] for m in utterances(messages)}
    assert len(runtime_ids) == 3  # each started stream has its own session nonce
