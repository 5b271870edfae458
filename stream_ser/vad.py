"""Utterance segmentation on top of a voice detector (webrtcvad or Silero, vad_backends.py).

An utterance starts when `onset_ms` of voiced frames fall within the last `preroll_ms`;
its audio then includes that pre-roll. It ends after `hangover_ms` of unvoiced frames,
trimmed to the end of its last voiced frame. A turn longer than `max_utterance_ms` is
split and goes on as a new utterance, so no speech is lost. Segments whose voiced span is
shorter than `min_utterance_ms` are not utterances: they are counted and never reported.
All of these are counted in whole detector frames (30 ms webrtcvad, 32 ms Silero by default).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from stream_ser import SAMPLE_RATE
from stream_ser.events import (
    AudioChunk,
    SpeechAudio,
    UtteranceEnd,
    UtteranceStart,
    VadEvent,
    samples_to_ms,
)
from stream_ser.kinds import EndReason
from stream_ser.settings import VadSettings
from stream_ser.vad_backends import VoiceDetector, make_detector


@dataclass
class _Utterance:
    """The utterance being collected (mutable, private to the segmenter)."""

    start_sample: int
    frames: list[np.ndarray]
    voiced_end_sample: int
    silent_frames: int = 0
    announced_id: int | None = None
    sent_frames: int = 0  # frames already emitted as SpeechAudio


class Segmenter:
    """Turns 16 kHz audio into utterance events; synchronous and deterministic."""

    def __init__(self, settings: VadSettings, detector: VoiceDetector | None = None) -> None:
        """`detector` defaults to the one `settings.backend` names."""
        self.settings = settings
        self.detector = detector if detector is not None else make_detector(settings)
        self._frame_samples = self.detector.frame_samples
        self._remainder = np.zeros(0, dtype=np.float32)
        self._position = 0  # samples consumed as whole frames
        self._ring: deque[tuple[np.ndarray, bool]] = deque(
            maxlen=max(1, _samples(settings.preroll_ms) // self._frame_samples)
        )
        self._utterance: _Utterance | None = None
        self._next_id = 1
        self.short_segments = 0  # voiced blips below min_utterance_ms

    def process(self, chunk: AudioChunk) -> list[VadEvent]:
        """Consume one chunk; return the events it completes, in stream order."""
        audio = np.concatenate([self._remainder, chunk.samples])
        whole = len(audio) - len(audio) % self._frame_samples
        self._remainder = audio[whole:]
        frames = audio[:whole].reshape(-1, self._frame_samples)
        events: list[VadEvent] = []
        for frame, voiced in zip(frames, self.detector.classify(frames), strict=True):
            self._frame(frame, voiced, events)
        self._emit_speech(events)
        return events

    def flush(self) -> list[VadEvent]:
        """End of stream: finish the utterance in progress, if it is long enough."""
        events: list[VadEvent] = []
        if self._utterance is not None:
            self._finish("stream_end", self._utterance.voiced_end_sample, events)
        return events

    def _frame(self, frame: np.ndarray, voiced: bool, events: list[VadEvent]) -> None:
        self._position += len(frame)
        utterance = self._utterance
        if utterance is None:
            self._ring.append((frame, voiced))
            voiced_samples = sum(flag for _, flag in self._ring) * self._frame_samples
            if voiced_samples >= _samples(self.settings.onset_ms):
                self._open()
            return
        utterance.frames.append(frame)
        if voiced:
            utterance.voiced_end_sample = self._position
            utterance.silent_frames = 0
        else:
            utterance.silent_frames += 1
        self._announce_if_long_enough(utterance, events)
        silent = utterance.silent_frames * self._frame_samples
        if silent >= _samples(self.settings.hangover_ms):
            self._finish("silence", utterance.voiced_end_sample, events)
        elif self._position - utterance.start_sample >= self._max_samples:
            self._finish("max_length", self._position, events)
            self._utterance = _Utterance(self._position, [], self._position)

    def _open(self) -> None:
        """Start an utterance whose audio is the pre-roll ring."""
        start = self._position - len(self._ring) * self._frame_samples
        voiced_end = start
        for index, (_, voiced) in enumerate(self._ring):
            if voiced:
                voiced_end = start + (index + 1) * self._frame_samples
        self._utterance = _Utterance(start, [frame for frame, _ in self._ring], voiced_end)
        self._ring.clear()

    def _announce_if_long_enough(self, utterance: _Utterance, events: list[VadEvent]) -> None:
        if utterance.announced_id is not None:
            return
        if utterance.voiced_end_sample - utterance.start_sample >= self._min_samples:
            utterance.announced_id = self._next_id
            self._next_id += 1
            events.append(
                UtteranceStart(utterance.announced_id, samples_to_ms(utterance.start_sample))
            )

    def _emit_speech(self, events: list[VadEvent]) -> None:
        utterance = self._utterance
        if utterance is None or utterance.announced_id is None:
            return
        new = utterance.frames[utterance.sent_frames :]
        if not new:
            return
        start = utterance.start_sample + utterance.sent_frames * self._frame_samples
        utterance.sent_frames = len(utterance.frames)
        events.append(
            SpeechAudio(utterance.announced_id, np.concatenate(new), samples_to_ms(start))
        )

    def _finish(self, reason: EndReason, end_sample: int, events: list[VadEvent]) -> None:
        utterance = self._utterance
        assert utterance is not None
        self._announce_if_long_enough(utterance, events)
        if utterance.announced_id is None:
            self._utterance = None
            if utterance.voiced_end_sample > utterance.start_sample:
                self.short_segments += 1
            return
        self._emit_speech(events)
        self._utterance = None
        audio = np.concatenate(utterance.frames)[: end_sample - utterance.start_sample]
        events.append(
            UtteranceEnd(
                utterance.announced_id,
                audio,
                samples_to_ms(utterance.start_sample),
                samples_to_ms(end_sample),
                reason,
            )
        )

    @property
    def _min_samples(self) -> int:
        return _samples(self.settings.min_utterance_ms)

    @property
    def _max_samples(self) -> int:
        return _samples(self.settings.max_utterance_ms)


def _samples(ms: int) -> int:
    """Milliseconds as a sample count at 16 kHz."""
    return SAMPLE_RATE * ms // 1000


async def segment(
    chunks: AsyncIterator[AudioChunk], segmenter: Segmenter
) -> AsyncIterator[VadEvent]:
    """The VAD stage: audio chunks in, utterance events out; flushes at end of stream."""
    async for chunk in chunks:
        for event in segmenter.process(chunk):
            yield event
    for event in segmenter.flush():
        yield event
