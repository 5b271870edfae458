"""The Prometheus endpoint and health check, scraped over real HTTP."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import soundfile

from stream_ser.errors import ConfigError, StreamSerError
from stream_ser.metrics import Metrics, MetricsServer
from stream_ser.pipeline import OBSERVER_REFRESH_S, StreamPipeline, run_streams
from stream_ser.publish import JsonlSink
from stream_ser.settings import MetricsSettings
from tests.conftest import run_cli
from tests.test_tail import result

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture
def served() -> Iterator[tuple[Metrics, MetricsServer]]:
    """Metrics served on a free loopback port."""
    metrics = Metrics()
    with metrics.serve("127.0.0.1", 0) as server:
        yield metrics, server


def get(server: MetricsServer, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET path."""
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} parsed with Prometheus' own parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_scrape_after_results_and_counters(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    affect = {"arousal": 0.4, "valence": -0.25}
    metrics.observe_result("room1", result("room1", 1, 0, 2000, latency_ms=30.0, **affect))
    metrics.observe_result("room1", result("room1", 2, 3000, 3500, latency_ms=7.0, lag_ms=250))
    metrics.observe_result("room1", result("room1", 2, 3000, 4000, type="window"), model_s=0.004)
    metrics.observe_result("hall", result("hall", 1, 0, 900) | {"final": False})
    metrics.update_counters("room1", {"utterances": 2, "windows": 1, "windows_dropped": 3})
    metrics.update_counters("hall", {"utterances": 0, "windows_dropped": 0})
    metrics.update_sink_counters({"spool_waiting": 5, "reconnects": 1})

    code, content_type, body = get(server, "/metrics")
    assert code == 200 and content_type.startswith("text/plain")
    values = samples(body)
    room, hall = (("stream", "room1"),), (("stream", "hall"),)
    assert values[("stream_ser_utterances_total", room)] == 2
    assert values[("stream_ser_windows_dropped_total", room)] == 3
    assert values[("stream_ser_windows_dropped_total", hall)] == 0
    assert values[("stream_ser_sink_spool_waiting", ())] == 5  # a level: gauge
    assert values[("stream_ser_sink_reconnects_total", ())] == 1
    utterance_latency = (("stream", "room1"), ("type", "utterance"))
    assert values[("stream_ser_result_latency_seconds_count", utterance_latency)] == 2
    assert values[("stream_ser_result_latency_seconds_sum", utterance_latency)] == (
        pytest.approx(0.037)
    )
    bucket = (("le", "0.01"), ("stream", "room1"), ("type", "utterance"))
    assert values[("stream_ser_result_latency_seconds_bucket", bucket)] == 1
    assert values[("stream_ser_lag_seconds_sum", room)] == pytest.approx(0.25)
    assert values[("stream_ser_model_seconds_count", room)] == 1
    assert values[("stream_ser_utterance_duration_seconds_sum", room)] == pytest.approx(2.5)
    assert values[("stream_ser_arousal", room)] == pytest.approx(0.4)
    assert values[("stream_ser_valence", room)] == pytest.approx(-0.25)
    label = (("label", "calm"), ("stream", "room1"))  # utterance 1's top label
    assert values[("stream_ser_emotions_total", label)] == 1
    assert not any(n == "stream_ser_emotions_total" and ls[1] == hall[0] for n, ls in values)
    assert ("stream_ser_last_result_timestamp_seconds", (*hall, ("type", "utterance"))) in values


def test_health_follows_set_health(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    code, _, body = get(server, "/healthz")
    assert code == 503 and json.loads(body) == {"ok": False, "reason": "starting"}
    metrics.set_health(True, "broker connected")
    code, content_type, body = get(server, "/healthz")
    assert code == 200 and content_type == "application/json"
    assert json.loads(body) == {"ok": True, "reason": "broker connected"}
    assert samples(get(server, "/metrics")[2])[("stream_ser_healthy", ())] == 1
    metrics.set_health(False, "broker unreachable for 30 s")
    assert get(server, "/healthz")[0] == 503
    assert get(server, "/nope")[0] == 404


def test_port_in_use_and_settings_are_reported() -> None:
    metrics = Metrics()
    with (
        metrics.serve("127.0.0.1", 0) as server,
        pytest.raises(StreamSerError, match="cannot listen"),
    ):
        Metrics().serve("127.0.0.1", server.port)
    assert MetricsSettings().port is None and MetricsSettings().host == "127.0.0.1"
    with pytest.raises(ConfigError, match="--metrics-port"):
        MetricsSettings(port=70000)


def test_lag_is_a_gauge_not_a_counter(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    metrics.update_counters("room1", {"lag_ms": 250, "utterances": 2})
    body = get(server, "/metrics")[2]
    types = {family.name: family.type for family in text_string_to_metric_families(body)}
    assert types["stream_ser_lag_ms"] == "gauge"
    assert types["stream_ser_utterances"] == "counter"
    assert "lag_ms_total" not in body


class SteadyStream:
    """A stream that runs until released and counts what the test tells it to."""

    stream_id = "room1"

    def __init__(self) -> None:
        self.utterances = 0
        self.released = asyncio.Event()
        self.started = asyncio.Event()  # the first status (and observation) is out

    def status_counters(self) -> dict[str, int]:
        return {"utterances": self.utterances}

    async def run(self, stop: asyncio.Event) -> None:
        self.started.set()
        await self.released.wait()


@pytest.mark.slow
async def test_counters_are_fresh_between_status_messages() -> None:
    metrics, stream = Metrics(), SteadyStream()
    running = asyncio.create_task(
        run_streams([cast(StreamPipeline, stream)], JsonlSink(), asyncio.Event(), 60.0, metrics)
    )
    try:
        async with asyncio.timeout(10):
            await stream.started.wait()
            assert metrics.snapshot()[0]["room1"]["utterances"] == 0
            stream.utterances = 7  # the next status message is a minute away
            await asyncio.sleep(OBSERVER_REFRESH_S * 2)
            assert metrics.snapshot()[0]["room1"]["utterances"] == 7
    finally:
        stream.released.set()
        async with asyncio.timeout(10):
            await running


def test_metrics_endpoint_is_logged_once(tmp_path: Path, tiny_model: Path) -> None:
    audio = tmp_path / "quiet.wav"
    soundfile.write(audio, np.zeros(8000, dtype=np.float32), 16000)
    done = run_cli("run", "--input", str(audio), "--model", str(tiny_model), "--no-descriptors",
                   "--metrics-port", "0", timeout_s=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("metrics on") == 1, done.stderr
