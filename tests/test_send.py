"""`stream-ser send` against a real mosquitto: chunks, hellos, limits, failures, reconnection."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
import soundfile

from stream_ser.remote import Chunk, decode_chunk
from stream_ser.send import chunk_pieces
from stream_ser.uplink import Outbox, Outgoing
from tests.conftest import REPO, Broker, run_cli
from tools.net import free_port

PREFIX = "send-test"
MODEL_MODULES = ("onnxruntime", "opensmile")
# Runs the CLI and then reports which model modules the process imported.
CLI_WITH_IMPORT_CHECK = (
    "import sys\n"
    "from stream_ser.cli import main\n"
    "code = main(sys.argv[1:])\n"
    f"print('MODEL-MODULES', [m for m in {MODEL_MODULES!r} if m in sys.modules])\n"
    "sys.exit(code)\n"
)


def write_wav(path: Path, rate: int, channels: int, seconds: float, seed: int = 0) -> np.ndarray:
    """Random int16 audio in a 16-bit WAV; returns the samples, (frames, channels)."""
    frames = int(rate * seconds)
    audio = np.random.default_rng(seed).normal(0, 4000, (frames, channels))
    samples = np.clip(audio, -32768, 32767).astype(np.int16)
    soundfile.write(path, samples, rate, subtype="PCM_16")
    return samples


class Received:
    """What a subscriber to {prefix}/audio/# saw."""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self.hellos: list[dict[str, Any]] = []
        self.topics: set[str] = set()
        self._arrived = asyncio.Event()

    def add(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/owner"):  # the listener's own claim
            return
        self.topics.add(topic)
        self._arrived.set()
        if topic.endswith("/hello"):
            self.hellos.append(json.loads(payload))
        else:
            self.chunks.append(decode_chunk(payload))

    async def wait_for_chunks(self, count: int, timeout_s: float = 30.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.chunks) < count:
                self._arrived.clear()
                await self._arrived.wait()

    @property
    def ended(self) -> bool:
        return any(c.last for c in self.chunks)

    def in_order(self) -> list[Chunk]:
        """By sequence number, repeats (re-sent after a lost acknowledgement) left out."""
        return list({c.seq: c for c in sorted(self.chunks, key=lambda c: c.seq)}.values())


async def listen(
    broker: Broker, received: Received, subscribed: asyncio.Event, persistent: bool = False
) -> None:
    """Gather audio topics until a last chunk arrives; with `persistent`, survive restarts."""
    while not received.ended:
        try:
            async with aiomqtt.Client(
                "127.0.0.1", broker.port, identifier="send-test-sub", clean_session=not persistent
            ) as client:
                await client.subscribe(f"{PREFIX}/audio/#", qos=1)
                subscribed.set()
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    topic = str(message.topic)
                    received.add(topic, message.payload)
                    if received.ended:
                        return
                    if topic.endswith("/hello"):  # claim the stream, as a worker does
                        owner = topic.removesuffix("/hello") + "/owner"
                        claim = json.dumps({"worker": "send-test-sub"})
                        await client.publish(owner, claim, qos=1, retain=True)
        except aiomqtt.MqttError:
            if not persistent:
                raise
            await asyncio.sleep(0.2)


async def send_and_receive(
    broker: Broker, *args: str, timeout_s: float = 60.0
) -> tuple[subprocess.CompletedProcess[str], Received]:
    received, subscribed = Received(), asyncio.Event()
    listener = asyncio.create_task(listen(broker, received, subscribed))
    await asyncio.wait_for(subscribed.wait(), 10)
    command = [sys.executable, "-c", CLI_WITH_IMPORT_CHECK, "send", "--mqtt", broker.url,
               "--mqtt-topic-prefix", PREFIX, *args]  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=timeout_s, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    await asyncio.wait_for(listener, 10)
    return done, received


def check_stream(
    received: Received, stream_id: str, rate: int, channels: int, chunk_ms: int = 100
) -> np.ndarray:
    """Sequence numbers from 0 without gaps, only the last flagged, one format; the PCM."""
    chunks = received.in_order()
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert {(c.sample_rate, c.channels) for c in chunks} == {(rate, channels)}
    assert all(c.frames <= rate * chunk_ms // 1000 for c in chunks)
    stamps = [c.captured_ms for c in chunks]
    assert stamps == sorted(stamps) and stamps[0] > 1_600_000_000_000
    assert received.hellos[0] == {"stream_id": stream_id, "sample_rate": rate,
                                  "channels": channels, "seq": 0}  # fmt: skip
    assert received.topics == {f"{PREFIX}/audio/{stream_id}/{kind}" for kind in ("hello", "pcm")}
    return np.concatenate([c.pcm for c in chunks])


async def test_a_mono_file_arrives_exactly_without_any_model_module(
    broker: Broker, tmp_path: Path
) -> None:
    samples = write_wav(tmp_path / "kitchen.wav", 16000, 1, 2.05)
    done, received = await send_and_receive(
        broker, "--input", str(tmp_path / "kitchen.wav"), "--no-realtime"
    )
    np.testing.assert_array_equal(check_stream(received, "kitchen", 16000, 1), samples)
    assert "MODEL-MODULES []" in done.stdout


async def test_a_stereo_44k_file_is_sent_as_it_is_paced(broker: Broker, tmp_path: Path) -> None:
    samples = write_wav(tmp_path / "stereo.wav", 44100, 2, 1.0, seed=1)
    _, received = await send_and_receive(
        broker, "--input", str(tmp_path / "stereo.wav"), "--speed", "20", "--stream-id", "hall"
    )
    np.testing.assert_array_equal(check_stream(received, "hall", 44100, 2), samples)


async def test_a_96k_file_is_converted_to_16k_mono(broker: Broker, tmp_path: Path) -> None:
    write_wav(tmp_path / "hifi.wav", 96000, 2, 1.0, seed=2)
    _, received = await send_and_receive(
        broker, "--input", str(tmp_path / "hifi.wav"), "--no-realtime", "--send-chunk-ms", "50"
    )
    pcm = check_stream(received, "hifi", 16000, 1, chunk_ms=50)
    assert abs(len(pcm) - 16000) <= 16


def start_send(broker: Broker, *args: str) -> subprocess.Popen[str]:
    command = ["send", "--mqtt", broker.url, "--mqtt-topic-prefix", PREFIX, *args]
    return subprocess.Popen(
        [sys.executable, "-m", "stream_ser", *command],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_sigterm_sends_a_last_chunk_and_exits_0(broker: Broker, tmp_path: Path) -> None:
    write_wav(tmp_path / "long.wav", 16000, 1, 30.0)
    received, subscribed = Received(), asyncio.Event()
    listener = asyncio.create_task(listen(broker, received, subscribed))
    await asyncio.wait_for(subscribed.wait(), 10)
    process = start_send(broker, "--input", str(tmp_path / "long.wav"))
    try:
        await received.wait_for_chunks(5)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    await asyncio.wait_for(listener, 10)
    pcm = check_stream(received, "long", 16000, 1)
    assert 1600 * 4 <= len(pcm) < 16000 * 10  # stopped early, in real time


@pytest.mark.slow
async def test_chunks_survive_a_broker_restart(tmp_path: Path) -> None:
    broker = Broker(tmp_path, persistence=True)
    broker.start()
    try:
        samples = write_wav(tmp_path / "porch.wav", 16000, 1, 4.0, seed=3)
        received, subscribed = Received(), asyncio.Event()
        listener = asyncio.create_task(listen(broker, received, subscribed, persistent=True))
        await asyncio.wait_for(subscribed.wait(), 10)
        process = start_send(broker, "--input", str(tmp_path / "porch.wav"), "--speed", "2")
        try:
            await received.wait_for_chunks(3)
            await asyncio.to_thread(broker.stop)
            await asyncio.sleep(0.8)
            await asyncio.to_thread(broker.start)
            _, stderr = await asyncio.to_thread(process.communicate, timeout=60)
        finally:
            process.kill()
        assert process.returncode == 0, stderr
        assert "retrying" in stderr and "1 reconnect(s)" in stderr
        await asyncio.wait_for(listener, 20)
        np.testing.assert_array_equal(check_stream(received, "porch", 16000, 1), samples)
    finally:
        broker.stop()


def test_a_missing_file_is_a_one_line_error(broker: Broker, tmp_path: Path) -> None:
    done = run_cli("send", "--input", str(tmp_path / "nope.wav"), "--mqtt", broker.url)
    assert done.returncode == 1
    error = f"stream-ser: error: {tmp_path}/nope.wav: no such file"
    assert done.stderr.strip().splitlines() == [error]


def test_an_unreachable_broker_is_a_clear_error(tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", 16000, 1, 0.2)
    url = f"mqtt://127.0.0.1:{free_port()}"
    done = run_cli("send", "--input", str(tmp_path / "a.wav"), "--mqtt", url)
    assert done.returncode == 1
    assert "cannot connect to broker mqtt://127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr


def test_send_needs_a_broker(tmp_path: Path) -> None:
    done = run_cli("send", "--input", str(tmp_path / "a.wav"))
    assert done.returncode == 2 and "--mqtt" in done.stderr


@pytest.mark.parametrize(("flag", "value"), [("--send-chunk-ms", "1001"), ("--send-qos", "2")])
def test_bad_send_settings_are_usage_errors(flag: str, value: str, tmp_path: Path) -> None:
    done = run_cli("send", "--input", "x.wav", "--mqtt", "mqtt://127.0.0.1:1", flag, value)
    assert done.returncode == 2 and flag in done.stderr


async def test_a_full_live_outbox_drops_the_oldest_and_counts() -> None:
    outbox = Outbox(3, drop_oldest=True)
    for seq in range(5):
        await outbox.put(Outgoing(seq, b""))
    assert outbox.dropped == 2
    first = await outbox.get(0.1)
    assert first is not None and first.seq == 2
    outbox.done(first)
    assert len(outbox) == 2


async def test_a_full_file_outbox_waits_for_room() -> None:
    outbox = Outbox(2, drop_oldest=False)
    await outbox.put(Outgoing(0, b""))
    await outbox.put(Outgoing(1, b""))
    blocked = asyncio.create_task(outbox.put(Outgoing(2, b"")))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    item = await outbox.get(0.1)
    assert item is not None
    outbox.done(item)
    await asyncio.wait_for(blocked, 1)
    assert outbox.dropped == 0 and len(outbox) == 2
    await outbox.put(Outgoing(3, b""), force=True)  # the final chunk never waits
    assert outbox.dropped == 1
    outbox.close()
    assert not outbox.finished
    assert await asyncio.wait_for(outbox.get(5), 1) is not None


def test_oversized_blocks_are_split_and_only_the_end_is_flagged() -> None:
    pieces = list(chunk_pieces(np.zeros((25, 2), np.int16), 10, last=True))
    assert [(len(p), last) for p, last in pieces] == [(10, False), (10, False), (5, True)]
    assert [len(p) for p, _ in chunk_pieces(np.zeros((0, 1), np.int16), 10, last=True)] == [0]
    assert list(chunk_pieces(np.zeros((0, 1), np.int16), 10, last=False)) == []
