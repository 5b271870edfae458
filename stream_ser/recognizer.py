"""The specialist stage: one Recognizer shared by every stream, built on the model-worker core.

Utterances go first, one per model call (their lengths differ); windows waiting together, of
one length and one speaker baseline, run as one batch. Overflow rule: at most
`max_pending_windows` windows of one stream wait; the oldest is dropped (its future gets None
and the stream counts it in `windows_dropped`). Utterances are never dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np

from stream_ser.inference import Batching, ModelWorker, Overflow
from stream_ser.kinds import EndReason, JobKind
from stream_ser.specialist import Baseline, Specialist

MAX_WINDOW_BATCH = 32


@dataclass(frozen=True)
class Job:
    """Audio waiting for the specialist."""

    kind: JobKind
    utterance_id: int
    samples: np.ndarray = field(repr=False)
    start_ms: int
    end_ms: int
    ready_s: float  # time.monotonic() when the audio was complete
    reason: EndReason | None = None
    baseline: Baseline | None = None  # the stream's speaker baseline (adaptive models)
    stream_id: str = ""


@dataclass(frozen=True)
class Scored:
    """The specialist's answer for one job."""

    probabilities: np.ndarray  # float64, one per label
    embedding: np.ndarray | None  # adaptive models' pooled embedding (utterances only)
    model_ms: float  # inference time of the model call that held this job


Outcome = Scored | None  # None: a window dropped by the overflow rule


class Recognizer:
    """The specialist shared by all streams: one inference thread, windows batched.

    `submit` never blocks; `async with` runs its worker.
    """

    def __init__(self, specialist: Specialist, max_pending_windows: int = 8) -> None:
        self.specialist = specialist
        self.max_pending_windows = max_pending_windows
        # a separate window model is not adaptive: windows of every stream share a call
        card = specialist.card
        self._windows_ignore_baseline = card.window_model is not None or card.adaptation is None
        self.worker: ModelWorker[Job, Outcome] = ModelWorker(
            "specialist",
            self._infer,
            Batching(MAX_WINDOW_BATCH, key=self._batch_key, urgent=_is_utterance),
            Overflow(max_pending_windows, "drop_oldest", _dropped, group=_window_stream),
        )

    async def __aenter__(self) -> Recognizer:
        await self.worker.__aenter__()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.worker.__aexit__(kind, err, tb)

    def submit(self, job: Job) -> asyncio.Future[Outcome]:
        """Queue a job; the future gives its Scored outcome (None: window dropped)."""
        return self.worker.submit(job)

    def _batch_key(self, job: Job) -> Hashable | None:
        """Windows of one length (and one baseline, for an adaptive model) share a call."""
        if job.kind != "window":
            return None
        baseline = None if self._windows_ignore_baseline else id(job.baseline)
        return (len(job.samples), baseline)

    def _infer(self, batch: list[Job]) -> list[Outcome]:
        """Runs in the inference thread."""
        first = batch[0]
        samples = [job.samples for job in batch]
        started = time.perf_counter()
        if first.kind == "window":
            rows = self.specialist.predict_windows(samples, first.baseline)
            model_ms = (time.perf_counter() - started) * 1000
            return [Scored(row, None, model_ms) for row in rows]
        probabilities, embeddings = self.specialist.analyze(samples, first.baseline)
        model_ms = (time.perf_counter() - started) * 1000
        embedding = None if embeddings is None else embeddings[0]
        return [Scored(probabilities[0], embedding, model_ms)]


def _is_utterance(job: Job) -> bool:
    return job.kind == "utterance"


def _window_stream(job: Job) -> Hashable | None:
    return job.stream_id if job.kind == "window" else None


def _dropped(job: Job, waiting: int) -> Outcome:
    return None
