"""`stream-ser send`'s link to the broker: the outbox of encoded chunks and the uplink that
publishes it with hellos, reconnecting through `stream_ser.mqtt`.

After every (re)connection, chunks go out only once a worker has claimed the stream (its
retained owner record), for at most CLAIM_WAIT_S: what a device buffered during a broker outage
is not published before a worker has subscribed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stream_ser.mqtt import (
    Backoff,
    BrokerAddress,
    CheckedClient,
    LastError,
    broker_client,
    close,
    connect,
    keep_connected,
    parse_broker_url,
)
from stream_ser.remote import HELLO_INTERVAL_S
from stream_ser.settings import MqttSettings

if TYPE_CHECKING:
    from stream_ser.send import Capture

log = logging.getLogger(__name__)

# after each connection, chunks wait (in the outbox) this long for a worker's claim of the
# stream: audio published before a worker subscribes (after a broker restart, say) is lost
CLAIM_WAIT_S = 10.0

# --- outbox --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    """One encoded chunk waiting for the broker."""

    seq: int
    payload: bytes


class Outbox:
    """Encoded chunks between the source and the broker, at most `capacity` of them.

    Overflow rule: with `drop_oldest` (live sources) the oldest waiting chunk is dropped,
    counted and logged; otherwise `put` waits for room. `close` marks the end of the input.
    """

    def __init__(self, capacity: int, drop_oldest: bool) -> None:
        self.capacity = capacity
        self.drop_oldest = drop_oldest
        self.dropped = 0
        self.closed = False
        self._items: deque[Outgoing] = deque()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: Outgoing, force: bool = False) -> None:
        """Queue a chunk; waits for room unless dropping (or `force`, for the final chunk)."""
        while len(self._items) >= self.capacity and not (self.drop_oldest or force):
            await self._wait()
        if len(self._items) >= self.capacity:
            self._items.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("outbox full: %d chunk(s) dropped so far, oldest first",
                            self.dropped)  # fmt: skip
        self._items.append(item)
        self._notify()

    def close(self) -> None:
        """No more chunks will come."""
        self.closed = True
        self._notify()

    async def get(self, timeout_s: float) -> Outgoing | None:
        """The oldest chunk, left in place until `done`; None after `timeout_s` or when
        closed and empty."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not self._items and not self.closed:
                    await self._wait()
        return self._items[0] if self._items else None

    def done(self, item: Outgoing) -> None:
        """The broker has `item` (the oldest, unless it was dropped meanwhile)."""
        if self._items and self._items[0] is item:
            self._items.popleft()
            self._notify()

    @property
    def finished(self) -> bool:
        """Closed and everything delivered (or dropped)."""
        return self.closed and not self._items

    async def _wait(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()


# --- broker --------------------------------------------------------------------------------


class Uplink:
    """Publishes the outbox and hellos; reconnects with backoff when the broker drops."""

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        stream_id: str,
        capture: Capture,
        qos: int,
    ) -> None:
        assert settings.url is not None
        self.address: BrokerAddress = parse_broker_url(
            settings.url, settings.password_file, settings.username
        )
        self.settings = settings
        self.client_id = client_id
        self.stream_id = stream_id
        self.capture = capture
        self.qos = qos
        topic = f"{settings.topic_prefix}/audio/{stream_id}"
        self.pcm_topic = f"{topic}/pcm"
        self.hello_topic = f"{topic}/hello"
        self.owner_topic = f"{topic}/owner"
        self.sent = 0
        self.reconnects = 0
        self.publish_denied = 0
        self._paho_log = logging.getLogger(f"{__name__}.paho")
        self._paho_errors = LastError()
        self._paho_log.addFilter(self._paho_errors)

    async def connect(self) -> CheckedClient:
        """A connected client; PublishError with a one-line reason if there is none."""
        client = await connect(
            broker_client(self.settings, self.address, self.client_id, logger=self._paho_log),
            self.settings, self.address, self._paho_errors,
        )  # fmt: skip
        log.info("connected to %s as %s; streaming %s at %d Hz, %d channel(s)", self.address,
                 self.client_id, self.pcm_topic, self.capture.sample_rate,
                 self.capture.channels)  # fmt: skip
        return client

    async def run(
        self, client: CheckedClient | None, outbox: Outbox, seq: Callable[[], int]
    ) -> None:
        """Deliver until the outbox is finished; `client` is the first connection (or None).

        `seq()` is the next sequence number (sent in hellos)."""
        link: list[CheckedClient | None] = [client]

        async def session(backoff: Backoff) -> None:
            try:
                connected = link[0]
                if connected is None:
                    connected = link[0] = await self.connect()
                    self.reconnects += 1
                backoff.reset()
                await self._pump(connected, outbox, seq)
            finally:
                await close(link[0])
                link[0] = None

        def lost(err: Exception, delay: float) -> float:
            log.warning("broker %s: %s; %d chunk(s) waiting; retrying in %.1f s",
                        self.address, err, len(outbox), delay)  # fmt: skip
            return delay

        await keep_connected(session, lost)

    async def _pump(self, client: CheckedClient, outbox: Outbox, seq: Callable[[], int]) -> None:
        claimed = asyncio.Event()
        watching = asyncio.create_task(self._watch_owner(client, claimed), name="owner-watch")
        try:
            await self._pump_claimed(client, outbox, seq, claimed)
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)

    async def _pump_claimed(
        self, client: CheckedClient, outbox: Outbox, seq: Callable[[], int], claimed: asyncio.Event
    ) -> None:
        """Hellos, and chunks once a worker has claimed the stream on this connection (or
        after CLAIM_WAIT_S without a claim: then they go out anyway, with a warning)."""
        next_hello = time.monotonic()
        give_up_at = next_hello + CLAIM_WAIT_S
        subscribed = False
        while not outbox.finished:
            if time.monotonic() >= next_hello:
                await self._publish(client, self.hello_topic, self._hello(seq()), 1)
                if not subscribed:  # after the first hello, so that it goes out at once
                    await client.subscribe(self.owner_topic, qos=1)
                    subscribed = True
                next_hello = time.monotonic() + HELLO_INTERVAL_S
            if not claimed.is_set() and time.monotonic() < give_up_at:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_hello - time.monotonic())):
                        await claimed.wait()
                if time.monotonic() >= give_up_at and not claimed.is_set():
                    log.warning("no worker claimed %s within %.0f s; sending anyway",
                                self.stream_id, CLAIM_WAIT_S)  # fmt: skip
                continue
            item = await outbox.get(max(0.0, next_hello - time.monotonic()))
            if item is not None:
                await self._publish(client, self.pcm_topic, item.payload, self.qos)
                outbox.done(item)
                self.sent += 1

    async def _watch_owner(self, client: CheckedClient, claimed: asyncio.Event) -> None:
        """Set `claimed` once a worker's owner record for the stream arrives."""
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if _owner_record(payload):
                claimed.set()

    def _hello(self, seq: int) -> bytes:
        return json.dumps({
            "stream_id": self.stream_id,
            "sample_rate": self.capture.sample_rate,
            "channels": self.capture.channels,
            "seq": seq,
        }).encode()  # fmt: skip

    async def _publish(self, client: CheckedClient, topic: str, payload: bytes, qos: int) -> None:
        async with asyncio.timeout(self.settings.connect_timeout_s + 1.0):
            refusal = await client.publish_checked(topic, payload, qos)
        if refusal is not None:  # final: it would be refused again
            self.publish_denied += 1
            if self.publish_denied == 1:
                log.error("the broker refused a message on %s: %s (reason code %d); check the "
                          "broker's ACL for this user; refused chunks are dropped and counted",
                          topic, refusal, refusal.value)  # fmt: skip


def _owner_record(payload: bytes) -> bool:
    """Whether a payload of the owner topic names a worker (empty: released)."""
    try:
        record = json.loads(payload) if payload else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(record, dict) and isinstance(record.get("worker"), str)
