"""The transcript stage: what was said in each utterance, in the final result (`--transcribe`).

`TranscriptStage` is an utterance stage (stream_ser.stages): `start` queues the utterance's audio
on its own `ModelWorker` (one thread owning the `Transcriber`), so transcription never blocks
capture, windows or the provisional result; `add_to_final` puts `Transcript.to_dict()` into the
final's `transcript` field, or a flag saying why there is none:

    transcript_skipped   the worker was behind (overflow rule below)
    transcript_failed    the transcriber raised
    transcript_deadline  no answer by the fusion deadline (live streams)

Overflow rule: at most `max_pending` utterances with a deadline (live streams) wait; a further
one is refused at once, and one whose final has already gone out when its turn comes is skipped
(both `transcript_skipped`). Utterances without a deadline (a lossless file, which bounds its own
utterances in flight) are never refused or skipped: their finals wait for the transcript.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from stream_ser import SAMPLE_RATE
from stream_ser.asr import Transcript
from stream_ser.errors import StreamSerError
from stream_ser.inference import ModelWorker, Overflow, by_deadline, past_deadline
from stream_ser.stages import FinalDraft, StageResult, Utterance, WorkerStage

log = logging.getLogger(__name__)


class TranscriptSkipped(StreamSerError):
    """The transcriber was too far behind to transcribe this utterance in time."""


class Transcribes(Protocol):
    """What the stage needs of a transcriber (stream_ser.asr.Transcriber; fakes in tests)."""

    def transcribe(self, audio: np.ndarray, words: bool = False) -> Transcript:
        """The transcript of one utterance (16 kHz mono float32)."""


@dataclass(frozen=True)
class _TranscriptJob:
    samples: np.ndarray = field(repr=False)
    deadline_s: float | None  # monotonic; None: never skipped


class TranscriptStage(WorkerStage):
    """Each utterance's transcript, on the transcriber's own thread; see the module docstring."""

    name = "transcript"
    needs: tuple[str, ...] = ()

    def __init__(self, transcriber: Transcribes, words: bool = False, max_pending: int = 8) -> None:
        logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # an INFO line per call
        self.transcriber = transcriber
        self.words = words
        self.skipped = 0
        self.worker: ModelWorker[_TranscriptJob, Transcript] = ModelWorker(
            "transcript",
            self._transcribe_batch,
            overflow=Overflow(max_pending, "reject_new", _too_many, group=by_deadline),
            on_close=_closing,
        )
        # the first call of a CTranslate2 model is slow: pay it while the pipeline starts
        self.worker.warm_up(lambda: transcriber.transcribe(np.zeros(SAMPLE_RATE, np.float32)))

    def start(
        self, utterance: Utterance, started: Mapping[str, asyncio.Future[Any]]
    ) -> asyncio.Future[Transcript]:
        """Queue the utterance on the transcriber's thread; never blocks."""
        return self.worker.submit(_TranscriptJob(utterance.job.samples, utterance.deadline_s))

    def add_to_final(self, result: StageResult, draft: FinalDraft) -> None:
        """`transcript`, or a flag saying why there is none."""
        if isinstance(result, Transcript):
            draft.fields["transcript"] = result.to_dict()
        elif isinstance(result, TranscriptSkipped):
            self.skipped += 1
            draft.flags.append("transcript_skipped")
        elif isinstance(result, BaseException):
            draft.flags.append("transcript_failed")
        else:
            draft.flags.append("transcript_deadline")

    def _transcribe_batch(self, batch: list[_TranscriptJob]) -> list[Transcript]:
        """Runs in the worker's thread."""
        (job,) = batch
        if past_deadline(job):
            raise TranscriptSkipped("its final result has already gone out")
        return [self.transcriber.transcribe(job.samples, words=self.words)]


def _too_many(job: _TranscriptJob, waiting: int) -> BaseException:
    log.warning("transcripts: %d utterances waiting, skipped the new one", waiting)
    return TranscriptSkipped(f"{waiting} utterances already waiting")


def _closing(job: _TranscriptJob) -> BaseException:
    return TranscriptSkipped("the stage is closing")
