"""How a stream meets slow stages: live (never wait, drop and meet deadlines) or lossless.

One policy object per stream, chosen once where the stream is built (`for_stream`):

    Live      a microphone, a pipe, a remote device, a paced file: capture never waits for a
              stage; the Recognizer drops the oldest waiting window; a final result goes out
              at the fusion deadline with whatever has answered by then.
    Lossless  a file read as fast as possible: capture waits instead. Before a window, until
              the Recognizer would queue it without dropping one; before an utterance, until
              fewer than MAX_LOSSLESS_UTTERANCES are without a final, and (adaptive models)
              until the one before it is in the speaker baseline. A final waits for every
              stage (no deadline until the run is stopped; then the deadline counts from the
              stop), so a file's output does not depend on how busy the machine is.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

from stream_ser.recognizer import Job, Outcome

MAX_LOSSLESS_UTTERANCES = 8  # a lossless stream's utterances between capture and their final


class BackPressure(Protocol):
    """What a stream's tasks ask before they go on; see the module docstring."""

    async def before_utterance(self) -> None:
        """Capture: an utterance is about to start."""

    async def before_job(self, job: Job) -> None:
        """Capture: `job` is about to be submitted."""

    def submitted(self, job: Job, scored: asyncio.Future[Outcome], adaptive: bool) -> None:
        """Capture: `job` was submitted (`adaptive`: its result joins a speaker baseline)."""

    def baseline_current(self) -> None:
        """Publish: the last submitted utterance is in the speaker baseline (or never will be)."""

    def deadline_s(self, job: Job) -> float | None:
        """When the utterance's final goes out at the latest (monotonic); None: no deadline."""

    async def final_deadline_s(
        self, job: Job, stages: Sequence[asyncio.Future[Any]], stop: asyncio.Event
    ) -> float | None:
        """Finalize: wait as the policy requires; the deadline for the stages' answers."""

    def final_sent(self) -> None:
        """Finalize: an utterance's final result has gone out."""


class Live:
    """Never wait: deadlines and the stages' own overflow rules keep up with real time."""

    def __init__(self, deadline_ms: int) -> None:
        self.deadline_ms = deadline_ms

    async def before_utterance(self) -> None:
        """Nothing to wait for."""

    async def before_job(self, job: Job) -> None:
        """Nothing to wait for."""

    def submitted(self, job: Job, scored: asyncio.Future[Outcome], adaptive: bool) -> None:
        """Nothing to track."""

    def baseline_current(self) -> None:
        """Nothing to track."""

    def deadline_s(self, job: Job) -> float | None:
        """The fusion deadline after the audio was ready."""
        return job.ready_s + self.deadline_ms / 1000

    async def final_deadline_s(
        self, job: Job, stages: Sequence[asyncio.Future[Any]], stop: asyncio.Event
    ) -> float | None:
        """The fusion deadline; nothing to wait for."""
        return self.deadline_s(job)

    def final_sent(self) -> None:
        """Nothing to track."""


class Lossless:
    """Wait instead of dropping: see the module docstring."""

    def __init__(self, deadline_ms: int, max_pending_windows: int) -> None:
        self.deadline_ms = deadline_ms
        self.max_pending_windows = max_pending_windows
        self._windows_in_flight: deque[asyncio.Future[Outcome]] = deque()
        self._utterances_in_flight = asyncio.Semaphore(MAX_LOSSLESS_UTTERANCES)
        self._baseline_current = asyncio.Event()  # no utterance waits to join the baseline
        self._baseline_current.set()
        self._stopped_s: float | None = None

    async def before_utterance(self) -> None:
        """Until the utterance before it is in the speaker baseline."""
        await self._baseline_current.wait()

    async def before_job(self, job: Job) -> None:
        """A window: until the Recognizer would queue it without dropping one (fewer than
        `max_pending_windows` of this stream's unscored). An utterance: until fewer than
        MAX_LOSSLESS_UTTERANCES are without a final."""
        if job.kind == "utterance":
            await self._utterances_in_flight.acquire()  # released by its final
            return
        in_flight = self._windows_in_flight
        while in_flight and in_flight[0].done():
            in_flight.popleft()
        if len(in_flight) >= self.max_pending_windows:
            await asyncio.wait({in_flight.popleft()})

    def submitted(self, job: Job, scored: asyncio.Future[Outcome], adaptive: bool) -> None:
        """Track windows in flight; an adaptive utterance holds the next one back."""
        if job.kind == "window":
            self._windows_in_flight.append(scored)
        elif adaptive:
            self._baseline_current.clear()

    def baseline_current(self) -> None:
        """Let the next utterance start."""
        self._baseline_current.set()

    def deadline_s(self, job: Job) -> float | None:
        """None: the final waits for every stage."""
        return None

    async def final_deadline_s(
        self, job: Job, stages: Sequence[asyncio.Future[Any]], stop: asyncio.Event
    ) -> float | None:
        """Every stage's answer, or (once stopped) the fusion deadline counted from the stop."""
        await _answered_or_stopped(stages, stop)
        if not stop.is_set():
            return None
        self._stopped_s = self._stopped_s or time.monotonic()
        return self._stopped_s + self.deadline_ms / 1000

    def final_sent(self) -> None:
        """One more utterance may start."""
        self._utterances_in_flight.release()


def for_stream(lossless: bool, deadline_ms: int, max_pending_windows: int) -> BackPressure:
    """The policy of one stream: Lossless for a source that waits for us, else Live."""
    return Lossless(deadline_ms, max_pending_windows) if lossless else Live(deadline_ms)


async def _answered_or_stopped(futures: Sequence[asyncio.Future[Any]], stop: asyncio.Event) -> None:
    """Return when every future is done or `stop` is set."""
    waiting = {future for future in futures if not future.done()}
    if not waiting or stop.is_set():
        return
    stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    try:
        everything: asyncio.Future[Any] = asyncio.gather(*waiting, return_exceptions=True)
        await asyncio.wait({everything, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
