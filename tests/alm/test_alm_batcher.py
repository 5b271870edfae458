"""The dynamic batcher: sizes, deadlines, order, overflow, OOM splitting, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_ser import alm
from stream_ser.acoustics import CueTokens
from stream_ser.alm import AlmBatcher, AlmOptions, AlmOutOfMemoryError
from stream_ser.errors import ModelError, StreamSerError

from .alm_helpers import LABELS

TIMEOUT_S = 10


class FakeBackend:
    """Synchronous stand-in: label `clip[0] % 4` gets 0.7; can sleep, run out of memory, fail."""

    kind = "fake"
    spec = "fake:test"
    labels: tuple[str, ...] = LABELS

    def __init__(self, options: AlmOptions, delay_s: float = 0.0, oom_above: int | None = None,
                 error: Exception | None = None) -> None:
        self.options = options
        self.delay_s = delay_s
        self.oom_above = oom_above
        self.error = error
        self.batches: list[list[int]] = []

    def predict(self, batch: Sequence[np.ndarray],
                cues: Sequence[CueTokens | None] | None = None) -> list[dict[str, float]]:
        self.batches.append([int(clip[0]) for clip in batch])
        time.sleep(self.delay_s)
        if self.oom_above is not None and len(batch) > self.oom_above:
            raise AlmOutOfMemoryError("CUDA out of memory")
        if self.error is not None:
            raise self.error
        return [expected(int(clip[0])) for clip in batch]

    def predict_templates(self, batch: Sequence[np.ndarray],
                          cues: Sequence[CueTokens | None] | None = None
                          ) -> list[list[dict[str, float]]]:
        return [[distribution] for distribution in self.predict(batch, cues)]

    def template_names(self) -> list[str]:
        return ["fake template"]

    def explain(self, batch: Sequence[np.ndarray],
                cues: Sequence[CueTokens | None] | None = None) -> list[str]:
        return [f"because {int(clip[0])}" for clip in batch]

    def cue_phrases(self, batch: Sequence[np.ndarray],
                    cues: Sequence[CueTokens | None] | None = None) -> list[str | None]:
        return [None] * len(batch)


def expected(tag: int) -> dict[str, float]:
    return {label: 0.7 if i == tag % 4 else 0.1 for i, label in enumerate(LABELS)}


def clip(tag: int) -> np.ndarray:
    return np.full(1600, tag, dtype=np.float32)


def options(**changes: Any) -> AlmOptions:
    return replace(AlmOptions(max_batch=4, max_wait_ms=50, max_queue=16), **changes)


async def gather(futures: Sequence[asyncio.Future[alm.AlmResult]]) -> list[alm.AlmResult]:
    async with asyncio.timeout(TIMEOUT_S):
        return list(await asyncio.gather(*futures))


async def test_full_batches_go_at_once_in_order() -> None:
    backend = FakeBackend(options(max_batch=2, max_wait_ms=60_000))
    async with AlmBatcher(backend) as batcher:
        results = await gather([batcher.submit(clip(i)) for i in range(4)])
    assert backend.batches == [[0, 1], [2, 3]]
    assert [r.distribution for r in results] == [expected(i) for i in range(4)]
    assert all(r.ok and r.batch_size == 2 for r in results)
    assert (batcher.stats.submitted, batcher.stats.completed, batcher.stats.batches) == (4, 4, 2)


async def test_partial_batch_goes_when_the_oldest_has_waited() -> None:
    backend = FakeBackend(options(max_batch=8, max_wait_ms=150))
    async with AlmBatcher(backend) as batcher:
        start = time.monotonic()
        first = batcher.submit(clip(0))
        await asyncio.sleep(0.08)
        second = batcher.submit(clip(1))
        results = await gather([first, second])
        waited = time.monotonic() - start
    assert backend.batches == [[0, 1]]  # one batch: the deadline is the oldest's
    assert 0.14 <= waited < 0.14 + 0.5
    assert results[0].latency_ms >= 140 and results[1].latency_ms < results[0].latency_ms


async def test_submit_never_blocks_while_the_model_runs() -> None:
    backend = FakeBackend(options(max_batch=1, max_wait_ms=0), delay_s=0.3)
    async with AlmBatcher(backend) as batcher:
        first = batcher.submit(clip(0))
        await asyncio.sleep(0.05)  # the model is now busy in its thread
        start = time.monotonic()
        later = [batcher.submit(clip(i)) for i in range(1, 4)]
        await asyncio.sleep(0.01)
        assert time.monotonic() - start < 0.1  # the loop kept running
        results = await gather([first, *later])
    assert [r.ok for r in results] == [True] * 4


async def test_overflow_drops_the_oldest_waiting_and_counts_it() -> None:
    backend = FakeBackend(options(max_batch=1, max_wait_ms=0, max_queue=2), delay_s=0.2)
    async with AlmBatcher(backend) as batcher:
        running = batcher.submit(clip(0))
        await asyncio.sleep(0.05)
        waiting = [batcher.submit(clip(i)) for i in (1, 2, 3)]
        results = await gather([running, *waiting])
    assert [r.ok for r in results] == [True, False, True, True]
    assert results[1].error is not None and "queue full" in results[1].error
    assert results[1].distribution == {}
    assert batcher.stats.dropped == 1 and batcher.stats.completed == 3
    assert [tags for tags in backend.batches] == [[0], [2], [3]]


async def test_out_of_memory_splits_then_flags() -> None:
    backend = FakeBackend(options(max_batch=4, max_wait_ms=10), oom_above=1)
    async with AlmBatcher(backend) as batcher:
        results = await gather([batcher.submit(clip(i)) for i in range(4)])
    assert backend.batches == [[0, 1, 2, 3], [0, 1], [0], [1], [2, 3], [2], [3]]
    assert all(r.ok and r.batch_size == 1 for r in results)
    assert [r.distribution for r in results] == [expected(i) for i in range(4)]
    assert (batcher.stats.splits, batcher.stats.batches) == (3, 7)

    always = FakeBackend(options(max_batch=2, max_wait_ms=10), oom_above=0)
    async with AlmBatcher(always) as batcher:
        results = await gather([batcher.submit(clip(i)) for i in range(2)])
    assert all(not r.ok and r.error and r.error.startswith("out of memory") for r in results)
    assert batcher.stats.failed == 2


async def test_model_error_flags_the_batch() -> None:
    backend = FakeBackend(options(max_batch=2, max_wait_ms=10), error=ModelError("server down"))
    async with AlmBatcher(backend) as batcher:
        results = await gather([batcher.submit(clip(i)) for i in range(2)])
    assert [(r.ok, r.error) for r in results] == [(False, "server down")] * 2
    assert backend.batches == [[0, 1]]  # not split: only out-of-memory is retried


async def test_bug_reaches_the_caller() -> None:
    backend = FakeBackend(options(max_batch=1, max_wait_ms=0), error=ZeroDivisionError("bug"))
    async with AlmBatcher(backend) as batcher:
        with pytest.raises(ZeroDivisionError):
            await gather([batcher.submit(clip(0))])
        backend.error = None  # the worker survives a bug and serves the next batch
        (result,) = await gather([batcher.submit(clip(1))])
    assert result.ok and batcher.stats.submitted == 2


async def test_result_metadata_and_rationale() -> None:
    backend = FakeBackend(options(max_wait_ms=0, explain=True, audio_repeats=2, text_repeats=3,
                                  cues="conflicting", prompt_set="mine"), delay_s=0.02)
    async with AlmBatcher(backend) as batcher:
        (result,) = await gather([batcher.submit(clip(5))])
    assert (result.prompt_set, result.audio_repeats, result.text_repeats, result.cue_mode) == (
        "mine", 2, 3, "conflicting")
    assert result.backend == "fake:test" and result.rationale == "because 5"
    assert result.latency_ms >= result.inference_ms >= 20


async def test_exit_drains_and_error_exit_flags_shutdown() -> None:
    backend = FakeBackend(options(max_batch=2, max_wait_ms=30_000))
    start = time.monotonic()
    async with AlmBatcher(backend) as batcher:
        futures = [batcher.submit(clip(i)) for i in range(3)]
    assert all(f.done() and f.result().ok for f in futures)  # the partial batch was flushed
    assert time.monotonic() - start < 5  # without waiting for its 30 s deadline

    slow = FakeBackend(options(max_batch=2, max_wait_ms=30_000))
    with pytest.raises(RuntimeError, match="boom"):
        async with AlmBatcher(slow) as batcher:
            pending = batcher.submit(clip(0))
            raise RuntimeError("boom")
    assert pending.done() and pending.result().error == "shutdown"


async def test_submit_needs_a_running_batcher() -> None:
    batcher = AlmBatcher(FakeBackend(options()))
    with pytest.raises(StreamSerError, match="not running"):
        batcher.submit(clip(0))


@pytest.mark.slow
async def test_real_backend_through_the_batcher(
    tiny_qwen: Path, mixed_clips: list[np.ndarray]
) -> None:
    backend = alm.load(f"qwen2-audio:{tiny_qwen}", LABELS, prompt_set="single", cpu_threads=1,
                       max_batch=3, max_wait_ms=20)
    alone = [backend.predict([c])[0] for c in mixed_clips]
    async with AlmBatcher(backend) as batcher:
        results = await gather([batcher.submit(c) for c in mixed_clips])
    assert [r.batch_size for r in results] == [3, 3, 3, 1]
    for result, reference in zip(results, alone, strict=True):
        assert result.ok and result.cue_mode == "none"
        np.testing.assert_allclose(list(result.distribution.values()), list(reference.values()),
                                   atol=1e-5)
