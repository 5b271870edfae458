"""The speaker stage: who spoke each utterance within its stream (`--speakers`).

`SpeakerStage` is an utterance stage (stream_ser.stages) that starts first: its own
`ModelWorker` (one thread owning the `SpeakerEmbedder`) embeds the utterance and assigns it to a
speaker of its stream (`OnlineSpeakers`, kept in the stream's `StreamScope`; it is only touched
in that thread, in submission order, so labels follow the stream's order). The label then picks
the per-speaker state of the other consumers:

    the specialist's adaptation baseline   StreamPipeline awaits the label (stages.speaker_of), then
                                           submits the utterance with that speaker's baseline
    the descriptors and the ALM's cues     DescriptorsStage needs "speaker" and analyses against
                                           that speaker's StreamAcoustics

Privacy: embeddings and centroids never leave this process (nor are they written anywhere); only
the label (`spk-1`, `spk-2`, ...) is published, in the provisional and the final result.

Overflow rule: at most `max_pending` utterances with a deadline (live streams) wait; a further
one is refused at once, and one whose final deadline has passed when its turn comes is skipped.
Such an utterance has no label (flag `speaker_skipped`): it is scored and described with the
stream's unlabelled state, as without `--speakers`. Lossless utterances are never refused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from stream_ser import SAMPLE_RATE
from stream_ser.errors import StreamSerError
from stream_ser.inference import ModelWorker, Overflow, by_deadline, past_deadline
from stream_ser.speakers import Assignment, OnlineSpeakers
from stream_ser.stages import SPEAKER_STAGE, FinalDraft, StageResult, Utterance, WorkerStage

log = logging.getLogger(__name__)


class SpeakerSkipped(StreamSerError):
    """The speaker model was too far behind to label this utterance in time."""


class Embeds(Protocol):
    """What the stage needs of a speaker encoder (stream_ser.speakers.SpeakerEmbedder)."""

    def embed(self, audio: np.ndarray) -> np.ndarray:
        """A unit speaker embedding of one utterance (16 kHz mono float32)."""


@dataclass(frozen=True)
class _SpeakerJob:
    speakers: OnlineSpeakers  # the stream's; touched only in the worker's thread
    samples: np.ndarray = field(repr=False)
    deadline_s: float | None


class SpeakerStage(WorkerStage):
    """Each utterance's speaker label; see the module docstring."""

    name = SPEAKER_STAGE
    needs: tuple[str, ...] = ()

    def __init__(
        self, embedder: Embeds, threshold: float, max_speakers: int, max_pending: int = 32
    ) -> None:
        OnlineSpeakers(threshold, max_speakers)  # invalid settings fail here, at start-up
        self.embedder = embedder
        self.threshold = threshold
        self.max_speakers = max_speakers
        self.worker: ModelWorker[_SpeakerJob, Assignment] = ModelWorker(
            "speakers",
            self._label_batch,
            overflow=Overflow(max_pending, "reject_new", _too_many, group=by_deadline),
            on_close=_closing,
        )
        self.worker.warm_up(lambda: embedder.embed(np.zeros(SAMPLE_RATE, np.float32)))

    def start(
        self, utterance: Utterance, started: Mapping[str, asyncio.Future[Any]]
    ) -> asyncio.Future[Assignment]:
        """Queue the utterance on the speaker model's thread; never blocks."""
        speakers = utterance.scope.state(self.name, self._new_speakers)
        return self.worker.submit(
            _SpeakerJob(speakers, utterance.job.samples, utterance.deadline_s)
        )

    def add_to_final(self, result: StageResult, draft: FinalDraft) -> None:
        """`speaker`, or a flag saying why there is none."""
        if isinstance(result, Assignment):
            draft.fields["speaker"] = result.label
        elif result is None or isinstance(result, SpeakerSkipped):
            draft.flags.append("speaker_skipped")
        else:
            draft.flags.append("speaker_failed")

    def _new_speakers(self) -> OnlineSpeakers:
        return OnlineSpeakers(self.threshold, self.max_speakers)

    def _label_batch(self, batch: list[_SpeakerJob]) -> list[Assignment]:
        """Runs in the worker's thread: embed, then assign (in the stream's order)."""
        (job,) = batch
        if past_deadline(job):
            raise SpeakerSkipped("its final result has already gone out")
        return [job.speakers.assign(self.embedder.embed(job.samples))]


def _too_many(job: _SpeakerJob, waiting: int) -> BaseException:
    log.warning("speakers: %d utterances waiting, left the new one unlabelled", waiting)
    return SpeakerSkipped(f"{waiting} utterances already waiting")


def _closing(job: _SpeakerJob) -> BaseException:
    return SpeakerSkipped("the stage is closing")
