"""Publishing to a real mosquitto broker started by the test."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from tests.conftest import LABELS, REPO, Broker, run_cli
from tests.schema import check_message, check_result, check_status
from tools.net import free_port

PREFIX = "test-ser"


async def collect(
    broker: Broker, topic: str, until: Any, timeout_s: float = 60.0
) -> list[tuple[str, bool, dict[str, Any]]]:
    """Subscribe to `topic`; gather (topic, retained, payload) until `until(messages)` is true."""
    messages: list[tuple[str, bool, dict[str, Any]]] = []
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                messages.append((str(message.topic), message.retain, json.loads(message.payload)))
                if until(messages):
                    break
    return messages


async def run_cli_async(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, *args)


@pytest.mark.slow
async def test_every_utterance_is_published_and_status_is_retained(
    broker: Broker, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clip_count = speech_with_pauses

    def finished(messages: list[tuple[str, bool, dict[str, Any]]]) -> bool:
        return any(m.get("state") == "offline" for _, _, m in messages)

    listener = asyncio.create_task(collect(broker, f"{PREFIX}/#", finished))
    await asyncio.sleep(0.5)  # subscribed before the run starts
    done = await run_cli_async(
        "run",
        "--input",
        str(path),
        "--model",
        str(tiny_model),
        "--mqtt",
        broker.url,
        "--mqtt-topic-prefix",
        PREFIX,
        "--mqtt-client-id",
        "ser-test",
        "--stream-id",
        "room1",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # with a broker, nothing on stdout unless --jsonl
    messages = await asyncio.wait_for(listener, 30)
    utterance_results = [m for topic, _, m in messages if topic == f"{PREFIX}/room1/utterance"]
    finals = [m for m in utterance_results if m["final"]]
    provisional = [m for m in utterance_results if not m["final"]]
    assert [m["utterance_id"] for m in provisional] == list(range(1, clip_count + 1))
    windows = [m for topic, _, m in messages if topic == f"{PREFIX}/room1/window"]
    assert [m["utterance_id"] for m in finals] == list(range(1, clip_count + 1))
    assert windows
    kinds = {m["type"] for _, _, m in messages}
    assert kinds == {"window", "utterance", "speaking", "status"}
    for _, _, message in messages:  # every published message follows docs/schema
        check_message(message)
    for message in finals + windows:
        check_result(message, LABELS)
        assert message["stream_id"] == "room1"
    statuses = [m for topic, _, m in messages if topic == f"{PREFIX}/status/ser-test"]
    assert statuses[0]["state"] == "online"
    assert statuses[-1]["state"] == "offline"
    assert statuses[-1]["counters"]["utterances"] == clip_count

    # a subscriber arriving later gets the retained status
    (retained,) = await collect(broker, f"{PREFIX}/status/+", lambda m: True, timeout_s=10)
    assert retained[1] is True
    assert retained[2]["state"] == "offline"


@pytest.mark.slow
async def test_last_will_reports_offline_when_the_process_dies(
    broker: Broker, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, _ = speech_with_pauses
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream_ser",
            "run",
            "--input",
            str(path),
            "--realtime",
            "--model",
            str(tiny_model),
            "--mqtt",
            broker.url,
            "--mqtt-topic-prefix",
            PREFIX,
            "--mqtt-client-id",
            "doomed",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        online = await collect(
            broker, f"{PREFIX}/status/doomed", lambda m: m[-1][2]["state"] == "online"
        )
        assert online[-1][2]["state"] == "online"
        listener = asyncio.create_task(
            collect(broker, f"{PREFIX}/status/doomed", lambda m: m[-1][2]["state"] == "offline")
        )
        await asyncio.sleep(0.5)
        os.kill(process.pid, signal.SIGKILL)  # no chance to say goodbye: the broker does
        messages = await asyncio.wait_for(listener, 30)
        assert messages[-1][2]["state"] == "offline"
        check_status(messages[-1][2])  # the last will follows the schema too
    finally:
        process.kill()
        process.wait(timeout=10)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
@pytest.mark.slow
async def test_sigint_finishes_cleanly_with_offline_status(
    broker: Broker, tiny_model: Path, speech_with_pauses: tuple[Path, int], signum: int
) -> None:
    """SIGINT (Ctrl-C), and SIGHUP (its terminal closed): the utterance in progress is
    still recognised, the spool flushed, `offline` published, exit 0."""
    path, _ = speech_with_pauses
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream_ser",
            "run",
            "--input",
            str(path),
            "--realtime",
            "--model",
            str(tiny_model),
            "--mqtt",
            broker.url,
            "--mqtt-topic-prefix",
            PREFIX,
            "--mqtt-client-id",
            "interrupted",
            "--jsonl",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = await collect(broker, f"{PREFIX}/+/utterance", lambda m: m[-1][2]["final"])
    assert first[0][2]["utterance_id"] == 1
    process.send_signal(signum)
    stdout, stderr = await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr
    lines = [json.loads(line) for line in stdout.decode().splitlines()]
    assert next(m["utterance_id"] for m in lines if m["type"] == "utterance") == 1
    (status,) = await collect(broker, f"{PREFIX}/status/interrupted", lambda m: True, timeout_s=10)
    assert status[2]["state"] == "offline"


@pytest.mark.slow
def test_unreachable_broker_is_a_clear_error(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, _ = speech_with_pauses

    done = run_cli(
        "run",
        "--input",
        str(path),
        "--model",
        str(tiny_model),
        "--mqtt",
        f"mqtt://127.0.0.1:{free_port()}",
        "--mqtt-connect-timeout-s",
        "3",
        timeout_s=30,
    )
    assert done.returncode == 1
    assert "cannot connect to broker mqtt://127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_socket_closed_before_its_write_registration_is_skipped_quietly() -> None:
    """paho asks for the write registration from its connect thread; a failed TLS handshake
    closes the socket meanwhile, and asyncio used to log a traceback for the dead descriptor."""
    import socket

    from stream_ser.mqtt import CheckedClient

    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    client = CheckedClient("127.0.0.1", free_port(), identifier="closed-socket")
    closed, open_ = socket.socketpair()
    try:
        closed.close()
        # the shim overrides aiomqtt's private hook: driven here as paho's connect thread does
        client._on_socket_register_write(client._client, None, closed)  # noqa: SLF001
        client._on_socket_register_write(client._client, None, open_)  # noqa: SLF001
        await asyncio.sleep(0.05)  # the loop runs both registrations
        assert errors == []
        assert loop.remove_writer(open_.fileno())  # the live socket was registered
    finally:
        open_.close()
        loop.set_exception_handler(None)
