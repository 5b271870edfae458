"""The stages chained in one place: source -> VAD -> specialist -> utterance stages -> sink.

One process serves one or more streams. Each stream has its own tasks:

    capture   source chunks -> Segmenter -> Windower -> jobs submitted to the Recognizer;
              a finished utterance also goes to every utterance stage (stream_ser.stages);
              the futures go into the stream's `pending` queue, in stream order
    publish   awaits the specialist's futures in order and publishes windows and provisional
              utterance results
    finalize  one final result per utterance, fused from the stages' results

All streams share the Recognizer (stream_ser.recognizer: one model session, one inference
thread, windows batched across streams) and the utterance stages.

Speaker baselines (adaptation.PerSpeaker): with the speaker stage, a finished utterance is
labelled first, then scored with its speaker's baseline; windows use the last utterance's
speaker's. Without it, one unlabelled baseline: exactly one StreamBaseline per stream.

Queues and their overflow rules:
    Recognizer          at most `max_pending_windows` windows of one stream wait: its oldest
                        is dropped (counted in `windows_dropped`); utterances never.
    utterance stages    each stage's own rule (stream_ser.stages, stream_ser.alm.batcher).
    stream `pending`    at most MAX_PENDING_RESULTS results wait to be published: capture
                        waits (a file is read more slowly; a microphone keeps capturing into
                        its own bounded queue).
    back-pressure       a stream's policy (stream_ser.backpressure): Live never waits and
                        meets the fusion deadline; Lossless (a file read as fast as possible)
                        waits instead of dropping, so its output does not depend on timing.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, TypeVar

import numpy as np

from stream_ser import SAMPLE_RATE
from stream_ser.adaptation import PerSpeaker, StreamBaseline
from stream_ser.backpressure import BackPressure, Live
from stream_ser.errors import ModelError, StreamSerError
from stream_ser.events import (
    AudioChunk,
    Recognition,
    SpeechAudio,
    UtteranceEnd,
    UtteranceStart,
    samples_to_ms,
)
from stream_ser.kinds import ResultStage, StatusState
from stream_ser.messages import (
    ResultMessage,
    StatusMessage,
    StreamInfo,
    result_message,
    speaking_message,
    status_message,
)
from stream_ser.publish import Sink
from stream_ser.recognizer import Job, Outcome, Recognizer, Scored
from stream_ser.source import SourceStats
from stream_ser.specialist import Baseline
from stream_ser.stages import SPEAKER_STAGE, StreamScope, Utterance, UtteranceStages, speaker_of
from stream_ser.vad import Segmenter, segment

log = logging.getLogger(__name__)

MAX_PENDING_RESULTS = 64
OBSERVER_REFRESH_S = 1.0  # how often the observer (metrics) gets fresh counters
T = TypeVar("T")


@dataclass
class Counters:
    """One stream's counters, reported on the status topic."""

    utterances: int = 0
    windows: int = 0
    windows_dropped: int = 0  # skipped because the specialist fell behind
    short_segments: int = 0  # voiced blips below min_utterance_ms
    model_errors: int = 0
    lag_ms: int = 0  # now: how far capture is behind real time (a gauge, not a count)
    specialist_only: int = 0  # finals without the ALM's answer (late, failed or dropped)
    descriptors_skipped: int = 0  # finals without descriptors: the analyser was behind
    transcripts_missing: int = 0  # finals without a transcript: late, skipped or failed
    speakers_unlabelled: int = 0  # finals without a speaker label: skipped or failed


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


class Observer(Protocol):
    """Receives what the pipeline publishes and counts (the Prometheus exporter is one)."""

    def observe_result(self, stream_id: str, message: Mapping[str, Any]) -> None:
        """One published result."""

    def update_counters(self, stream_id: str, counters: Mapping[str, int | float]) -> None:
        """A stream's counters, as on the status topic."""

    def update_sink_counters(self, counters: Mapping[str, int | float]) -> None:
        """The sink's delivery counters."""

    def set_health(self, ok: bool, reason: str = "") -> None:
        """Whether the process is healthy."""


@dataclass(frozen=True)
class Pending:
    """A job and the futures of every stage working on it."""

    job: Job
    scored: asyncio.Future[Outcome]
    stages: dict[str, asyncio.Future[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Final:
    """An utterance waiting for its final result."""

    job: Job
    scored: Scored | None  # None if the specialist failed
    specialist_error: str | None
    stages: dict[str, asyncio.Future[Any]]


@dataclass
class StreamPipeline:
    """One stream from its source to the sink, through the shared stages."""

    stream: StreamInfo
    source: AsyncIterator[AudioChunk]
    segmenter: Segmenter
    recognizer: Recognizer
    sink: Sink
    window_ms: int
    hop_ms: int
    stages: UtteranceStages
    windows: bool = True
    source_stats: SourceStats = field(default_factory=SourceStats)
    counters: Counters = field(default_factory=Counters)
    observer: Observer | None = None
    more_counters: Callable[[], dict[str, int]] | None = None  # e.g. a remote stream's
    backpressure: BackPressure | None = None
    """How the stream meets slow stages (stream_ser.backpressure); None: Live."""

    def __post_init__(self) -> None:
        self.finished = asyncio.Event()
        self._origin_s: float | None = None  # monotonic time of the stream's time zero
        adaptation = self.recognizer.specialist.card.adaptation
        self.baselines: PerSpeaker[StreamBaseline] | None = None  # per speaker label
        if adaptation is not None:
            self.baselines = PerSpeaker(lambda: StreamBaseline(adaptation))
        self._speaker: str | None = None  # the last utterance's label: the windows' baseline
        self.scope = StreamScope(self.stream_id)
        if self.backpressure is None:
            self.backpressure = Live(self.stages.fusion.deadline_ms)
        self._policy: BackPressure = self.backpressure

    async def run(self, stop: asyncio.Event) -> None:
        """Run until the source ends (or `stop` is set), then publish what is pending."""
        pending: asyncio.Queue[Pending | None] = asyncio.Queue(MAX_PENDING_RESULTS)
        finals: asyncio.Queue[_Final | None] = asyncio.Queue(MAX_PENDING_RESULTS)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._capture(pending, stop), name=f"capture-{self.stream_id}")
                group.create_task(self._publish(pending, finals), name=f"publish-{self.stream_id}")
                group.create_task(self._finalize(finals, stop), name=f"finalize-{self.stream_id}")
        finally:
            self.finished.set()

    @property
    def stream_id(self) -> str:
        """The stream's id."""
        return self.stream.stream_id

    def status_counters(self) -> dict[str, int]:
        """This stream's counters, the source's included."""
        self.counters.short_segments = self.segmenter.short_segments
        more = self.more_counters() if self.more_counters is not None else {}
        return asdict(self.counters) | asdict(self.source_stats) | more

    def _track_lag(self, chunk: AudioChunk) -> None:
        """Lag: how far capture is behind real time (0 for a file read faster than that)."""
        end_s = (chunk.start_ms + len(chunk.samples) * 1000 // SAMPLE_RATE) / 1000
        now_s = time.monotonic()
        if self._origin_s is None:
            self._origin_s = now_s - end_s
        self.counters.lag_ms = max(0, round((now_s - self._origin_s - end_s) * 1000))

    async def _capture(self, pending: asyncio.Queue[Pending | None], stop: asyncio.Event) -> None:
        windower = Windower(self.window_ms, self.hop_ms)
        try:
            chunks = until_stopped(self.source, stop, self._track_lag)
            async for event in segment(chunks, self.segmenter):
                await self._speaking(event)
                if isinstance(event, UtteranceStart):
                    await self._policy.before_utterance()
                for job in self._jobs(event, windower):
                    await self._policy.before_job(job)
                    await pending.put(self._submit(job))
        finally:
            await pending.put(None)

    async def _speaking(self, event: object) -> None:
        if isinstance(event, UtteranceStart | UtteranceEnd):
            speaking = isinstance(event, UtteranceStart)
            at_ms = event.start_ms if isinstance(event, UtteranceStart) else event.end_ms
            await self.sink.speaking(
                self.stream_id, speaking_message(self.stream, event.utterance_id, speaking, at_ms)
            )

    def _baseline(self, speaker: str | None) -> Baseline | None:
        """The speaker's adaptation baseline now (None: the population's)."""
        return self.baselines.get(speaker).current() if self.baselines is not None else None

    def _jobs(self, event: object, windower: Windower) -> list[Job]:
        baseline = self._baseline(self._speaker)
        if isinstance(event, UtteranceStart):
            windower.start(event)
        elif isinstance(event, SpeechAudio) and self.windows:
            return [
                replace(job, baseline=baseline, stream_id=self.stream_id)
                for job in windower.add(event)
            ]
        elif isinstance(event, UtteranceEnd):
            return [
                Job("utterance", event.utterance_id, event.samples, event.start_ms,
                    event.end_ms, time.monotonic(), event.reason, baseline, self.stream_id)
            ]  # fmt: skip
        return []

    def _submit(self, job: Job) -> Pending:
        """Start every stage the job needs; nothing here waits."""
        if job.kind == "window":
            scored = self.recognizer.submit(job)
            self._policy.submitted(job, scored, adaptive=self.baselines is not None)
            return Pending(job, scored)
        started = self.stages.start(Utterance(job, self._policy.deadline_s(job), self.scope))
        if SPEAKER_STAGE in started:
            scored = asyncio.ensure_future(self._score_as_speaker(job, started))
        else:
            scored = self.recognizer.submit(job)
        self._policy.submitted(job, scored, adaptive=self.baselines is not None)
        return Pending(job, scored, started)

    async def _score_as_speaker(self, job: Job, started: dict[str, asyncio.Future[Any]]) -> Outcome:
        """The utterance scored with its speaker's baseline, once the speaker stage labelled it."""
        self._speaker = await speaker_of(started)
        return await self.recognizer.submit(replace(job, baseline=self._baseline(self._speaker)))

    async def _publish(
        self, pending: asyncio.Queue[Pending | None], finals: asyncio.Queue[_Final | None]
    ) -> None:
        """Windows and provisional utterance results, in stream order, as soon as ready."""
        while (item := await pending.get()) is not None:
            job = item.job
            scored, error = await self._scored(job, item.scored)
            if job.kind == "window":
                if scored is not None:
                    timing = {"model_ms": round(scored.model_ms, 3)}
                    await self._send(job, scored.probabilities, "window", timing)
                    self.counters.windows += 1
                continue
            speaker = await speaker_of(item.stages)  # done: the specialist waited for it
            if scored is not None and self.baselines is not None and scored.embedding is not None:
                self.baselines.get(speaker).update(scored.embedding, scored.probabilities)
            self._policy.baseline_current()
            if scored is not None and self.stages.final_waits:
                fields: dict[str, Any] = {"model_ms": round(scored.model_ms, 3)}
                fields |= {"speaker": speaker} if speaker is not None else {}
                await self._send(job, scored.probabilities, "provisional", fields)
            await finals.put(_Final(job, scored, error, item.stages))
        await finals.put(None)

    async def _scored(
        self, job: Job, future: asyncio.Future[Outcome]
    ) -> tuple[Scored | None, str | None]:
        try:
            scored = await future
        except ModelError as err:
            self.counters.model_errors += 1
            log.error("%s: %s %d: %s", self.stream_id, job.kind, job.utterance_id, err)
            return None, str(err)
        if scored is None:
            self.counters.windows_dropped += 1
        return scored, None

    async def _finalize(self, finals: asyncio.Queue[_Final | None], stop: asyncio.Event) -> None:
        """Exactly one final result per utterance, by the deadline its policy sets."""
        while (item := await finals.get()) is not None:
            futures = item.stages
            deadline_s = await self._policy.final_deadline_s(item.job, list(futures.values()), stop)
            results = {name: await _by_deadline(f, deadline_s) for name, f in futures.items()}
            probabilities = None if item.scored is None else item.scored.probabilities
            fused, extras = self.stages.final(
                self.stream, probabilities, item.specialist_error, results
            )
            if item.scored is not None:
                extras["model_ms"] = round(item.scored.model_ms, 3)
            self.counters.specialist_only += "specialist_only" in extras["flags"]
            flags = extras["flags"]
            self.counters.descriptors_skipped += "descriptors_skipped" in flags
            self.counters.transcripts_missing += any(f.startswith("transcript_") for f in flags)
            self.counters.speakers_unlabelled += any(f.startswith("speaker_") for f in flags)
            await self._send(item.job, fused, "final", extras, self.stages.fusion.labels)
            self.counters.utterances += 1
            self._policy.final_sent()

    async def _send(
        self,
        job: Job,
        probabilities: np.ndarray,
        stage: ResultStage,
        extras: dict[str, Any],
        labels: tuple[str, ...] | None = None,
    ) -> None:
        result = Recognition(
            job.kind, job.utterance_id, job.start_ms, job.end_ms, probabilities,
            (time.monotonic() - job.ready_s) * 1000, job.reason,
        )  # fmt: skip
        message: ResultMessage = result_message(self.stream, result, stage, labels)
        message.update(extras)  # type: ignore[typeddict-item]
        message["lag_ms"] = self.counters.lag_ms
        await self.sink.result(self.stream_id, message)
        if self.observer is not None:
            self.observer.observe_result(self.stream_id, message)


async def _by_deadline(future: asyncio.Future[T], deadline_s: float | None) -> T | Exception | None:
    """The future's result, its exception, or None if it is not done by the deadline
    (None: no deadline)."""
    if future.done():
        return future.exception() or future.result()  # type: ignore[return-value]
    try:
        remaining_s = None if deadline_s is None else max(0.0, deadline_s - time.monotonic())
        async with asyncio.timeout(remaining_s):
            return await asyncio.shield(future)
    except TimeoutError:
        return None
    except StreamSerError as err:
        return err


async def until_stopped(
    source: AsyncIterator[AudioChunk],
    stop: asyncio.Event,
    on_chunk: Callable[[AudioChunk], None] | None = None,
) -> AsyncIterator[AudioChunk]:
    """The source's chunks until it ends or `stop` is set; `on_chunk` sees each one first."""
    chunks = aiter(source)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while True:
            next_chunk = asyncio.ensure_future(anext(chunks))
            await asyncio.wait({next_chunk, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():  # also when the next chunk was ready too (a fast file)
                next_chunk.cancel()
                await asyncio.gather(next_chunk, return_exceptions=True)
                return
            try:
                chunk = next_chunk.result()
            except StopAsyncIteration:
                return
            if on_chunk is not None:
                on_chunk(chunk)
            yield chunk
    finally:
        stopping.cancel()


async def run_streams(  # noqa: C901, PLR0917  (replaced by the stage redesign, issue #16)
    streams: Sequence[StreamPipeline],
    sink: Sink,
    stop: asyncio.Event,
    status_interval_s: float = 10.0,
    observer: Observer | None = None,
    arriving: AsyncIterator[StreamPipeline] | None = None,
    more_counters: Callable[[], dict[str, int]] | None = None,
) -> None:
    """Run every stream to its end, with the retained status kept up to date.

    `arriving` yields streams that start later (remote devices); the run ends when it is
    exhausted and every stream has ended. An arrived stream that has ended is freed: its
    counts stay in the totals, but it leaves the status's stream list and per-stream counters.
    `more_counters` adds process-wide counters (a worker's) to the totals.
    """
    running = list(streams)
    ended: dict[str, int] = {}  # totals of the arrived streams that have ended

    def observe() -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        counters = {s.stream_id: s.status_counters() for s in running}
        sink_counters = sink.counters()
        if observer is not None:
            for stream_id, values in counters.items():
                observer.update_counters(stream_id, values)
            observer.update_sink_counters(sink_counters)
        return counters, sink_counters

    def status(state: StatusState) -> StatusMessage:
        counters, sink_counters = observe()
        if observer is not None:
            observer.set_health(state == "online", state)
        totals = _totals([ended, *(s.status_counters() for s in running)]) | sink_counters
        totals |= more_counters() if more_counters is not None else {}
        return status_message(state, [s.stream_id for s in running], totals, counters)

    async def run_arrived(stream: StreamPipeline) -> None:
        try:
            await stream.run(stop)
        finally:
            running.remove(stream)
            counts = stream.status_counters()
            counts.pop("lag_ms", None)  # a gauge: an ended stream has none
            ended.update(_totals([ended, counts]))

    async def report() -> None:
        while True:
            await asyncio.sleep(status_interval_s)
            await sink.status(status("online"))

    async def refresh() -> None:  # the observer's counters, between status messages too
        while observer is not None:
            await asyncio.sleep(OBSERVER_REFRESH_S)
            observe()

    await sink.status(status("online"))
    reporter = asyncio.create_task(report(), name="status")
    refresher = asyncio.create_task(refresh(), name="observer-refresh")
    try:
        async with asyncio.TaskGroup() as group:
            for stream in running:
                group.create_task(stream.run(stop), name=f"stream-{stream.stream_id}")
            async for stream in arriving or _nothing():
                running.append(stream)
                group.create_task(run_arrived(stream), name=f"stream-{stream.stream_id}")
    finally:
        reporter.cancel()
        refresher.cancel()
        await asyncio.gather(reporter, refresher, return_exceptions=True)
    await sink.status(status("offline"))


async def _nothing() -> AsyncIterator[StreamPipeline]:
    return
    yield


def _totals(per_stream: Iterable[dict[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for counters in per_stream:
        for name, value in counters.items():
            totals[name] = totals.get(name, 0) + value
    return totals


def new_session_id() -> str:
    """A short random id that makes message ids unique across runs."""
    return secrets.token_hex(4)
