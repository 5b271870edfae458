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
import random
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import aiomqtt

from stream_ser.errors import ConfigError, PublishError
from stream_ser.messages import encode, status_message
from stream_ser.settings import MqttSettings

log = logging.getLogger(__name__)

PASSWORD_ENV = "STREAM_SER_MQTT_PASSWORD"
QOS_BY_KIND = {"utterance": 1, "window": 0}
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class BrokerAddress:
    """A parsed broker URL; the password is never part of its text form."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str, password_file: str | None = None) -> BrokerAddress:
    """mqtt://[user[:pass]@]host[:port] or mqtts://...; the password may come from a file or env."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"--mqtt must start with mqtt:// or mqtts://, got {parts.scheme!r}")
    try:
        port = parts.port
    except ValueError as err:
        raise ConfigError(f"--mqtt: invalid port ({err})") from err
    if not parts.hostname:
        raise ConfigError("--mqtt: the URL names no host")
    if parts.path not in ("", "/") or parts.query:
        raise ConfigError("--mqtt: the URL must be scheme://[user@]host[:port] only")
    password = unquote(parts.password) if parts.password else None
    if os.environ.get(PASSWORD_ENV):
        password = os.environ[PASSWORD_ENV]
    if password_file:
        password = Path(password_file).read_text(encoding="utf-8").strip()
    return BrokerAddress(
        host=parts.hostname,
        port=port or (8883 if parts.scheme == "mqtts" else 1883),
        tls=parts.scheme == "mqtts",
        username=unquote(parts.username) if parts.username else None,
        password=password,
    )


class Sink(Protocol):
    """Where results and status go."""

    async def __aenter__(self) -> Sink: ...

    async def __aexit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def result(self, stream_id: str, message: dict[str, Any]) -> None:
        """Deliver one window or utterance result."""

    async def status(self, message: dict[str, Any]) -> None:
        """Deliver the process status."""


class JsonlSink:
    """Results as JSON Lines on stdout; status goes to the log."""

    async def __aenter__(self) -> JsonlSink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        sys.stdout.flush()

    async def result(self, stream_id: str, message: dict[str, Any]) -> None:
        """Write one line."""
        sys.stdout.write(encode(message).decode() + "\n")
        sys.stdout.flush()

    async def status(self, message: dict[str, Any]) -> None:
        """Log the status at debug level."""
        log.debug("status %s", message)


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

    async def result(self, stream_id: str, message: dict[str, Any]) -> None:
        """To each sink."""
        for sink in self._sinks:
            await sink.result(stream_id, message)

    async def status(self, message: dict[str, Any]) -> None:
        """To each sink."""
        for sink in self._sinks:
            await sink.status(message)


def default_client_id(stream_id: str) -> str:
    """Stable per host and stream, so the retained status topic is reused across restarts."""
    return f"stream-ser-{socket.gethostname()}-{stream_id}"


class MqttSink:
    """Publishes to a broker; reconnects with backoff and jitter if the connection drops."""

    def __init__(self, settings: MqttSettings, client_id: str, stream_ids: list[str]) -> None:
        assert settings.url is not None
        self.address = parse_broker_url(settings.url, settings.password_file)
        self.settings = settings
        self.client_id = client_id
        self.status_topic = f"{settings.topic_prefix}/status/{client_id}"
        self._offline = encode(status_message("offline", stream_ids, {}))
        self._client: aiomqtt.Client | None = None
        self._connected = False
        self.closing = False  # set when the pipeline drains: stop retrying after one timeout
        self._last_status: bytes | None = None
        self._offline_sent = False

    def _make_client(self) -> aiomqtt.Client:
        tls = None
        if self.address.tls:
            tls = aiomqtt.TLSParameters(
                ca_certs=self.settings.ca_file,
                certfile=self.settings.cert_file,
                keyfile=self.settings.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        return aiomqtt.Client(
            self.address.host,
            self.address.port,
            identifier=self.client_id,
            username=self.address.username,
            password=self.address.password,
            keepalive=self.settings.keepalive_s,
            timeout=self.settings.connect_timeout_s,
            tls_params=tls,
            will=aiomqtt.Will(self.status_topic, self._offline, qos=1, retain=True),
        )

    async def __aenter__(self) -> MqttSink:
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._connected or self._client is None:
            return
        if not self._offline_sent:
            try:
                await self._client.publish(self.status_topic, self._offline, qos=1, retain=True)
            except aiomqtt.MqttError as err:
                log.warning("could not publish the offline status: %s", err)
        await self._disconnect()

    async def _connect(self) -> None:
        self._client = self._make_client()  # a fresh client: no state left from a lost link
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                await self._client.__aenter__()
        except (aiomqtt.MqttError, TimeoutError, OSError, ssl.SSLError) as err:
            reason = str(err) or type(err).__name__
            raise PublishError(f"cannot connect to broker {self.address}: {reason}") from err
        self._connected = True
        log.info("connected to %s as %s", self.address, self.client_id)
        if self._last_status is not None:
            await self._client.publish(self.status_topic, self._last_status, qos=1, retain=True)

    async def _disconnect(self) -> None:
        self._connected = False
        if self._client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError):  # the connection may already be gone
            await self._client.__aexit__(None, None, None)

    async def _publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        """Publish, reconnecting with backoff until it goes through (or, when closing, gives up)."""
        backoff = 0.5
        while True:
            try:
                if not self._connected or self._client is None:
                    await self._connect()
                assert self._client is not None
                await self._client.publish(topic, payload, qos=qos, retain=retain)
                return
            except (aiomqtt.MqttError, PublishError) as err:
                if self._connected:
                    await self._disconnect()
                if self.closing:
                    raise PublishError(f"broker {self.address} unreachable while closing") from err
                delay = backoff * random.uniform(0.5, 1.5)
                log.warning("broker %s: %s; retrying in %.1f s", self.address, err, delay)
                await asyncio.sleep(delay)
                backoff = min(MAX_BACKOFF_S, backoff * 2)

    async def result(self, stream_id: str, message: dict[str, Any]) -> None:
        """Utterances at QoS 1, windows at QoS 0."""
        kind = message["type"]
        topic = f"{self.settings.topic_prefix}/{stream_id}/{kind}"
        await self._publish(topic, encode(message), QOS_BY_KIND[kind])

    async def status(self, message: dict[str, Any]) -> None:
        """Retained, re-published after every reconnect."""
        self._last_status = encode(message)
        await self._publish(self.status_topic, self._last_status, 1, retain=True)
        self._offline_sent = message["state"] == "offline"
