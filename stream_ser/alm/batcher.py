"""Dynamic batching of finished utterances onto one ALM backend, off the event loop.

`submit()` never blocks: it queues the utterance and returns a future of its `AlmResult`. A batch
goes to the backend when it holds `max_batch` utterances or its oldest has waited `max_wait_ms`;
the backend runs in the thread of a `ModelWorker` (stream_ser.inference), so capture and the
specialist keep going.

Overflow rule: the queue holds at most `max_queue` waiting utterances; submitting to a full queue
drops the OLDEST waiting utterance (a live stream cares most about recent speech). Its future gets
an `ok=False` result with the reason; drops are counted in `stats` and logged.

Failures: an out-of-memory batch is split in halves and retried down to single utterances; an
utterance that still fails, or any batch whose backend raises another StreamSerError, gets an
`ok=False` result with the reason (the pipeline then publishes a specialist-only result, flagged).
Other exceptions are bugs: they are logged with a traceback and set on the batch's futures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from stream_ser import acoustics
from stream_ser.acoustics import CueTokens
from stream_ser.alm.base import (
    AlmBackend,
    AlmOptions,
    AlmOutOfMemoryError,
    AlmResult,
    template_means,
)
from stream_ser.errors import StreamSerError
from stream_ser.inference import Batching, ModelWorker, Overflow

log = logging.getLogger(__name__)


@dataclass
class AlmStats:
    """Counters for the status output; updated on the event loop only."""

    submitted: int = 0
    completed: int = 0
    """Results with a distribution."""
    failed: int = 0
    """Results flagged ok=False by a model error or out of memory."""
    dropped: int = 0
    """Utterances dropped by the overflow rule."""
    batches: int = 0
    """Backend calls, including retries after a split."""
    splits: int = 0
    """Out-of-memory batch splits."""
    waiting: int = 0
    """Utterances queued now."""


@dataclass
class _Pending:
    audio: np.ndarray
    cues: CueTokens | None
    enqueued_s: float  # time.monotonic()


@dataclass
class _Outcome:
    distribution: dict[str, float] | None
    error: str | None
    inference_ms: float
    batch_size: int
    cue_phrase: str | None = None
    rationale: str | None = None
    cue_baseline: str | None = None
    templates: tuple[dict[str, float], ...] = ()


class AlmBatcher:
    """`async with AlmBatcher(backend) as alm: result = await alm.submit(audio, cues=...)`."""

    def __init__(self, backend: AlmBackend, options: AlmOptions | None = None) -> None:
        self.backend = backend
        self.options = options or backend.options
        self._completed = 0
        self._failed = 0
        self._batches: int = 0
        self._splits: int = 0
        self.worker: ModelWorker[_Pending, AlmResult] = ModelWorker(
            "alm",
            self._infer,
            Batching(
                self.options.max_batch, key=_together, linger_s=self.options.max_wait_ms / 1000
            ),
            Overflow(self.options.max_queue, "drop_oldest", self._dropped),
            on_close=self._shut_down,
            wait_on_close=False,
        )

    @property
    def stats(self) -> AlmStats:
        """The counters now."""
        worker = self.worker.stats
        return AlmStats(
            worker.submitted, self._completed, self._failed, worker.refused,
            self._batches, self._splits, worker.waiting,
        )  # fmt: skip

    async def __aenter__(self) -> AlmBatcher:
        await self.worker.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(drain=exc_type is None)

    async def close(self, drain: bool = True) -> None:
        """Stop the worker; with `drain`, first finish every queued utterance. Without it,
        queued utterances get a flagged "shutdown" result at once (a model call in progress
        still finishes in its thread)."""
        await self.worker.close(drain)

    def submit(self, audio: np.ndarray, cues: CueTokens | None = None) -> asyncio.Future[AlmResult]:
        """Queue one finished utterance (16 kHz mono float32); never blocks."""
        if not self.worker.running:
            raise StreamSerError("alm: the batcher is not running (use `async with`)")
        pending = _Pending(np.asarray(audio, dtype=np.float32).reshape(-1), cues, time.monotonic())
        future = self.worker.submit(pending)
        future.add_done_callback(self._count)
        return future

    async def drain(self) -> None:
        """Send what is queued without waiting for deadlines; return when all have results."""
        await self.worker.drain()

    def _count(self, future: asyncio.Future[AlmResult]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        result = future.result()
        if result.ok:
            self._completed += 1
        elif result.batch_size:  # a model error, not a drop or the shutdown
            self._failed += 1

    def _dropped(self, pending: _Pending, waiting: int) -> AlmResult:
        log.warning(
            "alm: queue full (max_queue=%d), dropped the oldest waiting utterance "
            "(%d dropped so far)",
            self.options.max_queue,
            self.worker.stats.refused,
        )
        reason = f"dropped: ALM queue full (max_queue={self.options.max_queue})"
        return self._result(pending, _Outcome(None, reason, 0.0, 0), time.monotonic())

    def _shut_down(self, pending: _Pending) -> AlmResult:
        return self._result(pending, _Outcome(None, "shutdown", 0.0, 0), time.monotonic())

    def _result(self, pending: _Pending, outcome: _Outcome, now_s: float) -> AlmResult:
        options = self.backend.options
        return AlmResult(
            distribution=outcome.distribution or {},
            ok=outcome.distribution is not None,
            error=outcome.error,
            backend=self.backend.spec,
            prompt_set=options.prompt_set,
            audio_repeats=options.audio_repeats,
            text_repeats=options.text_repeats,
            cue_mode=options.cues if self.backend.kind != "clap" else "none",
            latency_ms=round((now_s - pending.enqueued_s) * 1000, 3),
            inference_ms=round(outcome.inference_ms, 3),
            batch_size=outcome.batch_size,
            cues=outcome.cue_phrase,
            cue_baseline=outcome.cue_baseline,
            rationale=outcome.rationale,
            templates=outcome.templates,
        )

    # --- worker thread from here on: no event-loop objects are touched ---

    def _infer(self, batch: list[_Pending]) -> list[AlmResult]:
        audio = [pending.audio for pending in batch]
        outcomes = self._predict_split(audio, self._cues(batch))
        now_s = time.monotonic()
        return [
            self._result(pending, outcome, now_s)
            for pending, outcome in zip(batch, outcomes, strict=True)
        ]

    def _cues(self, batch: list[_Pending]) -> list[CueTokens | None]:
        """Missing cues are computed here once (population baseline) when the mode needs them."""
        if self.backend.options.cues == "none" or self.backend.kind == "clap":
            return [pending.cues for pending in batch]
        return [
            pending.cues or acoustics.cue_tokens(acoustics.analyse_functionals(pending.audio))
            for pending in batch
        ]

    def _predict_split(
        self, audio: Sequence[np.ndarray], cues: Sequence[CueTokens | None]
    ) -> list[_Outcome]:
        self._batches += 1
        start_s = time.perf_counter()
        try:
            members = self.backend.predict_templates(audio, cues)
            distributions = template_means(self.backend.labels, members)
            phrases = self.backend.cue_phrases(audio, cues)
        except AlmOutOfMemoryError as err:
            if len(audio) == 1:
                return [_Outcome(None, f"out of memory: {err}", _ms(start_s), 1)]
            self._splits += 1
            log.warning("alm: out of memory on a batch of %d, splitting", len(audio))
            half = (len(audio) + 1) // 2
            return self._predict_split(audio[:half], cues[:half]) + self._predict_split(
                audio[half:], cues[half:]
            )
        except StreamSerError as err:
            log.error("alm: batch of %d failed: %s", len(audio), err)
            return [_Outcome(None, str(err), _ms(start_s), len(audio)) for _ in audio]
        rationales = self._explain(audio, cues)
        elapsed_ms = _ms(start_s)
        explain = self.backend.options.explain
        return [
            _Outcome(
                distribution, None, elapsed_ms, len(audio), phrase, rationale,
                _baseline(tokens) if phrase else None, tuple(member) if explain else (),
            )
            for distribution, phrase, rationale, tokens, member in zip(
                distributions, phrases, rationales, cues, members, strict=True
            )
        ]  # fmt: skip

    def _explain(
        self, audio: Sequence[np.ndarray], cues: Sequence[CueTokens | None]
    ) -> list[str | None]:
        if not self.backend.options.explain:
            return [None] * len(audio)
        try:
            return list(self.backend.explain(audio, cues))
        except StreamSerError as err:
            log.warning("alm: rationale failed (distribution kept): %s", err)
            return [None] * len(audio)


def _together(pending: _Pending) -> tuple[()]:
    return ()


def _baseline(tokens: CueTokens | None) -> str | None:
    """What an utterance's cues are relative to ("speaker" or "population")."""
    return tokens.baseline if tokens is not None else None


def _ms(start_s: float) -> float:
    return (time.perf_counter() - start_s) * 1000
