"""A Pipecat processor: the emotion of the user's speech, as frames in a Pipecat pipeline.

    from stream_ser.integrations.pipecat import EmotionProcessor

    pipeline = Pipeline([transport.input(), stt, EmotionProcessor(), user_aggregator, llm, ...])

EmotionProcessor passes every frame on unchanged and in the order it came (audio included).
The user's input audio (InputAudioRawFrame, any rate and channel count of 16-bit PCM) feeds one
stream-ser stream: a stream_ser.push.PushSource (converted to 16 kHz mono there) run by
stream-ser's own runtime (stream_ser.app.open_runtime, the same stages as `stream-ser run`).
The published messages come back through a stream_ser.hub.ResultHub and go downstream as:

    EmotionFrame                one result; `message` is the published JSON object (schema
                                version 1): every final, windows and provisional results
                                when EmotionParams asks for them
    TranscriptionEmotionFrame   right after each TranscriptionFrame: the finals of the
                                utterances that transcription covers (docs/pipecat.md)

Queues and overflow: audio waits in the PushSource (at most `max_queued_s` seconds); live (the
default) drops the oldest queued audio when recognition falls behind (counted in the counters'
`blocks_dropped`); `lossless=True` makes the audio path wait instead (a recording fed as fast
as it can be read). Results pass through the hub's bounded subscription and are pushed on at once.

EndFrame: the last utterance is flushed, its frames go downstream before the EndFrame, and the
runtime is shut down. CancelFrame: the same without waiting for slow stages; the results still
reach `on_emotion` handlers, but downstream processors are cancelling and may not see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

try:
    from pipecat.frames.frames import (
        CancelFrame,
        DataFrame,
        EndFrame,
        Frame,
        InputAudioRawFrame,
        TranscriptionFrame,
    )
    from pipecat.processors.frame_processor import (
        FrameDirection,
        FrameProcessor,
        FrameProcessorSetup,
    )
except ModuleNotFoundError as err:  # pragma: no cover - depends on the install
    raise ImportError(
        "stream_ser.integrations.pipecat needs Pipecat: pip install 'stream-ser[pipecat]'"
    ) from err

from stream_ser.app import Runtime, load_specialist, open_runtime
from stream_ser.errors import AudioInputError, StreamSerError
from stream_ser.hub import ResultHub, Subscription
from stream_ser.pipeline import StreamPipeline, run_streams
from stream_ser.push import PushSource
from stream_ser.results import Result
from stream_ser.settings import Settings

log = logging.getLogger(__name__)

Message = Mapping[str, Any]  # one published message, as its JSON object (read-only)
MAX_UNATTACHED = 64  # finals kept for the next TranscriptionFrame; older ones are forgotten
SETTLE_POLL_S = 0.02  # how often _attach looks at the audio queue while it waits


# --------------------------------------------------------------------------- frames


@dataclass
class EmotionFrame(DataFrame):
    """One stream-ser result for the user's speech; interruptions do not drop it.

    `message`: the published JSON object (docs/schema/result.schema.json), read-only;
    `result`: its typed view (stream_ser.results.Result, as the Python API gives).
    """

    message: Message
    interruptible: bool = field(default=False, init=False)
    result: Result = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[no-untyped-call]  # pipecat is untyped
        self.result = Result.from_message(self.message)

    @property
    def stage(self) -> str:
        """window, provisional or final."""
        return self.result.stage

    @property
    def final(self) -> bool:
        """True for the one final result of an utterance."""
        return self.result.final

    @property
    def label(self) -> str:
        """The most probable label."""
        return self.result.top_label

    @property
    def probability(self) -> float:
        """The most probable label's probability."""
        return self.result.top_probability

    @property
    def distribution(self) -> dict[str, float]:
        """Label -> probability."""
        return dict(self.result.distribution)

    @property
    def utterance_id(self) -> int:
        """1, 2, ... within the stream."""
        return self.result.utterance_id

    def __str__(self) -> str:
        message = self.message
        return (
            f"{self.name}({self.stage} utterance {message['utterance_id']} "
            f"{message['start_ms']}-{message['end_ms']} ms: {self.label} {self.probability:.2f})"
        )


@dataclass
class TranscriptionEmotionFrame(DataFrame):
    """The finals of the utterances a TranscriptionFrame covers, pushed right after it.

    `finals`: published final results (oldest first); empty when none was ready in time.
    """

    transcription: TranscriptionFrame
    finals: tuple[Message, ...]
    interruptible: bool = field(default=False, init=False)

    @property
    def label(self) -> str | None:
        """The top label of the longest covered utterance; None when none is covered."""
        if not self.finals:
            return None
        longest = max(self.finals, key=lambda m: int(m["end_ms"]) - int(m["start_ms"]))
        return str(longest["top_label"])

    def __str__(self) -> str:
        return f"{self.name}(text: [{self.transcription.text}], finals: {len(self.finals)})"


# --------------------------------------------------------------------------- processor


@dataclass(frozen=True)
class EmotionParams:
    """What the processor pushes and how it meets slow recognition."""

    stream_id: str = "pipecat"
    windows: bool = False  # recognise sliding windows too and push them
    provisional: bool = False  # push provisional results (only with stages the final waits for)
    transcriptions: bool = True  # push a TranscriptionEmotionFrame after each TranscriptionFrame
    attach_timeout_s: float = 1.0  # how long a transcription may wait for its utterances' finals
    lossless: bool = False  # the audio path waits rather than dropping (recordings)
    max_queued_s: float = 10.0  # audio queued for recognition at most (s)
    end_timeout_s: float = 30.0  # at EndFrame: how long flushing the last utterance may take
    cancel_timeout_s: float = 2.0  # at CancelFrame (and cleanup): the same, once stopped


class EmotionProcessor(FrameProcessor):
    """Speech emotion of the user's input audio, pushed downstream as EmotionFrames.

    By default the processor owns a runtime (the model of `settings`, the bundled one by
    default), started at set-up and shut down at the end. Give `runtime` and `hub` instead to
    run its stream on a runtime the caller runs (one model for many calls; stream ids must
    then differ): the runtime's sink must publish to `hub`, and its `run_streams` must read
    `runtime.arrivals`. Event handlers: `on_emotion(processor, frame: EmotionFrame)` for each
    result pushed.
    """

    def __init__(
        self,
        *,
        settings: Settings | None = None,
        params: EmotionParams | None = None,
        runtime: Runtime | None = None,
        hub: ResultHub | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (runtime is None) != (hub is None):
            raise ValueError("EmotionProcessor: give both `runtime` and `hub`, or neither")
        self._params = params or EmotionParams()
        base = settings or Settings()
        self._settings = replace(base, model=replace(base.model, windows=self._params.windows))
        self._shared = runtime is not None
        self._runtime = runtime
        self._hub = hub
        self._stack: contextlib.AsyncExitStack | None = None  # an owned runtime's
        self._serve_task: asyncio.Task[None] | None = None  # an owned runtime's run_streams
        self._subscription: Subscription | None = None
        self._forwarder: asyncio.Task[None] | None = None
        self._source: PushSource | None = None
        self._stream: StreamPipeline | None = None
        self._watcher: asyncio.Task[None] | None = None  # ends the source when the stream ends
        self._stop = asyncio.Event()  # stops an owned runtime's streams at once
        self._changed = asyncio.Event()  # a message came from the hub
        self._input_ended = False  # EndFrame/CancelFrame seen, or the audio cannot be taken
        self._closing = asyncio.Lock()
        self._closed = False
        self._heard_frames = 0  # input audio frames (samples per channel) fed so far
        self._open: dict[int, int] = {}  # utterance id -> start_ms, until its final is out
        self._unattached: deque[Message] = deque(maxlen=MAX_UNATTACHED)
        self.frames_ignored = 0  # audio frames not recognised: another format than the first
        self._register_event_handler("on_emotion")

    # ------------------------------------------------------------------ lifecycle

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        """Load the model and start the runtime (Pipecat sets processors up concurrently)."""
        await super().setup(setup)
        if self._hub is None:
            self._hub = await self._open_runtime()
        self._subscription = self._hub.subscribe(self._params.stream_id)
        self._forwarder = self.create_task(self._forward(self._subscription), "emotion-results")

    async def _open_runtime(self) -> ResultHub:
        """The processor's own runtime, publishing to its own hub, serving arriving streams."""
        settings = self._settings
        specialist = await asyncio.to_thread(load_specialist, settings.model.path, 1, settings)
        async with contextlib.AsyncExitStack() as stack:
            hub = await stack.enter_async_context(ResultHub(history_s=0.0))
            runtime = await stack.enter_async_context(open_runtime(settings, specialist, hub))
            self._stack = stack.pop_all()
        self._runtime = runtime
        self._serve_task = self.create_task(self._serve(runtime), "emotion-runtime")
        return hub

    async def _serve(self, runtime: Runtime) -> None:
        """Run the streams started on the runtime until its arrivals close; report a fault."""
        interval_s = runtime.settings.mqtt.status_interval_s
        try:
            await run_streams([], runtime.sink, self._stop, interval_s,
                              arriving=aiter(runtime.arrivals))  # fmt: skip
        except Exception as err:  # the top of the task: the audio goes on passing through
            log.exception("%s: the stream-ser runtime failed", self)
            await self.push_error(
                f"stream-ser stopped: {err}", exception=err, force_treat_as_permanent=True
            )
        finally:
            if self._source is not None:
                self._source.end()  # a lossless feed waiting for room goes on

    async def cleanup(self) -> None:
        """Stop the stream and the runtime if no EndFrame did."""
        await self._finish(self._params.cancel_timeout_s, stop=True)
        await super().cleanup()  # type: ignore[no-untyped-call]

    @property
    def closed(self) -> bool:
        """True once the stream has ended and its results were pushed (and an owned runtime
        shut down)."""
        return self._closed

    def counters(self) -> dict[str, int]:
        """The stream's counters (as on the status topic) and `frames_ignored`."""
        counts = self._stream.status_counters() if self._stream is not None else {}
        return counts | {"frames_ignored": self.frames_ignored}

    # ------------------------------------------------------------------ frames in

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Pass the frame on; feed the user's audio to stream-ser; flush at the end."""
        await super().process_frame(frame, direction)
        if isinstance(frame, EndFrame):  # the last utterance's frames go before the EndFrame
            await self._finish(self._params.end_timeout_s, stop=False)
        await self.push_frame(frame, direction)
        if direction != FrameDirection.DOWNSTREAM:
            return
        if isinstance(frame, InputAudioRawFrame):
            await self._hear(frame)
        elif isinstance(frame, TranscriptionFrame) and self._params.transcriptions:
            await self._attach(frame)
        elif isinstance(frame, CancelFrame):
            await self._finish(self._params.cancel_timeout_s, stop=True)

    async def _hear(self, frame: InputAudioRawFrame) -> None:
        """Queue the frame's audio for recognition (the first frame starts the stream)."""
        if self._input_ended:
            return
        source = self._source or await self._start_stream(frame)
        if source is None or source.ended:
            return
        if (frame.sample_rate, frame.num_channels) != (source.sample_rate, source.channels):
            self._ignore(frame, f"{frame.sample_rate} Hz x {frame.num_channels} channel(s)")
            return
        try:
            if self._params.lossless:
                await source.put(frame.audio)
            else:
                source.push(frame.audio)
        except AudioInputError as err:
            self._ignore(frame, str(err))
            return
        self._heard_frames += frame.num_frames

    def _ignore(self, frame: InputAudioRawFrame, why: str) -> None:
        self.frames_ignored += 1
        if self.frames_ignored == 1:  # once: a transport sends the same format again and again
            source = self._source
            expected = f"{source.sample_rate} Hz x {source.channels}" if source else "?"
            log.warning("%s: audio not recognised (%s; the stream is %s)", self, why, expected)

    async def _start_stream(self, frame: InputAudioRawFrame) -> PushSource | None:
        """The stream, in the first audio frame's format; None if it cannot start."""
        if self._runtime is None:
            return None
        try:
            source = PushSource(
                frame.sample_rate, frame.num_channels, "s16le",
                max_queued_s=self._params.max_queued_s,
            )  # fmt: skip
            stream = self._runtime.start(
                self._params.stream_id, source.chunks(), source.stats, self._params.lossless
            )
        except StreamSerError as err:  # the format, the stream id, a runtime shutting down
            self._input_ended = True
            await self.push_error(f"stream-ser cannot start the stream: {err}", exception=err)
            return None
        self._source, self._stream = source, stream
        self._watcher = self.create_task(self._watch(stream, source), "emotion-stream-end")
        return source

    async def _watch(self, stream: StreamPipeline, source: PushSource) -> None:
        """When the stream ends (a fault too), a lossless feed waiting for room goes on."""
        await stream.finished.wait()
        source.end()

    # ------------------------------------------------------------------ results out

    async def _forward(self, subscription: Subscription) -> None:
        """Every message of the stream, in publish order, until the subscription closes."""
        async for message in subscription:
            self._changed.set()
            kind = message.get("type")
            if kind == "speaking" and message["speaking"]:
                self._open[int(message["utterance_id"])] = int(message["at_ms"])
            elif kind in ("window", "utterance"):
                await self._result(EmotionFrame(message=message))
        if subscription.close_reason is not None:  # the hub gave up on us: no more results
            await self.push_error(f"stream-ser results stopped: {subscription.close_reason}")

    async def _result(self, frame: EmotionFrame) -> None:
        if frame.final:
            self._open.pop(frame.utterance_id, None)
            if self._params.transcriptions:
                self._unattached.append(frame.message)
        elif not (self._params.windows if frame.stage == "window" else self._params.provisional):
            return
        await self._call_event_handler("on_emotion", frame)
        await self.push_frame(frame)

    async def _attach(self, transcription: TranscriptionFrame) -> None:
        """Push the finals of the utterances the transcription covers.

        Covered: the utterances that started before the transcription arrived (in stream
        time: the audio fed so far) whose finals were not pushed with an earlier transcription.
        Those still open (speech going on, or its final on the way) are waited for, at most
        `attach_timeout_s`; one not final by then goes with the next transcription.
        """
        heard_ms = self._heard_ms()
        deadline_s = time.monotonic() + self._params.attach_timeout_s
        while not self._settled(heard_ms) and (left_s := deadline_s - time.monotonic()) > 0:
            self._changed.clear()  # set by each message; the audio queue is looked at anyway
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left_s, SETTLE_POLL_S))
        covered = tuple(m for m in self._unattached if int(m["start_ms"]) < heard_ms)
        later = [m for m in self._unattached if int(m["start_ms"]) >= heard_ms]
        self._unattached = deque(later, maxlen=MAX_UNATTACHED)
        await self.push_frame(
            TranscriptionEmotionFrame(transcription=transcription, finals=covered)
        )

    def _heard_ms(self) -> int:
        source = self._source
        return 0 if source is None else self._heard_frames * 1000 // source.sample_rate

    def _settled(self, heard_ms: int) -> bool:
        """True when every utterance that started before `heard_ms` has its final."""
        source = self._source
        if source is None or self._stream is None or self._stream.finished.is_set():
            return True
        caught_up = source.queued_ms == 0
        return caught_up and all(start >= heard_ms for start in self._open.values())

    # ------------------------------------------------------------------ the end

    async def _finish(self, timeout_s: float, stop: bool) -> None:
        """End the stream (flushing its last utterance), deliver its results, close; once."""
        self._input_ended = True
        if stop and not self._shared:
            self._stop.set()
        async with self._closing:
            if self._closed:
                return
            if self._source is not None:
                self._source.end()
            if self._stream is not None:
                await self._await_stream(self._stream, timeout_s)
            if self._runtime is not None and not self._shared:
                self._runtime.arrivals.close()  # its run_streams ends with our stream
            await self._await_task(self._serve_task)
            await self._await_task(self._watcher)
            if self._subscription is not None:
                self._subscription.close()  # what it holds is still delivered
            await self._await_task(self._forwarder)
            if self._stack is not None:
                await self._stack.aclose()
            self._closed = True

    async def _await_stream(self, stream: StreamPipeline, timeout_s: float) -> None:
        """The stream's end within `timeout_s`; an owned runtime's is then stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stream.finished.wait(), timeout_s)
        if stream.finished.is_set():
            return
        log.warning("%s: the last utterance took over %.1f s: stopping", self, timeout_s)
        self._stop.set()

    async def _await_task(self, task: asyncio.Task[None] | None) -> None:
        """The task's end within `cancel_timeout_s`, else cancelled."""
        if task is None:
            return
        await asyncio.wait({task}, timeout=self._params.cancel_timeout_s)
        if not task.done():
            await self.cancel_task(task)
