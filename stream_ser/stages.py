"""Utterance stages: what happens to a finished utterance besides the specialist.

Every stage has one shape (`UtteranceStage`): a name, the stages it needs, `start` (turn an
utterance into a future result, never blocking) and `add_to_final` (put its result, its failure or
its silence into the final message). The final message is built from the mapping of stage
results, in registration order. Adding a stage is one new class here (or in its own module)
plus one line of registration where the runtime is built (`stream_ser.app.build_stages`).

Stages of this module:
    DescriptorsStage  eGeMAPS descriptors (and cue tokens for the ALM), in the Analyzer's thread
    AlmStage          the audio-language model, through the AlmBatcher
    SideStage         further ONNX specialists (fusion sources specialist:<model id>)

Each of them (and the stages of stream_ser.asr_stage and stream_ser.speaker_stage) runs on one
worker and is a `WorkerStage`: its `async with` starts that worker and closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar, cast

import numpy as np

from stream_ser.acoustics import Analysis, AnalysisSkipped, StreamAcoustics, warm_up
from stream_ser.adaptation import PerSpeaker
from stream_ser.alm.base import AlmResult
from stream_ser.alm.batcher import AlmBatcher
from stream_ser.errors import ModelError, StreamSerError
from stream_ser.fusion import FusionConfig, fuse
from stream_ser.inference import ModelWorker, Overflow, by_deadline, past_deadline
from stream_ser.kinds import Flag
from stream_ser.messages import StreamInfo
from stream_ser.recognizer import Job
from stream_ser.speakers import Assignment
from stream_ser.specialist import Specialist

log = logging.getLogger(__name__)

T = TypeVar("T")
StageResult = Any
"""A stage's result, the exception it failed with, or None (no answer by the deadline)."""
SPEAKER_STAGE = "speaker"  # stream_ser.speaker_stage: its label picks per-speaker state


@dataclass
class StreamScope:
    """One stream's state kept by the stages (a speaker's acoustic baseline)."""

    stream_id: str
    _state: dict[str, object] = field(default_factory=dict)

    def state(self, stage: str, new: Callable[[], T]) -> T:
        """The stage's state for this stream, made by `new` on first use."""
        if stage not in self._state:
            self._state[stage] = new()
        return cast(T, self._state[stage])


@dataclass(frozen=True)
class Utterance:
    """A finished utterance handed to the stages."""

    job: Job
    deadline_s: float | None  # when its final goes out at the latest (monotonic); None: waits
    scope: StreamScope


@dataclass
class FinalDraft:
    """The parts of a final result the stages fill in; see `UtteranceStages.final`."""

    specialist_ok: bool
    distributions: dict[str, dict[str, float]] = field(default_factory=dict)  # fusion inputs
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    flags: list[Flag] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)  # further top-level fields


class UtteranceStage(Protocol):
    """One per-utterance stage; see the module docstring."""

    name: str
    needs: tuple[str, ...]  # stages whose futures `start` is given (they start first)

    def start(
        self, utterance: Utterance, started: Mapping[str, asyncio.Future[Any]]
    ) -> asyncio.Future[Any]:
        """Begin work on the utterance; never blocks."""

    def add_to_final(self, result: StageResult, draft: FinalDraft) -> None:
        """Its result (or exception, or None if not answered in time) into the final."""

    async def __aenter__(self) -> Any:
        """Start its worker."""

    async def __aexit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop its worker."""


class Worker(Protocol):
    """What a WorkerStage needs of its worker: a ModelWorker, or the AlmBatcher in front of one."""

    async def __aenter__(self) -> object: ...

    async def close(self, drain: bool = True) -> None:
        """Stop; with `drain`, after every queued item has its result."""


class WorkerStage:
    """Base of a stage (or of the model wrapper behind one) whose work runs on one worker,
    `worker`: `async with` starts it; leaving closes it without draining, since every final
    result is out when the streams end and what is still queued is moot (queued items get the
    worker's `on_close` answer)."""

    worker: Worker

    async def __aenter__(self) -> Self:
        await self.worker.__aenter__()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.worker.close(drain=False)


@dataclass
class UtteranceStages:
    """The registered stages, shared by every stream, and how an utterance goes through them
    to its final result."""

    fusion: FusionConfig
    stages: Sequence[UtteranceStage] = ()

    def __post_init__(self) -> None:
        self._start_order = _dependency_order(self.stages)

    @property
    def final_waits(self) -> bool:
        """The final result waits for another stage: the specialist's result goes out first,
        as a provisional result."""
        return bool(self.stages)

    def start(self, utterance: Utterance) -> dict[str, asyncio.Future[Any]]:
        """Start every stage on the utterance (those it needs first); nothing waits."""
        started: dict[str, asyncio.Future[Any]] = {}
        for stage in self._start_order:
            future = stage.start(utterance, started)
            future.add_done_callback(_retrieve)
            started[stage.name] = future
        return started

    def final(
        self,
        stream: StreamInfo,
        specialist: np.ndarray | None,
        specialist_error: str | None,
        results: Mapping[str, StageResult],
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The fused distribution of a final result and its further fields, from the
        specialist's probabilities (None: it failed with `specialist_error`) and each stage's
        result (its value, its exception, or None: no answer by the deadline)."""
        draft = FinalDraft(specialist is not None)
        if specialist is not None:
            distribution = dict(zip(stream.labels, map(float, specialist), strict=True))
            draft.distributions["specialist"] = distribution
            draft.sources["specialist"] = {
                "model_id": stream.model_id,
                "distribution": rounded(distribution),
            }
        else:
            draft.flags.append("specialist_failed")
            draft.sources["specialist"] = {"model_id": stream.model_id, "error": specialist_error}
        for stage in self.stages:
            stage.add_to_final(results.get(stage.name), draft)
        fields: dict[str, Any] = {"sources": draft.sources, "flags": draft.flags}
        if draft.distributions:
            fused, dropped = fuse(draft.distributions, self.fusion)
            fields["fusion"] = {
                "rule": self.fusion.rule,
                "sources": list(draft.distributions),
                "dropped_mass": {name: round(mass, 6) for name, mass in dropped.items()},
            }
        else:
            fused = np.full(len(self.fusion.labels), 1.0 / len(self.fusion.labels))
            draft.flags.append("no_recognition")
        return fused, fields | draft.fields


def _dependency_order(stages: Sequence[UtteranceStage]) -> list[UtteranceStage]:
    """Registration order, except that a stage starts after the registered stages it needs."""
    registered = {stage.name for stage in stages}
    ordered: list[UtteranceStage] = []
    waiting = list(stages)
    while waiting:
        done = {stage.name for stage in ordered}
        ready = [s for s in waiting if all(n in done or n not in registered for n in s.needs)]
        if not ready:
            raise ValueError(f"stages need each other: {[s.name for s in waiting]}")
        ordered += ready
        waiting = [s for s in waiting if s not in ready]
    return ordered


async def speaker_of(started: Mapping[str, asyncio.Future[Any]]) -> str | None:
    """The label the speaker stage gave the utterance; None without the stage, or when it gave
    none (skipped or failed; the worker has logged a failure that was a bug): such utterances
    share the stream's unlabelled state, as without speakers."""
    future = started.get(SPEAKER_STAGE)
    if future is None:
        return None
    try:
        assignment: Assignment = await asyncio.shield(future)
    except Exception:  # unlabelled is the fallback; the final flags it, the worker logged bugs
        return None
    return assignment.label


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a background future's exception as seen; its consumer reports it (or it timed out)."""
    if not future.cancelled():
        future.exception()


# --------------------------------------------------------------------------- descriptors


@dataclass(frozen=True)
class _AnalysisJob:
    acoustics: StreamAcoustics
    samples: np.ndarray
    deadline_s: float | None


class Analyzer(WorkerStage):
    """Per-utterance acoustics (eGeMAPS: descriptors and ALM cues) in its own thread.

    Overflow rule: at most `max_pending` analyses with a deadline wait; a further one, and one
    whose final result has already gone out (its deadline passed) when its turn comes, is
    skipped (the final is flagged `descriptors_skipped`). A skipped utterance does not join the
    stream's speaker baseline. An analysis without a deadline (a lossless stream's, which bounds
    its own utterances in flight) is never skipped.
    """

    def __init__(self, max_pending: int = 32) -> None:
        self.max_pending = max_pending
        self.skipped = 0
        self.worker: ModelWorker[_AnalysisJob, Analysis] = ModelWorker(
            "acoustics",
            _analyse_batch,
            overflow=Overflow(max_pending, "reject_new", _too_many, group=by_deadline),
        )
        self.worker.warm_up(warm_up)  # opensmile loads while the pipeline starts

    async def analyse(
        self, acoustics: StreamAcoustics, samples: np.ndarray, deadline_s: float | None
    ) -> Analysis:
        """One utterance, against (then into) its stream's speaker baseline; skipped if its
        final result goes out at `deadline_s` (monotonic) before its turn comes."""
        try:
            return await self.worker.submit(_AnalysisJob(acoustics, samples, deadline_s))
        except AnalysisSkipped:
            self.skipped += 1
            raise


def _analyse_batch(batch: list[_AnalysisJob]) -> list[Analysis]:
    (job,) = batch
    if past_deadline(job):
        raise AnalysisSkipped("its final result has already gone out")
    return [job.acoustics.analyse(job.samples)]


def _too_many(job: _AnalysisJob, waiting: int) -> BaseException:
    return AnalysisSkipped(f"{waiting} analyses already waiting")


class DescriptorsStage(WorkerStage):
    """Descriptors of each utterance against its speaker's baseline (published, and the ALM's
    cue tokens); with the speaker stage, one baseline per speaker of the stream."""

    name = "descriptors"
    needs: tuple[str, ...] = (SPEAKER_STAGE,)

    def __init__(self, analyzer: Analyzer, publish: bool = True) -> None:
        self.analyzer = analyzer
        self.worker = analyzer.worker  # started and closed with this stage
        self.publish = publish
        """False: the analysis runs only for the ALM's cue tokens (--no-descriptors)."""

    def start(
        self, utterance: Utterance, started: Mapping[str, asyncio.Future[Any]]
    ) -> asyncio.Future[Analysis]:
        """Analyse in the Analyzer's thread (once the speaker is known)."""
        return asyncio.ensure_future(self._analyse(utterance, started))

    async def _analyse(
        self, utterance: Utterance, started: Mapping[str, asyncio.Future[Any]]
    ) -> Analysis:
        speakers = utterance.scope.state(self.name, lambda: PerSpeaker(StreamAcoustics))
        acoustics = speakers.get(await speaker_of(started))
        return await self.analyzer.analyse(acoustics, utterance.job.samples, utterance.deadline_s)

    def add_to_final(self, result: StageResult, draft: FinalDraft) -> None:
        """`descriptors`, or a flag saying why there are none."""
        if not self.publish:
            return
        if isinstance(result, Analysis):
            draft.fields["descriptors"] = result.descriptors_message()
        elif isinstance(result, AnalysisSkipped):
            draft.flags.append("descriptors_skipped")
        elif isinstance(result, Exception):
            draft.flags.append("descriptors_failed")
        else:
            draft.flags.append("descriptors_deadline")


# --------------------------------------------------------------------------- ALM


class AlmStage(WorkerStage):
    """The audio-language model's distribution, with the descriptors' cue tokens when its cue
    mode uses them."""

    name = "alm"
    needs: tuple[str, ...] = ("descriptors",)

    def __init__(self, batcher: AlmBatcher) -> None:
        self.batcher = batcher
        self.worker = batcher  # closing it gives utterances still queued a "shutdown" result

    def start(
        self, utterance: Utterance, started: Mapping[str, asyncio.Future[Any]]
    ) -> asyncio.Future[AlmResult]:
        """Submit to the ALM (after the cue tokens, when it uses them)."""
        return asyncio.ensure_future(self._ask(utterance.job.samples, started.get("descriptors")))

    async def _ask(
        self, samples: np.ndarray, analysis: asyncio.Future[Analysis] | None
    ) -> AlmResult:
        cues = None
        if analysis is not None and self.batcher.options.cues != "none":
            with contextlib.suppress(StreamSerError):
                cues = (await analysis).cues
        return await self.batcher.submit(samples, cues=cues)

    def add_to_final(self, result: StageResult, draft: FinalDraft) -> None:
        """The ALM's source entry, its distribution for fusion, or flags."""
        draft.sources["alm"] = _alm_source(result)
        if isinstance(result, AlmResult) and result.ok:
            draft.distributions["alm"] = dict(result.distribution)
            return
        draft.flags.append("alm_deadline" if result is None else "alm_failed")
        if draft.specialist_ok:
            draft.flags.append("specialist_only")


def _alm_source(alm: AlmResult | Exception | None) -> dict[str, Any]:
    if alm is None:
        return {"ok": False, "error": "no answer by the fusion deadline"}
    if isinstance(alm, Exception):
        return {"ok": False, "error": str(alm)}
    fields: dict[str, Any] = {
        "ok": alm.ok,
        "backend": alm.backend,
        "prompt_set": alm.prompt_set,
        "audio_repeats": alm.audio_repeats,
        "text_repeats": alm.text_repeats,
        "cue_mode": alm.cue_mode,
        "cues": alm.cues,
        "cue_baseline": alm.cue_baseline,
        "latency_ms": alm.latency_ms,
        "batch_size": alm.batch_size,
    }
    if alm.ok:
        fields["distribution"] = rounded(alm.distribution)
    else:
        fields["error"] = alm.error
    if alm.rationale is not None:
        fields["rationale"] = alm.rationale
    if alm.templates:  # explain mode: the prompt ensemble's members, in template order
        fields["templates"] = [rounded(member) for member in alm.templates]
    return fields


def rounded(distribution: Mapping[str, float]) -> dict[str, float]:
    """Probabilities rounded to 6 decimals, as published."""
    return {label: round(float(p), 6) for label, p in distribution.items()}


# --------------------------------------------------------------------------- side specialists


@dataclass(frozen=True)
class _SideJob:
    samples: np.ndarray
    deadline_s: float | None


class SideSpecialists:
    """Further ONNX specialists, run once per utterance in their own thread.

    Overflow rule: at most `max_pending` utterances with a deadline wait; beyond that the
    oldest is dropped (logged, counted in `worker.stats.refused`) and its final has no further
    specialists' sources, as when they fail. Utterances without a deadline (a lossless
    stream's, which bounds its own utterances in flight) are never dropped.
    """

    def __init__(self, specialists: Sequence[Specialist], max_pending: int = 32) -> None:
        self.specialists = list(specialists)
        self.worker: ModelWorker[_SideJob, dict[str, dict[str, float]]] = ModelWorker(
            "side-specialists",
            self._predict_batch,
            overflow=Overflow(max_pending, "drop_oldest", self._dropped, group=by_deadline),
        )

    async def predict(
        self, samples: np.ndarray, deadline_s: float | None = None
    ) -> dict[str, dict[str, float]]:
        """Each specialist's distribution; one that fails is left out (and logged)."""
        return await self.worker.submit(_SideJob(samples, deadline_s))

    def _dropped(self, job: _SideJob, waiting: int) -> dict[str, dict[str, float]]:
        log.warning("further specialists: %d utterances waiting, dropped the oldest", waiting)
        return {}

    def _predict_batch(self, batch: list[_SideJob]) -> list[dict[str, dict[str, float]]]:
        return [self._predict(job.samples) for job in batch]

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


class SideStage(WorkerStage):
    """Further specialists' distributions, each a fusion source specialist:<model id>."""

    name = "side"
    needs: tuple[str, ...] = ()

    def __init__(self, side: SideSpecialists) -> None:
        self.side = side
        self.worker = side.worker  # started and closed with this stage

    def start(
        self, utterance: Utterance, started: Mapping[str, asyncio.Future[Any]]
    ) -> asyncio.Future[dict[str, dict[str, float]]]:
        """Run every further specialist in their thread."""
        return asyncio.ensure_future(self.side.predict(utterance.job.samples, utterance.deadline_s))

    def add_to_final(self, result: StageResult, draft: FinalDraft) -> None:
        """One fusion source per specialist that answered (failures are left out)."""
        for name, distribution in (result if isinstance(result, dict) else {}).items():
            draft.distributions[name] = dict(distribution)
            draft.sources[name] = {"distribution": rounded(distribution)}
