"""SIGTERM (what service managers and `docker stop` send) behaves like Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from tests.conftest import REPO, Broker

PREFIX = "signal-test"


async def window_of_a_later_utterance(client: aiomqtt.Client, timeout_s: float = 60) -> None:
    """Return once a window result of utterance 2 or later comes (speech is in flight)."""
    async with asyncio.timeout(timeout_s):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            if json.loads(message.payload)["utterance_id"] >= 2:
                return


async def retained_status(broker: Broker, client_id: str) -> dict[str, Any]:
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe(f"{PREFIX}/status/{client_id}", qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                status: dict[str, Any] = json.loads(message.payload)
                return status
    raise AssertionError("no status")


@pytest.mark.slow
async def test_sigterm_mid_utterance_finishes_it_and_exits_cleanly(
    broker: Broker, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, _ = speech_with_pauses
    windows = aiomqtt.Client("127.0.0.1", broker.port)
    await windows.__aenter__()
    await windows.subscribe(f"{PREFIX}/+/window", qos=1)
    process = subprocess.Popen(
        [sys.executable, "-m", "stream_ser", "run", "--input", str(path), "--realtime",
         "--speed", "2", "--model", str(tiny_model), "--mqtt", broker.url,
         "--mqtt-topic-prefix", PREFIX, "--mqtt-client-id", "terminated", "--jsonl"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        await window_of_a_later_utterance(windows)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.to_thread(process.communicate, timeout=30)
    finally:
        process.kill()
        process.wait(timeout=10)
        await windows.__aexit__(None, None, None)
    assert process.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr
    lines = [json.loads(line) for line in stdout.decode().splitlines()]
    finals = [m for m in lines if m["type"] == "utterance" and m["final"]]
    assert [m["utterance_id"] for m in finals] == list(range(1, len(finals) + 1))
    assert len(finals) >= 2
    assert finals[-1]["end_reason"] == "stream_end"  # the one in flight is not lost
    status = await retained_status(broker, "terminated")
    assert status["state"] == "offline"
    assert status["counters"]["utterances"] == len(finals)
    assert status["counters"]["spool_waiting"] == 0
