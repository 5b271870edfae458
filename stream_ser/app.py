"""The composition root: the runtime built from settings (models, stages, sink, streams).

`stream-ser run` (cli.py), `eval` and `calibrate` (eval_commands.py), the benchmarks and the
tests build what they run here; no command imports cli.py.

    async with open_runtime(settings, specialist, sink) as runtime:
        streams = [runtime.pipeline(stream_id, source, stats, lossless) for ...]
        await run_streams(streams, sink, stop)

Registering an utterance stage is one line in `build_stages`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stream_ser import backpressure
from stream_ser.alm.base import AlmBackend
from stream_ser.alm.batcher import AlmBatcher
from stream_ser.arrivals import Arrivals, merge
from stream_ser.discovery import discovery_messages
from stream_ser.errors import ConfigError
from stream_ser.events import AudioChunk
from stream_ser.fusion import FusionConfig, load_fusion
from stream_ser.fusion_eval import Recognizers
from stream_ser.hub import ResultHub
from stream_ser.messages import StreamInfo
from stream_ser.metrics import Metrics
from stream_ser.mqtt import parse_broker_url
from stream_ser.pipeline import StreamPipeline, new_session_id, run_streams
from stream_ser.publish import JsonlSink, MqttSink, Sink, TeeSink, default_spool_path
from stream_ser.recognizer import Recognizer
from stream_ser.settings import MAX_STREAM_ID_BYTES, Settings, SourceSettings, check_name
from stream_ser.source import Damage, SourceStats, is_recording, open_source
from stream_ser.specialist import Specialist, bundled_model_dir
from stream_ser.spool import Spool
from stream_ser.stages import (
    AlmStage,
    Analyzer,
    DescriptorsStage,
    SideSpecialists,
    SideStage,
    UtteranceStage,
    UtteranceStages,
)
from stream_ser.stopping import install_stop_handlers
from stream_ser.vad import Segmenter
from stream_ser.worker import AudioWorker, RemoteStream

log = logging.getLogger("stream_ser")


# --------------------------------------------------------------------------- models


def load_specialist(
    path: str | None, threads: int = 1, settings: Settings | None = None
) -> Specialist:
    """The specialist in `path` (None: the bundled one), with the [model] session settings."""
    model_dir = Path(path) if path else bundled_model_dir()
    if not model_dir.is_dir():
        raise ConfigError(f"--model: no such model directory: {model_dir}")
    if settings is None:
        return Specialist(model_dir, intra_op_threads=threads)
    model = settings.model
    return Specialist(model_dir, model.providers, model.intra_op_threads, model.inter_op_threads)


def fusion_config(settings: Settings, labels: tuple[str, ...]) -> FusionConfig:
    """The fusion file (if any) with the flags' overrides; labels default to the specialist's."""
    fusion = settings.fusion
    config = load_fusion(Path(fusion.file), labels) if fusion.file else FusionConfig(labels)
    overrides: dict[str, Any] = {}
    if fusion.rule is not None:
        overrides["rule"] = fusion.rule
    if fusion.deadline_ms is not None:
        overrides["deadline_ms"] = fusion.deadline_ms
    return replace(config, **overrides)


def load_alm(settings: Settings, labels: tuple[str, ...]) -> AlmBackend | None:
    """The ALM backend named by --alm, loaded now so a bad path fails at start-up."""
    if settings.alm.spec is None:
        return None
    from stream_ser import alm

    log.info("loading ALM %s", settings.alm.spec)
    return alm.load(settings.alm.spec, labels, settings.alm.options())


def load_recognizers(
    settings: Settings, model: str | None, extras: Sequence[str], threads: int = 1
) -> tuple[Recognizers, FusionConfig]:
    """The specialist, further specialists and ALM that `eval`/`calibrate` run, and the base
    fusion settings (the fusion file's, or defaults on the specialist's labels)."""
    specialist = load_specialist(model, threads)
    fusion = fusion_config(settings, specialist.labels)
    recognizers = Recognizers(
        specialist,
        [load_specialist(path, threads) for path in extras],
        load_alm(settings, fusion.labels),
        settings.alm.max_batch,
    )
    return recognizers, fusion


def build_stages(
    settings: Settings, fusion: FusionConfig, backend: AlmBackend | None
) -> UtteranceStages:
    """The utterance stages the settings ask for; the order is the final message's."""
    stages: list[UtteranceStage] = []
    if settings.model.extra:
        extra = [load_specialist(path) for path in settings.model.extra]
        stages.append(SideStage(SideSpecialists(extra)))
    if backend is not None:
        stages.append(AlmStage(AlmBatcher(backend)))
    # the ALM's cue tokens need the analyzer too: --no-descriptors must not change the cues
    needs_cues = backend is not None and backend.kind != "clap" and settings.alm.cues != "none"
    if settings.output.descriptors or needs_cues:
        stages.append(DescriptorsStage(Analyzer(), publish=settings.output.descriptors))
    return UtteranceStages(fusion, stages)


# --------------------------------------------------------------------------- sink


def make_sink(settings: Settings, client_id: str, stream_ids: list[str]) -> Sink:
    """MQTT through the spool (with JSON Lines too if asked), or JSON Lines on stdout."""
    if settings.mqtt.url is None:
        return JsonlSink()
    spool_path = (
        Path(settings.mqtt.spool_dir) / f"{client_id}.sqlite3"
        if settings.mqtt.spool_dir
        else default_spool_path(client_id)
    )
    mqtt = settings.mqtt
    max_bytes = round(mqtt.spool_max_mb * 2**20)
    spool = Spool(spool_path, mqtt.spool_max_messages, mqtt.spool_hard_limit, max_bytes)
    sink = MqttSink(settings.mqtt, client_id, stream_ids, spool)
    return TeeSink(sink, JsonlSink()) if settings.output.jsonl else sink


# --------------------------------------------------------------------------- runtime


@dataclass
class Runtime:
    """What every stream of the process shares."""

    settings: Settings
    specialist: Specialist
    recognizer: Recognizer
    stages: UtteranceStages
    sink: Sink
    session_id: str
    observer: Metrics | None = None
    arrivals: Arrivals = field(default_factory=Arrivals)
    """Streams started while it runs (`start`); `run_streams(..., arriving=...)` runs them."""

    def start(self, stream_id: str, source: AsyncIterator[AudioChunk],
              stats: SourceStats, lossless: bool = False) -> StreamPipeline:  # fmt: skip
        """Start a new stream on the running runtime (a WebSocket client, a Pipecat pipeline,
        Python code): its pipeline, already handed to the runtime; await `.finished` for its
        end. ConfigError for an invalid id, StreamIdInUse if a live stream has it,
        RuntimeClosed while shutting down. Each gets its own session nonce (message ids)."""
        check_name("stream_id", stream_id, MAX_STREAM_ID_BYTES)
        self.arrivals.check_free(stream_id)
        pipeline = self.pipeline(stream_id, source, stats, lossless, new_session_id())
        self.arrivals.add(pipeline)
        return pipeline

    def pipeline(self, stream_id: str, source: AsyncIterator[AudioChunk],
                 stats: SourceStats, lossless: bool = False,
                 session_id: str | None = None) -> StreamPipeline:  # fmt: skip
        """A new stream's pipeline (`lossless`: its source waits for it, see backpressure;
        `session_id`: the nonce in its message ids, the process's by default)."""
        card = self.specialist.card
        session = session_id or self.session_id
        model = self.settings.model
        policy = backpressure.for_stream(
            lossless, self.stages.fusion.deadline_ms, self.recognizer.max_pending_windows
        )
        pipeline = StreamPipeline(
            stream=StreamInfo(stream_id, session, card.model_id, card.labels),
            source=source,
            segmenter=Segmenter(self.settings.vad),
            recognizer=self.recognizer,
            sink=self.sink,
            window_ms=model.window_ms or card.window_ms,
            hop_ms=model.hop_ms or card.hop_ms,
            stages=self.stages,
            windows=model.windows,
            source_stats=stats,
            observer=self.observer,
            backpressure=policy,
        )
        self.arrivals.track(pipeline)  # its id is live until it has run (see `start`)
        return pipeline


@contextlib.asynccontextmanager
async def open_runtime(
    settings: Settings, specialist: Specialist, sink: Sink, observer: Metrics | None = None
) -> AsyncIterator[Runtime]:
    """The shared Recognizer and utterance stages, running until the block ends."""
    fusion = fusion_config(settings, specialist.labels)
    stages = build_stages(settings, fusion, load_alm(settings, fusion.labels))
    async with contextlib.AsyncExitStack() as stack:
        recognizer = await stack.enter_async_context(
            Recognizer(specialist, settings.output.max_pending_windows)
        )
        for stage in stages.stages:
            await stack.enter_async_context(stage)
        yield Runtime(settings, specialist, recognizer, stages, sink, new_session_id(), observer)


async def run(
    settings: Settings,
    sources: list[SourceSettings],
    stream_ids: list[str],
    specialist: Specialist,
    sink: Sink,
    client_id: str,
    *,
    damage: Damage | None = None,
) -> None:
    """`stream-ser run`: every source (and remote devices) to the end, or until a signal
    (`damage` collects a damaged file's error; the caller raises it afterwards)."""
    stop = asyncio.Event()
    install_stop_handlers(stop)
    hub = ResultHub() if settings.http.address else None  # what the WebSocket clients read
    sink = TeeSink(sink, hub) if hub is not None else sink
    async with contextlib.AsyncExitStack() as stack:
        metrics = serve_metrics(settings, stack)
        runtime = await stack.enter_async_context(open_runtime(settings, specialist, sink, metrics))
        streams = []
        for source, stream_id in zip(sources, stream_ids, strict=True):
            stats = SourceStats()
            streams.append(
                runtime.pipeline(
                    stream_id, open_source(source, stats, damage), stats, is_recording(source)
                )
            )
        async with sink:
            announcer = Announcer(settings, sink, client_id)
            for stream_id in stream_ids:
                await announcer.announce(stream_id, socket.gethostname())
            async with accept_streams(runtime, hub, stop):
                await run_all(runtime, streams, stop, client_id, announcer)
    for stream in streams:
        counters = stream.counters
        log.info(
            "%s done: %d utterance(s), %d window(s), %d window(s) dropped, %d model error(s)",
            stream.stream_id, counters.utterances, counters.windows, counters.windows_dropped,
            counters.model_errors,
        )  # fmt: skip


async def run_all(
    runtime: Runtime,
    streams: list[StreamPipeline],
    stop: asyncio.Event,
    client_id: str,
    announcer: Announcer,
) -> None:
    """The local streams, and the remote ones a worker claims (--mqtt-audio), to the end."""
    settings = runtime.settings
    interval = settings.mqtt.status_interval_s
    if not settings.source.mqtt_audio:
        arriving = announcer.remote(aiter(runtime.arrivals))
        await run_streams(streams, runtime.sink, stop, interval, runtime.observer, arriving)
        return
    assert settings.mqtt.url is not None

    def remote_pipeline(remote: RemoteStream) -> StreamPipeline:
        # each device session gets its own nonce: a device that streams again to this worker
        # starts counting utterances from 1, and its message ids must still be new
        pipeline = runtime.pipeline(remote.stream_id, remote.chunks(), remote.source_stats,
                                    session_id=new_session_id())  # fmt: skip
        pipeline.more_counters = remote.counters
        return pipeline

    worker = AudioWorker(
        settings.mqtt,
        parse_broker_url(settings.mqtt.url, settings.mqtt.password_file, settings.mqtt.username),
        client_id,
        settings.source.mqtt_audio_group,
        remote_pipeline,
        settings.source.mqtt_audio_max_streams,
    )
    arriving = announcer.remote(merge([worker.streams(), aiter(runtime.arrivals)]))
    async with asyncio.TaskGroup() as group:
        group.create_task(worker.run(stop), name="audio-worker")
        remote = run_streams(
            streams, runtime.sink, stop, interval, runtime.observer, arriving, worker.counters
        )
        group.create_task(remote, name="streams")


@contextlib.asynccontextmanager
async def accept_streams(
    runtime: Runtime, hub: ResultHub | None, stop: asyncio.Event
) -> AsyncIterator[None]:
    """With --http (`hub`): the web server starts streams on the runtime until `stop` (the
    run lasts until then). Without: nothing else starts streams; the run ends with its sources."""
    if hub is None:
        runtime.arrivals.close()
        yield
        return
    from stream_ser.web.server import serve

    async with serve(runtime.settings.http, runtime, hub, stop):
        yield


def serve_metrics(settings: Settings, stack: contextlib.AsyncExitStack) -> Metrics | None:
    """The Prometheus endpoint, when --metrics-port is given."""
    if settings.metrics.port is None:
        return None
    metrics = Metrics()
    stack.enter_context(metrics.serve(settings.metrics.host, settings.metrics.port))
    return metrics


class Announcer:
    """Home Assistant discovery configs, retained, for each stream (with --ha-discovery).

    Entities are available while the status of `client_id` (the process that publishes
    the stream's results) is online.
    """

    def __init__(self, settings: Settings, sink: Sink, client_id: str) -> None:
        self._settings = settings
        self._sink = sink
        self._status_topic = f"{settings.mqtt.topic_prefix}/status/{client_id}"
        self._announced: set[str] = set()

    async def announce(self, stream_id: str, host: str | None) -> None:
        """A stream's configs, once per process (`host` for a local stream, see node_id)."""
        ha = self._settings.ha
        if not ha.discovery or self._settings.mqtt.url is None or stream_id in self._announced:
            return
        self._announced.add(stream_id)
        for topic, payload in discovery_messages(
            self._settings.mqtt.topic_prefix, stream_id, self._status_topic,
            ha.discovery_prefix, ha.device_name, host,
        ):  # fmt: skip
            await self._sink.announce(topic, payload)

    async def remote(
        self, arrivals: AsyncIterator[StreamPipeline]
    ) -> AsyncIterator[StreamPipeline]:
        """The streams a worker claims, each announced before it runs."""
        async for stream in arrivals:
            await self.announce(stream.stream_id, None)
            yield stream
