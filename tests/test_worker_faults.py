"""Attacks on the audio worker (issue 17, items 1, 8, 9, 10, 12), each against a real broker."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from stream_ser.remote import encode_chunk
from stream_ser.settings import MqttSettings
from stream_ser.worker import OWNER_TTL_S, AudioWorker, RemoteStream
from tests.conftest import REPO, Broker
from tests.test_workers import CHUNK, PREFIX, collect_finals, device, recording, start_worker


@asynccontextmanager
async def worker_process(
    broker: Broker, model: Path, name: str, spool: Path
) -> AsyncIterator[subprocess.Popen[bytes]]:
    process = start_worker(broker, model, name, spool)
    try:
        await asyncio.sleep(3.0)  # subscribed
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


async def retained(broker: Broker, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish(topic, payload, qos=1, retain=True)


async def latest_status(broker: Broker, client_id: str) -> dict[str, Any]:
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe(f"{PREFIX}/status/{client_id}", qos=1)
        async with asyncio.timeout(5):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                status: dict[str, Any] = json.loads(message.payload)
                return status
    raise AssertionError("no status")


@pytest.mark.slow
async def test_a_device_streaming_twice_gets_new_ids_and_every_session_is_counted(
    tmp_path: Path, broker: Broker, tiny_model: Path, ravdess_clips: list[Path]
) -> None:
    """Item 1: a device's second session reused the session id, so its ids repeated."""
    audio = recording(ravdess_clips, 2)
    async with worker_process(broker, tiny_model, "wa", tmp_path / "spool"):
        finals: list[dict[str, Any]] = []
        for session in range(2):
            listener = asyncio.create_task(collect_finals(broker, lambda f: len(f) >= 2, 60))
            await asyncio.sleep(0.5)
            await device(broker, "door", audio, speed=4.0)
            finals += await listener
            assert len(finals) == 2 * (session + 1)
        await asyncio.sleep(2.0)  # the worker freed the ended stream; status refreshed
        status = await latest_status(broker, "wa")
    ids = [final["id"] for final in finals]
    assert len(set(ids)) == len(ids), ids  # a subscriber dropping duplicates by id keeps all
    assert len({i.split(":")[0] for i in ids}) == 2  # one nonce per device session
    assert status["counters"]["utterances"] >= len(finals)  # both sessions counted
    assert "door" not in status["streams"]  # the ended stream was freed
    assert status["counters"]["streams_claimed"] == 2


@pytest.mark.slow
async def test_malformed_owner_status_and_hello_messages_leave_the_listener_alive(
    tmp_path: Path, broker: Broker, tiny_model: Path, ravdess_clips: list[Path]
) -> None:
    """Item 8: a retained owner record `{"worker": []}` killed the listener, silently."""
    for topic, payload in (
        (f"{PREFIX}/audio/door/owner", b'{"worker": []}'),
        (f"{PREFIX}/audio/hall/owner", b'{"worker": 5}'),
        (f"{PREFIX}/audio/attic/owner", b"[1, 2]"),
        (f"{PREFIX}/status/evil", b'{"state": {"x": 1}}'),
        (f"{PREFIX}/status/evil2", b"[" * 100_000),
    ):
        await retained(broker, topic, payload)
    async with worker_process(broker, tiny_model, "wa", tmp_path / "spool") as process:
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            for payload in (b'{"stream_id": 5}', b"null", b'{"stream_id": "door", "seq": []}'):
                await client.publish(f"{PREFIX}/audio/door/hello", payload, qos=1)
        listener = asyncio.create_task(collect_finals(broker, lambda f: len(f) >= 2, 60))
        await asyncio.sleep(0.5)
        await asyncio.gather(
            device(broker, "door", recording(ravdess_clips, 1), speed=4.0),
            device(broker, "hall", recording(ravdess_clips, 1), speed=4.0),
        )
        finals = await listener
        assert process.poll() is None
        status = await latest_status(broker, "wa")
    assert {final["stream_id"] for final in finals} == {"door", "hall"}
    assert status["counters"]["messages_rejected"] >= 6


@pytest.mark.slow
async def test_backoff_resets_after_a_good_connection(
    tmp_path: Path, broker: Broker, tiny_model: Path
) -> None:
    """Item 9: after a few short outages the worker came back 10-15 s after the broker."""
    async with worker_process(broker, tiny_model, "wa", tmp_path / "spool"):
        for _ in range(4):
            broker.stop()
            await asyncio.sleep(1.5)
            broker.start()
            await asyncio.sleep(2.5)
        broker.stop()
        await asyncio.sleep(1.5)
        broker.start()
        back_at = time.monotonic()
        claimed_s = await seconds_until_claimed(broker, "porch", back_at, timeout_s=40)
    assert claimed_s < 8.0, f"claimed {claimed_s:.1f} s after the broker came back"


async def seconds_until_claimed(
    broker: Broker,
    stream_id: str,
    since: float,
    timeout_s: float,
    by: str | None = None,
    interval_s: float = 0.5,
) -> float:
    """Send hellos every `interval_s` until a worker (`by`, when given) claims the stream;
    seconds from `since`."""
    hello = {"stream_id": stream_id, "sample_rate": 16000, "channels": 1, "seq": 0}
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe(f"{PREFIX}/audio/{stream_id}/owner", qos=1)
        async with asyncio.timeout(timeout_s):
            while True:
                await client.publish(f"{PREFIX}/audio/{stream_id}/hello", json.dumps(hello), qos=1)
                try:
                    async with asyncio.timeout(interval_s):
                        async for message in client.messages:
                            payload = message.payload
                            assert isinstance(payload, bytes)
                            if payload and by in (None, json.loads(payload)["worker"]):
                                return time.monotonic() - since
                except TimeoutError:
                    continue
    raise AssertionError("unreachable")


@pytest.mark.slow
async def test_an_expired_claim_of_a_dead_worker_is_taken_over(
    tmp_path: Path, broker: Broker, tiny_model: Path
) -> None:
    """Item 12: a worker that died with the broker left `online` and its claims retained;
    nobody ever claimed its streams again."""
    await retained(broker, f"{PREFIX}/status/ghost", b'{"state": "online"}')
    await retained(broker, f"{PREFIX}/audio/orphan/owner", b'{"worker": "ghost"}')
    async with worker_process(broker, tiny_model, "wa", tmp_path / "spool"):
        claimed_s = await seconds_until_claimed(
            broker, "orphan", time.monotonic(), OWNER_TTL_S + 15, by="wa", interval_s=1.0
        )
    assert claimed_s <= OWNER_TTL_S + 10, claimed_s


# --- in-process workers with a consumer in place of the pipeline ------------------------------


class Consumer:
    """Stands in for a StreamPipeline: reads the remote stream's audio to its end."""

    def __init__(self, remote: RemoteStream) -> None:
        self.remote = remote
        self.samples = 0
        self.finished = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._consume())

    async def _consume(self) -> None:
        async for chunk in self.remote.chunks():
            self.samples += len(chunk.samples)
        self.finished.set()


@asynccontextmanager
async def in_process_worker(
    broker: Broker, **options: Any
) -> AsyncIterator[tuple[AudioWorker, dict[str, Consumer]]]:
    consumers: dict[str, Consumer] = {}

    def make(remote: RemoteStream) -> Any:
        consumers[remote.stream_id] = Consumer(remote)
        return consumers[remote.stream_id]

    settings = MqttSettings(url=broker.url, topic_prefix=PREFIX, connect_timeout_s=3.0)
    from stream_ser.mqtt import parse_broker_url

    worker = AudioWorker(settings, parse_broker_url(broker.url), "inproc", "g", make, **options)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.sleep(1.0)  # subscribed
        yield worker, consumers
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await running


async def wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polls state another task changes
            await asyncio.sleep(0.05)


def pcm_chunk(seq: int, last: bool = False) -> bytes:
    tone = (np.sin(np.arange(CHUNK) / 5.0) * 8000).astype("<i2")
    return encode_chunk(seq, 16000, tone, 1000 + seq * 100, last=last)


async def publish_chunks(broker: Broker, stream_id: str, seqs: range, last: int = -1) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        for seq in seqs:
            await client.publish(f"{PREFIX}/audio/{stream_id}/pcm", pcm_chunk(seq, seq == last),
                                 qos=1)  # fmt: skip


async def hello(broker: Broker, stream_id: str) -> None:
    message = {"stream_id": stream_id, "sample_rate": 16000, "channels": 1, "seq": 0}
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish(f"{PREFIX}/audio/{stream_id}/hello", json.dumps(message), qos=1)


@pytest.mark.slow
async def test_audio_sent_while_the_broker_restarts_reaches_the_worker(tmp_path: Path) -> None:
    """Item 9: the worker's audio link kept no session, so what a device published after a
    broker restart, before the worker had re-subscribed, reached nobody."""
    broker = Broker(tmp_path, persistence=True)
    broker.start()
    try:
        async with in_process_worker(broker) as (_, consumers):
            await hello(broker, "porch")
            await wait_until(lambda: "porch" in consumers, 5)
            await asyncio.sleep(0.3)  # subscribed to the pcm topic
            await publish_chunks(broker, "porch", range(10))
            await wait_until(lambda: consumers["porch"].samples >= 10 * CHUNK, 5)
            broker.stop()
            broker.start()
            await publish_chunks(broker, "porch", range(10, 30))  # the worker is not back yet
            await asyncio.sleep(3.0)
            await publish_chunks(broker, "porch", range(30, 40), last=39)
            await asyncio.wait_for(consumers["porch"].finished.wait(), 20)
            stats = consumers["porch"].remote.reorderer.stats
            assert stats.chunks_lost == 0, stats
            assert consumers["porch"].samples == 40 * CHUNK
    finally:
        broker.stop()


async def test_streams_beyond_the_limit_are_refused_counted_and_ended_ones_freed(
    broker: Broker,
) -> None:
    """Item 10: every hello made a stream, without bound, and ended streams were kept."""
    async with in_process_worker(broker, max_streams=2) as (worker, _):
        for index in range(5):
            await hello(broker, f"fake{index}")
        await wait_until(lambda: worker.stats.streams_refused >= 3, 5)
        assert len(worker.mine) == 2 and worker.stats.streams_claimed == 2
        first = sorted(worker.mine)[0]
        await asyncio.sleep(0.3)
        await publish_chunks(broker, first, range(3), last=2)
        await wait_until(lambda: first not in worker.mine, 5)  # ended and freed
        await hello(broker, "fake9")
        await wait_until(lambda: "fake9" in worker.mine, 5)
        assert worker.counters()["streams_active"] == 2


@pytest.mark.slow
async def test_audio_a_device_buffers_while_the_broker_is_killed_reaches_the_worker(
    tmp_path: Path, broker: Broker, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    """Item 9 as attacked: three SIGKILLs of a broker without persistence, 2 s each, while
    `send` streams; the audio the device buffered meanwhile was published before the worker
    had subscribed again, to nobody (30 of 36 utterances lost, `send` reported 0 dropped)."""
    path, clip_count = speech_with_pauses
    async with worker_process(broker, tiny_model, "wa", tmp_path / "spool"):
        sender = subprocess.Popen(
            [sys.executable, "-m", "stream_ser", "send", "--input", str(path), "--stream-id",
             "porch", "--mqtt", broker.url, "--mqtt-topic-prefix", PREFIX],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            for _ in range(3):
                await asyncio.sleep(3.0)
                assert broker.process is not None
                broker.process.kill()
                broker.process.wait()
                await asyncio.sleep(2.0)
                broker.start()
            _, stderr = await asyncio.to_thread(sender.communicate, timeout=60)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.communicate()
        assert sender.returncode == 0, stderr
        assert " 0 dropped" in stderr
        status: dict[str, Any] = {"streams": ["porch"]}
        deadline = time.monotonic() + 30  # the stream ends and its counts reach the totals
        while "porch" in status["streams"] and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            status = await latest_status(broker, "wa")
        assert "porch" not in status["streams"], status
    counters = status["counters"]
    assert counters["utterances"] == clip_count, counters
    assert counters["chunks_lost"] == 0, counters
    assert counters["chunks_late"] == 0, counters
