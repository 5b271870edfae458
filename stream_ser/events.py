"""Events that cross stage boundaries: source -> vad -> recognizer -> publisher.

Audio is always 16 kHz mono float32 in [-1, 1]. Times are stream time in milliseconds,
counted from the first sample of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stream_ser import SAMPLE_RATE
from stream_ser.kinds import EndReason, JobKind


def samples_to_ms(samples: int) -> int:
    """Stream time in whole milliseconds for a sample count at 16 kHz."""
    return samples * 1000 // SAMPLE_RATE


@dataclass(frozen=True)
class AudioChunk:
    """A block of captured audio."""

    samples: np.ndarray = field(repr=False)  # float32, mono, 16 kHz
    start_ms: int  # stream time of the first sample


@dataclass(frozen=True)
class UtteranceStart:
    """The VAD has found an utterance long enough to report."""

    utterance_id: int  # 1, 2, ... within the stream
    start_ms: int


@dataclass(frozen=True)
class SpeechAudio:
    """Audio that belongs to the utterance in progress, in stream order."""

    utterance_id: int
    samples: np.ndarray = field(repr=False)
    start_ms: int


@dataclass(frozen=True)
class UtteranceEnd:
    """A finished utterance with all of its audio."""

    utterance_id: int
    samples: np.ndarray = field(repr=False)
    start_ms: int
    end_ms: int  # end of the last voiced frame (or of the split / stream)
    reason: EndReason


VadEvent = UtteranceStart | SpeechAudio | UtteranceEnd


@dataclass(frozen=True)
class Recognition:
    """A distribution for a window of speech or a whole utterance."""

    kind: JobKind
    utterance_id: int
    start_ms: int
    end_ms: int
    probabilities: np.ndarray = field(repr=False)  # float64, one per label, sums to 1
    latency_ms: float  # from the audio being ready to the distribution being ready
    reason: EndReason | None = None  # why an utterance ended; None for windows
