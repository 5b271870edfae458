"""The shared Recognizer: window batching across streams, overflow rule, model errors."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from stream_ser.adaptation import StreamBaseline
from stream_ser.errors import ModelError
from stream_ser.kinds import JobKind
from stream_ser.recognizer import Job, Recognizer
from stream_ser.specialist import Baseline, Specialist
from tests.pipelines import ResultSink, file_pipeline
from tests.test_evaluate import build_adaptive_model


class GatedSpecialist:
    """Records every batch; each call waits until the test opens the gate."""

    card = SimpleNamespace(window_model=None, adaptation=None)

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.fail_on = fail_on

    def predict_windows(self, batch: Sequence[np.ndarray], baseline: object) -> np.ndarray:
        self.gate.wait(timeout=10)
        self.batches.append([int(clip[0]) for clip in batch])
        if self.fail_on is not None and int(batch[0][0]) == self.fail_on:
            raise ModelError("boom")
        return np.array([[clip[0], 1.0] for clip in batch])

    def analyze(self, batch: Sequence[np.ndarray], baseline: object) -> tuple[np.ndarray, None]:
        return self.predict_windows(batch, baseline), None


def job(kind: JobKind, tag: int, samples: int = 1600) -> Job:
    return Job(kind, 1, np.full(samples, tag, dtype=np.float32), 0, 100, 0.0)


async def collect(futures: list[asyncio.Future[Any]]) -> list[Any]:
    async with asyncio.timeout(10):
        return await asyncio.gather(*futures, return_exceptions=True)


async def test_waiting_windows_of_one_length_share_a_model_call() -> None:
    specialist = GatedSpecialist()
    async with Recognizer(specialist, max_pending_windows=8) as recognizer:  # type: ignore[arg-type]
        first = recognizer.submit(job("utterance", 0, 800))
        await asyncio.sleep(0.05)  # the worker is now blocked on the utterance
        windows = [recognizer.submit(job("window", tag)) for tag in range(1, 5)]
        odd = recognizer.submit(job("window", 9, 3200))
        specialist.gate.set()
        results = await collect([first, *windows, odd])
    assert specialist.batches == [[0], [1, 2, 3, 4], [9]]
    assert [scored.probabilities[0] for scored in results] == [0, 1, 2, 3, 4, 9]


async def test_too_many_waiting_windows_drop_the_oldest_never_utterances() -> None:
    specialist = GatedSpecialist()
    async with Recognizer(specialist, max_pending_windows=2) as recognizer:  # type: ignore[arg-type]
        busy = recognizer.submit(job("utterance", 0, 800))
        await asyncio.sleep(0.05)
        futures = [recognizer.submit(job("window", 1)), recognizer.submit(job("utterance", 2, 800)),
                   recognizer.submit(job("window", 3)), recognizer.submit(job("window", 4)),
                   recognizer.submit(job("utterance", 5, 800))]  # fmt: skip
        specialist.gate.set()
        results = await collect([busy, *futures])
    assert results[1] is None  # window 1 was the oldest window when window 4 arrived
    assert [r.probabilities[0] for r in results if r is not None] == [0, 2, 3, 4, 5]


async def test_model_error_reaches_only_its_job() -> None:
    specialist = GatedSpecialist(fail_on=2)
    specialist.gate.set()
    async with Recognizer(specialist) as recognizer:  # type: ignore[arg-type]
        futures = [recognizer.submit(job("utterance", tag, 800 + tag)) for tag in (1, 2, 3)]
        results = await collect(futures)
    assert results[0].probabilities[0] == 1 and results[2].probabilities[0] == 3
    assert isinstance(results[1], ModelError)


async def test_an_utterance_goes_before_waiting_windows() -> None:
    specialist = GatedSpecialist()
    async with Recognizer(specialist, max_pending_windows=8) as recognizer:  # type: ignore[arg-type]
        busy = recognizer.submit(job("window", 0))
        await asyncio.sleep(0.05)  # the worker is blocked on window 0
        windows = [recognizer.submit(job("window", tag)) for tag in (1, 2)]
        utterance = recognizer.submit(job("utterance", 7, 800))
        specialist.gate.set()
        await collect([busy, *windows, utterance])
    assert specialist.batches == [[0], [7], [1, 2]]


class SlowWindows(Specialist):
    """The real tiny model, 30 ms per window call: windows pile up behind a fast file."""

    def predict_windows(self, *args: Any, **kwargs: Any) -> np.ndarray:
        time.sleep(0.03)
        return super().predict_windows(*args, **kwargs)


async def test_a_file_read_as_fast_as_possible_loses_no_window(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    """A live stream drops the oldest waiting window when the specialist falls behind; a
    lossless one (a file read as fast as possible) is read more slowly instead."""
    path, clip_count = speech_with_pauses
    specialist = SlowWindows(tiny_model)
    counters = {}
    windows = {}
    for lossless in (False, True):
        sink = ResultSink()
        async with Recognizer(specialist, max_pending_windows=2) as recognizer:
            stream = file_pipeline(path, recognizer, sink, lossless=lossless, windows=True)
            await stream.run(asyncio.Event())
        counters[lossless] = stream.counters
        windows[lossless] = [(m["start_ms"], m["end_ms"]) for m in sink.results
                             if m["type"] == "window"]  # fmt: skip
        assert len([m for m in sink.results if m["type"] == "utterance"]) == clip_count
    assert counters[False].windows_dropped > 0  # the live rule did drop
    assert counters[True].windows_dropped == 0
    assert len(windows[True]) == len(windows[False]) + counters[False].windows_dropped
    assert set(windows[False]) < set(windows[True])


class SlowUtterances(Specialist):
    """A real adaptive model, 300 ms per utterance: a fast file's next utterance ends before
    this one is scored. Records the speaker baseline each utterance was given."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.given: list[Baseline | None] = []
        self.embeddings: list[np.ndarray] = []
        self.probabilities: list[np.ndarray] = []

    def analyze(
        self, batch: Sequence[np.ndarray], baseline: Baseline | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        time.sleep(0.3)
        self.given += [baseline] * len(batch)
        probabilities, embeddings = super().analyze(batch, baseline)
        assert embeddings is not None
        self.embeddings += list(embeddings)
        self.probabilities += list(probabilities)
        return probabilities, embeddings


def adaptive_with_offsets(directory: Path) -> Path:
    """The tiny adaptive model with emotion offsets in its card (adaptation.py)."""
    build_adaptive_model(directory)
    card = json.loads((directory / "card.json").read_text())
    offsets = [[0.02 * (i + 1), -0.03 * (i % 2)] for i in range(len(card["labels"]))]
    card["adaptation"] |= {"emotion_offsets": offsets, "offset_scale": 1.0}
    (directory / "card.json").write_text(json.dumps(card))
    return directory


@pytest.mark.parametrize("offsets", [False, True])
async def test_a_file_read_as_fast_as_possible_adapts_to_every_earlier_utterance(
    tmp_path: Path, speech_with_pauses: tuple[Path, int], offsets: bool
) -> None:
    """Each utterance of a lossless stream is normalised with the baseline of all the ones
    before it, however long the specialist takes: the output does not depend on timing. With
    emotion offsets each update also takes the utterance's recognised distribution."""
    path, clip_count = speech_with_pauses
    build = adaptive_with_offsets if offsets else build_adaptive_model
    specialist = SlowUtterances(build(tmp_path / "adaptive"))
    assert specialist.card.adaptation is not None
    sink = ResultSink()
    async with Recognizer(specialist) as recognizer:
        stream = file_pipeline(path, recognizer, sink)
        await stream.run(asyncio.Event())
    assert len([m for m in sink.results if m["type"] == "utterance"]) == clip_count
    expected = StreamBaseline(specialist.card.adaptation)
    assert len(specialist.given) == clip_count
    recorded = zip(specialist.given, specialist.embeddings, specialist.probabilities, strict=True)
    for given, embedding, probabilities in recorded:
        wanted = expected.current()
        if wanted is None:  # warm-up: the population's statistics
            assert given is None
        else:
            assert given is not None
            np.testing.assert_allclose(given.mean, wanted.mean)
            np.testing.assert_allclose(given.std, wanted.std)
        expected.update(embedding, probabilities)
    assert expected.current() is not None  # the replay did leave the warm-up
