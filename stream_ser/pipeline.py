"""The stages chained in one place: sources -> VAD -> specialist -> publisher.

One process serves one or more streams. Each stream has its own tasks:

    capture   source chunks -> Segmenter -> Windower -> jobs submitted to the Recognizer;
              the job's future goes into the stream's `pending` queue, in stream order
    publish   awaits the futures in order and publishes each result

All streams share one Recognizer (one model session, one inference thread), which batches
pending windows of equal length across streams into one model call.

Queues and their overflow rules:
    Recognizer windows  at most `max_pending_windows` windows of one stream wait: its
                        oldest is dropped (the stream counts it in `windows_dropped`);
                        a `lossless` stream (a file read as fast as possible) waits instead.
    Recognizer utterances  never dropped.
    lossless utterances a `lossless` stream has at most MAX_LOSSLESS_UTTERANCES utterances
                        without a final result: capture waits. Their finals wait for every
                        stage (no fusion deadline until the run is stopped; no skipped
                        descriptors), and an utterance starts only once the one before it
                        is in the speaker baseline, so a file's output does not depend on
                        how busy the machine is.
    stream `pending`    at most MAX_PENDING_RESULTS results wait to be published: capture
                        waits (a file is read more slowly; a microphone keeps capturing into
                        its own bounded queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from types import TracebackType
from typing import Any, Protocol, TypeVar

import numpy as np

from stream_ser import SAMPLE_RATE
from stream_ser.acoustics import Analysis, AnalysisSkipped, StreamAcoustics, warm_up
from stream_ser.adaptation import StreamBaseline
from stream_ser.alm.base import AlmResult
from stream_ser.alm.batcher import AlmBatcher
from stream_ser.errors import ModelError, StreamSerError
from stream_ser.events import (
    AudioChunk,
    Recognition,
    SpeechAudio,
    UtteranceEnd,
    UtteranceStart,
    samples_to_ms,
)
from stream_ser.fusion import FusionConfig
from stream_ser.messages import (
    StreamInfo,
    final_fields,
    result_message,
    speaking_message,
    status_message,
)
from stream_ser.publish import Sink
from stream_ser.source import SourceStats
from stream_ser.specialist import Baseline, Specialist
from stream_ser.vad import Segmenter, segment

log = logging.getLogger(__name__)

MAX_PENDING_RESULTS = 64
MAX_LOSSLESS_UTTERANCES = 8  # a lossless stream's utterances between capture and their final
MAX_WINDOW_BATCH = 32
OBSERVER_REFRESH_S = 1.0  # how often the observer (metrics) gets fresh counters
T = TypeVar("T")


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
    baseline: Baseline | None = None  # the stream's speaker baseline (adaptive models)
    stream_id: str = ""


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


@dataclass(frozen=True)
class Scored:
    """The specialist's answer for one job."""

    probabilities: np.ndarray  # float64, one per label
    embedding: np.ndarray | None  # adaptive models' pooled embedding (utterances only)
    model_ms: float  # inference time of the model call that held this job


Outcome = Scored | None  # None: a window dropped by the overflow rule


@dataclass
class _Queued:
    job: Job
    future: asyncio.Future[Outcome]


class Recognizer:
    """The specialist shared by all streams: one inference thread, windows batched.

    `submit` never blocks. Utterances go first, one per model call (their lengths differ);
    windows waiting together, of one length and one speaker baseline, run as one batch.
    """

    def __init__(self, specialist: Specialist, max_pending_windows: int = 8) -> None:
        self.specialist = specialist
        self.max_pending_windows = max_pending_windows
        # a separate window model is not adaptive: windows of every stream share a call
        card = specialist.card
        self._windows_ignore_baseline = card.window_model is not None or card.adaptation is None
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
        """Queue a job; the future gives its Scored outcome (None: window dropped)."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        if job.kind == "window":
            windows = [
                q
                for q in self._queue
                if q.job.kind == "window" and q.job.stream_id == job.stream_id
            ]
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
            try:
                scored = await loop.run_in_executor(self._executor, self._infer, batch)
            except ModelError as err:
                for queued in batch:
                    queued.future.set_exception(err)
                continue
            for queued, outcome in zip(batch, scored, strict=True):
                queued.future.set_result(outcome)

    def _infer(self, batch: list[_Queued]) -> list[Scored]:
        """Runs in the inference thread."""
        first = batch[0].job
        samples = [queued.job.samples for queued in batch]
        started = time.perf_counter()
        if first.kind == "window":
            rows = self.specialist.predict_windows(samples, first.baseline)
            model_ms = (time.perf_counter() - started) * 1000
            return [Scored(row, None, model_ms) for row in rows]
        probabilities, embeddings = self.specialist.analyze(samples, first.baseline)
        model_ms = (time.perf_counter() - started) * 1000
        embedding = None if embeddings is None else embeddings[0]
        return [Scored(probabilities[0], embedding, model_ms)]

    def _take_batch(self) -> list[_Queued]:
        """The oldest utterance (a final result waits on it), else the oldest window plus
        every waiting window that can share its model call."""
        first = next((q for q in self._queue if q.job.kind == "utterance"), self._queue[0])
        self._queue.remove(first)
        if first.job.kind != "window":
            return [first]
        batch = [first]
        for queued in list(self._queue):
            if len(batch) == MAX_WINDOW_BATCH:
                break
            job = queued.job
            if (
                job.kind == "window"
                and len(job.samples) == len(first.job.samples)
                and (self._windows_ignore_baseline or job.baseline is first.job.baseline)
            ):
                self._queue.remove(queued)
                batch.append(queued)
        return batch


class Analyzer:
    """Per-utterance acoustics (eGeMAPS: descriptors and ALM cues) in its own thread.

    Overflow rule: at most `max_pending` analyses wait; beyond that, and for an utterance
    whose final result has already gone out (its deadline passed) when its turn comes, the
    analysis is skipped (the final is flagged `descriptors_skipped`). A skipped utterance does
    not join the stream's speaker baseline. An analysis without a deadline (a lossless
    stream's, which bounds its own utterances in flight) is never skipped.
    """

    def __init__(self, max_pending: int = 32) -> None:
        self.max_pending = max_pending
        self.skipped = 0
        self._pending = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="acoustics")
        self._executor.submit(warm_up)  # opensmile loads while the pipeline starts

    async def analyse(
        self, acoustics: StreamAcoustics, samples: np.ndarray, deadline_s: float | None
    ) -> Analysis:
        """One utterance, against (then into) its stream's speaker baseline; skipped if its
        final result goes out at `deadline_s` (monotonic) before its turn comes."""
        if deadline_s is not None and self._pending >= self.max_pending:
            self.skipped += 1
            raise AnalysisSkipped(f"{self._pending} analyses already waiting")
        self._pending += 1
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, self._analyse, acoustics, samples, deadline_s
            )
        except AnalysisSkipped:
            self.skipped += 1
            raise
        finally:
            self._pending -= 1

    @staticmethod
    def _analyse(
        acoustics: StreamAcoustics, samples: np.ndarray, deadline_s: float | None
    ) -> Analysis:
        if deadline_s is not None and time.monotonic() > deadline_s:
            raise AnalysisSkipped("its final result has already gone out")
        return acoustics.analyse(samples)

    def close(self) -> None:
        """Stop the thread once the work queued so far is done."""
        self._executor.shutdown(wait=True)


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


class SideSpecialists:
    """Further ONNX specialists, run once per utterance in their own thread (fusion sources
    named specialist:<model id>)."""

    def __init__(self, specialists: Sequence[Specialist]) -> None:
        self.specialists = list(specialists)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="side-specialists")

    async def predict(self, samples: np.ndarray) -> dict[str, dict[str, float]]:
        """Each specialist's distribution; one that fails is left out (and logged)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._predict, samples)

    def _predict(self, samples: np.ndarray) -> dict[str, dict[str, float]]:
        found = {}
        for specialist in self.specialists:
            try:
                row = specialist.predict([samples])[0]
            except ModelError as err:
                log.error("%s: %s", specialist.card.model_id, err)
                continue
            found[f"specialist:{specialist.card.model_id}"] = dict(
                zip(specialist.labels, map(float, row), strict=True)
            )
        return found

    def close(self) -> None:
        """Stop the thread once the work queued so far is done."""
        self._executor.shutdown(wait=True)


@dataclass
class UtteranceStages:
    """What happens to a finished utterance besides the specialist (shared by all streams)."""

    fusion: FusionConfig
    analyzer: Analyzer | None = None  # descriptors (and cues for the ALM)
    alm: AlmBatcher | None = None
    side: SideSpecialists | None = None
    descriptors: bool = True
    """Publish the analyzer's descriptors (False: it runs only for the ALM's cue tokens)."""

    @property
    def final_waits(self) -> bool:
        """The final result waits for another stage: the specialist's result goes out first,
        as a provisional result."""
        return self.alm is not None or self.analyzer is not None or self.side is not None


@dataclass(frozen=True)
class _Final:
    """An utterance waiting for its final result."""

    job: Job
    scored: Scored | None  # None if the specialist failed
    specialist_error: str | None
    analysis: asyncio.Future[Analysis] | None
    alm: asyncio.Future[AlmResult] | None
    side: asyncio.Future[dict[str, dict[str, float]]] | None


@dataclass(frozen=True)
class Pending:
    """A job and the futures of every stage working on it."""

    job: Job
    scored: asyncio.Future[Outcome]
    analysis: asyncio.Future[Analysis] | None = None
    alm: asyncio.Future[AlmResult] | None = None
    side: asyncio.Future[dict[str, dict[str, float]]] | None = None


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
    # the source waits for us (a file read as fast as possible): it is read no faster than
    # the specialist scores its windows and the stages finish its utterances, so no window is
    # dropped, every final waits for all its stages, and the output is reproducible
    lossless: bool = False

    def __post_init__(self) -> None:
        self.finished = asyncio.Event()
        self._windows_in_flight: deque[asyncio.Future[Outcome]] = deque()
        self._utterances_in_flight = asyncio.Semaphore(MAX_LOSSLESS_UTTERANCES)
        self._baseline_current = asyncio.Event()  # no utterance waits to join the baseline
        self._baseline_current.set()
        self._origin_s: float | None = None  # monotonic time of the stream's time zero
        adaptation = self.recognizer.specialist.card.adaptation
        self.baseline = StreamBaseline(adaptation) if adaptation is not None else None
        self.acoustics = StreamAcoustics() if self.stages.analyzer is not None else None

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
                if self.lossless and isinstance(event, UtteranceStart):
                    await self._baseline_current.wait()
                for job in self._jobs(event, windower):
                    if self.lossless and job.kind == "window":
                        await self._room_for_a_window()
                    elif self.lossless:
                        await self._utterances_in_flight.acquire()  # released by its final
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

    def _jobs(self, event: object, windower: Windower) -> list[Job]:
        baseline = self.baseline.current() if self.baseline is not None else None
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

    async def _room_for_a_window(self) -> None:
        """Wait until the Recognizer would queue one more of this stream's windows without
        dropping one (fewer than `max_pending_windows` of them unscored)."""
        in_flight = self._windows_in_flight
        while in_flight and in_flight[0].done():
            in_flight.popleft()
        if len(in_flight) >= self.recognizer.max_pending_windows:
            await asyncio.wait({in_flight.popleft()})

    def _submit(self, job: Job) -> Pending:
        """Start every stage the job needs; nothing here waits."""
        scored = self.recognizer.submit(job)
        if job.kind == "window":
            if self.lossless:
                self._windows_in_flight.append(scored)
            return Pending(job, scored)
        if self.lossless and self.baseline is not None:
            self._baseline_current.clear()  # the next utterance waits until this one is in it
        analysis = None
        if self.stages.analyzer is not None and self.acoustics is not None:
            deadline_s = self._deadline_s(job)
            analysis = asyncio.ensure_future(
                self.stages.analyzer.analyse(self.acoustics, job.samples, deadline_s)
            )
            analysis.add_done_callback(_retrieve)
        alm = None
        if self.stages.alm is not None:
            alm = asyncio.ensure_future(_ask_alm(self.stages.alm, job.samples, analysis))
            alm.add_done_callback(_retrieve)
        side = None
        if self.stages.side is not None:
            side = asyncio.ensure_future(self.stages.side.predict(job.samples))
            side.add_done_callback(_retrieve)
        return Pending(job, scored, analysis, alm, side)

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
            if scored is not None and self.baseline is not None and scored.embedding is not None:
                self.baseline.update(scored.embedding)
            self._baseline_current.set()
            if scored is not None and self.stages.final_waits:
                timing = {"model_ms": round(scored.model_ms, 3)}
                await self._send(job, scored.probabilities, "provisional", timing)
            await finals.put(_Final(job, scored, error, item.analysis, item.alm, item.side))
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
        """Exactly one final result per utterance, at the latest at the fusion deadline (a
        lossless stream's: once every stage has answered or, after `stop`, at the deadline
        counted from the stop)."""
        stopped_s: float | None = None
        while (item := await finals.get()) is not None:
            deadline_s = self._deadline_s(item.job)
            if deadline_s is None:  # lossless
                await _answered_or_stopped((item.analysis, item.alm, item.side), stop)
                if stop.is_set():
                    stopped_s = stopped_s or time.monotonic()
                    deadline_s = stopped_s + self.stages.fusion.deadline_ms / 1000
            analysis = await _by_deadline(item.analysis, deadline_s)
            alm = await _by_deadline(item.alm, deadline_s)
            side = await _by_deadline(item.side, deadline_s)
            published = self.stages.descriptors and item.analysis is not None
            probabilities, extras = final_fields(
                self.stream, self.stages.fusion, item.scored, item.specialist_error,
                item.alm is not None, alm, analysis if published else None,
                side if isinstance(side, dict) else {}, published,
            )  # fmt: skip
            if item.scored is not None:
                extras["model_ms"] = round(item.scored.model_ms, 3)
            self.counters.specialist_only += "specialist_only" in extras["flags"]
            self.counters.descriptors_skipped += "descriptors_skipped" in extras["flags"]
            await self._send(item.job, probabilities, "final", extras, self.stages.fusion.labels)
            self.counters.utterances += 1
            if self.lossless:
                self._utterances_in_flight.release()

    def _deadline_s(self, job: Job) -> float | None:
        """When the utterance's final goes out at the latest (monotonic); None: when every
        stage has answered (a lossless stream)."""
        if self.lossless:
            return None
        return job.ready_s + self.stages.fusion.deadline_ms / 1000

    async def _send(
        self,
        job: Job,
        probabilities: np.ndarray,
        stage: str,
        extras: dict[str, Any],
        labels: tuple[str, ...] | None = None,
    ) -> None:
        kind = "window" if stage == "window" else "utterance"
        result = Recognition(
            kind, job.utterance_id, job.start_ms, job.end_ms, probabilities,
            (time.monotonic() - job.ready_s) * 1000, job.reason,
        )  # fmt: skip
        message = result_message(self.stream, result, stage, labels) | extras
        message["lag_ms"] = self.counters.lag_ms
        await self.sink.result(self.stream_id, message)
        if self.observer is not None:
            self.observer.observe_result(self.stream_id, message)


async def _ask_alm(
    alm: AlmBatcher, samples: np.ndarray, analysis: asyncio.Future[Analysis] | None
) -> AlmResult:
    """Submit to the ALM, with the utterance's cue tokens when the cue mode needs them."""
    cues = None
    if analysis is not None and alm.options.cues != "none":
        with contextlib.suppress(StreamSerError):
            cues = (await analysis).cues
    return await alm.submit(samples, cues=cues)


async def _answered_or_stopped(
    futures: Sequence[asyncio.Future[Any] | None], stop: asyncio.Event
) -> None:
    """Return when every future is done or `stop` is set."""
    waiting = {future for future in futures if future is not None and not future.done()}
    if not waiting or stop.is_set():
        return
    stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    try:
        everything: asyncio.Future[Any] = asyncio.gather(*waiting, return_exceptions=True)
        await asyncio.wait({everything, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()


async def _by_deadline(
    future: asyncio.Future[T] | None, deadline_s: float | None
) -> T | Exception | None:
    """The future's result, its exception, or None if it is absent or not done by the deadline
    (None: no deadline)."""
    if future is None:
        return None
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


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a background future's exception as seen; its consumer reports it (or it timed out)."""
    if not future.cancelled():
        future.exception()


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

    def status(state: str) -> dict[str, Any]:
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


def install_stop_handlers(stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM/SIGHUP stop capture; the pipeline then drains and exits cleanly
    (SIGHUP: the terminal a foreground run was started from has closed)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
