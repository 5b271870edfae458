"""The shared broker link (stream_ser.mqtt): URLs, backoff, the reconnect loop; `tail` input."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from stream_ser.errors import ConfigError, PublishError
from stream_ser.mqtt import PASSWORD_ENV, Backoff, keep_connected, parse_broker_url
from stream_ser.send import Capture
from stream_ser.settings import MqttSettings
from stream_ser.tail import TailOptions, TailView
from stream_ser.uplink import Outbox, Uplink
from tests.conftest import SAMPLE, Broker, run_cli
from tests.test_tail import PREFIX, subscribed_tail


@pytest.fixture(autouse=True)
def no_password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)


def test_a_hash_in_the_url_password_is_part_of_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It used to start a fragment: "the port must be a number"."""
    address = parse_broker_url("mqtt://alice:pa#ss?w/rd@broker.local:1884")
    assert (address.username, address.password) == ("alice", "pa#ss?w/rd")
    assert (address.host, address.port) == ("broker.local", 1884)
    assert "pa#ss" not in str(address) and "pa#ss" not in caplog.text


def test_port_0_is_refused_not_reported_as_1883() -> None:
    with pytest.raises(ConfigError, match="1 to 65535"):
        parse_broker_url("mqtt://h:0")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://[::1", "invalid IPv6 address"),
        ("mqtt://alice:secret@[::1", "invalid IPv6 address"),
        ("localhost:1883", "mqtt://localhost:1883"),
        ("localhost", "mqtt://"),
        ("http://host", "mqtt://"),
        ("mqtt://", "names no host"),
        ("mqtt://alice:secret@host:port", "port must be a number"),
    ],
)
def test_bad_urls_say_what_a_url_looks_like_without_the_password(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_broker_url(url)
    assert expected in str(error.value)
    assert "secret" not in str(error.value)


def test_an_ipv6_url_works_and_shows_its_brackets() -> None:
    address = parse_broker_url("mqtts://[::1]:8884")
    assert (address.host, address.port, str(address)) == ("::1", 8884, "mqtts://[::1]:8884")
    assert parse_broker_url("mqtt://[::1]").port == 1883


@pytest.mark.parametrize("url", ["mqtt://[::1", "mqtt://h:0", "localhost:1883"])
def test_bad_urls_are_one_line_usage_errors_of_the_cli(url: str) -> None:
    for command in (["tail", "--mqtt", url], ["send", "--input", str(SAMPLE), "--mqtt", url]):
        done = run_cli(*command, timeout_s=60)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.strip().count("\n") == 0, done.stderr


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_reset() -> None:
    backoff = Backoff(first_s=1.0, max_s=8.0)
    delays = [backoff.next_delay() for _ in range(6)]
    for delay, nominal in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert 0.5 * nominal <= delay <= 1.5 * nominal
    backoff.reset()
    assert 0.5 <= backoff.next_delay() <= 1.5


async def test_keep_connected_resets_the_backoff_after_a_good_connection() -> None:
    """A session that connects and later loses its link is retried quickly again, however
    many failures came before (the worker's and `send`'s loops never reset)."""
    outcomes = ["fail"] * 6 + ["connect-then-lose", "fail", "done"]
    delays: list[float] = []

    async def session(backoff: Backoff) -> None:
        outcome = outcomes.pop(0)
        if outcome == "done":
            return
        if outcome == "connect-then-lose":
            backoff.reset()
        raise aiomqtt.MqttError(outcome)

    def lost(err: Exception, delay: float) -> float:
        delays.append(delay)
        return delay

    async def no_sleep(_: float) -> None:
        await asyncio.sleep(0)

    async with asyncio.timeout(5):
        await keep_connected(session, lost, Backoff(1.0, 30.0), sleep=no_sleep)
    assert delays[5] >= 16.0  # 32 s nominal (capped at 30): six failures in a row
    assert delays[6] <= 1.5  # lost after a good connection: back to the first delay
    assert delays[7] <= 3.0


async def test_keep_connected_stops_when_on_lost_gives_up_or_raises() -> None:
    calls = 0

    async def session(_: Backoff) -> None:
        nonlocal calls
        calls += 1
        raise PublishError("down")

    async with asyncio.timeout(5):
        await keep_connected(session, lambda err, delay: None)
    assert calls == 1

    def fail(err: Exception, delay: float) -> float:
        raise err

    with pytest.raises(PublishError):
        async with asyncio.timeout(5):
            await keep_connected(session, fail)


WRONG_TYPES = [
    {"type": "utterance", "distribution": [1, 2], "top_label": "sad"},
    {"type": "utterance", "distribution": {"sad": "high"}},
    {"type": "utterance", "top_probability": "high"},
    {"type": "utterance", "top_probability": 10**400},
    {"type": "utterance", "utterance_id": {"a": 1}, "stream_id": ["x"]},
    {"type": "utterance", "start_ms": 10**400, "end_ms": 1},
    {"type": "utterance", "arousal": 10**400, "valence": 0.1},
    {"type": "utterance", "id": 5, "final": "yes"},
]


@pytest.mark.parametrize("message", WRONG_TYPES)
def test_tail_ignores_results_with_fields_of_the_wrong_type(message: dict[str, object]) -> None:
    view = TailView(TailOptions())
    assert view.handle("stream-ser/room/utterance", json.dumps(message).encode()) == []
    assert view.results == 0


def test_tail_ignores_statuses_with_fields_of_the_wrong_type_and_deep_json() -> None:
    view = TailView(TailOptions())
    for payload in (b'{"state": "online", "counters": [1]}', b'{"streams": 7}', b"[" * 100_000):
        assert view.handle("stream-ser/status/x", payload) == []
    assert view.handle("stream-ser/room/utterance", b"[" * 100_000) == []


@pytest.mark.slow
async def test_a_running_tail_survives_results_of_the_wrong_type(broker: Broker) -> None:
    """Valid JSON with wrong types gave `tail` a traceback."""
    good = {"type": "utterance", "id": "s:room:1:f", "final": True, "top_label": "sad",
            "top_probability": 0.9, "distribution": {"sad": 0.9, "calm": 0.1}}  # fmt: skip
    async with subscribed_tail(broker, "--count", "1") as process:
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            for message in [*WRONG_TYPES, good]:
                await client.publish(f"{PREFIX}/room/utterance", json.dumps(message), qos=1)
        assert process.stdout is not None and process.stderr is not None
        out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert b"sad" in out and out.count(b"\n") == 1


def test_nothing_else_imports_the_connection_helpers_from_publish() -> None:
    """One broker link: the reconnect loop and its constants exist once (stream_ser.mqtt)."""
    package = Path(__file__).resolve().parent.parent / "stream_ser"
    for module in package.glob("*.py"):
        text = module.read_text()
        if module.name != "mqtt.py":
            assert "MAX_BACKOFF_S =" not in text, module.name
            assert "random.uniform" not in text, module.name


async def _no_blocks() -> AsyncGenerator[tuple[np.ndarray, bool], None]:
    return
    yield


@pytest.mark.slow
async def test_send_reconnects_quickly_after_repeated_short_outages(broker: Broker) -> None:
    """Item 9: `send`'s backoff never reset, so after a few short outages it came back
    10-15 s after the broker (the audio it buffered meanwhile waited that long)."""
    settings = MqttSettings(url=broker.url, connect_timeout_s=2.0)
    uplink = Uplink(settings, "dev-porch", "porch", Capture(16000, 1, _no_blocks(), True), 1)
    outbox = Outbox(100, drop_oldest=True)
    running = asyncio.create_task(uplink.run(None, outbox, lambda: 0))

    async def reconnected(count: int, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while uplink.reconnects < count:  # noqa: ASYNC110 - polls another task's count
                await asyncio.sleep(0.05)

    try:
        await reconnected(1, 10)
        for outage in range(5):
            broker.stop()
            await asyncio.sleep(1.5)
            broker.start()
            back_at = time.monotonic()
            await reconnected(outage + 2, 20)
            assert time.monotonic() - back_at < 6.0, f"outage {outage + 1}"
            await asyncio.sleep(2.5)
    finally:
        outbox.close()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
