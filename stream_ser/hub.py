"""Published messages fanned out in-process: a Sink that subscribers read from (WebSocket
clients, the dashboard, Python code).

    hub = ResultHub()
    sink = TeeSink(mqtt_or_stdout_sink, hub)       # the runtime publishes to both
    async with hub.subscribe("kitchen", history=True) as subscription:
        async for message in subscription:         # exactly the published JSON objects
            ...

Every message the pipeline publishes (window, provisional and final results, speaking, status)
reaches each subscriber in publish order. Messages are shared between subscribers: read-only.

Queues and their overflow rule: a subscriber holds at most `max_queued` live messages. When
full, the oldest queued *droppable* message (a window, a provisional result or a status: each is
superseded by a later one) makes room, or the new message is dropped if it is droppable itself;
both counted in `dropped`. A final result or a speaking change is never dropped silently: when
none of the queued messages can make room for one, the subscription is closed with a reason
(`close_reason`) after what is queued has been read. Publishing never waits for a subscriber.

History: the hub keeps the messages of the last `history_s` seconds (at most `max_history`,
windows dropped first) and the latest status; `subscribe(history=True)` replays them (the
latest status last) before the live messages, so a page that (re)connects can draw its timeline.
Not thread-safe: use it from the event loop that runs the pipeline.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Self

from stream_ser.messages import ResultMessage, SpeakingMessage, StatusMessage

Message = Mapping[str, Any]  # one published message, as its JSON object

DEFAULT_MAX_QUEUED = 1000
DEFAULT_HISTORY_S = 600.0
DEFAULT_MAX_HISTORY = 20_000


def droppable(message: Message) -> bool:
    """A window, a provisional result or a status: a later message supersedes it."""
    kind = message.get("type")
    return kind in ("window", "status") or (kind == "utterance" and not message.get("final"))


class Subscription:
    """One subscriber's messages: an async iterator (and context manager) fed by the hub."""

    def __init__(
        self, hub: ResultHub, stream_id: str | None, backlog: Iterable[Message], max_queued: int
    ) -> None:
        self.stream_id = stream_id
        self.max_queued = max_queued
        self.dropped = 0  # droppable messages this subscriber lost (too slow)
        self.close_reason: str | None = None  # why the hub closed it; None: closed by its owner
        self._hub = hub
        self._backlog: deque[Message] = deque(backlog)  # history, replayed first
        self._queue: deque[Message] = deque()
        self._ready = asyncio.Event()
        self._closed = False

    @property
    def closed(self) -> bool:
        """No more messages will be added (what is queued can still be read)."""
        return self._closed

    def wants(self, message: Message) -> bool:
        """Every message, or one stream's messages and the process status."""
        if self.stream_id is None or message.get("type") == "status":
            return True
        return message.get("stream_id") == self.stream_id

    def offer(self, message: Message) -> None:
        """Queue a message (the hub calls this); never waits. See the module's overflow rule."""
        if self._closed:
            return
        if len(self._queue) >= self.max_queued and not self._make_room(message):
            return
        self._queue.append(message)
        self._ready.set()

    def _make_room(self, message: Message) -> bool:
        """True if the message may be queued now."""
        victim = next((i for i, queued in enumerate(self._queue) if droppable(queued)), None)
        if victim is not None:
            del self._queue[victim]
            self.dropped += 1
            self._hub.dropped += 1
            return True
        if droppable(message):
            self.dropped += 1
            self._hub.dropped += 1
            return False
        self._hub.closed_slow += 1
        self.close(
            f"subscriber too slow: {len(self._queue)} messages waited to be read and none could "
            f"make room for a {message.get('type')} message"
        )
        return False

    def close(self, reason: str | None = None) -> None:
        """Stop receiving; what is queued can still be read, then iteration ends."""
        if self._closed:
            return
        self._closed = True
        self.close_reason = reason
        self._hub.unsubscribe(self)
        self._ready.set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        while True:
            if self._backlog:
                return self._backlog.popleft()
            if self._queue:
                return self._queue.popleft()
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class ResultHub:
    """A Sink (stream_ser.publish.Sink) that fans every published message out to subscribers."""

    def __init__(
        self,
        history_s: float = DEFAULT_HISTORY_S,
        max_history: int = DEFAULT_MAX_HISTORY,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        self.history_s = history_s
        self.max_history = max_history
        self.max_queued = max_queued
        self.dropped = 0  # messages subscribers lost, all together
        self.closed_slow = 0  # subscriptions closed because a final did not fit
        self.more_counters: list[Callable[[], dict[str, int]]] = []  # e.g. the web server's
        self._subscriptions: list[Subscription] = []
        self._history: deque[tuple[float, Message]] = deque()  # (monotonic s, message)
        self._status: Message | None = None
        self._closed = False

    # ------------------------------------------------------------------ subscribers

    def subscribe(
        self, stream_id: str | None = None, history: bool = False, max_queued: int | None = None
    ) -> Subscription:
        """Messages of every stream (or of `stream_id`, plus the status) from now on;
        `history`: first the retained ones. After the hub closed: only those, then the end."""
        backlog = self.history(stream_id) if history else []
        subscription = Subscription(self, stream_id, backlog, max_queued or self.max_queued)
        if self._closed:
            subscription.close()
        else:
            self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Forget a subscription (Subscription.close calls this)."""
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    @property
    def subscribers(self) -> int:
        """Subscriptions open now."""
        return len(self._subscriptions)

    def history(self, stream_id: str | None = None) -> list[Message]:
        """The retained messages (of one stream), oldest first, then the latest status."""
        self._expire(time.monotonic())
        kept = [m for _, m in self._history if stream_id is None or m.get("stream_id") == stream_id]
        return kept + ([self._status] if self._status is not None else [])

    def publish(self, message: Message) -> None:
        """Keep the message in the history and offer it to every subscriber that wants it."""
        if message.get("type") == "status":
            self._status = message
        else:
            now = time.monotonic()
            self._history.append((now, message))
            self._expire(now)
        for subscription in list(self._subscriptions):
            if subscription.wants(message):
                subscription.offer(message)

    def _expire(self, now: float) -> None:
        while self._history and now - self._history[0][0] > self.history_s:
            self._history.popleft()
        if len(self._history) > self.max_history:
            kept = [entry for entry in self._history if not droppable(entry[1])]
            if len(kept) > self.max_history // 2:  # mostly finals: keep the newest
                kept = kept[len(kept) - self.max_history // 2 :]
            self._history = deque(kept)

    # ------------------------------------------------------------------ the Sink protocol

    async def __aenter__(self) -> ResultHub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """No more messages: every subscription ends once its queue is read."""
        self._closed = True
        for subscription in list(self._subscriptions):
            subscription.close()

    async def result(self, stream_id: str, message: ResultMessage) -> None:
        """A window, provisional or final result."""
        self.publish(message)

    async def status(self, message: StatusMessage) -> None:
        """The process status."""
        self.publish(message)

    async def speaking(self, stream_id: str, message: SpeakingMessage) -> None:
        """A stream's voice-activity change."""
        self.publish(message)

    async def announce(self, topic: str, payload: bytes) -> None:
        """Discovery configs are for MQTT only."""

    def counters(self) -> dict[str, int]:
        """Subscribers now, messages they lost, subscriptions closed for being too slow
        (and `more_counters`' counters)."""
        counters = {
            "hub_subscribers": len(self._subscriptions),
            "hub_messages_dropped": self.dropped,
            "hub_subscribers_too_slow": self.closed_slow,
        }
        for more in self.more_counters:
            counters |= more()
        return counters
