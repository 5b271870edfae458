"""`stream-ser run --http` end to end: the real command in a subprocess, real clients (the
documented examples/ws_client.py among them) over real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soundfile

from stream_ser.web.protocol import Close
from tests.conftest import REPO, Broker, run_cli
from tests.schema import check_message, check_result, parse_lines, utterances
from tools.net import free_port, wait_for_port

TOKEN = "t0ken-for-tests"

pytestmark = pytest.mark.slow


class Server:
    """`stream-ser run --http` in a subprocess; its stdout (JSON Lines) in a file."""

    def __init__(self, tmp_path: Path, tiny_model: Path, *more: str) -> None:
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.stdout = tmp_path / "server.jsonl"
        self.stderr = tmp_path / "server.log"
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        command = [sys.executable, "-m", "stream_ser", "run", "--http",
                   f"127.0.0.1:{self.port}", "--http-token-file", str(token_file),
                   "--model", str(tiny_model), "--no-descriptors", *more]  # fmt: skip
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO)
        wait_for_port(self.port, timeout_s=60)

    def stop(self) -> int:
        """SIGINT, as Ctrl-C; the exit code."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=60)

    def results(self) -> list[dict[str, Any]]:
        return parse_lines(self.stdout.read_text())


@pytest.fixture
def server(tmp_path: Path, tiny_model: Path) -> Iterator[Server]:
    running = Server(tmp_path, tiny_model)
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait(timeout=10)


async def events(server: Server) -> AsyncGenerator[dict[str, Any]]:
    """/v1/events' messages (history, then live) until the server closes it."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = f"{server.url}/v1/events"
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
        async for message in ws:
            yield json.loads(message.data)
        assert ws.close_code == Close.GOING_AWAY


async def collect_until(
    feed: AsyncIterator[dict[str, Any]], seen: list[dict[str, Any]], done: Any
) -> None:
    async for message in feed:
        seen.append(message)
        if done(seen):
            return


def run_example(url: str, audio: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / "ws_client.py"), url, str(audio), TOKEN],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
    )  # fmt: skip


def finals(messages: list[dict[str, Any]], stream_id: str | None = None) -> list[tuple[Any, ...]]:
    return [
        (m["utterance_id"], m["start_ms"], m["end_ms"], m["end_reason"], m["distribution"])
        for m in utterances(messages)
        if stream_id is None or m["stream_id"] == stream_id
    ]


async def test_the_documented_client_gets_the_file_paths_results(
    server: Server, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, count = speech_with_pauses
    by_file = run_cli("run", "--input", str(path), "--model", str(tiny_model), "--no-descriptors")
    assert by_file.returncode == 0, by_file.stderr
    expected = finals(parse_lines(by_file.stdout))
    assert len(expected) == count
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(180):
        feed = events(server)
        watching = asyncio.create_task(collect_until(feed, seen, lambda s: len(finals(s)) == count))
        client = await asyncio.to_thread(run_example, server.url, path)
        await watching
        await feed.aclose()
    assert client.returncode == 0, client.stderr
    assert f"closed: {Close.NORMAL}" in client.stderr
    received = parse_lines(client.stdout)
    for message in received:
        check_result(message)
    assert finals(received) == expected  # same utterances, same distributions
    assert finals(seen) == expected  # /v1/events saw the WebSocket stream's results
    for message in seen:
        check_message(message)
    assert server.stop() == 0
    published = server.results()  # stdout: JSON Lines, as without --http
    assert finals(published) == expected


async def test_a_client_killed_mid_utterance_gets_its_final_published_once(
    server: Server, tmp_path: Path, ravdess_clips: list[Path]
) -> None:
    first, _ = soundfile.read(ravdess_clips[0], dtype="int16")
    second, _ = soundfile.read(ravdess_clips[1], dtype="int16")
    audio = np.concatenate([first, np.zeros(24000, np.int16), second[: len(second) // 2]])
    pcm_file = tmp_path / "cut.raw"
    pcm_file.write_bytes(audio.astype("<i2").tobytes())
    client_code = tmp_path / "hanging_client.py"
    client_code.write_text(HANGING_CLIENT)
    seen: list[dict[str, Any]] = []

    def speaking_in_second(messages: list[dict[str, Any]]) -> bool:
        return any(m["type"] == "speaking" and m["stream_id"] == "killed" and m["speaking"]
                   and m["utterance_id"] == 2 for m in messages)  # fmt: skip

    async with asyncio.timeout(180):
        feed = events(server)
        client = subprocess.Popen(
            [sys.executable, str(client_code), server.url, str(pcm_file), TOKEN],
            stdout=subprocess.DEVNULL,
        )
        try:
            await collect_until(feed, seen, speaking_in_second)
            assert not [m for m in utterances(seen) if m["utterance_id"] == 2]
            os.kill(client.pid, signal.SIGKILL)  # mid-utterance, no close frame
            await collect_until(feed, seen, lambda s: len(finals(s, "killed")) == 2)
        finally:
            client.kill()
            client.wait(timeout=10)
        assert server.stop() == 0
        await collect_until(feed, seen, lambda s: False)  # the rest, until the server closes
    second_finals = [m for m in utterances(seen) if m["utterance_id"] == 2]
    assert len(second_finals) == 1 and second_finals[0]["end_reason"] == "stream_end"
    for message in seen:
        check_message(message)
    published = [m for m in utterances(server.results()) if m["stream_id"] == "killed"]
    assert [m["utterance_id"] for m in published] == [1, 2]  # stdout: each final once
    assert published[1]["id"] == second_finals[0]["id"]


HANGING_CLIENT = """
import asyncio, sys
import aiohttp

async def main(server, path, token):
    pcm = open(path, "rb").read()
    url = f"{server}/v1/stream?stream_id=killed&token={token}"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        for start in range(0, len(pcm), 3200):
            await ws.send_bytes(pcm[start:start + 3200])
        await asyncio.sleep(3600)  # mid-utterance: killed here

asyncio.run(main(*sys.argv[1:]))
"""


def test_run_http_refuses_a_bad_address_and_a_missing_token_file(
    tiny_model: Path, tmp_path: Path
) -> None:
    done = run_cli("run", "--http", "127.0.0.1:99999", "--model", str(tiny_model))
    assert done.returncode == 2 and "--http '127.0.0.1:99999'" in done.stderr
    missing = str(tmp_path / "nope")
    done = run_cli("run", "--http", "127.0.0.1:0", "--http-token-file", missing,
                   "--model", str(tiny_model))  # fmt: skip
    assert done.returncode == 2 and "--http-token-file" in done.stderr


async def test_websocket_and_mqtt_devices_stream_into_one_process(
    broker: Broker, tmp_path: Path, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    from tests.test_workers import PREFIX, collect_finals, device

    path, count = speech_with_pauses
    audio, _ = soundfile.read(path, dtype="float32")
    server = Server(tmp_path, tiny_model, "--mqtt", broker.url, "--mqtt-audio",
                    "--mqtt-topic-prefix", PREFIX, "--mqtt-spool-dir", str(tmp_path))  # fmt: skip
    seen: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(180):
            feed = events(server)
            over_mqtt = asyncio.create_task(
                collect_finals(broker, lambda got: len(got) == 2 * count, 120)
            )
            await asyncio.sleep(0.5)  # subscribed
            streaming = asyncio.create_task(device(broker, "porch", audio, speed=4.0))
            await collect_until(feed, seen, lambda s: any(m.get("stream_id") == "porch" for m in s))
            taken = f"{server.url}/v1/stream?stream_id=porch&token={TOKEN}"
            async with aiohttp.ClientSession() as http, http.ws_connect(taken) as ws:
                message = await ws.receive(timeout=30)  # the device's id is taken
            assert (message.data, message.extra) == (
                Close.STREAM_ID_IN_USE,
                "stream id 'porch' is in use by a live stream",
            )
            watching = asyncio.create_task(
                collect_until(feed, seen, lambda s: len(finals(s)) == 2 * count)
            )
            client = await asyncio.to_thread(run_example, server.url, path)
            await streaming
            await watching
            mqtt_finals = await over_mqtt
            await feed.aclose()
    finally:
        assert server.stop() == 0
    assert client.returncode == 0, client.stderr
    by_stream = {m["stream_id"] for m in utterances(seen)}
    assert "porch" in by_stream and len(by_stream) == 2  # the device and the WebSocket client
    assert len(finals(seen, "porch")) == count
    assert sorted(m["id"] for m in mqtt_finals) == sorted(m["id"] for m in utterances(seen))


async def test_a_device_cannot_take_the_id_of_a_websocket_stream(
    broker: Broker, tmp_path: Path, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    from tests.test_workers import PREFIX, device

    path, _ = speech_with_pauses
    audio, _ = soundfile.read(path, dtype="float32")
    server = Server(tmp_path, tiny_model, "--mqtt", broker.url, "--mqtt-audio",
                    "--mqtt-topic-prefix", PREFIX, "--mqtt-spool-dir", str(tmp_path),
                    "--mqtt-status-interval-s", "0.5")  # fmt: skip
    seen: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(120), aiohttp.ClientSession() as http:
            url = f"{server.url}/v1/stream?stream_id=den&token={TOKEN}"
            async with http.ws_connect(url) as ws:  # holds the id, sends nothing
                feed = events(server)
                await collect_until(feed, seen, lambda s: any(
                    m["type"] == "status" and "den" in m["streams"] for m in s))  # fmt: skip
                await device(broker, "den", audio[: 16000 * 3], speed=1.0)  # 3 s: 2 hellos
                await collect_until(feed, seen, lambda s: (
                    s[-1]["type"] == "status" and s[-1]["counters"].get("streams_refused", 0) >= 1
                ))  # fmt: skip
                await ws.send_str('{"type": "end"}')
                async for _ in ws:
                    pass
            await feed.aclose()
    finally:
        assert server.stop() == 0
    assert not [m for m in seen if m["type"] in ("utterance", "window", "speaking")]
    log = server.stderr.read_text()
    assert log.count("refused stream den: a live stream of this process has its id") == 1
