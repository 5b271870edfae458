"""Send an audio file to stream-ser's WebSocket API; print each final result as a JSON line.

    python examples/ws_client.py ws://127.0.0.1:8080 speech.wav [TOKEN]
"""

import asyncio
import json
import sys

import aiohttp
import numpy as np
import soundfile


async def send(ws: aiohttp.ClientWebSocketResponse, audio: np.ndarray, rate: int) -> None:
    for start in range(0, len(audio), rate // 10):  # 100 ms per message
        await ws.send_bytes(audio[start : start + rate // 10].tobytes())
    await ws.send_str(json.dumps({"type": "end"}))  # the server flushes, then closes


async def main(server: str, path: str, token: str = "") -> None:
    audio, rate = soundfile.read(path, dtype="int16", always_2d=True)  # s16le frames
    query = f"rate={rate}&channels={audio.shape[1]}&format=s16le&mode=lossless"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{server}/v1/stream?{query}"
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
        sending = asyncio.create_task(send(ws, audio, rate))
        async for message in ws:  # results until the server closes the socket
            result = json.loads(message.data)
            if result["type"] == "utterance" and result["final"]:
                print(message.data, flush=True)
        await sending
    print(f"closed: {ws.close_code}", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
