"""The HTTP server (stream_ser.web): aiohttp's client over a real socket against the real
server (serve) on a running runtime with a real ONNX model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soundfile
from aiohttp import web

from stream_ser.app import load_specialist, open_runtime
from stream_ser.arrivals import Arrivals
from stream_ser.hub import ResultHub
from stream_ser.pipeline import run_streams
from stream_ser.settings import ModelSettings, OutputSettings, Settings
from stream_ser.source import SourceStats, file_source, open_file
from stream_ser.web.options import HttpSettings
from stream_ser.web.protocol import Close
from stream_ser.web.server import WebServer, serve
from tests.schema import check_message, utterances
from tools.net import free_port

CHUNK_BYTES = 3200  # 100 ms of 16 kHz mono s16le


@dataclass
class Served:
    """A server on a running runtime."""

    url: str  # http://127.0.0.1:PORT
    server: WebServer
    hub: ResultHub
    runtime: Any
    everything: Any  # a hub subscription opened before any stream: every published message
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def ws_url(self, path: str, **query: Any) -> str:
        params = "&".join(f"{key}={value}" for key, value in query.items())
        return f"{self.url.replace('http', 'ws', 1)}{path}" + (f"?{params}" if params else "")


@contextlib.asynccontextmanager
async def served(
    tiny_model: Path,
    static: Path | None = None,
    hub: ResultHub | None = None,
    model: ModelSettings | None = None,
    **http: Any,
) -> AsyncIterator[Served]:
    port = free_port()
    settings = Settings(
        output=OutputSettings(descriptors=False),
        http=HttpSettings(address=f"127.0.0.1:{port}", **http),
        model=model or ModelSettings(),
    )
    hub = hub or ResultHub()
    async with open_runtime(settings, load_specialist(str(tiny_model)), hub) as runtime:
        stop = asyncio.Event()
        everything = hub.subscribe(max_queued=1_000_000)  # never too slow
        async with serve(settings.http, runtime, hub, stop, static) as server:
            running = asyncio.create_task(
                run_streams([], hub, stop, 0.5, None, aiter(runtime.arrivals))
            )
            try:
                yield Served(f"http://127.0.0.1:{port}", server, hub, runtime, everything, stop)
            finally:
                stop.set()
                await running
    hub.close()


async def read_all(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[dict[str, Any]], int, str]:
    """Every JSON message until the server closes: (messages, close code, reason)."""
    messages = []
    while True:
        message = await ws.receive(timeout=60)
        if message.type == aiohttp.WSMsgType.TEXT:
            messages.append(json.loads(message.data))
        elif message.type == aiohttp.WSMsgType.CLOSE:
            return messages, int(message.data), str(message.extra or "")
        else:
            return messages, ws.close_code or 0, ""


def speech_pcm(path: Path) -> bytes:
    audio, rate = soundfile.read(path, dtype="int16")
    assert rate == 16000
    return np.asarray(audio).astype("<i2").tobytes()


async def send_audio(ws: aiohttp.ClientWebSocketResponse, pcm: bytes) -> None:
    for start in range(0, len(pcm), CHUNK_BYTES):
        await ws.send_bytes(pcm[start : start + CHUNK_BYTES])


def finals_of(messages: list[dict[str, Any]], stream_id: str) -> list[tuple[Any, ...]]:
    return [
        (m["utterance_id"], m["start_ms"], m["end_ms"], m["end_reason"], m["distribution"])
        for m in utterances(messages)
        if m["stream_id"] == stream_id
    ]


async def finished(s: Served, stream_id: str) -> None:
    """Until the stream's pipeline has finished (if it is live)."""
    if (pipeline := s.runtime.arrivals.live(stream_id)) is not None:
        await pipeline.finished.wait()


async def drained(subscription: Any) -> list[dict[str, Any]]:
    """What a subscription holds now (the hub must be closed, or this waits)."""
    async with asyncio.timeout(10):
        return [message async for message in subscription]


# --------------------------------------------------------------------------- plain HTTP


async def test_page_static_files_and_health(tmp_path: Path, tiny_model: Path) -> None:
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<!doctype html><title>stream-ser</title>")
    (static / "app.js").write_text("console.log('hi')")
    (tmp_path / "secret.txt").write_text("no")
    async with (
        asyncio.timeout(60),
        served(tiny_model, static) as s,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(f"{s.url}/healthz") as response:
            assert response.status == 200 and await response.text() == "ok"
        async with http.get(f"{s.url}/") as response:
            assert response.status == 200 and "stream-ser" in await response.text()
        async with http.get(f"{s.url}/static/app.js") as response:
            assert response.status == 200 and "console.log" in await response.text()
        async with http.get(f"{s.url}/static/..%2fsecret.txt") as response:
            assert response.status in (403, 404)
        async with http.get(f"{s.url}/v1/stream") as response:  # no upgrade
            assert response.status == 400


async def test_a_missing_dashboard_is_a_clear_404(tmp_path: Path, tiny_model: Path) -> None:
    async with (
        asyncio.timeout(60),
        served(tiny_model, tmp_path / "none") as s,
        aiohttp.ClientSession() as http,
        http.get(f"{s.url}/") as response,
    ):
        assert response.status == 404
        assert "not installed" in await response.text()


# --------------------------------------------------------------------------- /v1/stream


async def test_results_over_the_websocket_equal_the_file_path(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, count = speech_with_pauses
    pcm = speech_pcm(path)
    async with asyncio.timeout(120), served(tiny_model) as s, aiohttp.ClientSession() as http:
        events = await http.ws_connect(s.ws_url("/v1/events"))
        kitchen_only = await http.ws_connect(s.ws_url("/v1/events", stream_id="kitchen", history=0))
        stats = SourceStats()
        from_file = file_source(path, open_file(path), 100, None, stats)
        local = s.runtime.start("file", from_file, stats, lossless=True)
        url = s.ws_url("/v1/stream", rate=16000, channels=1, stream_id="kitchen", mode="lossless")
        async with http.ws_connect(url) as ws:
            sender = asyncio.create_task(send_audio(ws, pcm))
            await sender
            await ws.send_str(json.dumps({"type": "end"}))
            messages, code, reason = await read_all(ws)
        await local.finished.wait()
        assert (code, reason) == (Close.NORMAL, "end of stream")
        seen_by_events: list[dict[str, Any]] = []
        while len(finals_of(seen_by_events, "kitchen")) < count:
            seen_by_events.append(json.loads((await events.receive(timeout=30)).data))
        await events.close()
        seen_by_kitchen_only: list[dict[str, Any]] = []
        while len(finals_of(seen_by_kitchen_only, "kitchen")) < count:
            seen_by_kitchen_only.append(json.loads((await kitchen_only.receive(timeout=30)).data))
        await kitchen_only.close()
    assert {m.get("stream_id") for m in seen_by_events} >= {"file", "kitchen"}
    assert {m.get("stream_id", "status") for m in seen_by_kitchen_only} <= {"kitchen", "status"}
    assert finals_of(seen_by_kitchen_only, "kitchen") == finals_of(seen_by_events, "kitchen")
    for message in messages:
        check_message(message)
        assert message["type"] == "status" or message["stream_id"] == "kitchen"
    assert {m["type"] for m in messages} >= {"window", "utterance", "speaking"}
    everything = await drained(s.everything)
    assert len(finals_of(everything, "file")) == count
    expected = finals_of(everything, "file")
    assert finals_of(messages, "kitchen") == expected
    assert finals_of(seen_by_events, "kitchen") == expected  # /v1/events saw them too
    assert finals_of(everything, "kitchen") == expected  # published once each


async def test_two_live_connections_may_not_share_a_stream_id(tiny_model: Path) -> None:
    async with asyncio.timeout(60), served(tiny_model) as s, aiohttp.ClientSession() as http:
        url = s.ws_url("/v1/stream", stream_id="same")
        async with http.ws_connect(url) as first, http.ws_connect(url) as second:
            _, code, reason = await read_all(second)
            assert code == Close.STREAM_ID_IN_USE and "in use" in reason
            await first.send_str('{"type": "end"}')
            _, code, _ = await read_all(first)
            assert code == Close.NORMAL
        async with http.ws_connect(url) as again:  # free once the first has ended
            await again.send_str('{"type": "end"}')
            assert (await read_all(again))[1] == Close.NORMAL


@pytest.mark.parametrize(
    ("path", "query", "words"),
    [
        ("/v1/stream", {"rate": "fast"}, "rate 'fast' is not a whole number"),
        ("/v1/stream", {"rate": "1000"}, "sample rate 1000 Hz"),
        ("/v1/stream", {"channels": "0"}, "channels 0"),
        ("/v1/stream", {"format": "mp3"}, "sample format 'mp3'"),
        ("/v1/stream", {"mode": "fast"}, "mode 'fast'"),
        ("/v1/stream", {"stream_id": "a%2Fb"}, "must not contain '/'"),
        ("/v1/stream", {"colour": "red"}, "unknown parameter(s): colour"),
        ("/v1/events", {"history": "yes"}, "history 'yes'"),
        ("/v1/events", {"rate": "16000"}, "unknown parameter(s): rate"),
    ],
)
async def test_bad_parameters_close_with_4400_and_the_reason(
    tiny_model: Path, path: str, query: dict[str, str], words: str
) -> None:
    async with (
        asyncio.timeout(60),
        served(tiny_model) as s,
        aiohttp.ClientSession() as http,
        http.ws_connect(s.ws_url(path, **query)) as ws,
    ):
        messages, code, reason = await read_all(ws)
    assert (messages, code) == ([], Close.BAD_PARAMETERS)
    assert words in reason


@pytest.mark.parametrize(
    ("query", "frame", "words"),
    [
        ({}, b"\x01\x02\x03", "3 bytes is not a whole number of frames"),
        ({"channels": "2"}, b"\x00" * 6, "a frame of 2 channel(s) of s16le is 4 bytes"),
        ({"format": "f32le"}, b"\x00" * 10, "of f32le is 4 bytes"),
        ({}, "hello", 'the only text frame understood is {"type": "end"}'),
    ],
)
async def test_audio_in_the_wrong_format_closes_with_1003(
    tiny_model: Path, query: dict[str, str], frame: bytes | str, words: str
) -> None:
    async with asyncio.timeout(60), served(tiny_model) as s, aiohttp.ClientSession() as http:
        async with http.ws_connect(s.ws_url("/v1/stream", **query)) as ws:
            if isinstance(frame, bytes):
                await ws.send_bytes(frame)
            else:
                await ws.send_str(frame)
            _, code, reason = await read_all(ws)
        assert s.server.stats.ws_bad_input == 1
    assert code == Close.UNSUPPORTED_DATA and words in reason


async def test_an_oversized_frame_closes_with_1009(tiny_model: Path) -> None:
    limit = 4096
    async with (
        asyncio.timeout(60),
        served(tiny_model, max_frame_bytes=limit) as s,
        aiohttp.ClientSession() as http,
        http.ws_connect(s.ws_url("/v1/stream")) as ws,
    ):
        await ws.send_bytes(b"\x00" * limit)  # exactly the limit: taken
        await ws.send_bytes(b"\x00" * (limit + 2))
        _, code, reason = await read_all(ws)
    assert code == Close.TOO_BIG and reason == f"message too large: more than {limit} bytes"


async def test_a_token_is_required_by_header_or_query(tiny_model: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    async with asyncio.timeout(60), served(tiny_model, token_file=str(token_file)) as s:
        async with aiohttp.ClientSession() as http:
            for path, query, headers in [
                ("/v1/events", {}, {}),
                ("/v1/stream", {"token": "wrong"}, {}),
                ("/v1/events", {}, {"Authorization": "Bearer wrong"}),
            ]:
                async with http.ws_connect(s.ws_url(path, **query), headers=headers) as ws:
                    messages, code, reason = await read_all(ws)
                    assert (messages, code, reason) == ([], Close.POLICY, "missing or wrong token")
            good = http.ws_connect(
                s.ws_url("/v1/events"), headers={"Authorization": "Bearer s3cret"}
            )
            async with good as ws:
                assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT  # status
            async with http.ws_connect(s.ws_url("/v1/stream", token="s3cret")) as ws:
                await ws.send_str('{"type": "end"}')
                assert (await read_all(ws))[1] == Close.NORMAL
        assert s.server.stats.ws_refused_token == 3
    statuses = [m for m in await drained(s.everything) if m["type"] == "status"]
    check_message(statuses[-1])
    assert statuses[-1]["state"] == "offline"
    assert statuses[-1]["counters"]["ws_refused_token"] == 3  # in the status totals


async def test_a_page_of_another_origin_needs_the_token(tiny_model: Path) -> None:
    async with asyncio.timeout(60), served(tiny_model) as s, aiohttp.ClientSession() as http:
        evil = {"Origin": "http://evil.example"}
        async with http.ws_connect(s.ws_url("/v1/events"), headers=evil) as ws:
            _, code, reason = await read_all(ws)
            assert code == Close.POLICY and "another origin" in reason
        same = {"Origin": s.url}
        async with http.ws_connect(s.ws_url("/v1/events"), headers=same) as ws:
            assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT


async def test_connections_beyond_the_limit_are_refused(tiny_model: Path) -> None:
    async with asyncio.timeout(60), served(tiny_model, max_connections=2) as s:
        async with aiohttp.ClientSession() as http:
            first = await http.ws_connect(s.ws_url("/v1/events"))
            second = await http.ws_connect(s.ws_url("/v1/stream"))
            async with http.ws_connect(s.ws_url("/v1/stream")) as third:
                _, code, reason = await read_all(third)
            assert code == Close.TRY_AGAIN_LATER and "too many connections" in reason
            await first.close()
            await second.close()
            for _ in range(100):  # the server sees them go
                if not s.server.counters()["ws_connections"]:
                    break
                await asyncio.sleep(0.05)
            async with http.ws_connect(s.ws_url("/v1/stream")) as fourth:
                await fourth.send_str('{"type": "end"}')
                assert (await read_all(fourth))[1] == Close.NORMAL
        assert s.server.stats.ws_refused_limit == 1


async def test_one_client_address_may_not_take_every_connection(tiny_model: Path) -> None:
    async with (
        asyncio.timeout(60),
        served(tiny_model, max_connections=8, max_connections_per_client=2) as s,
        aiohttp.ClientSession() as http,
    ):
        first = await http.ws_connect(s.ws_url("/v1/events"))
        second = await http.ws_connect(s.ws_url("/v1/events"))
        async with http.ws_connect(s.ws_url("/v1/stream")) as third:
            _, code, reason = await read_all(third)
        assert code == Close.TRY_AGAIN_LATER
        assert "from 127.0.0.1: 2 open (--http-max-connections-per-client)" in reason
        assert s.server.counters()["ws_connections"] == 2
        await first.close()
        await second.close()
    assert s.server.stats.ws_refused_limit == 1


async def test_an_abrupt_disconnect_mid_utterance_still_publishes_its_final_once(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, _ = speech_with_pauses
    pcm = speech_pcm(path)
    sockets: list[socket.socket] = []

    def keep(addr_info: Any) -> socket.socket:
        family, kind, proto, _, _ = addr_info
        sock = socket.socket(family, kind, proto)
        sockets.append(sock)
        return sock

    async with asyncio.timeout(120), served(tiny_model) as s:
        connector = aiohttp.TCPConnector(socket_factory=keep)
        async with aiohttp.ClientSession(connector=connector) as http:
            ws = await http.ws_connect(s.ws_url("/v1/stream", stream_id="gone"))
            speaking = None
            for start in range(0, len(pcm), CHUNK_BYTES):  # real time-ish, until speech starts
                await ws.send_bytes(pcm[start : start + CHUNK_BYTES])
                message = await _next_text(ws, 0.02)
                if message is not None and message["type"] == "speaking":
                    speaking = message
                    break
            assert speaking is not None and speaking["speaking"]
            sockets[0].shutdown(socket.SHUT_RDWR)  # no close frame: the client vanished
            await asyncio.sleep(0)
        await finished(s, "gone")
    everything = await drained(s.everything)
    finals = [m for m in utterances(everything) if m["stream_id"] == "gone"]
    assert len(finals) == 1
    assert finals[0]["utterance_id"] == speaking["utterance_id"]
    assert finals[0]["end_reason"] == "stream_end"
    for message in everything:
        check_message(message)


async def _next_text(ws: aiohttp.ClientWebSocketResponse, timeout_s: float) -> Any:
    try:
        message = await ws.receive(timeout=timeout_s)
    except TimeoutError:
        return None
    return json.loads(message.data) if message.type == aiohttp.WSMsgType.TEXT else None


async def test_a_stop_flushes_open_streams_and_refuses_new_ones(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, _ = speech_with_pauses
    pcm = speech_pcm(path)
    async with asyncio.timeout(60), served(tiny_model) as s, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(s.ws_url("/v1/stream", stream_id="cut"))
        for start in range(0, len(pcm), CHUNK_BYTES):  # until the first utterance has begun
            await ws.send_bytes(pcm[start : start + CHUNK_BYTES])
            message = await _next_text(ws, 0.02)
            if message is not None and message["type"] == "speaking":
                break
        s.stop.set()  # Ctrl-C
        messages, code, reason = await read_all(ws)
        async with http.get(f"{s.url}/healthz") as response:
            assert response.status == 503
        async with http.ws_connect(s.ws_url("/v1/stream")) as late:
            assert (await read_all(late))[1:] == (Close.GOING_AWAY, "the server is shutting down")
    assert (code, reason) == (Close.GOING_AWAY, "the server is shutting down")
    for message in messages:
        check_message(message)
    (final,) = utterances(messages)
    assert final["utterance_id"] == 1 and final["end_reason"] == "stream_end"


async def test_many_concurrent_clients_each_get_their_own_results(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, count = speech_with_pauses
    pcm = speech_pcm(path)
    clients = 12

    async def client(http: aiohttp.ClientSession, n: int) -> list[dict[str, Any]]:
        url = s.ws_url("/v1/stream", stream_id=f"c{n}", mode="lossless")
        async with http.ws_connect(url) as ws:
            await send_audio(ws, pcm)
            await ws.send_str('{"type": "end"}')
            messages, code, _ = await read_all(ws)
        assert code == Close.NORMAL
        return messages

    async with asyncio.timeout(120), served(tiny_model) as s, aiohttp.ClientSession() as http:
        got = await asyncio.gather(*(client(http, n) for n in range(clients)))
    reference = [f[1:] for f in finals_of(got[0], "c0")]  # times, reason, distribution
    assert len(reference) == count
    for n, messages in enumerate(got):
        for message in messages:
            check_message(message)
        assert {m["stream_id"] for m in messages if m["type"] != "status"} == {f"c{n}"}
        assert [f[1:] for f in finals_of(messages, f"c{n}")] == reference


async def test_a_client_that_sends_nothing_is_closed_when_idle(tiny_model: Path) -> None:
    async with asyncio.timeout(60), served(tiny_model) as s, aiohttp.ClientSession() as http:
        s.server.idle_timeout_s = 0.3
        async with http.ws_connect(s.ws_url("/v1/stream", stream_id="quiet")) as ws:
            messages, code, reason = await read_all(ws)
    assert (code, reason) == (Close.IDLE, "no message for 0.3 s")
    assert all(m["type"] == "status" for m in messages)


class BrokenRuntime:
    """A runtime with a bug: starting a stream fails."""

    arrivals = Arrivals()

    def start(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in start")


async def test_a_fault_in_the_server_closes_with_1011_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    broken: Any = BrokenRuntime()
    server = WebServer(broken, ResultHub(), HttpSettings(f"127.0.0.1:{port}"))
    runner = web.AppRunner(server.application())
    async with asyncio.timeout(30):
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
                    _, code, reason = await read_all(ws)
                async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                    assert response.status == 200  # the server goes on
        finally:
            await runner.cleanup()
    assert (code, reason) == (Close.INTERNAL, "internal error (see the server's log)")
    assert "a bug in start" in caplog.text
