"""The stages chained in one place: source -> VAD -> specialist -> publisher.

    capture task    source chunks -> Segmenter -> jobs (windows, utterances)
    recognize task  jobs -> Specialist (single-thread executor) -> results
    publish task    results -> sink (MQTT or JSON Lines)
    status task     retained status every status_interval_s

Queues and their overflow rules:
    jobs     at most `max_pending_windows` windows: the oldest window is dropped (counted);
             at most MAX_PENDING_UTTERANCES utterances: capture waits (a file is simply read
             more slowly; a microphone keeps capturing into its own bounded queue).
    results  at most MAX_PENDING_RESULTS: the recognizer waits for the publisher.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
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

MAX_PENDING_UTTERANCES = 32
MAX_PENDING_RESULTS = 256


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
    """What the status topic reports, besides the source's own counters."""

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
            jobs.append(
                Job(
                    "window",
                    speech.utterance_id,
                    window,
                    start_ms,
                    start_ms + samples_to_ms(self._window),
                    time.monotonic(),
                )
            )
            self._next_end += self._hop
        keep = min(len(self._buffer), self._window)
        self._buffer_start = total - keep
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return jobs


class JobQueue:
    """FIFO of jobs: windows are dropped oldest-first when too many wait, utterances never."""

    def __init__(self, max_windows: int, counters: Counters) -> None:
        self._jobs: deque[Job | None] = deque()
        self._max_windows = max_windows
        self._counters = counters
        self._changed = asyncio.Condition()

    def _count(self, kind: str) -> int:
        return sum(1 for job in self._jobs if job is not None and job.kind == kind)

    async def put(self, job: Job | None) -> None:
        """Queue a job (None ends the stream); waits only while too many utterances wait."""
        async with self._changed:
            if (
                job is not None
                and job.kind == "window"
                and self._count("window") >= (self._max_windows)
            ):
                oldest = next(j for j in self._jobs if j is not None and j.kind == "window")
                self._jobs.remove(oldest)
                self._counters.windows_dropped += 1
            if job is not None and job.kind == "utterance":
                await self._changed.wait_for(
                    lambda: self._count("utterance") < MAX_PENDING_UTTERANCES
                )
            self._jobs.append(job)
            self._changed.notify_all()

    async def get(self) -> Job | None:
        """The oldest job; None once the stream has ended and everything is done."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._jobs))
            job = self._jobs.popleft()
            self._changed.notify_all()
            return job


@dataclass
class Pipeline:
    """One stream from source to sink."""

    source: AsyncIterator[AudioChunk]
    segmenter: Segmenter
    specialist: Specialist
    sink: Sink
    stream: StreamInfo
    window_ms: int
    hop_ms: int
    windows: bool = True
    max_pending_windows: int = 8
    status_interval_s: float = 10.0
    source_stats: SourceStats = field(default_factory=SourceStats)
    counters: Counters = field(default_factory=Counters)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._drained = asyncio.Event()

    async def run(self) -> None:
        """Run until the source ends (or `stop` is set), then drain every stage."""
        jobs = JobQueue(self.max_pending_windows, self.counters)
        results: asyncio.Queue[Recognition | None] = asyncio.Queue(MAX_PENDING_RESULTS)
        await self.sink.status(self._status("online"))
        with ThreadPoolExecutor(1, thread_name_prefix="specialist") as executor:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._capture(jobs), name="capture")
                group.create_task(self._recognize(jobs, results, executor), name="recognize")
                group.create_task(self._publish(results), name="publish")
                status = group.create_task(self._report_status(), name="status")
                await self._drained.wait()
                status.cancel()
        await self.sink.status(self._status("offline"))

    async def _capture(self, jobs: JobQueue) -> None:
        windower = Windower(self.window_ms, self.hop_ms)
        try:
            async for event in segment(self._until_stopped(), self.segmenter):
                if isinstance(event, UtteranceStart):
                    windower.start(event)
                elif isinstance(event, SpeechAudio) and self.windows:
                    for job in windower.add(event):
                        await jobs.put(job)
                elif isinstance(event, UtteranceEnd):
                    await jobs.put(
                        Job(
                            "utterance",
                            event.utterance_id,
                            event.samples,
                            event.start_ms,
                            event.end_ms,
                            time.monotonic(),
                            event.reason,
                        )
                    )
        finally:
            self.counters.short_segments = self.segmenter.short_segments
            await jobs.put(None)

    async def _until_stopped(self) -> AsyncIterator[AudioChunk]:
        """The source's chunks until it ends or `stop` is set."""
        chunks = aiter(self.source)
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            while True:
                next_chunk = asyncio.ensure_future(anext(chunks))
                await asyncio.wait({next_chunk, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not next_chunk.done():
                    next_chunk.cancel()
                    return
                try:
                    yield next_chunk.result()
                except StopAsyncIteration:
                    return
        finally:
            stopping.cancel()

    async def _recognize(
        self,
        jobs: JobQueue,
        results: asyncio.Queue[Recognition | None],
        executor: ThreadPoolExecutor,
    ) -> None:
        loop = asyncio.get_running_loop()
        while (job := await jobs.get()) is not None:
            try:
                (probabilities,) = await loop.run_in_executor(
                    executor, self.specialist.predict, [job.samples]
                )
            except ModelError as err:
                self.counters.model_errors += 1
                log.error("utterance %d: %s", job.utterance_id, err)
                continue
            latency_ms = (time.monotonic() - job.ready_s) * 1000
            await results.put(
                Recognition(
                    job.kind,
                    job.utterance_id,
                    job.start_ms,
                    job.end_ms,
                    probabilities,
                    latency_ms,
                    job.reason,
                )
            )
        await results.put(None)

    async def _publish(self, results: asyncio.Queue[Recognition | None]) -> None:
        while (result := await results.get()) is not None:
            await self.sink.result(self.stream.stream_id, result_message(self.stream, result))
            if result.kind == "utterance":
                self.counters.utterances += 1
            else:
                self.counters.windows += 1
        self._drained.set()

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(self.status_interval_s)
            await self.sink.status(self._status("online"))

    def _status(self, state: str) -> dict[str, Any]:
        self.counters.short_segments = self.segmenter.short_segments
        counters = asdict(self.counters) | asdict(self.source_stats)
        return status_message(state, [self.stream.stream_id], counters)


def new_session_id() -> str:
    """A short random id that makes message ids unique across runs."""
    return secrets.token_hex(4)


def install_stop_handlers(stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM stop capture; the pipeline then drains and exits cleanly."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
