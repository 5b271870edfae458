"""Remote generative backend: an OpenAI-compatible chat server (e.g. vLLM serving Qwen2-Audio).

Each utterance x question template is one `POST {base}/chat/completions` request with the audio
as base64 WAV `input_audio` parts (`audio_repeats` times), the question text, `max_tokens=1`,
`temperature=0`, `logprobs=true` and `top_logprobs`; the distribution comes from
`choices[0].logprobs.content[0].top_logprobs` by the rule in `labels.from_top_logprobs`, averaged
over templates. The requests of a batch run concurrently, so one server batches a fleet's work.
Standard library only (urllib, json, wave, threads).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import urllib.error
import urllib.request
import wave
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from stream_ser import SAMPLE_RATE
from stream_ser.acoustics import CueTokens
from stream_ser.alm import labels as label_rules
from stream_ser.alm import text_scoring
from stream_ser.alm.base import (
    AlmOptions,
    as_distributions,
    check_batch,
    check_labels,
    resolve_cues,
    template_means,
    warn_cue_collisions,
)
from stream_ser.alm.prompts import cue_sentence, load_generative, question_text
from stream_ser.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

WINDOW_S = 30
"""Audio longer than this is sent as consecutive parts (Qwen2-Audio's window)."""


def wav_base64(clip: np.ndarray, sample_rate: int = SAMPLE_RATE) -> str:
    """16-bit PCM mono WAV, base64-encoded."""
    pcm = (np.clip(clip, -1.0, 1.0) * 32767.0).round().astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(sample_rate)
        writer.writeframes(pcm.tobytes())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def api_base(url: str) -> str:
    """http://host:port[/v1] -> http://host:port/v1."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"alm: openai backend needs an http(s) URL, not {url!r}")
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class OpenAIRemoteBackend:
    """Chat-completions client scoring labels from the first token's top logprobs."""

    kind = "openai"

    def __init__(self, url: str, labels: Sequence[str], options: AlmOptions) -> None:
        self.spec = f"{self.kind}:{url}"
        self.labels = check_labels(labels)
        warn_cue_collisions(self.labels)
        self.options = options
        self.prompts = load_generative(options.prompts, options.prompt_set)
        self._base = api_base(url)
        self._key = options.api_key or os.environ.get("OPENAI_API_KEY")
        self.model = options.model_name or self._served_model()

    def predict(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None = None
    ) -> list[dict[str, float]]:
        """One distribution per utterance: concurrent requests, mean over templates."""
        return template_means(self.labels, self.predict_templates(batch, cues))

    def predict_templates(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None = None
    ) -> list[list[dict[str, float]]]:
        """Per utterance, the distribution of each question template."""
        clips = check_batch(batch)
        questions = self.template_names()
        written = self.options.scoring == "text"
        bodies = [
            self._body(
                clip,
                question_text(template, self.labels, self.options.text_repeats, sentence),
                scoring=not written,
                max_tokens=self.options.text_tokens,
            )
            for clip, sentence in zip(clips, self._cue_sentences(clips, cues), strict=True)
            for template in questions
        ]
        replies = self._post_all(bodies)
        if written:
            rows = [text_scoring.parse(self.labels, _message(r), self.spec) for r in replies]
            return [rows[i : i + len(questions)] for i in range(0, len(rows), len(questions))]
        top = np.stack([label_rules.from_top_logprobs(self.labels, _top(r)) for r in replies])
        grouped = top.reshape(len(clips), len(questions), -1)
        return [as_distributions(self.labels, group) for group in grouped]

    def template_names(self) -> list[str]:
        """The question templates (scoring "text": the distribution question)."""
        if self.options.scoring == "text":
            return [self.prompts.distribution]
        return list(self.prompts.questions)

    def explain(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None = None
    ) -> list[str]:
        """A short free-text rationale per utterance (separate requests)."""
        clips = check_batch(batch)
        bodies = []
        for clip, sentence in zip(clips, self._cue_sentences(clips, cues), strict=True):
            question = self.prompts.explain + (f"\n{sentence}" if sentence else "")
            bodies.append(self._body(clip, question, False, self.options.explain_tokens))
        return [_message(reply) for reply in self._post_all(bodies)]

    def cue_phrases(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None = None
    ) -> list[str | None]:
        """The cue phrase of each prompt after the probe (None without cues)."""
        resolved = resolve_cues(batch, cues, self.options.cues)
        return [tokens.text() if tokens and tokens.cues else None for tokens in resolved]

    def _cue_sentences(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None
    ) -> list[str | None]:
        resolved = resolve_cues(batch, cues, self.options.cues)
        return [cue_sentence(self.prompts.cues, tokens) for tokens in resolved]

    def _body(
        self, clip: np.ndarray, question: str, scoring: bool, max_tokens: int = 0
    ) -> dict[str, Any]:
        """One request; `scoring`: one token with its top logprobs, else up to `max_tokens`."""
        window = WINDOW_S * SAMPLE_RATE
        parts = [clip[start : start + window] for start in range(0, clip.shape[0], window)]
        content: list[dict[str, Any]] = [
            {"type": "input_audio", "input_audio": {"data": wav_base64(part), "format": "wav"}}
            for part in parts * self.options.audio_repeats
        ]
        content.append({"type": "text", "text": question})
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.prompts.system},
                {"role": "user", "content": content},
            ],
            "temperature": 0,
        }
        if scoring:
            body |= {"max_tokens": 1, "logprobs": True, "top_logprobs": self.options.top_logprobs}
        else:
            body["max_tokens"] = max_tokens
        return body

    def _post_all(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        workers = max(1, min(len(bodies), self.options.max_batch))
        with ThreadPoolExecutor(workers, thread_name_prefix="alm-http") as pool:
            return list(pool.map(self._post, bodies))

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/chat/completions", json.dumps(body).encode())

    def _served_model(self) -> str:
        reply = self._request("GET", "/models", None)
        try:
            return str(reply["data"][0]["id"])
        except (KeyError, IndexError, TypeError) as err:
            raise ModelError(f"alm: {self._base}/models lists no model; set model_name") from err

    def _request(self, method: str, path: str, data: bytes | None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(
            self._base + path, data=data, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=self.options.timeout_s) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode("utf-8", "replace")
            raise ModelError(f"alm: {self._base}{path}: HTTP {err.code}: {detail}") from err
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            raise ModelError(f"alm: cannot reach ALM server {self._base}: {err}") from err
        except ValueError as err:
            raise ModelError(f"alm: {self._base}{path}: reply is not JSON: {err}") from err
        if not isinstance(reply, dict):
            raise ModelError(f"alm: {self._base}{path}: reply is not a JSON object")
        return reply


def _top(reply: dict[str, Any]) -> list[tuple[str, float]]:
    try:
        entries = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        return [(str(entry["token"]), float(entry["logprob"])) for entry in entries]
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise ModelError(
            "alm: server reply lacks choices[0].logprobs.content[0].top_logprobs "
            "(does it support logprobs?)"
        ) from err


def _message(reply: dict[str, Any]) -> str:
    try:
        return str(reply["choices"][0]["message"]["content"]).strip()
    except (KeyError, IndexError, TypeError) as err:
        raise ModelError("alm: server reply lacks choices[0].message.content") from err
