"""The segmenter on synthetic signals with known speech boundaries."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from stream_ser.events import AudioChunk, SpeechAudio, UtteranceEnd, UtteranceStart, VadEvent
from stream_ser.settings import VadSettings
from stream_ser.vad import Segmenter
from tests.signals import RATE, buzz, noise, silence, tone


def run_segmenter(
    audio: np.ndarray, chunk: int = 1600, **settings: Any
) -> tuple[list[VadEvent], Segmenter]:
    segmenter = Segmenter(VadSettings(**settings))
    events: list[VadEvent] = []
    for offset in range(0, len(audio), chunk):
        events += segmenter.process(AudioChunk(audio[offset : offset + chunk], offset // 16))
    events += segmenter.flush()
    return events, segmenter


def ends(events: list[VadEvent]) -> list[UtteranceEnd]:
    return [event for event in events if isinstance(event, UtteranceEnd)]


def test_silence_gives_no_utterance() -> None:
    events, segmenter = run_segmenter(silence(5))
    assert events == []
    assert segmenter.short_segments == 0


def test_two_bursts_give_two_utterances_at_the_right_times() -> None:
    audio = np.concatenate([silence(1), buzz(1.5), silence(1.5), buzz(2), silence(1)])
    events, _ = run_segmenter(audio)
    utterances = ends(events)
    assert [u.utterance_id for u in utterances] == [1, 2]
    for utterance, (begin_ms, end_ms) in zip(utterances, [(1000, 2500), (4000, 6000)], strict=True):
        # pre-roll puts the start up to 300 ms (+ onset detection) before the speech
        assert begin_ms - 400 <= utterance.start_ms <= begin_ms
        # webrtcvad itself hangs on for a few frames after the signal stops
        assert end_ms <= utterance.end_ms <= end_ms + 250
        assert utterance.reason == "silence"
        assert len(utterance.samples) == (utterance.end_ms - utterance.start_ms) * RATE // 1000


def test_events_are_ordered_and_speech_audio_covers_the_utterance() -> None:
    audio = np.concatenate([silence(1), buzz(2), silence(1)])
    events, _ = run_segmenter(audio)
    assert isinstance(events[0], UtteranceStart)
    assert isinstance(events[-1], UtteranceEnd)
    speech = np.concatenate([e.samples for e in events if isinstance(e, SpeechAudio)])
    end = events[-1]
    assert events[0].start_ms == end.start_ms
    # the streamed speech audio starts with the utterance and also holds the hangover
    np.testing.assert_array_equal(speech[: len(end.samples)], end.samples)


def test_chunk_size_does_not_change_the_result() -> None:
    audio = np.concatenate([silence(0.7), buzz(1.2), silence(1), buzz(0.9), silence(0.8)])
    reference = [(u.start_ms, u.end_ms) for u in ends(run_segmenter(audio, chunk=1600)[0])]
    for chunk in (160, 333, 4096, len(audio)):
        assert [(u.start_ms, u.end_ms) for u in ends(run_segmenter(audio, chunk=chunk)[0])] == (
            reference
        )
    assert len(reference) == 2


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_every_frame_size_works(frame_ms: int) -> None:
    audio = np.concatenate([silence(1), buzz(1.5), silence(1)])
    utterances = ends(run_segmenter(audio, frame_ms=frame_ms)[0])
    assert len(utterances) == 1
    assert 600 <= utterances[0].start_ms <= 1000


def test_long_turn_is_split_without_losing_audio() -> None:
    audio = np.concatenate([silence(0.5), buzz(9.0), silence(1)])
    utterances = ends(run_segmenter(audio, max_utterance_ms=4000)[0])
    assert [u.reason for u in utterances] == ["max_length", "max_length", "silence"]
    for before, after in itertools.pairwise(utterances):
        assert after.start_ms == before.end_ms  # contiguous: nothing lost
        assert 4000 <= before.end_ms - before.start_ms < 4000 + 30  # next frame boundary
    assert utterances[-1].end_ms >= 9500


def test_blip_shorter_than_minimum_is_counted_not_reported() -> None:
    audio = np.concatenate([silence(1), buzz(0.15), silence(1.5)])
    events, segmenter = run_segmenter(audio, min_utterance_ms=600)
    assert events == []
    assert segmenter.short_segments == 1


def test_stream_ending_mid_utterance_still_yields_it() -> None:
    audio = np.concatenate([silence(1), buzz(2)])
    utterances = ends(run_segmenter(audio)[0])
    assert len(utterances) == 1
    assert utterances[0].reason == "stream_end"
    assert utterances[0].end_ms >= 2900


def test_pure_tone_is_not_speech_at_highest_aggressiveness() -> None:
    audio = np.concatenate([silence(1), tone(1), silence(1), tone(1), silence(1)])
    assert ends(run_segmenter(audio, aggressiveness=3)[0]) == []


def test_loud_noise_bursts_are_segmented() -> None:
    audio = np.concatenate([silence(1), noise(1), silence(1), noise(1, seed=1), silence(1)])
    assert len(ends(run_segmenter(audio)[0])) == 2
