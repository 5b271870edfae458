"""The model-worker core: one generic worker per model, off the event loop.

A `ModelWorker` owns one executor thread, a queue with a declared overflow rule, an optional
batch key, and its stats. `submit()` never blocks: it queues an item and returns a future of its
result. The worker task takes the next batch (the oldest urgent item, else the oldest item, plus
every waiting item with the same batch key, up to `max_batch`) and runs it in the thread.

    worker = ModelWorker("specialist", run_batch, Batching(max_batch=32, key=by_length),
                         Overflow(limit=8, rule="drop_oldest", refused=..., group=by_stream))
    async with worker:
        result = await worker.submit(item)

The Recognizer (specialist), AlmBatcher, Analyzer (acoustics), SideSpecialists and the transcript
and speaker stages are its users. The last four group utterances with `by_deadline`: one with a
deadline (a live stream's) counts against the overflow limit; one without (a lossless stream's,
which bounds its own utterances in flight) is never refused.

Failures: an exception raised by the batch function is set on every future of the batch; one
that is not a StreamSerError is a bug and is logged with its traceback too. The worker survives
both and serves the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, Literal, Protocol, TypeVar

from stream_ser.errors import StreamSerError

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")

OverflowRule = Literal["drop_oldest", "reject_new"]
"""drop_oldest: the oldest waiting item of the group makes room (a live stream cares most about
recent audio); reject_new: the item that does not fit is refused at once."""


class HasDeadline(Protocol):
    """An item that may carry a deadline."""

    @property
    def deadline_s(self) -> float | None:
        """When its answer is no longer needed (monotonic seconds); None: it waits for it."""


def by_deadline(item: HasDeadline) -> Hashable | None:
    """`Overflow.group`: items with a deadline form one group; those without are never refused."""
    return None if item.deadline_s is None else ()


def past_deadline(item: HasDeadline) -> bool:
    """Whether the item's deadline has passed (never for an item without one)."""
    return item.deadline_s is not None and time.monotonic() > item.deadline_s


def _alone(item: object) -> Hashable | None:
    return None


def _never(item: object) -> bool:
    return False


def _one_group(item: object) -> Hashable | None:
    return ()


@dataclass(frozen=True)
class Batching(Generic[Req]):
    """Which waiting items share one model call."""

    max_batch: int = 1
    key: Callable[[Req], Hashable | None] = _alone
    """Items with equal keys may share a call; None: the item runs alone."""
    urgent: Callable[[Req], bool] = _never
    """Urgent items go before every other waiting item (oldest first)."""
    linger_s: float = 0.0
    """A batch waits up to this long after its oldest item arrived for `max_batch` items."""


@dataclass(frozen=True)
class Overflow(Generic[Req, Res]):
    """The bounded queue's rule: at most `limit` items of one group wait (not yet running)."""

    limit: int
    rule: OverflowRule
    refused: Callable[[Req, int], Res | BaseException]
    """What the future of a dropped or rejected item gets (given the count waiting)."""
    group: Callable[[Req], Hashable | None] = _one_group
    """Items are counted per group; None: never counted, never refused."""


@dataclass
class WorkerStats:
    """A worker's counters; updated on the event loop only."""

    submitted: int = 0
    completed: int = 0  # results delivered
    failed: int = 0  # items whose batch raised
    refused: int = 0  # dropped or rejected by the overflow rule
    batches: int = 0  # model calls
    waiting: int = 0  # items queued now


@dataclass
class _Queued(Generic[Req, Res]):
    item: Req
    future: asyncio.Future[Res]
    enqueued_s: float  # loop time


@dataclass
class ModelWorker(Generic[Req, Res]):
    """One model, one thread, one queue; see the module docstring."""

    name: str
    run_batch: Callable[[list[Req]], list[Res]]
    """Runs in the worker's thread: one result per item, in order."""
    batching: Batching[Req] = field(default_factory=Batching)
    overflow: Overflow[Req, Res] | None = None
    """None: never refused (the callers bound what they submit; their rule is documented)."""
    on_close: Callable[[Req], Res | BaseException] | None = None
    """What items still queued at close get; None: their futures are cancelled."""
    wait_on_close: bool = True
    """Close waits for a model call in progress (False: it finishes in its thread alone)."""
    stats: WorkerStats = field(default_factory=WorkerStats)

    def __post_init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=self.name)
        self._queue: deque[_Queued[Req, Res]] = deque()
        self._current: list[_Queued[Req, Res]] = []
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._flushing = False
        self._task: asyncio.Task[None] | None = None

    def warm_up(self, function: Callable[[], object]) -> None:
        """Run `function` in the worker's thread before anything submitted later."""
        self._executor.submit(function)

    async def __aenter__(self) -> ModelWorker[Req, Res]:
        self._task = asyncio.create_task(self._run(), name=f"worker-{self.name}")
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(drain=False)

    @property
    def running(self) -> bool:
        """Whether the worker task is serving the queue."""
        return self._task is not None and not self._task.done()

    def submit(self, item: Req) -> asyncio.Future[Res]:
        """Queue one item; never blocks. The overflow rule may refuse it (or an older one)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Res] = loop.create_future()
        self.stats.submitted += 1
        if not self._make_room(item, future):
            return future
        self._queue.append(_Queued(item, future, loop.time()))
        self.stats.waiting = len(self._queue)
        self._idle.clear()
        self._arrived.set()
        return future

    async def drain(self) -> None:
        """Send what is queued without lingering; return when every item has its result."""
        self._flushing = True
        self._arrived.set()
        try:
            await self._idle.wait()
        finally:
            self._flushing = False

    async def close(self, drain: bool = True) -> None:
        """Stop the worker (with `drain`, after every queued item has its result); items
        still queued get `on_close`'s answer."""
        if drain and self.running:
            await self.drain()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for queued in [*self._current, *self._queue]:
            if self.on_close is None:
                queued.future.cancel()
            else:
                _resolve(queued.future, self.on_close(queued.item))
        self._queue.clear()
        self._current = []
        self.stats.waiting = 0
        self._idle.set()
        self._executor.shutdown(wait=self.wait_on_close, cancel_futures=not self.wait_on_close)

    def _make_room(self, item: Req, future: asyncio.Future[Res]) -> bool:
        """Apply the overflow rule; False if `item` itself was refused."""
        overflow = self.overflow
        if overflow is None or (group := overflow.group(item)) is None:
            return True
        waiting = [q for q in self._queue if overflow.group(q.item) == group]
        if len(waiting) < overflow.limit:
            return True
        self.stats.refused += 1
        if overflow.rule == "reject_new":
            _resolve(future, overflow.refused(item, len(waiting)))
            return False
        oldest = waiting[0]
        self._queue.remove(oldest)
        _resolve(oldest.future, overflow.refused(oldest.item, len(waiting)))
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_batch(loop)
            batch = self._take_batch()
            self._current = batch
            self.stats.waiting = len(self._queue)
            self.stats.batches += 1
            try:
                results = await loop.run_in_executor(
                    self._executor, self.run_batch, [q.item for q in batch]
                )
            except Exception as err:  # delivered to the callers; a bug is also logged
                if not isinstance(err, StreamSerError):
                    log.exception("%s: batch of %d failed unexpectedly", self.name, len(batch))
                self.stats.failed += len(batch)
                for queued in batch:
                    _resolve(queued.future, err)
            else:
                self.stats.completed += len(batch)
                for queued, result in zip(batch, results, strict=True):
                    _resolve(queued.future, result)
            self._current = []
            if not self._queue:
                self._idle.set()

    async def _wait_for_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        linger_s = self.batching.linger_s
        while len(self._queue) < self.batching.max_batch and not self._flushing:
            remaining_s = self._queue[0].enqueued_s + linger_s - loop.time()
            if remaining_s <= 0:
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining_s):
                    await self._arrived.wait()
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Queued[Req, Res]]:
        """The oldest urgent item, else the oldest; plus waiting items sharing its key."""
        urgent = self.batching.urgent
        first = next((q for q in self._queue if urgent(q.item)), self._queue[0])
        self._queue.remove(first)
        key = self.batching.key(first.item)
        batch = [first]
        if key is None:
            return batch
        for queued in list(self._queue):
            if len(batch) >= self.batching.max_batch:
                break
            if self.batching.key(queued.item) == key:
                self._queue.remove(queued)
                batch.append(queued)
        return batch


def _resolve(future: asyncio.Future[Res], outcome: Res | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
