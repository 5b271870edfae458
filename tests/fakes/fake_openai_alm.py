"""A local fake of an OpenAI-compatible audio chat server (the subset stream-ser uses).

`GET /v1/models` lists one model; `POST /v1/chat/completions` checks the request shape (system +
user message, base64 WAV `input_audio` parts, a text part) and answers with deterministic
`top_logprobs` derived from the audio and the prompt text, or with a short message when no
logprobs are asked (a written distribution "neutral: 12%, ..." when the prompt asks for percents:
the text-level baseline). Every request is recorded. For tests and benchmarks:

    with FakeOpenAIServer(latency_s=0.02) as server:
        backend = stream_ser.alm.load(f"openai:{server.url}", labels)

or from a shell: `python -m tests.fakes.fake_openai_alm --port 8765` (serves until interrupted).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import math
import threading
import time
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import numpy as np

MODEL_ID = "fake-qwen2-audio"
TOKENS = ("neutral", " happy", "Sad", "ang", "The", " ", "sad")
"""The listed candidate tokens: label words, a prefix, a non-label word, a bare space."""
WRITTEN_LABELS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprise")


def decode_wav(data: str) -> np.ndarray:
    """base64 16-bit mono WAV -> float32 samples."""
    with wave.open(io.BytesIO(base64.b64decode(data)), "rb") as reader:
        assert reader.getnchannels() == 1 and reader.getsampwidth() == 2
        frames = reader.readframes(reader.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32767.0


def fake_logprobs(audio: list[np.ndarray], text: str) -> list[tuple[str, float]]:
    """Deterministic top logprobs: a softmax over TOKENS seeded by the audio bytes and the text."""
    digest = hashlib.sha256(text.encode())
    for clip in audio:
        digest.update(clip.tobytes())
    rng = np.random.default_rng(int.from_bytes(digest.digest()[:8], "little"))
    logits = rng.normal(0.0, 1.5, len(TOKENS))
    log_z = math.log(float(np.exp(logits).sum()) + 1.0)  # +1: mass of unlisted tokens
    return [(token, float(value) - log_z) for token, value in zip(TOKENS, logits, strict=True)]


def written_distribution(audio: list[np.ndarray], text: str) -> str:
    """A deterministic written answer "neutral: 12%, calm: 3%, ..." (whole percents)."""
    logprobs = fake_logprobs(audio, text)
    rng = np.random.default_rng(int(-1000 * logprobs[0][1]))
    shares = rng.dirichlet(np.ones(len(WRITTEN_LABELS)))
    pairs = zip(WRITTEN_LABELS, shares, strict=True)
    return ", ".join(f"{label}: {round(100 * p)}%" for label, p in pairs)


class FakeOpenAIServer:
    """ThreadingHTTPServer on 127.0.0.1, port 0, in a daemon thread; a context manager."""

    def __init__(
        self, latency_s: float = 0.0, fail_status: int | None = None, port: int = 0
    ) -> None:
        self.latency_s = latency_s
        self.fail_status = fail_status
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="fake-openai")

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT (the backend appends /v1)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The reply to one chat-completions request body (raises AssertionError if malformed)."""
        system, user = body["messages"]
        assert system["role"] == "system" and user["role"] == "user"
        parts = user["content"]
        audio = [decode_wav(p["input_audio"]["data"]) for p in parts if p["type"] == "input_audio"]
        assert all(p["input_audio"]["format"] == "wav" for p in parts if p["type"] == "input_audio")
        (text,) = [p["text"] for p in parts if p["type"] == "text"]
        assert audio, "no input_audio part"
        with self._lock:
            self.requests.append(body)
        if self.latency_s:
            time.sleep(self.latency_s)
        if not body.get("logprobs"):
            content = f"fake rationale for {len(audio)} clip(s)"
            if "percent" in text:
                content = written_distribution(audio, text)
            return {"choices": [{"message": {"role": "assistant", "content": content}}]}
        top = fake_logprobs(audio, text)[: body.get("top_logprobs", 0)]
        entries = [{"token": token, "logprob": lp, "bytes": list(token.encode())}
                   for token, lp in top]
        first = entries[0] if entries else {"token": "", "logprob": 0.0}
        return {
            "id": "chatcmpl-fake", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": first["token"]},
                         "logprobs": {"content": [{**first, "top_logprobs": entries}]},
                         "finish_reason": "length"}],
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

            def do_GET(self) -> None:
                if self.path != "/v1/models":
                    return self._send(404, {"error": {"message": "not found"}})
                return self._send(200, {"object": "list", "data": [{"id": MODEL_ID}]})

            def do_POST(self) -> None:
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found"}})
                if server.fail_status:
                    return self._send(server.fail_status, {"error": {"message": "failing"}})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                try:
                    reply = server.answer(body)
                except (AssertionError, KeyError, ValueError) as err:
                    return self._send(400, {"error": {"message": f"bad request: {err!r}"}})
                return self._send(200, reply)

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def main() -> None:
    """Command line: serve until interrupted (for measurements with `stream-ser eval`)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    with FakeOpenAIServer(port=args.port) as server:
        print(f"fake OpenAI-compatible ALM on {server.url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
