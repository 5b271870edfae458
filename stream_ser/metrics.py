"""Prometheus metrics and a health check, served over HTTP from a background thread.

    GET /metrics   Prometheus text format (needs prometheus-client: the `metrics` extra)
    GET /healthz   200 `{"ok": true, ...}` while healthy, 503 `{"ok": false, "reason": ...}`

The pipeline reports to a `Metrics` object; the HTTP thread only reads it:

    observe_result(stream_id, message)    each published result -> histograms, gauges
    update_counters(stream_id, counters)  a stream's cumulative counters (the status ones)
    update_sink_counters(counters)        the sink's counters (spool, reconnects, ...)
    set_health(ok, reason)                what /healthz answers

Exported (label `stream` on all per-stream series; times in seconds, as Prometheus prefers):
    stream_ser_<counter>_total{stream}                   each counter of `update_counters`
                                                         (`stream_ser_lag_ms{stream}`: a gauge)
    stream_ser_sink_<counter>_total                      each sink counter (gauges for
                                                         `spool_waiting`)

The pipeline pushes counters every second (pipeline.OBSERVER_REFRESH_S), not only with
the status message, so a scrape between two status messages is current.
    stream_ser_result_latency_seconds{stream,type}       histogram of `latency_ms`
    stream_ser_model_seconds{stream}                     histogram of model time
    stream_ser_lag_seconds{stream}                       histogram of lag behind the audio
    stream_ser_utterance_duration_seconds{stream}        histogram of end_ms - start_ms
    stream_ser_emotions_total{stream,label}              final utterances by top label
    stream_ser_arousal{stream}, stream_ser_valence{stream}  of the last final utterance
    stream_ser_last_result_timestamp_seconds{stream,type}
    stream_ser_healthy                                   1 healthy, 0 not
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from stream_ser.errors import ConfigError, StreamSerError
from stream_ser.plot import read_affect

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'stream-ser[metrics]'"
NAMESPACE = "stream_ser"
MAX_PORT = 65535
# levels, not running totals
GAUGE_COUNTERS = frozenset({"spool_waiting", "lag_ms", "hub_subscribers", "ws_connections"})
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAG_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
DURATION_BUCKETS_S = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 30.0, 60.0)


def import_prometheus() -> Any:
    """The prometheus_client module, or ConfigError with the install hint."""
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError as err:
        raise ConfigError(f"metrics need prometheus-client: {INSTALL_HINT}") from err
    return prometheus_client


class Metrics:
    """Per-stream metrics in a registry of their own, plus the health state."""

    def __init__(self) -> None:
        prometheus = import_prometheus()
        self._prometheus = prometheus
        self.registry = prometheus.CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._stream_counters: dict[str, dict[str, float]] = {}
        self._sink_counters: dict[str, float] = {}
        self._health: tuple[bool, str] = (False, "starting")
        self.registry.register(_CounterSnapshot(self, prometheus.core))
        self._define_series(prometheus)

    def _define_series(self, prometheus: Any) -> None:
        histogram, gauge, counter = prometheus.Histogram, prometheus.Gauge, prometheus.Counter
        r, ns = self.registry, NAMESPACE
        self._latency = histogram(
            "result_latency_seconds", "Audio complete to result ready (latency_ms)",
            ["stream", "type"], namespace=ns, registry=r, buckets=LATENCY_BUCKETS_S,
        )  # fmt: skip
        self._model = histogram(
            "model_seconds", "Model inference time per result", ["stream"],
            namespace=ns, registry=r, buckets=LATENCY_BUCKETS_S,
        )  # fmt: skip
        self._lag = histogram(
            "lag_seconds", "How far results trail the audio", ["stream"],
            namespace=ns, registry=r, buckets=LAG_BUCKETS_S,
        )  # fmt: skip
        self._duration = histogram(
            "utterance_duration_seconds", "Length of final utterances", ["stream"],
            namespace=ns, registry=r, buckets=DURATION_BUCKETS_S,
        )  # fmt: skip
        self._emotions = counter(
            "emotions", "Final utterances by top label", ["stream", "label"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self._arousal = gauge(
            "arousal", "Arousal of the last final utterance (-1..1)", ["stream"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self._valence = gauge(
            "valence", "Valence of the last final utterance (-1..1)", ["stream"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self._last = gauge(
            "last_result_timestamp_seconds", "Unix time of the last result", ["stream", "type"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self._healthy = gauge("healthy", "1 while healthy, else 0", namespace=ns, registry=r)

    def observe_result(
        self,
        stream_id: str,
        message: Mapping[str, Any],
        *,
        model_s: float | None = None,
        lag_s: float | None = None,
    ) -> None:
        """Record one published result (schema 1; optional fields are read when present).

        Model time and lag come from the arguments, else from `model_ms`/`lag_ms` fields.
        """
        kind = str(message.get("type", "unknown"))
        if isinstance(latency_ms := message.get("latency_ms"), int | float):
            self._latency.labels(stream_id, kind).observe(max(0.0, latency_ms / 1000))
        if (model := _seconds(model_s, message.get("model_ms"))) is not None:
            self._model.labels(stream_id).observe(model)
        if (lag := _seconds(lag_s, message.get("lag_ms"))) is not None:
            self._lag.labels(stream_id).observe(lag)
        self._last.labels(stream_id, kind).set_to_current_time()
        if message.get("final", kind == "utterance") is True and kind == "utterance":
            self._observe_final(stream_id, message)

    def _observe_final(self, stream_id: str, message: Mapping[str, Any]) -> None:
        if isinstance(label := message.get("top_label"), str):
            self._emotions.labels(stream_id, label).inc()
        start, end = message.get("start_ms"), message.get("end_ms")
        if isinstance(start, int | float) and isinstance(end, int | float) and end >= start:
            self._duration.labels(stream_id).observe((end - start) / 1000)
        affect = read_affect(message)
        if affect is not None:
            self._arousal.labels(stream_id).set(affect[0])
            self._valence.labels(stream_id).set(affect[1])

    def update_counters(self, stream_id: str, counters: Mapping[str, int | float]) -> None:
        """Replace a stream's cumulative counters (as in the status message's per_stream)."""
        numbers = _numbers(counters)
        with self._lock:
            self._stream_counters[stream_id] = numbers

    def update_sink_counters(self, counters: Mapping[str, int | float]) -> None:
        """Replace the sink's counters (`Sink.counters()`: spool, reconnects, denials)."""
        numbers = _numbers(counters)
        with self._lock:
            self._sink_counters = numbers

    def set_health(self, ok: bool, reason: str = "") -> None:
        """What /healthz answers: 200 if `ok`, else 503; `reason` is shown either way."""
        with self._lock:
            self._health = (ok, reason)
        self._healthy.set(1 if ok else 0)

    def health(self) -> tuple[bool, str]:
        """(ok, reason) as last set; (False, 'starting') before the first call."""
        with self._lock:
            return self._health

    def snapshot(self) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """(per-stream counters, sink counters), copied."""
        with self._lock:
            return dict(self._stream_counters), dict(self._sink_counters)

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format."""
        return bytes(self._prometheus.generate_latest(self.registry))

    @property
    def content_type(self) -> str:
        """The Content-Type of `exposition()`."""
        return str(self._prometheus.CONTENT_TYPE_LATEST)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
        """Start serving /metrics and /healthz in a thread; close the server to stop."""
        return MetricsServer(self, host, port)


def _seconds(explicit_s: float | None, field_ms: Any) -> float | None:
    if explicit_s is not None:
        return max(0.0, explicit_s)
    if isinstance(field_ms, int | float) and not isinstance(field_ms, bool):
        return max(0.0, field_ms / 1000)
    return None


def _numbers(counters: Mapping[str, Any]) -> dict[str, float]:
    return {
        name: float(value)
        for name, value in counters.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def _metric_name(name: str) -> str:
    """A counter name made safe for Prometheus (letters, digits and `_`)."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)


class _CounterSnapshot:
    """A collector exporting the latest counter snapshots (they are totals kept elsewhere)."""

    def __init__(self, metrics: Metrics, core: Any) -> None:
        self._metrics = metrics
        self._core = core  # prometheus_client.core, imported lazily

    def describe(self) -> list[Any]:
        """Nothing fixed: the counter names come from the pipeline."""
        return []

    def collect(self) -> Iterator[Any]:
        """One family per counter name."""
        core = self._core
        per_stream, sink = self._metrics.snapshot()
        names = sorted({name for counters in per_stream.values() for name in counters})
        for name in names:
            family = _family(core, f"{NAMESPACE}_{_metric_name(name)}", name, ["stream"])
            for stream_id, counters in sorted(per_stream.items()):
                if name in counters:
                    family.add_metric([stream_id], counters[name])
            yield family
        for name, value in sorted(sink.items()):
            family = _family(core, f"{NAMESPACE}_sink_{_metric_name(name)}", name, [])
            family.add_metric([], value)
            yield family


def _family(core: Any, metric: str, name: str, labels: list[str]) -> Any:
    kind = core.GaugeMetricFamily if name in GAUGE_COUNTERS else core.CounterMetricFamily
    return kind(metric, f"stream-ser counter {name}", labels=labels)


class MetricsServer:
    """A tiny threaded HTTP server for /metrics and /healthz."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        handler = type("Handler", (_Handler,), {"metrics": metrics})
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as err:
            raise StreamSerError(
                f"--metrics-port: cannot listen on {host}:{port}: {err.strerror}"
            ) from err
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="metrics-http", daemon=True
        )  # polls for shutdown every 0.1 s
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics, health on /healthz", host, self.port)

    def close(self) -> None:
        """Stop serving and wait for the thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics

    def do_GET(self) -> None:
        """Answer /metrics, /healthz, or 404."""
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, self.metrics.content_type, self.metrics.exposition())
        elif path == "/healthz":
            ok, reason = self.metrics.health()
            body = json.dumps({"ok": ok, "reason": reason}).encode()
            self._reply(200 if ok else 503, "application/json", body)
        else:
            self._reply(404, "text/plain; charset=utf-8", b"try /metrics or /healthz\n")

    def _reply(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests go to the debug log, not stderr."""
        log.debug("metrics http: " + format, *args)
