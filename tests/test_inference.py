"""The model-worker core: batching, overflow rules, failures, shutdown; and the stage protocol."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_ser.errors import ModelError
from stream_ser.fusion import FusionConfig
from stream_ser.inference import Batching, ModelWorker, Overflow, by_deadline, past_deadline
from stream_ser.recognizer import Recognizer
from stream_ser.specialist import Specialist
from stream_ser.stages import (
    FinalDraft,
    SideSpecialists,
    Utterance,
    UtteranceStages,
    WorkerStage,
)
from tests.pipelines import ResultSink, file_pipeline

TIMEOUT_S = 10


class Gated:
    """A batch function that records its batches and waits for the test to open the gate."""

    def __init__(self, fail_on: int | None = None, error: Exception | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.fail_on = fail_on
        self.error = error or ModelError("boom")

    def __call__(self, batch: list[int]) -> list[int]:
        self.gate.wait(timeout=TIMEOUT_S)
        self.batches.append(list(batch))
        if self.fail_on in batch:
            raise self.error
        return [item * 10 for item in batch]


def parity(item: int) -> Hashable | None:
    return item % 2


def refused(item: int, waiting: int) -> int:
    return -item


async def results(futures: Sequence[asyncio.Future[Any]]) -> list[Any]:
    async with asyncio.timeout(TIMEOUT_S):
        return list(await asyncio.gather(*futures, return_exceptions=True))


async def busy(worker: ModelWorker[int, int]) -> asyncio.Future[int]:
    """Submit item 100 and wait until the worker's thread holds it."""
    first = worker.submit(100)
    await asyncio.sleep(0.05)
    return first


async def test_items_with_one_key_share_a_call_and_urgent_ones_go_first() -> None:
    run = Gated()
    batching = Batching(max_batch=2, key=parity, urgent=lambda item: item >= 50)
    async with ModelWorker("test", run, batching) as worker:
        first = await busy(worker)
        later = [worker.submit(item) for item in (1, 2, 3, 5, 60)]
        run.gate.set()
        got = await results([first, *later])
    # the urgent 60 goes first, taking the waiting item of its key along; then the oldest
    assert run.batches == [[100], [60, 2], [1, 3], [5]]
    assert got == [1000, 10, 20, 30, 50, 600]
    assert (worker.stats.submitted, worker.stats.completed, worker.stats.batches) == (6, 6, 4)


async def test_drop_oldest_counts_per_group_and_spares_ungrouped_items() -> None:
    run = Gated()
    overflow = Overflow(2, "drop_oldest", refused, group=lambda i: None if i >= 50 else i % 2)
    async with ModelWorker("test", run, overflow=overflow) as worker:
        first = await busy(worker)
        later = [worker.submit(item) for item in (1, 3, 2, 5, 60, 61, 62)]
        run.gate.set()
        got = await results([first, *later])
    assert got == [1000, -1, 30, 20, 50, 600, 610, 620]  # 1 made room for 5; 60.. never count
    assert worker.stats.refused == 1


async def test_reject_new_refuses_the_item_that_does_not_fit() -> None:
    run = Gated()
    async with ModelWorker("test", run, overflow=Overflow(1, "reject_new", refused)) as worker:
        first = await busy(worker)
        later = [worker.submit(item) for item in (1, 2)]
        assert later[1].done() and later[1].result() == -2  # at once, not after the wait
        run.gate.set()
        assert await results([first, *later]) == [1000, 10, -2]


async def test_a_failed_batch_reaches_its_items_only_and_a_bug_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = Gated(fail_on=2)
    run.gate.set()
    async with ModelWorker("test", run) as worker:
        got = await results([worker.submit(item) for item in (1, 2, 3)])
        assert got[0] == 10 and got[2] == 30 and isinstance(got[1], ModelError)
        assert not caplog.records  # a StreamSerError is the caller's to report
        run.error = ZeroDivisionError("bug")
        with caplog.at_level(logging.ERROR):
            (bug,) = await results([worker.submit(2)])
        assert isinstance(bug, ZeroDivisionError)
        assert "failed unexpectedly" in caplog.text
        assert await results([worker.submit(4)]) == [40]  # the worker survived
    assert worker.stats.failed == 2


async def test_a_batch_lingers_for_company_and_drain_sends_it_at_once() -> None:
    run = Gated()
    run.gate.set()
    batching: Batching[int] = Batching(max_batch=3, key=lambda item: (), linger_s=0.2)
    async with ModelWorker("test", run, batching) as worker:
        started = time.monotonic()
        first = worker.submit(1)
        await asyncio.sleep(0.05)
        second = worker.submit(2)
        assert await results([first, second]) == [10, 20]
        assert time.monotonic() - started >= 0.19 and run.batches == [[1, 2]]
        started = time.monotonic()
        third = worker.submit(3)
        await asyncio.wait_for(worker.drain(), TIMEOUT_S)
        assert third.result() == 30 and time.monotonic() - started < 0.15


async def test_close_answers_or_cancels_what_is_still_queued() -> None:
    run = Gated()
    worker = ModelWorker("test", run, on_close=lambda item: -item, wait_on_close=False)
    async with worker:
        first = await busy(worker)
        queued = worker.submit(1)
    assert queued.result() == -1 and first.done()
    run.gate.set()
    run = Gated()
    async with ModelWorker("test", run) as plain:
        await busy(plain)
        waiting = plain.submit(1)
        run.gate.set()  # close waits for the call in progress, then cancels what is queued
    assert waiting.cancelled()


@dataclass(frozen=True)
class Timed:
    deadline_s: float | None


class GatedStage(WorkerStage):
    """A stage on one worker: at most one utterance with a deadline waits (reject_new)."""

    def __init__(self, gate: threading.Event) -> None:
        def run(batch: list[Timed]) -> list[str]:
            gate.wait(TIMEOUT_S)
            return ["done"] * len(batch)

        self.worker: ModelWorker[Timed, str] = ModelWorker(
            "stage",
            run,
            overflow=Overflow(1, "reject_new", lambda job, waiting: "refused", group=by_deadline),
            on_close=lambda job: "closed",
            wait_on_close=False,
        )


async def test_a_worker_stage_closes_without_draining_and_never_refuses_a_lossless_job() -> None:
    gate = threading.Event()
    stage = GatedStage(gate)
    try:
        async with stage as entered:
            assert entered is stage and stage.worker.running
            held = stage.worker.submit(Timed(None))
            await asyncio.sleep(0.05)  # the thread holds it
            live = [stage.worker.submit(Timed(time.monotonic() + 60)) for _ in "ab"]
            lossless = [stage.worker.submit(Timed(None)) for _ in "abc"]
        assert not stage.worker.running
        got = await results([held, *live, *lossless])
    finally:
        gate.set()
    assert got == ["closed", "closed", "refused", "closed", "closed", "closed"]


def test_deadlines_group_and_expire_only_jobs_that_have_one() -> None:
    now = time.monotonic()
    assert [by_deadline(Timed(d)) for d in (None, now + 60)] == [None, ()]
    assert [past_deadline(Timed(d)) for d in (None, now + 60, now - 1)] == [False, False, True]


class Failing:
    """A specialist whose window call has a bug (not a ModelError)."""

    card = type("Card", (), {"window_model": None, "adaptation": None})()

    def predict_windows(self, batch: Sequence[np.ndarray], baseline: object) -> np.ndarray:
        raise ZeroDivisionError("bug in the model wrapper")


async def test_a_bug_in_the_specialist_reaches_the_stream_instead_of_hanging_it() -> None:
    """Before the worker core, a non-ModelError ended the Recognizer's task silently and every
    future stayed pending (the stream waited forever)."""
    from stream_ser.recognizer import Job

    async with Recognizer(Failing()) as recognizer:  # type: ignore[arg-type]
        job = Job("window", 1, np.zeros(1600, dtype=np.float32), 0, 100, 0.0, stream_id="s")
        (outcome,) = await results([recognizer.submit(job)])
    assert isinstance(outcome, ZeroDivisionError)


class SlowSpecialist:
    """A further specialist taking 50 ms per utterance."""

    labels = ("a", "b")
    card = type("Card", (), {"model_id": "slow"})()

    def predict(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        time.sleep(0.05)
        return np.array([[0.25, 0.75]] * len(batch))


async def test_further_specialists_drop_the_oldest_live_utterance_never_a_lossless_one() -> None:
    side = SideSpecialists([SlowSpecialist()], max_pending=1)  # type: ignore[list-item]
    clip = np.zeros(1600, dtype=np.float32)
    async with side.worker:
        live = [asyncio.ensure_future(side.predict(clip, time.monotonic() + 60))]
        await asyncio.sleep(0.02)  # the thread holds the first one
        live += [asyncio.ensure_future(side.predict(clip, time.monotonic() + 60)) for _ in "ab"]
        lossless = [asyncio.ensure_future(side.predict(clip, None)) for _ in range(3)]
        got = await results([*live, *lossless])
    answered = {"specialist:slow": {"a": 0.25, "b": 0.75}}
    assert got == [answered, {}, answered, answered, answered, answered]
    assert side.worker.stats.refused == 1


class LengthStage:
    """A toy stage: the utterance's length, published as `length_ms` (one class...)."""

    name = "length"
    needs: tuple[str, ...] = ()

    async def __aenter__(self) -> LengthStage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def start(self, utterance: Utterance, started: object) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        future.set_result(len(utterance.job.samples) * 1000 // 16000)
        return future

    def add_to_final(self, result: object, draft: FinalDraft) -> None:
        draft.fields["length_ms"] = result


async def test_a_new_stage_is_one_class_and_one_registration(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clip_count = speech_with_pauses
    specialist = Specialist(tiny_model)
    stages = UtteranceStages(FusionConfig(specialist.labels), [LengthStage()])  # ...one line
    sink = ResultSink()
    async with Recognizer(specialist) as recognizer:
        stream = file_pipeline(path, recognizer, sink, stages)
        await asyncio.wait_for(stream.run(asyncio.Event()), 60)
    finals = [m for m in sink.results if m["final"]]
    provisional = [m for m in sink.results if m["type"] == "utterance" and not m["final"]]
    assert len(finals) == len(provisional) == clip_count  # the final waits for a stage now
    for message in finals:
        duration_ms = message["end_ms"] - message["start_ms"]
        assert message["length_ms"] == pytest.approx(duration_ms, abs=40)
        assert message["flags"] == []
