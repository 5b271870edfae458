"""`run` with Home Assistant discovery, the speaking topic, Prometheus metrics and JSON logs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from tests.conftest import REPO, Broker
from tests.schema import check_speaking
from tools.net import free_port, wait_for_port

PREFIX = "integ"


async def retained(broker: Broker, topic: str, count: int) -> dict[str, Any]:
    """The retained messages under `topic` (waits for `count` of them)."""
    found: dict[str, Any] = {}
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(15):
            async for message in client.messages:
                assert isinstance(message.payload, bytes) and message.retain
                found[str(message.topic)] = json.loads(message.payload)
                if len(found) == count:
                    break
    return found


def scrape(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.slow
async def test_discovery_speaking_metrics_and_json_logs(
    broker: Broker, speech_with_pauses: tuple[Path, int], tiny_model: Path
) -> None:
    path, clip_count = speech_with_pauses
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "stream_ser", "run", "--input", str(path), "--realtime",
         "--speed", "2", "--model", str(tiny_model), "--mqtt", broker.url,
         "--mqtt-topic-prefix", PREFIX, "--mqtt-client-id", "integ", "--stream-id", "desk",
         "--ha-discovery", "--metrics-port", str(port), "--log-json",
         "--mqtt-status-interval-s", "0.5"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.to_thread(wait_for_port, port, 60)
        await asyncio.sleep(4)  # a few utterances in, at double speed
        status, health = await asyncio.to_thread(scrape, port, "/healthz")
        assert status == 200, health
        status, text = await asyncio.to_thread(scrape, port, "/metrics")
        assert status == 200
        assert 'stream_ser_utterances_total{stream="desk"}' in text
        assert 'stream_ser_result_latency_seconds_count{stream="desk",type="window"}' in text
        _, stderr = await asyncio.to_thread(process.communicate, timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0
    logs = [json.loads(line) for line in stderr.decode().splitlines()]
    assert any("connected to" in entry["message"] for entry in logs)
    assert {"time", "level", "logger", "message"} <= set(logs[0])

    configs = await retained(broker, "homeassistant/#", 4)
    kinds = sorted(topic.split("/")[1] for topic in configs)
    assert kinds == ["binary_sensor", "sensor", "sensor", "sensor"]
    for config in configs.values():
        assert config["availability"][0]["topic"] == f"{PREFIX}/status/integ"
    speaking = await retained(broker, f"{PREFIX}/desk/speaking", 1)
    last = speaking[f"{PREFIX}/desk/speaking"]
    assert last["speaking"] is False and last["utterance_id"] == clip_count
    check_speaking(last)
