"""A client that reads its results slowly over /v1/stream: it loses windows (counted), never
silently a final, and holds up neither the model nor the other clients.

aiohttp's client buffers whatever arrives in memory, so the slow reader here is a minimal
WebSocket client on a plain socket with a small receive buffer that reads nothing until asked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from stream_ser.hub import ResultHub
from stream_ser.settings import ModelSettings
from stream_ser.web.protocol import Close
from tests.schema import check_message
from tests.test_web import (
    CHUNK_BYTES,
    drained,
    finals_of,
    finished,
    read_all,
    send_audio,
    served,
    speech_pcm,
)

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


class RawWebSocket:
    """RFC 6455 by hand: masked frames out, unfragmented frames in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, target: str, receive_buffer: int = 4096) -> RawWebSocket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=receive_buffer)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 101 " in head.split(b"\r\n")[0], head
        return cls(reader, writer)

    async def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)
        await self.writer.drain()

    async def read_all(self) -> tuple[list[dict[str, Any]], int, str]:
        """Every text message until the close: (messages, close code, reason)."""
        messages = []
        while True:
            first, second = await self.reader.readexactly(2)
            size = second & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(size)
            opcode = first & 0x0F
            if opcode == OP_TEXT:
                messages.append(json.loads(payload))
            elif opcode == OP_PING:
                await self.send(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                (code,) = struct.unpack("!H", payload[:2])
                self.writer.close()
                return messages, code, payload[2:].decode()


@pytest.mark.slow
async def test_a_slow_reader_loses_windows_not_finals_and_holds_up_no_one(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, count = speech_with_pauses
    repeats = 24
    pcm = speech_pcm(path) * repeats
    hub = ResultHub(max_queued=32)
    many_windows = ModelSettings(hop_ms=100)  # enough messages to fill the socket's buffers
    async with asyncio.timeout(300), served(tiny_model, hub=hub, model=many_windows) as s:
        port = int(s.url.rsplit(":", 1)[1])
        slow = await RawWebSocket.connect(port, "/v1/stream?stream_id=slow&mode=lossless")
        async with aiohttp.ClientSession() as http:
            fast = await http.ws_connect(s.ws_url("/v1/stream", stream_id="fast", mode="lossless"))

            async def send_slow() -> None:
                for start in range(0, len(pcm), CHUNK_BYTES):
                    await slow.send(OP_BINARY, pcm[start : start + CHUNK_BYTES])
                await slow.send(OP_TEXT, b'{"type": "end"}')

            await asyncio.gather(send_slow(), send_audio(fast, pcm))
            await fast.send_str('{"type": "end"}')
            fast_messages, fast_code, _ = await read_all(fast)  # while slow reads nothing
            await finished(s, "slow")
            slow_messages, slow_code, slow_reason = await slow.read_all()
    everything = await drained(s.everything)
    for message in [*everything, *fast_messages, *slow_messages]:
        check_message(message)
    published = {name: [m for m in everything if m.get("stream_id") == name]
                 for name in ("slow", "fast")}  # fmt: skip
    # the fast reader got everything of its stream, in time
    assert fast_code == Close.NORMAL
    fast_published = [m for m in published["fast"] if m["type"] != "status"]
    assert [m for m in fast_messages if m["type"] != "status"] == fast_published
    assert len(finals_of(fast_messages, "fast")) == count * repeats
    # the slow one lost windows (counted), and a final only with the connection closed, saying so
    slow_windows = [m for m in slow_messages if m["type"] == "window"]
    published_windows = [m for m in published["slow"] if m["type"] == "window"]
    assert hub.dropped > 0 and len(slow_windows) < len(published_windows)
    assert len(finals_of(published["slow"], "slow")) == count * repeats  # all published
    slow_finals = finals_of(slow_messages, "slow")
    if slow_code == Close.NORMAL:
        assert slow_finals == finals_of(published["slow"], "slow")
    else:
        assert slow_code == Close.TOO_SLOW and "too slow" in slow_reason, (slow_code, slow_reason)
    assert slow_finals == finals_of(published["slow"], "slow")[: len(slow_finals)]  # in order
    print(f"slow reader: close {slow_code} {slow_reason!r}, {len(slow_messages)} messages "
          f"({len(slow_windows)} of {len(published_windows)} windows, {len(slow_finals)} finals);"
          f" hub dropped {hub.dropped}")  # fmt: skip
