"""The stages chained in one place: sources -> VAD -> specialist -> publisher.

One process serves one or more streams. Each stream has its own tasks:

    capture   source chunks -> Segmenter -> Windower -> jobs submitted to the Recognizer;
              the job's future goes into the stream's `pending` queue, in stream order
    publish   awaits the futures in order and publishes each result

All streams share one Recognizer (one model session, one inference thread), which batches
pending windows of equal length across streams into one model call.

Queues and their overflow rules:
    Recognizer windows  at most `max_pending_windows` windows wait: the oldest is dropped
                        (its stream counts it in `windows_dropped`).
    Recognizer utterances  never dropped.
    stream `pending`    at most MAX_PENDING_RESULTS results wait to be published: capture
                        waits (a file is read more slowly; a microphone keeps capturing into
                        its own bounded queue).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

import numpy as np

from stream_ser import SAMPLE_RATE
from stream_ser.errors import ModelError
from stream_ser.events import (
    AudioChunk,
    Recognition,
    SpeechAudio,
    UtteranceEnd,
    UtteranceStart,
    samples_to_ms,
)
from stream_ser.messages import StreamInfo, result_message, status_message
from stream_ser.publish import Sink
from stream_ser.source import SourceStats
from stream_ser.specialist import Specialist
from stream_ser.vad import Segmenter, segment

log = logging.getLogger(__name__)

MAX_PENDING_RESULTS = 64
MAX_WINDOW_BATCH = 32


@dataclass(frozen=True)
class Job:
    """Audio waiting for the specialist."""

    kind: str  # "window" or "utterance"
    utterance_id: int
    samples: np.ndarray = field(repr=False)
    start_ms: int
    end_ms: int
    ready_s: float  # time.monotonic() when the audio was complete
    reason: str | None = None


@dataclass
class Counters:
    """One stream's counters, reported on the status topic."""

    utterances: int = 0
    windows: int = 0
    windows_dropped: int = 0  # skipped because the specialist fell behind
    short_segments: int = 0  # voiced blips below min_utterance_ms
    model_errors: int = 0


class Windower:
    """Cuts the utterance in progress into `window_ms` windows every `hop_ms` of speech."""

    def __init__(self, window_ms: int, hop_ms: int) -> None:
        self._window = SAMPLE_RATE * window_ms // 1000
        self._hop = SAMPLE_RATE * hop_ms // 1000
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0  # utterance-relative sample index of _buffer[0]
        self._next_end = self._window
        self._utterance_start_ms = 0

    def start(self, event: UtteranceStart) -> None:
        """Forget the previous utterance."""
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0
        self._next_end = self._window
        self._utterance_start_ms = event.start_ms

    def add(self, speech: SpeechAudio) -> list[Job]:
        """Append speech; return a job for each window it completes."""
        self._buffer = np.concatenate([self._buffer, speech.samples])
        total = self._buffer_start + len(self._buffer)
        jobs = []
        while self._next_end <= total:
            begin = self._next_end - self._window - self._buffer_start
            window = self._buffer[begin : begin + self._window]
            start_ms = self._utterance_start_ms + samples_to_ms(self._next_end - self._window)
            end_ms = start_ms + samples_to_ms(self._window)
            jobs.append(
                Job("window", speech.utterance_id, window, start_ms, end_ms, time.monotonic())
            )
            self._next_end += self._hop
        keep = min(len(self._buffer), self._window)
        self._buffer_start = total - keep
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return jobs


Outcome = np.ndarray | None  # probabilities, or None for a dropped window


@dataclass
class _Queued:
    job: Job
    future: asyncio.Future[Outcome]


class Recognizer:
    """The specialist shared by all streams: one inference thread, windows batched.

    `submit` never blocks. Utterances run one per model call (their lengths differ);
    windows waiting together, all of one length, run as one batch.
    """

    def __init__(self, specialist: Specialist, max_pending_windows: int = 8) -> None:
        self.specialist = specialist
        self.max_pending_windows = max_pending_windows
        self._queue: deque[_Queued] = deque()
        self._arrived = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._worker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Recognizer:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="specialist")
        self._worker = asyncio.create_task(self._run(), name="recognizer")
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def submit(self, job: Job) -> asyncio.Future[Outcome]:
        """Queue a job; the future gives its probabilities (None: window dropped)."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        if job.kind == "window":
            windows = [q for q in self._queue if q.job.kind == "window"]
            if len(windows) >= self.max_pending_windows:
                self._queue.remove(windows[0])
                windows[0].future.set_result(None)
        self._queue.append(_Queued(job, future))
        self._arrived.set()
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            batch = self._take_batch()
            samples = [queued.job.samples for queued in batch]
            try:
                probabilities = await loop.run_in_executor(
                    self._executor, self.specialist.predict, samples
                )
            except ModelError as err:
                for queued in batch:
                    queued.future.set_exception(err)
                continue
            for queued, row in zip(batch, probabilities, strict=True):
                queued.future.set_result(row)

    def _take_batch(self) -> list[_Queued]:
        """The oldest job, plus every waiting window of the same length if it is a window."""
        first = self._queue.popleft()
        if first.job.kind != "window":
            return [first]
        length = len(first.job.samples)
        batch = [first]
        for queued in list(self._queue):
            if len(batch) == MAX_WINDOW_BATCH:
                break
            if queued.job.kind == "window" and len(queued.job.samples) == length:
                self._queue.remove(queued)
                batch.append(queued)
        return batch


@dataclass
class StreamPipeline:
    """One stream from its source to the sink, through the shared Recognizer."""

    stream: StreamInfo
    source: AsyncIterator[AudioChunk]
    segmenter: Segmenter
    recognizer: Recognizer
    sink: Sink
    window_ms: int
    hop_ms: int
    windows: bool = True
    source_stats: SourceStats = field(default_factory=SourceStats)
    counters: Counters = field(default_factory=Counters)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until the source ends (or `stop` is set), then publish what is pending."""
        pending: asyncio.Queue[tuple[Job, asyncio.Future[Outcome]] | None] = asyncio.Queue(
            MAX_PENDING_RESULTS
        )
        async with asyncio.TaskGroup() as group:
            group.create_task(self._capture(pending, stop), name=f"capture-{self.stream_id}")
            group.create_task(self._publish(pending), name=f"publish-{self.stream_id}")

    @property
    def stream_id(self) -> str:
        """The stream's id."""
        return self.stream.stream_id

    def status_counters(self) -> dict[str, int]:
        """This stream's counters, the source's included."""
        self.counters.short_segments = self.segmenter.short_segments
        return asdict(self.counters) | asdict(self.source_stats)

    async def _capture(
        self,
        pending: asyncio.Queue[tuple[Job, asyncio.Future[Outcome]] | None],
        stop: asyncio.Event,
    ) -> None:
        windower = Windower(self.window_ms, self.hop_ms)
        try:
            async for event in segment(until_stopped(self.source, stop), self.segmenter):
                for job in self._jobs(event, windower):
                    await pending.put((job, self.recognizer.submit(job)))
        finally:
            await pending.put(None)

    def _jobs(self, event: object, windower: Windower) -> list[Job]:
        if isinstance(event, UtteranceStart):
            windower.start(event)
        elif isinstance(event, SpeechAudio) and self.windows:
            return windower.add(event)
        elif isinstance(event, UtteranceEnd):
            return [
                Job("utterance", event.utterance_id, event.samples, event.start_ms,
                    event.end_ms, time.monotonic(), event.reason)
            ]  # fmt: skip
        return []

    async def _publish(
        self, pending: asyncio.Queue[tuple[Job, asyncio.Future[Outcome]] | None]
    ) -> None:
        while (item := await pending.get()) is not None:
            job, future = item
            try:
                probabilities = await future
            except ModelError as err:
                self.counters.model_errors += 1
                log.error("%s: %s %d: %s", self.stream_id, job.kind, job.utterance_id, err)
                continue
            if probabilities is None:
                self.counters.windows_dropped += 1
                continue
            latency_ms = (time.monotonic() - job.ready_s) * 1000
            result = Recognition(
                job.kind, job.utterance_id, job.start_ms, job.end_ms, probabilities,
                latency_ms, job.reason,
            )  # fmt: skip
            await self.sink.result(self.stream_id, result_message(self.stream, result))
            if job.kind == "utterance":
                self.counters.utterances += 1
            else:
                self.counters.windows += 1


async def until_stopped(
    source: AsyncIterator[AudioChunk], stop: asyncio.Event
) -> AsyncIterator[AudioChunk]:
    """The source's chunks until it ends or `stop` is set."""
    chunks = aiter(source)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while True:
            next_chunk = asyncio.ensure_future(anext(chunks))
            await asyncio.wait({next_chunk, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not next_chunk.done():
                next_chunk.cancel()
                await asyncio.gather(next_chunk, return_exceptions=True)
                return
            try:
                yield next_chunk.result()
            except StopAsyncIteration:
                return
    finally:
        stopping.cancel()


async def run_streams(
    streams: Sequence[StreamPipeline],
    sink: Sink,
    stop: asyncio.Event,
    status_interval_s: float = 10.0,
) -> None:
    """Run every stream to its end, with the retained status kept up to date."""

    def status(state: str) -> dict[str, Any]:
        counters = {s.stream_id: s.status_counters() for s in streams}
        totals = _totals(counters) | sink.counters()
        return status_message(state, [s.stream_id for s in streams], totals, counters)

    async def report() -> None:
        while True:
            await asyncio.sleep(status_interval_s)
            await sink.status(status("online"))

    await sink.status(status("online"))
    reporter = asyncio.create_task(report(), name="status")
    try:
        async with asyncio.TaskGroup() as group:
            for stream in streams:
                group.create_task(stream.run(stop), name=f"stream-{stream.stream_id}")
    finally:
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)
    await sink.status(status("offline"))


def _totals(per_stream: dict[str, dict[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for counters in per_stream.values():
        for name, value in counters.items():
            totals[name] = totals.get(name, 0) + value
    return totals


def new_session_id() -> str:
    """A short random id that makes message ids unique across runs."""
    return secrets.token_hex(4)


def install_stop_handlers(stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM stop capture; the pipeline then drains and exits cleanly."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
