"""The on-disk outbox, and delivery through broker outages and restarts of stream-ser."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
import soundfile

from stream_ser.messages import status_message
from stream_ser.publish import MqttSink
from stream_ser.settings import MqttSettings
from stream_ser.spool import Spool
from tests.conftest import REPO, Broker, run_cli

PREFIX = "spool-test"


def test_spool_keeps_order_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    spool = Spool(path)
    for index in range(5):
        spool.append("utterance", "t", 1, f"m{index}".encode())
    spool.remove(spool.oldest(1)[0].seq)
    spool.close()
    reopened = Spool(path)
    assert [m.payload for m in reopened.oldest(10)] == [b"m1", b"m2", b"m3", b"m4"]
    assert len(reopened) == 4


def test_overflow_drops_windows_first_then_utterances_at_the_hard_limit(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "outbox.sqlite3", max_messages=3, hard_limit=5)
    spool.append("window", "w", 0, b"w1")
    spool.append("utterance", "u", 1, b"u1")
    spool.append("window", "w", 0, b"w2")
    spool.append("utterance", "u", 1, b"u2")  # full: the oldest window (w1) goes
    assert [m.payload for m in spool.oldest(10)] == [b"u1", b"w2", b"u2"]
    spool.append("utterance", "u", 1, b"u3")  # w2 goes
    spool.append("utterance", "u", 1, b"u4")  # no window left: utterances kept below 5
    spool.append("utterance", "u", 1, b"u5")
    spool.append("utterance", "u", 1, b"u6")  # hard limit: the oldest utterance (u1) goes
    assert [m.payload for m in spool.oldest(10)] == [b"u2", b"u3", b"u4", b"u5", b"u6"]
    assert spool.stats.spool_dropped_windows == 2
    assert spool.stats.spool_dropped_utterances == 1


def long_recording(path: Path, clips: list[Path], count: int) -> Path:
    pieces = []
    for index in range(count):
        audio, _ = soundfile.read(clips[index % len(clips)], dtype="float32")
        pieces += [audio, np.zeros(16000, dtype=np.float32)]
    soundfile.write(path, np.concatenate(pieces), 16000)
    return path


class Subscriber:
    """A persistent-session QoS 1 subscriber that reconnects whenever the broker comes back.

    It subscribes once (`subscribed` is set after the SUBACK); later connections resume the
    session, which a broker restart keeps only with persistence: without it, nothing arrives
    after a restart. Subscribing again on reconnection would hide that, and messages the
    session delivers before a SUBACK that never comes would be acknowledged, then dropped.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.messages: list[dict[str, Any]] = []
        self.subscribed = asyncio.Event()
        self.offline = asyncio.Event()
        self.online = asyncio.Event()
        self.identifier = f"spool-sub-{id(self)}"

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.broker.port, identifier=self.identifier, clean_session=False
                ) as client:
                    if not self.subscribed.is_set():
                        await client.subscribe(f"{PREFIX}/#", qos=1)
                        self.subscribed.set()
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        payload = json.loads(message.payload)
                        self.messages.append(payload)
                        if payload.get("state") == "offline" and payload.get("counters"):
                            self.offline.set()
                        if payload.get("state") == "online":
                            self.online.set()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)

    def final_ids(self) -> list[int]:
        """Utterance ids after dropping duplicates by message id, in arrival order."""
        seen: set[str] = set()
        ids = []
        for message in self.messages:
            if message.get("final") and message["id"] not in seen:
                seen.add(message["id"])
                ids.append(message["utterance_id"])
        return ids


@pytest.mark.slow
async def test_broker_restarts_lose_nothing(
    tmp_path: Path, tiny_model: Path, ravdess_clips: list[Path]
) -> None:
    broker = Broker(tmp_path, persistence=True)
    broker.start()
    subscriber = Subscriber(broker)
    listening = asyncio.create_task(subscriber.run())
    recording = long_recording(tmp_path / "long.wav", ravdess_clips, 12)  # ~50 s
    try:
        async with asyncio.timeout(10):  # the session must hold the subscription before outages
            await subscriber.subscribed.wait()
        process = subprocess.Popen(
            [sys.executable, "-m", "stream_ser", "run", "--input", str(recording), "--realtime",
             "--speed", "4", "--model", str(tiny_model), "--mqtt", broker.url,
             "--mqtt-topic-prefix", PREFIX, "--mqtt-client-id", "flaky",
             "--mqtt-status-interval-s", "1"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        for _ in range(3):  # three outages while the file streams
            await asyncio.sleep(2.0)
            broker.stop()
            await asyncio.sleep(1.0)
            broker.start()
        _, stderr = await asyncio.to_thread(process.communicate, timeout=120)
        assert process.returncode == 0, stderr.decode()
        assert b"retrying" in stderr  # the outages were noticed
        async with asyncio.timeout(30):
            await subscriber.offline.wait()
    finally:
        listening.cancel()
        broker.stop()
    (offline,) = [m for m in subscriber.messages if m.get("state") == "offline" and m["counters"]]
    expected = offline["counters"]["utterances"]
    assert expected >= 10
    assert subscriber.final_ids() == list(range(1, expected + 1))


async def test_the_offline_status_follows_results_spooled_during_an_outage(
    tmp_path: Path,
) -> None:
    """The pipeline reports `offline` before the sink closes; a reconnection then must not
    send it ahead of the results still in the spool (a subscriber would think it had all)."""
    broker = Broker(tmp_path, persistence=True)
    broker.start()
    subscriber = Subscriber(broker)
    listening = asyncio.create_task(subscriber.run())
    settings = MqttSettings(url=broker.url, topic_prefix=PREFIX, connect_timeout_s=5.0)
    try:
        async with asyncio.timeout(30):
            await subscriber.subscribed.wait()
            async with MqttSink(settings, "closing", ["s"], Spool(tmp_path / "o.sqlite3")) as sink:
                await sink.status(status_message("online", ["s"], {"utterances": 0}))
                broker.stop()
                await asyncio.sleep(0.5)  # the sink has seen the link go
                for index in (1, 2):
                    await sink.result("s", {"type": "utterance", "final": True,  # type: ignore[typeddict-item]
                                            "id": f"u{index}", "utterance_id": index})  # fmt: skip
                await sink.status(status_message("offline", ["s"], {"utterances": 2}))
                broker.start()
            await subscriber.offline.wait()
    finally:
        listening.cancel()
        broker.stop()
    first = next(i for i, m in enumerate(subscriber.messages) if m.get("state") == "offline"
                 and m["counters"])  # fmt: skip
    assert [m["utterance_id"] for m in subscriber.messages[:first] if m.get("final")] == [1, 2]


@pytest.mark.slow
async def test_results_spooled_while_down_are_delivered_by_the_next_run(
    tmp_path: Path, broker: Broker, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clip_count = speech_with_pauses
    spool_dir = tmp_path / "spool"
    options = ["--model", str(tiny_model), "--mqtt-topic-prefix", PREFIX, "--mqtt-client-id",
               "restarted", "--mqtt-spool-dir", str(spool_dir), "--no-model-windows",
               "--mqtt-connect-timeout-s", "2"]  # fmt: skip
    # a run whose broker vanishes right after start-up keeps its results on disk
    watcher = Subscriber(broker)
    watching = asyncio.create_task(watcher.run())
    process = subprocess.Popen(
        [sys.executable, "-m", "stream_ser", "run", "--input", str(path), "--realtime", "--speed",
         "3", "--mqtt", broker.url, *options],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):  # connected: its online status arrived
        await watcher.online.wait()
    watching.cancel()
    broker.stop()
    _, stderr = await asyncio.to_thread(process.communicate, timeout=120)
    assert process.returncode == 0, stderr.decode()
    assert b"kept in" in stderr
    spool = Spool(spool_dir / "restarted.sqlite3")
    kept = spool.oldest(1000)
    assert [m.kind for m in kept].count("utterance") == 2 * clip_count  # provisional + final
    assert {m.kind for m in kept} == {"utterance", "speaking"}  # speaking changes wait too
    spool.close()

    broker.start()
    subscriber = Subscriber(broker)
    listening = asyncio.create_task(subscriber.run())
    async with asyncio.timeout(10):
        await subscriber.subscribed.wait()
    silent = tmp_path / "silence.wav"
    soundfile.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    done = await asyncio.to_thread(
        run_cli, "run", "--input", str(silent), "--mqtt", broker.url, *options
    )
    assert done.returncode == 0, done.stderr
    async with asyncio.timeout(30):
        await subscriber.offline.wait()
    listening.cancel()
    assert subscriber.final_ids() == list(range(1, clip_count + 1))


@pytest.mark.slow
async def test_an_idle_stream_reconnects_and_restores_its_status(
    tmp_path: Path, broker: Broker, tiny_model: Path
) -> None:
    """A broker restart while nobody speaks: the status comes back without any result."""
    silence = np.zeros(16000 * 8, dtype=np.float32)
    path = tmp_path / "quiet.wav"
    soundfile.write(path, silence, 16000)
    process = subprocess.Popen(
        [sys.executable, "-m", "stream_ser", "run", "--input", str(path), "--realtime",
         "--model", str(tiny_model), "--mqtt", broker.url, "--mqtt-topic-prefix", PREFIX,
         "--mqtt-client-id", "quiet", "--mqtt-status-interval-s", "0.5"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        watcher = Subscriber(broker)
        watching = asyncio.create_task(watcher.run())
        async with asyncio.timeout(30):
            await watcher.online.wait()
        watching.cancel()
        broker.stop()  # no persistence: the retained status is gone with it
        await asyncio.sleep(1.0)
        broker.start()
        async with asyncio.timeout(4), aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.subscribe(f"{PREFIX}/status/quiet", qos=1)
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                if json.loads(message.payload)["state"] == "online":
                    break
        _, stderr = await asyncio.to_thread(process.communicate, timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr.decode()


class Retrying(logging.Handler):
    """Catches the sink's first 'retrying' warning, and sets `seen`."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = asyncio.Event()
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage() and not self.seen.is_set():
            self.message = record.getMessage()
            self.seen.set()


async def test_a_link_lost_while_awaiting_an_acknowledgement_fails_over_at_once(
    tmp_path: Path, broker: Broker
) -> None:
    """A broker that dies with a QoS 1 publish unacknowledged: the sink notices the lost
    link and retries, instead of waiting out its 30 s timeout for a PUBACK that cannot come."""
    assert broker.process is not None
    settings = MqttSettings(url=broker.url, topic_prefix=PREFIX, connect_timeout_s=30.0)
    retrying = Retrying()
    logging.getLogger("stream_ser.publish").addHandler(retrying)
    try:
        async with MqttSink(settings, "dying", ["s"], Spool(tmp_path / "o.sqlite3")) as sink:
            broker.process.send_signal(signal.SIGSTOP)  # connected, but acknowledges nothing
            await sink.result("s", {"type": "utterance", "final": True, "id": "u1",  # type: ignore[typeddict-item]
                                    "utterance_id": 1})  # fmt: skip
            await asyncio.sleep(0.5)  # the publish is out, its PUBACK pending
            broker.process.kill()  # the kernel closes the broker's sockets: the link drops
            broker.process.wait(timeout=10)
            async with asyncio.timeout(10):
                await retrying.seen.wait()
            assert "connection was lost before the broker acknowledged" in retrying.message
            broker.start()
    finally:
        logging.getLogger("stream_ser.publish").removeHandler(retrying)
    spool = Spool(tmp_path / "o.sqlite3")
    assert len(spool) == 0  # delivered on reconnection, while the sink closed
    spool.close()
