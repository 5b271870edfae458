"""Remote devices' audio over MQTT, shared by two workers (MQTT v5 shared subscriptions)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
import soundfile

from stream_ser.remote import HELLO_INTERVAL_S, encode_chunk
from tests.conftest import REPO, Broker

PREFIX = "fleet"
CHUNK = 1600  # 100 ms at 16 kHz


def start_worker(broker: Broker, model: Path, name: str, spool: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "stream_ser", "run", "--mqtt-audio", "--mqtt", broker.url,
         "--mqtt-topic-prefix", PREFIX, "--mqtt-client-id", name, "--model", str(model),
         "--no-model-windows", "--no-descriptors", "--mqtt-spool-dir", str(spool),
         "--mqtt-status-interval-s", "0.5"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


async def device(broker: Broker, stream_id: str, audio: np.ndarray, speed: float) -> None:
    """A device streaming PCM chunks with hellos, as `stream-ser send` does."""
    pcm = (audio * 32767).astype("<i2")
    base = f"{PREFIX}/audio/{stream_id}"
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        last_hello = -1e9
        for seq, start in enumerate(range(0, len(pcm), CHUNK)):
            if time.monotonic() - last_hello >= HELLO_INTERVAL_S / speed:
                hello = {"stream_id": stream_id, "sample_rate": 16000, "channels": 1, "seq": seq}
                await client.publish(f"{base}/hello", json.dumps(hello), qos=1)
                last_hello = time.monotonic()
            last = start + CHUNK >= len(pcm)
            payload = encode_chunk(seq, 16000, pcm[start : start + CHUNK], 0, last=last)
            await client.publish(f"{base}/pcm", payload, qos=1)
            await asyncio.sleep(0.1 / speed)


async def collect_finals(broker: Broker, until: Any, timeout_s: float) -> list[dict[str, Any]]:
    finals: list[dict[str, Any]] = []
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe(f"{PREFIX}/+/utterance", qos=1)
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                result = json.loads(message.payload)
                if result["final"]:
                    finals.append(result)
                if until(finals):
                    break
    return finals


def recording(clips: list[Path], count: int) -> np.ndarray:
    pieces = []
    for index in range(count):
        audio, _ = soundfile.read(clips[index % len(clips)], dtype="float32")
        pieces += [audio, np.zeros(16000, dtype=np.float32)]
    return np.concatenate(pieces)


class OwnerWatch:
    """Every owner claim seen on the broker, in order."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.claims: list[tuple[str, str]] = []  # (stream_id, worker)
        self.changed = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.broker.port) as client:
            await client.subscribe(f"{PREFIX}/audio/+/owner", qos=1)
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                if message.payload:
                    worker = json.loads(message.payload)["worker"]
                    self.claims.append((str(message.topic).split("/")[2], worker))
                    self.changed.set()

    def owners(self, stream_id: str) -> list[str]:
        return [worker for stream, worker in self.claims if stream == stream_id]


@pytest.mark.slow
async def test_two_workers_split_the_streams_and_one_takes_over(
    tmp_path: Path, broker: Broker, tiny_model: Path, ravdess_clips: list[Path]
) -> None:
    names = ("wa", "wb")
    workers = {name: start_worker(broker, tiny_model, name, tmp_path / name) for name in names}
    watch = OwnerWatch(broker)
    watching = asyncio.create_task(watch.run())
    try:
        await asyncio.sleep(3.0)  # both workers subscribed
        audio = recording(ravdess_clips, 3)
        streams = [f"room{i}" for i in range(6)]
        listener = asyncio.create_task(
            collect_finals(broker, lambda f: {r["stream_id"] for r in f} >= set(streams), 120)
        )
        await asyncio.gather(*(device(broker, s, audio, speed=4.0) for s in streams))
        finals = await listener
        # the shared subscription spread the streams over both workers ...
        assert {watch.owners(s)[0] for s in streams} == set(names), watch.claims
        # ... and each stream stayed with one worker (one session id in its message ids)
        for stream in streams:
            sessions = {r["id"].split(":")[0] for r in finals if r["stream_id"] == stream}
            assert len(sessions) == 1, (stream, sessions)
            assert len(set(watch.owners(stream))) == 1

        # failover: kill the owner of a stream mid-stream; the other worker takes it over
        long_audio = recording(ravdess_clips, 6)
        sending = asyncio.create_task(device(broker, "late", long_audio, speed=1.5))
        async with asyncio.timeout(20):
            while not watch.owners("late"):
                watch.changed.clear()
                await watch.changed.wait()
        victim = watch.owners("late")[0]
        survivor = next(name for name in names if name != victim)
        await asyncio.sleep(2.0)
        os.kill(workers[victim].pid, signal.SIGKILL)
        killed_at_claims = len(watch.claims)
        late = asyncio.create_task(
            collect_finals(broker, lambda f: any(r["stream_id"] == "late" for r in f), 90)
        )
        await sending
        taken_over = await late
        assert survivor in [w for s, w in watch.claims[killed_at_claims:] if s == "late"]
        assert any(r["stream_id"] == "late" for r in taken_over)
    finally:
        watching.cancel()
        for process in workers.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in workers.values():
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


async def read_owners(broker: Broker, streams: list[str]) -> dict[str, str]:
    owners: dict[str, str] = {}
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe(f"{PREFIX}/audio/+/owner", qos=1)
        try:
            async with asyncio.timeout(1.0):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    if message.payload:
                        owners[str(message.topic).split("/")[2]] = json.loads(message.payload)[
                            "worker"
                        ]
        except TimeoutError:
            pass
    return {s: owners[s] for s in streams if s in owners}
