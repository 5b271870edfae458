"""The closed vocabularies of the pipeline and of its published messages (schema version 1).

Each alias lists every value a field can take; docs/schema/*.schema.json lists the same values
for subscribers (a test checks that they agree).
"""

from __future__ import annotations

from typing import Literal, get_args

JobKind = Literal["window", "utterance"]
"""What the specialist scores: a sliding window of speech or a whole utterance."""

ResultType = JobKind
"""The `type` of a result message."""

ResultStage = Literal["window", "provisional", "final"]
"""window: a sliding window; provisional: the specialist's utterance result while other stages
work; final: the fused utterance result (exactly one per utterance)."""

EndReason = Literal["silence", "max_length", "stream_end"]
"""Why an utterance ended."""

StatusState = Literal["online", "offline"]
"""The retained status: online while running, offline after exit (also the last will)."""

Flag = Literal[
    "specialist_failed",
    "specialist_only",
    "alm_deadline",
    "alm_failed",
    "no_recognition",
    "descriptors_skipped",
    "descriptors_failed",
    "descriptors_deadline",
    "transcript_skipped",
    "transcript_failed",
    "transcript_deadline",
    "speaker_skipped",
    "speaker_failed",
]
"""What a final result lacks, and why."""

CueBaseline = Literal["speaker", "population"]
"""What descriptors' z-scores are relative to."""

CueMode = Literal["aligned", "none", "shuffled", "corrupted", "conflicting"]
"""The ALM's acoustic cue tokens: true cues, none, or a probe (see stream_ser.acoustics)."""

FusionRule = Literal["mean", "geometric"]
"""How a final result's sources are combined."""


def values(alias: object) -> tuple[str, ...]:
    """The strings a Literal alias allows."""
    return tuple(str(value) for value in get_args(alias))
