"""A device's microphone, end to end: `stream-ser send --mic` -> broker -> a worker's results.

The microphone is the PulseAudio null sink's monitor (see tests/test_microphone.py); a file is
played into it in real time.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from tests.conftest import REPO, Broker
from tests.schema import check_result
from tests.test_microphone import pulse_env  # noqa: F401  (the PulseAudio fixture)

PREFIX = "devices"


async def finals_of(broker: Broker, stream_id: str, count: int) -> list[dict[str, Any]]:
    finals: list[dict[str, Any]] = []
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe(f"{PREFIX}/{stream_id}/utterance", qos=1)
        async with asyncio.timeout(90):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                result = json.loads(message.payload)
                if result["final"]:
                    finals.append(result)
                if len(finals) == count:
                    return finals
    return finals


async def claimed(broker: Broker, stream_id: str) -> None:
    """Return once a worker has claimed the stream (its retained owner record)."""
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe(f"{PREFIX}/audio/{stream_id}/owner", qos=1)
        async with asyncio.timeout(60):
            async for message in client.messages:
                if message.payload:
                    return


@pytest.mark.slow
async def test_send_mic_to_a_worker(
    pulse_env: dict[str, str],  # noqa: F811
    broker: Broker,
    tiny_model: Path,
    speech_with_pauses: tuple[Path, int],
    tmp_path: Path,
) -> None:
    path, clip_count = speech_with_pauses
    worker = subprocess.Popen(
        [sys.executable, "-m", "stream_ser", "run", "--mqtt-audio", "--mqtt", broker.url,
         "--mqtt-topic-prefix", PREFIX, "--mqtt-client-id", "box", "--model", str(tiny_model),
         "--no-model-windows", "--no-descriptors", "--mqtt-spool-dir", str(tmp_path)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    sender = subprocess.Popen(
        [sys.executable, "-m", "stream_ser", "send", "--mic", "pulse_mon", "--mqtt", broker.url,
         "--mqtt-topic-prefix", PREFIX, "--stream-id", "desk"],
        cwd=REPO, env=pulse_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        listening = asyncio.create_task(finals_of(broker, "desk", clip_count))
        await claimed(broker, "desk")  # capture running, hellos sent, a worker listening
        await asyncio.sleep(0.5)
        started = time.monotonic()
        await asyncio.to_thread(
            subprocess.run, ["paplay", "--device=vsink", str(path)], env=pulse_env, check=True,
            timeout=60,
        )  # fmt: skip
        assert time.monotonic() - started > 5.0  # played in real time
        await asyncio.sleep(1.5)  # the last hangover
        sender.send_signal(signal.SIGINT)  # sends the last chunk: the worker ends the stream
        _, sent_log = await asyncio.to_thread(sender.communicate, timeout=30)
        assert sender.returncode == 0, sent_log.decode()
        finals = await listening
    finally:
        sender.kill()
        worker.send_signal(signal.SIGINT)
        try:
            worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
    assert [m["utterance_id"] for m in finals] == list(range(1, clip_count + 1))
    for message in finals:
        check_result(message)
        assert message["stream_id"] == "desk"
