"""The broker link every command shares: URL, client, connect, errors, reconnect loop.

`parse_broker_url` reads `--mqtt`; `broker_client` builds an MQTT v5 client with the settings'
keep-alive, timeout and TLS; `connect` opens it with a one-line reason on failure;
`keep_connected` runs a session again after each lost link, with exponential backoff and
jitter that starts over once a session has connected (`Backoff.reset`). The publisher,
`send`, the audio worker and `tail` all use these.

aiomqtt 2.x (pinned < 3) reports neither a PUBACK's reason code nor a socket closed before
its write registration; `CheckedClient` is the one place that reaches into aiomqtt's
internals for that (tested in tests/test_mqtt.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from stream_ser.errors import ConfigError, PublishError
from stream_ser.settings import MqttSettings

log = logging.getLogger(__name__)
FIRST_FAILURE_CODE = 0x80  # MQTT reason codes from here up are failures

PASSWORD_ENV = "STREAM_SER_MQTT_PASSWORD"
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
URL_FORM = "mqtt://[user@]host[:port] or mqtts://... (e.g. mqtt://localhost:1883)"
# what a lost or refused link raises; the reconnect loop retries these
LINK_ERRORS: tuple[type[Exception], ...] = (aiomqtt.MqttError, PublishError, TimeoutError)


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
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}"


def parse_broker_url(
    url: str, password_file: str | None = None, username: str | None = None
) -> BrokerAddress:
    """mqtt://[user[:pass]@]host[:port] or mqtts://...; the password may come from a file or env.

    Precedence for the password: `password_file`, then $STREAM_SER_MQTT_PASSWORD, then the URL;
    `username` replaces the URL's. No error message quotes the URL (it may hold a password).
    """
    scheme, separator, rest = url.partition("://")
    if not separator or scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"--mqtt must be a broker URL: {URL_FORM}")
    try:
        parts = urlsplit(f"{scheme}://{_quote_userinfo(rest)}")
        port = parts.port
    except ValueError as err:  # a bad port, an unclosed [IPv6 address
        raise ConfigError(f"--mqtt: not a valid broker URL ({_reason(err)}); {URL_FORM}") from err
    if not parts.hostname:
        raise ConfigError(f"--mqtt: the URL names no host; {URL_FORM}")
    if port == 0:
        raise ConfigError("--mqtt: the port must be a number from 1 to 65535")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"--mqtt: the URL must be {URL_FORM} only (no path or query)")
    if parts.password:
        log.warning(
            "the broker password is part of --mqtt, where process listings show it; "
            "use --mqtt-password-file or $%s instead",
            PASSWORD_ENV,
        )
    password = unquote(parts.password) if parts.password else None
    if os.environ.get(PASSWORD_ENV):
        password = os.environ[PASSWORD_ENV]
    if password_file:
        password = _read_password(password_file)
    return BrokerAddress(
        host=parts.hostname,
        port=port if port is not None else (8883 if scheme == "mqtts" else 1883),
        tls=scheme == "mqtts",
        username=username or (unquote(parts.username) if parts.username else None),
        password=password,
    )


def _quote_userinfo(rest: str) -> str:
    """Percent-encode what precedes the last '@' before the host, so that '#', '?' or '/'
    in a password are read as part of it, not as the start of a fragment, query or path."""
    userinfo, at, host = rest.rpartition("@")
    return f"{quote(userinfo, safe=':%')}@{host}" if at else rest


def _reason(err: ValueError) -> str:
    """The parser's reason without the URL (it may hold a password)."""
    text = str(err)
    return "invalid IPv6 address" if "IPv6" in text else "the port must be a number"


def _read_password(path: str) -> str:
    """The first line of the file, without its line break; never echoed in errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ConfigError(f"--mqtt-password-file: cannot read {path}: {reason}") from err
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise ConfigError(f"--mqtt-password-file: {path} is empty")
    return lines[0]


# --- the client ----------------------------------------------------------------------------


def tls_parameters(settings: MqttSettings) -> aiomqtt.TLSParameters:
    """TLS with server verification (system CAs unless --mqtt-ca-file), optional client cert."""
    return aiomqtt.TLSParameters(
        ca_certs=settings.ca_file,
        certfile=settings.cert_file,
        keyfile=settings.key_file,
        cert_reqs=ssl.CERT_REQUIRED,
    )


def broker_client(
    settings: MqttSettings, address: BrokerAddress, client_id: str, **options: Any
) -> CheckedClient:
    """An MQTT v5 client for `address` with the settings' keep-alive, timeout and TLS;
    `options` go to aiomqtt.Client (a last will, a logger, queue sizes, session options)."""
    return CheckedClient(
        address.host,
        address.port,
        identifier=client_id,
        username=address.username,
        password=address.password,
        keepalive=settings.keepalive_s,
        timeout=settings.connect_timeout_s,
        tls_params=tls_parameters(settings) if address.tls else None,
        # results are small and latency matters: no Nagle delay on the broker link
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        **options,
    )


def persistent_session(expiry_s: int) -> dict[str, Any]:
    """`broker_client` options for a session the broker keeps `expiry_s` after a disconnect:
    QoS 1 messages for its subscriptions are queued meanwhile and delivered on reconnect."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = expiry_s
    return {"clean_start": False, "properties": properties}


async def connect(
    client: CheckedClient, settings: MqttSettings, address: BrokerAddress, errors: LastError
) -> CheckedClient:
    """Connect `client` within the connect timeout; PublishError with a one-line reason
    (`errors` has caught what the MQTT library logged meanwhile)."""
    errors.message = None
    try:
        async with asyncio.timeout(settings.connect_timeout_s):
            await client.__aenter__()
    except (aiomqtt.MqttError, TimeoutError, OSError, ssl.SSLError) as err:
        reason = describe_connect_error(err, errors.message)
        raise PublishError(f"cannot connect to broker {address}: {reason}") from err
    return client


async def close(client: aiomqtt.Client | None, timeout_s: float = 2.0) -> None:
    """Disconnect if connected; a link already gone is not an error."""
    if client is not None:
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(timeout_s):
                await client.__aexit__(None, None, None)


class SubscriptionRefused(PublishError):
    """The broker refused a subscription (its ACL, usually)."""


class CheckedClient(aiomqtt.Client):
    """An aiomqtt client that also reports a broker's refusal of a publish or a subscription.

    Over MQTT v5 a broker answers a publish it refuses (an ACL denial, say) with a PUBACK
    whose reason code is >= 0x80 (0x87: not authorized); MQTT 3.1.1 has no such code and
    the message just vanishes. aiomqtt 2.x completes `publish` without the code, so it is
    caught in the paho callback aiomqtt registers (`_on_publish`; aiomqtt is pinned < 3).
    Checked publishes go one at a time, so a refusal belongs to the publish in flight.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, protocol=aiomqtt.ProtocolVersion.V5, **kwargs)
        self._one_at_a_time = asyncio.Lock()
        self._refusal: ReasonCode | None = None

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        if reason_code.is_failure and mid in self._pending_publishes:
            self._refusal = reason_code
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        """As aiomqtt's, but a socket closed before the event loop registers it is skipped.

        paho asks for the registration from its connect thread; when a TLS handshake fails
        (a broker that wants a client certificate, say) the socket is closed while the request
        waits, and asyncio logged a traceback for the dead descriptor (EBADF)."""

        def write() -> None:
            try:
                client.loop_write()
            except Exception as exc:  # as aiomqtt: a broken link ends the session
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            descriptor = sock.fileno()
            if descriptor == -1:
                return
            with contextlib.suppress(OSError):  # closed since: nothing left to write to
                self._loop.add_writer(descriptor, write)

        self._loop.call_soon_threadsafe(register)

    async def subscribe_checked(self, topic: str, qos: int) -> None:
        """Subscribe; SubscriptionRefused when the broker's SUBACK refuses it."""
        granted = await self.subscribe(topic, qos=qos)
        code = granted[0] if granted else None
        if isinstance(code, ReasonCode):
            refused = code.is_failure
        else:
            refused = code is None or code >= FIRST_FAILURE_CODE
        if refused:
            reason = (
                f"{code} (reason code {_code_value(code)})" if code is not None else "no SUBACK"
            )
            raise SubscriptionRefused(
                f"the broker refused the subscription to {topic}: {reason}; check the "
                "broker's ACL for this user (docs/security.md)"
            )

    async def publish_checked(
        self, topic: str, payload: bytes, qos: int, retain: bool = False
    ) -> ReasonCode | None:
        """Publish; the broker's reason for refusing it, or None if accepted (or QoS 0).

        A link lost while the acknowledgement is awaited fails the publish at once
        (MqttError); aiomqtt alone waits out its whole timeout for a PUBACK that cannot come.
        """
        async with self._one_at_a_time:
            self._refusal = None
            publish = asyncio.ensure_future(self.publish(topic, payload, qos=qos, retain=retain))
            lost = self._disconnected
            try:
                await asyncio.wait((publish, lost), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not publish.done():  # the link is gone, or our caller was cancelled
                    publish.cancel()
            if not publish.done() or publish.cancelled():
                reason = lost.exception() if lost.done() and not lost.cancelled() else None
                raise aiomqtt.MqttError(
                    "the connection was lost before the broker acknowledged a message"
                ) from reason
            publish.result()
            return self._refusal


def _code_value(code: ReasonCode | int) -> int:
    return code.value if isinstance(code, ReasonCode) else code


class LastError(logging.Filter):
    """Remembers the last error paho logged: during a TLS handshake the broker's alert
    (a client certificate required, say) is logged there and the connect call just times out."""

    def __init__(self) -> None:
        super().__init__()
        self.message: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self.message = record.getMessage()
        return True


def describe_connect_error(err: BaseException, logged: str | None = None) -> str:
    """A one-line reason for a failed connection, with a hint where the cause is clear.

    `logged` is the last error the MQTT library logged while connecting, if any.
    """
    reason = str(err) or type(err).__name__
    if isinstance(err, TimeoutError) and logged:
        reason = f"{logged}, then no answer (TimeoutError)"
    if "CERTIFICATE_REQUIRED" in reason:
        reason += "; the broker wants a client certificate: --mqtt-cert-file, --mqtt-key-file"
    code = getattr(err, "rc", None)
    if isinstance(err, MqttConnectError) and isinstance(code, ReasonCode):
        reason = f"the broker refused the connection: {code} (reason code {code.value})"
        if code.value in (0x86, 0x87, 0x8C):  # bad user name or password, not authorized
            reason += (
                "; check the username and the password (--mqtt-password-file or "
                f"${PASSWORD_ENV}) and the broker's password file"
            )
    elif "CERTIFICATE_VERIFY_FAILED" in reason or isinstance(err, ssl.SSLCertVerificationError):
        reason = f"TLS: the broker's certificate was not accepted ({reason}); check --mqtt-ca-file"
    return reason


# --- reconnecting --------------------------------------------------------------------------


class Backoff:
    """Delays between reconnection attempts: doubling up to `max_s`, with +-50 % jitter;
    `reset` after a good connection, so that the next outage is retried quickly again."""

    def __init__(self, first_s: float = FIRST_BACKOFF_S, max_s: float = MAX_BACKOFF_S) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self._next_s = first_s

    def reset(self) -> None:
        """A connection succeeded: start over from `first_s`."""
        self._next_s = self.first_s

    def next_delay(self) -> float:
        """The delay before the next attempt (seconds); the one after is longer."""
        delay = self._next_s * random.uniform(0.5, 1.5)
        self._next_s = min(self.max_s, self._next_s * 2)
        return delay


Session = Callable[[Backoff], Awaitable[None]]
# (error, proposed delay) -> the delay to wait, or None to stop retrying; may raise
OnLost = Callable[[Exception, float], float | None]


async def keep_connected(
    session: Session,
    on_lost: OnLost,
    backoff: Backoff | None = None,
    retry: Sequence[type[Exception]] = LINK_ERRORS,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> None:
    """Run `session` until it returns; after each `retry` error, wait and run it again.

    `session` gets the Backoff and calls `reset()` once it is connected. `on_lost` logs the
    error and returns the delay to wait (or None to give up, or raises to fail).
    """
    backoff = backoff or Backoff()
    while True:
        try:
            await session(backoff)
        except tuple(retry) as err:
            delay = on_lost(err, backoff.next_delay())
            if delay is None:
                return
            await sleep(delay)
        else:
            return
