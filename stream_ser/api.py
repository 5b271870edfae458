"""The Python API: recognise a file or an array, or iterate the results of a live source.

    import stream_ser
    for result in stream_ser.recognize("speech.wav"):           # one final per utterance
        print(result.top_label, result.top_probability)
    async for result in stream_ser.listen(stream_ser.Microphone()):
        print(result)

Both run the runtime of `stream-ser run` (stream_ser.app: open_runtime, Runtime.pipeline,
run_streams) with a ResultHub (stream_ser.hub) as its sink; `listen` reads one subscription of
it and yields typed results (stream_ser.results). Documented in docs/python.md.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
)
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from stream_ser import app
from stream_ser.errors import ConfigError, StreamSerError
from stream_ser.events import AudioChunk
from stream_ser.hub import ResultHub, Subscription
from stream_ser.pipeline import run_streams
from stream_ser.push import PushSource
from stream_ser.results import STAGES, Result, Stage, stage_of
from stream_ser.settings import (
    MAX_STREAM_ID_BYTES,
    ModelSettings,
    Settings,
    SourceSettings,
    check_name,
)
from stream_ser.source import Damage, SourceStats, default_stream_id, is_recording, open_source
from stream_ser.specialist import Specialist

FINALS: tuple[Stage, ...] = ("final",)
BLOCK_S = 0.1  # an array is fed to the pipeline in blocks of this length, as a file is


@dataclass(frozen=True)
class Microphone:
    """A microphone as a `listen` source: the default one, or a device index or (part of) a
    name as `stream-ser devices` lists them. Needs PortAudio (libportaudio2)."""

    device: str = "default"


Source = str | os.PathLike[str] | Microphone | PushSource | AsyncIterable[np.ndarray]
"""What `listen` reads: a file path, a microphone, a PushSource or an async iterable of arrays."""


def recognize(
    audio: str | os.PathLike[str] | np.ndarray,
    sample_rate: int | None = None,
    *,
    stages: Collection[Stage] = FINALS,
    model: str | os.PathLike[str] | None = None,
    descriptors: bool = True,
    settings: Settings | None = None,
) -> list[Result]:
    """Every result of a file or an array (`sample_rate` needed for an array), in order: by
    default one final per utterance. Runs its own event loop: from async code, use `listen`."""
    if _loop_running():
        raise ConfigError(
            "recognize() runs its own event loop; in async code use "
            "`[result async for result in stream_ser.listen(...)]`"
        )
    if isinstance(audio, np.ndarray) and sample_rate is None:
        raise ConfigError("recognize(array): give its sample_rate")
    source: Source = audio if not isinstance(audio, np.ndarray) else _blocks(audio, sample_rate)
    channels = audio.shape[1] if isinstance(audio, np.ndarray) and audio.ndim > 1 else 1

    async def collect() -> list[Result]:
        results = listen(source, sample_rate=sample_rate, channels=int(channels), stages=stages,
                         model=model, descriptors=descriptors, settings=settings)  # fmt: skip
        return [result async for result in results]

    return asyncio.run(collect())


async def listen(  # noqa: PLR0913  (one keyword per documented option)
    source: Source,
    *,
    sample_rate: int | None = None,
    channels: int = 1,
    live: bool = False,
    stream_id: str | None = None,
    stages: Collection[Stage] = STAGES,
    model: str | os.PathLike[str] | None = None,
    descriptors: bool = True,
    realtime: bool = False,
    stop: asyncio.Event | None = None,
    settings: Settings | None = None,
) -> AsyncIterator[Result]:
    """The results of one source as they are published (`stages`: which of window,
    provisional and final), until the source ends or `stop` is set (the utterance in flight
    still gets its final). Leaving the loop early stops the pipeline at once.

    `live`: the audio of an array source or a PushSource arrives in real time (a capture, a
    call): the pipeline never makes it wait and finals go out by the fusion deadline; by
    default it is a recording, read as fast as the pipeline takes it, nothing dropped."""
    wanted = _check_stages(stages)
    settings = _settings(settings, model, descriptors, windows="window" in wanted)
    feed = _open(source, settings, _Audio(sample_rate, channels, live, realtime), stream_id)
    hub = ResultHub(history_s=0.0, max_history=2)  # one live subscriber: nothing to replay
    async with app.open_runtime(settings, load_model(settings), hub) as runtime:
        pipeline = runtime.pipeline(feed.stream_id, feed.chunks, feed.stats, feed.lossless)
        subscription = hub.subscribe(feed.stream_id)
        streams = run_streams([pipeline], hub, stop or asyncio.Event(),
                              settings.mqtt.status_interval_s)  # fmt: skip
        driver = asyncio.create_task(_drive(streams, feed, hub), name="listen")
        try:
            async for result in _results(subscription, wanted):
                yield result
            await driver  # raises its error, if it failed
        finally:
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
            subscription.close()
    feed.damage.check()  # a file that could not be decoded to its end: after its results


@dataclass(frozen=True)
class _Audio:
    """How to read an array source, and whether to pace a file."""

    sample_rate: int | None
    channels: int
    live: bool
    realtime: bool


@dataclass
class _Feed:
    """A source opened for one pipeline."""

    stream_id: str
    chunks: AsyncIterator[AudioChunk]
    stats: SourceStats
    lossless: bool  # the source waits for the pipeline (nothing is dropped)
    damage: Damage
    pump: Callable[[], Coroutine[Any, Any, None]] | None = None  # moves arrays into a PushSource


def _open(source: Source, settings: Settings, audio: _Audio, stream_id: str | None) -> _Feed:
    """The pipeline's source: a file or microphone as `stream-ser run` opens them, a
    PushSource as it is, arrays through a PushSource of their own."""
    damage = Damage()
    if isinstance(source, str | os.PathLike | Microphone):
        where = (
            SourceSettings(mic=source.device, stream_id=stream_id)
            if isinstance(source, Microphone)
            else SourceSettings(
                input=os.fspath(source), realtime=audio.realtime, stream_id=stream_id
            )
        )
        where = replace(where, chunk_ms=settings.source.chunk_ms)
        stats = SourceStats()
        chunks = open_source(where, stats, damage)
        return _Feed(default_stream_id(where), chunks, stats, is_recording(where), damage)
    name = stream_id or "stream"
    check_name("stream_id", name, MAX_STREAM_ID_BYTES)
    if isinstance(source, PushSource):
        return _Feed(name, source.chunks(), source.stats, not audio.live, damage)
    if audio.sample_rate is None:
        raise ConfigError("listen(arrays): give the arrays' sample_rate")
    pushed = PushSource(audio.sample_rate, audio.channels, "f32le")
    pump = functools.partial(_pump, source, pushed, audio.live)
    return _Feed(name, pushed.chunks(), pushed.stats, not audio.live, damage, pump)


async def _pump(arrays: AsyncIterable[np.ndarray], pushed: PushSource, live: bool) -> None:
    """Arrays into the PushSource: `put` waits for the pipeline, live `push` never waits;
    the stream ends with the arrays (or an error in them)."""
    try:
        async for array in arrays:
            if live:
                pushed.push(array)
            else:
                await pushed.put(array)
    finally:
        pushed.end()


async def _drive(streams: Awaitable[None], feed: _Feed, hub: ResultHub) -> None:
    """Run the pipeline (and the pump of an array source); the hub closes at the end, so that
    the subscription ends once its messages are read."""
    pump = None if feed.pump is None else asyncio.create_task(feed.pump(), name="listen-pump")
    try:
        await streams
        if pump is not None and not pump.done():
            pump.cancel()  # stopped before the arrays ended
        if pump is not None and (error := await _outcome(pump)) is not None:
            raise error
    except BaseExceptionGroup as group:
        raise _first(group) from None
    finally:
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        hub.close()


async def _outcome(task: asyncio.Task[None]) -> BaseException | None:
    await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.exception()


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    """The StreamSerError behind a task group's failure (else the group itself)."""
    for inner in group.exceptions:
        if isinstance(inner, StreamSerError):
            return inner
        if isinstance(inner, BaseExceptionGroup) and isinstance(_first(inner), StreamSerError):
            return _first(inner)
    return group


async def _results(subscription: Subscription, wanted: frozenset[Stage]) -> AsyncIterator[Result]:
    """The subscription's results of the wanted stages, typed; StreamSerError if the hub
    closed it (a consumer too slow for a final to fit)."""
    async for message in subscription:
        if message.get("type") in ("window", "utterance") and stage_of(message) in wanted:
            yield Result.from_message(message)
    if subscription.close_reason is not None:
        raise StreamSerError(f"results were lost: {subscription.close_reason}")


def _check_stages(stages: Collection[Stage]) -> frozenset[Stage]:
    wanted = frozenset(stages)
    if not wanted or not wanted <= set(STAGES):
        raise ConfigError(f"stages must be some of {STAGES}, not {tuple(stages)!r}")
    return wanted


def _settings(
    settings: Settings | None, model: str | os.PathLike[str] | None, descriptors: bool,
    windows: bool,
) -> Settings:  # fmt: skip
    """The runtime's settings: `stream-ser run`'s defaults (or `settings`) with the options."""
    base = settings or Settings()
    path = os.fspath(model) if model is not None else base.model.path
    return replace(
        base,
        model=replace(base.model, path=path, windows=windows and base.model.windows),
        output=replace(base.output, descriptors=descriptors and base.output.descriptors),
    )


def load_model(settings: Settings) -> Specialist:
    """The specialist the settings name, loaded once per process and session settings."""
    model = settings.model
    return _cached_model(
        ModelSettings(
            path=model.path,
            providers=model.providers,
            intra_op_threads=model.intra_op_threads,
            inter_op_threads=model.inter_op_threads,
        )
    )


@functools.lru_cache(maxsize=4)
def _cached_model(model: ModelSettings) -> Specialist:
    return app.load_specialist(model.path, settings=Settings(model=model))


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _blocks(audio: np.ndarray, sample_rate: int | None) -> AsyncIterator[np.ndarray]:
    """An array as blocks of BLOCK_S, as a file is read."""
    step = max(1, round((sample_rate or 0) * BLOCK_S))
    for start in range(0, len(audio), step):
        yield audio[start : start + step]
