"""The remote backend against a local fake OpenAI-compatible server (stdlib HTTP, real sockets)."""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
import pytest

from stream_ser import alm
from stream_ser.alm import labels as rules
from stream_ser.alm.openai_remote import OpenAIRemoteBackend, api_base, wav_base64
from stream_ser.alm.prompts import load_generative, question_text
from stream_ser.errors import ConfigError, ModelError
from tests.fakes import fake_openai_alm as fake

from .alm_helpers import LABELS, noise


def _backend(server: Any, **options: Any) -> OpenAIRemoteBackend:
    backend = alm.load(f"openai:{server.url}", LABELS, **options)
    assert isinstance(backend, OpenAIRemoteBackend)
    return backend


def test_api_base() -> None:
    assert api_base("http://h:8000") == "http://h:8000/v1"
    assert api_base("http://h:8000/v1/") == "http://h:8000/v1"
    with pytest.raises(ConfigError):
        api_base("h:8000")


def test_request_shape(fake_server: Any) -> None:
    backend = _backend(fake_server, audio_repeats=2, text_repeats=2, prompt_set="single")
    assert backend.model == fake.MODEL_ID  # discovered through /v1/models
    clip = noise(0.8, 1)
    backend.predict([clip])
    (body,) = fake_server.requests
    assert (body["max_tokens"], body["temperature"], body["logprobs"], body["top_logprobs"]) == (
        1, 0, True, 20)
    parts = body["messages"][1]["content"]
    audio = [fake.decode_wav(p["input_audio"]["data"]) for p in parts if p["type"] == "input_audio"]
    assert len(audio) == 2
    np.testing.assert_allclose(audio[0], clip, atol=1 / 32767 + 1e-7)
    assert parts[-1]["text"].count("neutral, happy, sad or angry") == 2


def test_distribution_from_top_logprobs(fake_server: Any) -> None:
    backend = _backend(fake_server)
    clips = [noise(0.5, 1), noise(1.2, 2), noise(0.3, 3)]
    got = backend.predict(clips)
    prompts = load_generative(None, "default")
    for clip, dist in zip(clips, got, strict=True):
        heard = fake.decode_wav(wav_base64(clip))
        rows = [rules.from_top_logprobs(LABELS, fake.fake_logprobs(
            [heard], question_text(q, LABELS, 1, None))) for q in prompts.questions]
        np.testing.assert_allclose([dist[k] for k in LABELS], np.mean(rows, axis=0), atol=1e-12)
        assert sum(dist.values()) == pytest.approx(1.0)
    assert len(fake_server.requests) == len(clips) * len(prompts.questions)
    assert backend.predict(clips[::-1])[::-1] == got  # concurrency keeps the order


def test_cues_and_explain(fake_server: Any, speech: np.ndarray) -> None:
    backend = _backend(fake_server, cues="conflicting", explain=True, prompt_set="single")
    clip = speech[: 2 * 16000]
    backend.predict([clip])
    assert "Acoustic cues relative to typical adult speech (no history of this speaker yet):" in \
        fake_server.requests[-1]["messages"][1]["content"][-1]["text"]  # no cues given: population
    (text,) = backend.explain([clip])
    assert text == "fake rationale for 1 clip(s)"
    assert "logprobs" not in fake_server.requests[-1]


def test_http_error_is_model_error() -> None:
    with fake.FakeOpenAIServer(fail_status=500) as server:
        backend = _backend(server, model_name="m")
        with pytest.raises(ModelError, match="HTTP 500"):
            backend.predict([noise(0.2, 1)])


def test_unreachable_server_is_model_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ModelError, match="cannot reach"):
        alm.load(f"openai:http://127.0.0.1:{port}", LABELS, timeout_s=2)


def test_text_level_scoring_parses_the_written_answer(fake_server: Any) -> None:
    backend = _backend(fake_server, scoring="text", text_tokens=40)
    clips = [noise(0.6, 4), noise(1.1, 5)]
    got = backend.predict(clips)
    assert len(fake_server.requests) == 2  # one distribution question per clip
    for clip, dist, body in zip(clips, got, fake_server.requests, strict=True):
        assert "logprobs" not in body and body["max_tokens"] == 40
        text = body["messages"][1]["content"][-1]["text"]
        assert text == question_text(backend.prompts.distribution, LABELS, 1, None)
        written = fake.written_distribution([fake.decode_wav(wav_base64(clip))], text)
        np.testing.assert_allclose(list(dist.values()),
                                   list(rules_parse(written).values()), atol=1e-12)
        assert sum(dist.values()) == pytest.approx(1.0)


def rules_parse(text: str) -> dict[str, float]:
    from stream_ser.alm.text_scoring import parse

    return parse(LABELS, text)


async def test_batcher_publishes_cue_baseline_and_template_members(
    fake_server: Any, speech: np.ndarray
) -> None:
    import asyncio

    from stream_ser import acoustics

    backend = _backend(fake_server, cues="aligned", explain=True, max_wait_ms=10)
    clip = speech[: 2 * 16000]
    tokens = acoustics.cue_tokens(acoustics.analyse_functionals(clip))
    async with asyncio.timeout(30), alm.AlmBatcher(backend) as batcher:
        own = await batcher.submit(clip, acoustics.CueTokens(tokens.cues, "speaker"))
        computed = await batcher.submit(clip)  # no cues given: population baseline
    assert (own.cue_baseline, computed.cue_baseline) == ("speaker", "population")
    assert len(own.templates) == len(backend.prompts.questions) == 3
    mean = np.mean([[m[k] for k in LABELS] for m in own.templates], axis=0)
    np.testing.assert_allclose([own.distribution[k] for k in LABELS], mean, atol=1e-12)
    texts = [r["messages"][1]["content"][-1]["text"] for r in fake_server.requests
             if r.get("logprobs")]
    assert sum("this speaker's earlier speech" in t for t in texts) == 3
    assert sum("typical adult speech" in t for t in texts) == 3
