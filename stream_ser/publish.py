"""Publishing results: MQTT through aiomqtt, or JSON Lines on stdout.

Topics (prefix configurable, default `stream-ser`):
    {prefix}/{stream_id}/utterance   QoS 1, one final result per utterance
    {prefix}/{stream_id}/window      QoS 0, sliding-window results while speech is active
    {prefix}/status/{client_id}      QoS 1, retained: `online` with counters while running,
                                     `offline` at exit and as the last will
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from stream_ser.delivery import LinkLedger
from stream_ser.errors import PublishError
from stream_ser.messages import (
    ResultMessage,
    SpeakingMessage,
    StatusMessage,
    encode,
    status_message,
)
from stream_ser.mqtt import (
    LINK_ERRORS,
    Backoff,
    CheckedClient,
    LastError,
    broker_client,
    connect,
    keep_connected,
    parse_broker_url,
)
from stream_ser.settings import MqttSettings
from stream_ser.spool import Spool, Spooled

log = logging.getLogger(__name__)

QOS_BY_KIND = {"utterance": 1, "window": 0}


class Sink(Protocol):
    """Where results and status go."""

    async def __aenter__(self) -> Sink: ...

    async def __aexit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def result(self, stream_id: str, message: ResultMessage) -> None:
        """Deliver one window or utterance result."""

    async def status(self, message: StatusMessage) -> None:
        """Deliver the process status."""

    async def speaking(self, stream_id: str, message: SpeakingMessage) -> None:
        """Deliver a stream's voice-activity change."""

    async def announce(self, topic: str, payload: bytes) -> None:
        """Publish a retained configuration message (Home Assistant discovery)."""

    def counters(self) -> dict[str, int]:
        """Delivery counters for the status topic."""
        return {}


class JsonlSink:
    """Results as JSON Lines on stdout; status goes to the log."""

    async def __aenter__(self) -> JsonlSink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        sys.stdout.flush()

    async def result(self, stream_id: str, message: ResultMessage) -> None:
        """Write one line; a closed stdout (`stream-ser run | head`) ends the run."""
        try:
            sys.stdout.write(encode(message).decode() + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            # what is still buffered has nowhere to go: stdout becomes /dev/null, so that no
            # later flush (at exit, too) fails again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            raise PublishError("stdout was closed (its reader went away)") from None

    async def status(self, message: StatusMessage) -> None:
        """Log the status at debug level."""
        log.debug("status %s", message)

    async def speaking(self, stream_id: str, message: SpeakingMessage) -> None:
        """Voice activity is not written to stdout (it is not a result)."""

    async def announce(self, topic: str, payload: bytes) -> None:
        """Nothing to announce to on stdout."""

    def counters(self) -> dict[str, int]:
        """Nothing to count."""
        return {}


class TeeSink:
    """Every message to several sinks, in order."""

    def __init__(self, *sinks: Sink) -> None:
        self._sinks = sinks

    async def __aenter__(self) -> TeeSink:
        for index, sink in enumerate(self._sinks):
            try:
                await sink.__aenter__()
            except BaseException:
                for entered in reversed(self._sinks[:index]):
                    await entered.__aexit__(None, None, None)
                raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for sink in reversed(self._sinks):
            await sink.__aexit__(*exc)

    async def result(self, stream_id: str, message: ResultMessage) -> None:
        """To each sink."""
        for sink in self._sinks:
            await sink.result(stream_id, message)

    async def status(self, message: StatusMessage) -> None:
        """To each sink."""
        for sink in self._sinks:
            await sink.status(message)

    async def speaking(self, stream_id: str, message: SpeakingMessage) -> None:
        """To each sink."""
        for sink in self._sinks:
            await sink.speaking(stream_id, message)

    async def announce(self, topic: str, payload: bytes) -> None:
        """To each sink."""
        for sink in self._sinks:
            await sink.announce(topic, payload)

    def counters(self) -> dict[str, int]:
        """Every sink's counters."""
        merged: dict[str, int] = {}
        for sink in self._sinks:
            merged |= sink.counters()
        return merged


def default_client_id(stream_id: str) -> str:
    """Stable per host and stream, so the retained status topic is reused across restarts."""
    return f"stream-ser-{socket.gethostname()}-{stream_id}"


def default_spool_path(client_id: str) -> Path:
    """$XDG_STATE_HOME/stream-ser/spool/{client_id}.sqlite3 (~/.local/state by default)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "stream-ser" / "spool" / f"{client_id}.sqlite3"


class MqttSink:
    """Publishes to a broker through the on-disk spool.

    Results go to the spool first; a delivery task publishes them in order and removes each
    once the broker has it. If the connection drops, it reconnects with exponential backoff
    and jitter, re-publishes the retained status and goes on where it stopped. At exit it
    delivers what it can within the connect timeout; the rest stays for the next run.
    """

    def __init__(
        self, settings: MqttSettings, client_id: str, stream_ids: list[str], spool: Spool
    ) -> None:
        assert settings.url is not None
        self.address = parse_broker_url(settings.url, settings.password_file, settings.username)
        self.settings = settings
        self.client_id = client_id
        self.spool = spool
        self._ledger = LinkLedger(spool)
        self.status_topic = f"{settings.topic_prefix}/status/{client_id}"
        self._offline = encode(status_message("offline", stream_ids, {}))
        self._client: CheckedClient | None = None
        self._last_status: bytes | None = None
        self._final_status: dict[str, Any] | None = None
        self._closing = False
        self._give_up_at = 0.0  # monotonic time after which closing stops retrying
        self._wake = asyncio.Event()
        self._delivery: asyncio.Task[None] | None = None
        self._denied_topics: set[str] = set()
        self._paho_log = logging.getLogger(f"{__name__}.paho")
        self._paho_errors = LastError()
        self.reconnects = 0
        self.publish_denied = 0  # results the broker refused (ACL): set aside, not retried

    def _make_client(self) -> CheckedClient:
        return broker_client(
            self.settings,
            self.address,
            self.client_id,
            will=aiomqtt.Will(self.status_topic, self._offline, qos=1, retain=True),
            logger=self._paho_log,
        )

    async def __aenter__(self) -> MqttSink:
        self._paho_log.addFilter(self._paho_errors)
        try:
            await self._connect()
        except BaseException:
            self._paho_log.removeFilter(self._paho_errors)
            raise
        self._delivery = asyncio.create_task(self._deliver(), name="mqtt-delivery")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        self._give_up_at = time.monotonic() + self.settings.connect_timeout_s
        self._wake.set()
        if self._delivery is not None:
            await self._delivery
        offline = self._offline  # the last will's text, or the final status with its counters
        if self._final_status is not None:  # with delivery counters as they are now
            counters = self._final_status["counters"] | self.counters()
            offline = encode(self._final_status | {"counters": counters})
        if self._client is not None:
            try:
                await self._publish_status(offline)
                self._ledger.confirm()  # the delivery task is done: it was sent after them all
            except aiomqtt.MqttError as err:
                log.warning("could not publish the offline status: %s", err)
        await self._disconnect()
        self._paho_log.removeFilter(self._paho_errors)
        if len(self.spool):
            log.warning(
                "%d result(s) not delivered are kept in %s for the next run",
                len(self.spool), self.spool.path,
            )  # fmt: skip
        self.spool.close()

    async def result(self, stream_id: str, message: ResultMessage) -> None:
        """Spool the result (utterances QoS 1, windows QoS 0) for in-order delivery."""
        kind = message["type"]
        topic = f"{self.settings.topic_prefix}/{stream_id}/{kind}"
        self.spool.append(kind, topic, QOS_BY_KIND[kind], encode(message))
        self._wake.set()

    async def speaking(self, stream_id: str, message: SpeakingMessage) -> None:
        """Retained on {prefix}/{stream_id}/speaking, through the spool (in order with results)."""
        topic = f"{self.settings.topic_prefix}/{stream_id}/speaking"
        self.spool.append("speaking", topic, 1, encode(message), retain=True)
        self._wake.set()

    async def announce(self, topic: str, payload: bytes) -> None:
        """Retained QoS 1, through the spool like results."""
        self.spool.append("announce", topic, 1, payload, retain=True)
        self._wake.set()

    async def status(self, message: StatusMessage) -> None:
        """Retained; while disconnected only the latest is kept, sent on reconnect.

        The final `offline` status goes out at exit, after the spool has been delivered.
        """
        if message["state"] == "offline":
            # not kept as the status a reconnection re-sends: that goes out before the
            # spool, and `offline` must come after every result still waiting there
            self._final_status = dict(message)
            return
        self._last_status = encode(message)
        if self._client is None:
            return
        try:
            await self._publish_status(self._last_status)
        except aiomqtt.MqttError as err:
            # the link is gone: the delivery task reconnects (and re-sends the status)
            log.debug("status not published now (%s); it will be after reconnecting", err)
            await self._disconnect()
            self._wake.set()

    def counters(self) -> dict[str, int]:
        """Spool size, spool drops, reconnections and results the broker refused."""
        return {
            "spool_waiting": len(self.spool),
            "reconnects": self.reconnects,
            "publish_denied": self.publish_denied,
        } | asdict(self.spool.stats)

    async def _connect(self) -> None:
        # a fresh client each time: no state left from a lost link
        client = await connect(self._make_client(), self.settings, self.address, self._paho_errors)
        self._client = client
        log.info("connected to %s as %s", self.address, self.client_id)
        if self._last_status is not None:
            await self._publish_status(self._last_status)

    async def _publish_status(self, payload: bytes) -> None:
        assert self._client is not None
        refusal = await self._client.publish_checked(self.status_topic, payload, 1, retain=True)
        if refusal is not None:
            self._refused(self.status_topic, refusal, "status")

    def _refused(self, topic: str, reason: ReasonCode, what: str) -> None:
        """Log a refusal once per topic (the counter keeps the rest)."""
        if topic not in self._denied_topics:
            self._denied_topics.add(topic)
            log.error(
                "the broker refused a %s message on %s: %s (reason code %d); check the "
                "broker's ACL for this user; such messages are set aside in the spool's "
                "dead_letters table and counted (publish_denied)",
                what, topic, reason, reason.value,
            )  # fmt: skip

    async def _disconnect(self) -> bool:
        """Close the link; True if a message blamed for losing it was set aside."""
        client, self._client = self._client, None
        set_aside = self._ledger.lost()
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):  # the connection may already be gone
                await client.__aexit__(None, None, None)
        return set_aside

    async def _deliver(self) -> None:
        """Keep the link up and publish the spool in order; reconnect with backoff and jitter.

        While closing, retries go on until `connect_timeout_s` after the close began; what is
        still undelivered then stays in the spool for the next run.
        """
        await keep_connected(self._delivery_session, self._link_lost)

    async def _delivery_session(self, backoff: Backoff) -> None:
        try:
            while True:
                if self._client is None:
                    await self._connect()
                    self.reconnects += 1
                    backoff.reset()
                batch = self.spool.oldest(100, after=self._ledger.last_sent)
                if batch:
                    await self._publish_batch(batch)
                    continue
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
        except LINK_ERRORS:
            if await self._disconnect():  # a message set aside: the rest can go on at once
                backoff.reset()
                self._give_up_at = time.monotonic() + self.settings.connect_timeout_s
            raise

    def _link_lost(self, err: Exception, delay: float) -> float | None:
        """Log a lost link; the delay before retrying, or None when closing has run out."""
        if self._closing:
            left_s = self._give_up_at - time.monotonic()
            if left_s <= 0:
                log.warning("broker %s unreachable while closing: %s", self.address, err)
                return None
            delay = min(delay, left_s)
        log.warning("broker %s: %s; retrying in %.1f s", self.address, err, delay)
        return delay

    async def _publish_batch(self, batch: list[Spooled]) -> None:
        """Publish in order; each leaves the spool once the broker has it (see LinkLedger)."""
        for message in batch:
            client = self._client
            if client is None:  # a status publish found the link gone meanwhile
                raise aiomqtt.MqttError("the connection was lost")
            self._ledger.sending(message)
            refusal = await client.publish_checked(
                message.topic, message.payload, message.qos, retain=message.retain
            )
            if refusal is not None:  # final: retrying would be refused again
                self.publish_denied += 1
                self._refused(message.topic, refusal, message.kind)
                self._ledger.refused(message, f"{refusal} (reason code {refusal.value})")
            elif message.qos > 0:
                self._ledger.confirm()
