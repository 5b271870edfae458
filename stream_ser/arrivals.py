"""Streams that start while a runtime runs, from any number of producers.

A WebSocket connection, a Pipecat pipeline or Python code starts a stream with
`Runtime.start(...)` (stream_ser.app); it lands in the runtime's `Arrivals`, which `run_streams`
reads as its `arriving` feed, merged (`merge`) with the remote devices an MQTT worker claims.
The feed ends when `close()` is called (at shutdown): streams already running go on to their
end; starting another then raises RuntimeClosed.

Arrivals also knows which stream ids are live, so that two streams never share one: an id is
taken from the moment its pipeline is created until the pipeline has finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import TypeVar, cast

from stream_ser.errors import StreamSerError
from stream_ser.pipeline import StreamPipeline

T = TypeVar("T")


class StreamIdInUse(StreamSerError):
    """Another live stream of this process has the stream id."""


class RuntimeClosed(StreamSerError):
    """The runtime is shutting down and takes no new streams."""


class Arrivals:
    """The streams started on a running runtime; an async iterator ended by `close`."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[StreamPipeline | None] = asyncio.Queue()
        self._live: dict[str, StreamPipeline] = {}
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once `close` was called."""
        return self._closed

    def live_ids(self) -> list[str]:
        """The ids of the streams created and not yet finished."""
        self._forget_finished()
        return list(self._live)

    def live(self, stream_id: str) -> StreamPipeline | None:
        """The live stream with this id (await its `.finished` for its end), or None."""
        self._forget_finished()
        return self._live.get(stream_id)

    def check_free(self, stream_id: str) -> None:
        """StreamIdInUse if a live stream has the id; RuntimeClosed after `close`."""
        if self._closed:
            raise RuntimeClosed("the runtime is shutting down: no new streams")
        self._forget_finished()
        if stream_id in self._live:
            raise StreamIdInUse(f"stream id {stream_id!r} is in use by a live stream")

    def track(self, pipeline: StreamPipeline) -> None:
        """Count a stream as live until its pipeline has finished (Runtime.pipeline calls this
        for every pipeline it builds: local sources, remote devices, started streams)."""
        self._forget_finished()
        self._live.setdefault(pipeline.stream_id, pipeline)

    def add(self, pipeline: StreamPipeline) -> None:
        """Hand a new stream to the runtime, which runs it at once; RuntimeClosed after `close`."""
        if self._closed:
            raise RuntimeClosed("the runtime is shutting down: no new streams")
        self.track(pipeline)
        self._queue.put_nowait(pipeline)

    def close(self) -> None:
        """No more streams: the feed ends after the ones already added."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)

    def _forget_finished(self) -> None:
        for stream_id, pipeline in list(self._live.items()):
            if pipeline.finished.is_set():
                del self._live[stream_id]

    def __aiter__(self) -> AsyncIterator[StreamPipeline]:
        return self._feed()

    async def _feed(self) -> AsyncIterator[StreamPipeline]:
        while (pipeline := await self._queue.get()) is not None:
            yield pipeline


async def merge(feeds: Iterable[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of several async iterators as they come; ends when all have ended
    (an error in one ends the merge with that error)."""
    items: asyncio.Queue[tuple[T | None, Exception | None]] = asyncio.Queue(1)
    end: tuple[None, None] = (None, None)

    async def pump(feed: AsyncIterator[T]) -> None:
        try:
            async for item in feed:
                await items.put((item, None))
        except Exception as err:  # handed to the reader, which raises it
            await items.put((None, err))
        else:
            await items.put(end)

    tasks = [asyncio.create_task(pump(feed), name="arrivals-merge") for feed in feeds]
    running = len(tasks)
    try:
        while running:
            got = await items.get()
            if got is end:
                running -= 1
                continue
            item, error = got
            if error is not None:
                raise error
            yield cast(T, item)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
