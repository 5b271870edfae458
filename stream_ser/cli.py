"""The `stream-ser` command.

Exit codes: 0 done, 1 a runtime failure (unreadable input, unreachable broker, model
failure), 2 invalid settings or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stream_ser import __version__, evaluate, fusion_eval, plot, send, tail
from stream_ser.alm.base import AlmBackend
from stream_ser.alm.batcher import AlmBatcher
from stream_ser.discovery import discovery_messages
from stream_ser.errors import ConfigError, StreamSerError
from stream_ser.events import AudioChunk
from stream_ser.fusion import FusionConfig, load_fusion
from stream_ser.logs import configure_logging
from stream_ser.messages import StreamInfo
from stream_ser.metrics import Metrics, MetricsSettings
from stream_ser.mqtt import parse_broker_url
from stream_ser.pipeline import (
    Analyzer,
    Recognizer,
    SideSpecialists,
    StreamPipeline,
    UtteranceStages,
    install_stop_handlers,
    new_session_id,
    run_streams,
)
from stream_ser.publish import (
    JsonlSink,
    MqttSink,
    Sink,
    TeeSink,
    default_client_id,
    default_spool_path,
)
from stream_ser.settings import (
    MAX_CLIENT_ID_BYTES,
    MqttSettings,
    Settings,
    SourceSettings,
    add_arguments,
    build_settings,
    check_name,
    split_sources,
)
from stream_ser.source import (
    Damage,
    SourceStats,
    default_stream_id,
    is_recording,
    list_input_devices,
    open_source,
)
from stream_ser.specialist import Specialist, bundled_model_dir
from stream_ser.spool import Spool
from stream_ser.vad import Segmenter
from stream_ser.worker import AudioWorker, RemoteStream

log = logging.getLogger("stream_ser")

EXIT_FAILURE = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `stream-ser` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except (StreamSerError, BaseExceptionGroup) as err:
        error = _first_error(err)
        if error is None:
            raise
        print(f"stream-ser: error: {error}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, ConfigError) else EXIT_FAILURE


def _first_error(err: BaseException) -> StreamSerError | None:
    """The StreamSerError behind `err`, also when a task group wrapped it."""
    if isinstance(err, StreamSerError):
        return err
    if isinstance(err, BaseExceptionGroup):
        for inner in err.exceptions:
            if (found := _first_error(inner)) is not None:
                return found
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-ser", description="Streaming speech emotion recognition."
    )
    parser.add_argument("--version", action="version", version=f"stream-ser {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run", help="recognise a file, stdin or a microphone and publish the results"
    )
    add_arguments(run)
    run.set_defaults(command=_run_command)
    devices = commands.add_parser("devices", help="list audio input devices")
    devices.set_defaults(command=_devices_command)
    scores = commands.add_parser("eval", help="evaluate a model on a labelled manifest of clips")
    evaluate.add_arguments(scores)
    scores.set_defaults(command=evaluate.eval_command)
    calibrate = commands.add_parser(
        "calibrate", help="learn fusion weights and temperatures on a development manifest"
    )
    _calibrate_arguments(calibrate)
    calibrate.set_defaults(command=fusion_eval.calibrate_command)
    plot.register(commands)
    send.register(commands)
    tail.register(commands)
    return parser


def _calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", metavar="DEV.csv", help="development manifest path,label[,...]")
    parser.add_argument("--out", "-o", required=True, metavar="FUSION.toml", help="file to write")
    parser.add_argument("--root", metavar="DIR", help="clip paths are relative to DIR")
    parser.add_argument("--model", metavar="DIR", help="specialist directory (default: bundled)")
    parser.add_argument("--adapt", choices=("auto", "stream", "none"), default="auto",
                        help="speaker adaptation while scoring (as in eval)")  # fmt: skip
    parser.add_argument("--per-class", action="store_true", help="also learn per-class weights")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    fusion_eval.add_source_arguments(parser)


def source_settings(args: argparse.Namespace) -> Settings:
    """The [alm] and [fusion] settings of `eval` and `calibrate`."""
    return build_settings(args)


def load_recognizers(
    settings: Settings, model: str | None, extras: Sequence[str], threads: int = 1
) -> tuple[fusion_eval.Recognizers, FusionConfig]:
    """The specialist, further specialists and ALM that `eval`/`calibrate` run, and the base
    fusion settings (the fusion file's, or defaults on the specialist's labels)."""
    specialist = _load_specialist(model, threads)
    fusion = _fusion_config(settings, specialist.labels)
    recognizers = fusion_eval.Recognizers(
        specialist,
        [_load_specialist(path, threads) for path in extras],
        _load_alm(settings, fusion.labels),
        settings.alm.max_batch,
    )
    return recognizers, fusion


def _load_specialist(
    path: str | None, threads: int = 1, settings: Settings | None = None
) -> Specialist:
    model_dir = Path(path) if path else bundled_model_dir()
    if not model_dir.is_dir():
        raise ConfigError(f"--model: no such model directory: {model_dir}")
    if settings is None:
        return Specialist(model_dir, intra_op_threads=threads)
    model = settings.model
    return Specialist(model_dir, model.providers, model.intra_op_threads, model.inter_op_threads)


def _run_command(args: argparse.Namespace) -> int:
    per_source = [build_settings(variant) for variant in split_sources(args)]
    settings = per_source[0]
    configure_logging(settings.output.log_level, settings.output.log_json)
    for note in dict.fromkeys(n for s in per_source for n in ineffective_settings(s)):
        log.warning("%s", note)
    sources = [s.source for s in per_source if s.source.input or s.source.mic]
    if not sources and not settings.source.mqtt_audio:
        raise ConfigError(
            "no audio source: give --input FILE, --input -, --mic [DEVICE] or --mqtt-audio"
        )
    if any(source.input is not None and source.mic is not None for source in sources):
        raise ConfigError("a source is either --input or --mic, not both")
    if [source.input for source in sources].count("-") > 1:
        raise ConfigError("stdin (--input -) can be read only once")
    if settings.source.mqtt_audio and settings.mqtt.url is None:
        raise ConfigError("--mqtt-audio needs --mqtt URL")
    specialist = _load_specialist(settings.model.path, settings.model.intra_op_threads, settings)
    stream_ids = _unique([default_stream_id(source) for source in sources])
    only = stream_ids[0] if len(stream_ids) == 1 and not settings.source.mqtt_audio else "worker"
    client_id = settings.mqtt.client_id or default_client_id(only)
    check_name("--mqtt-client-id", client_id, MAX_CLIENT_ID_BYTES)  # the default's length
    sink = _make_sink(settings, client_id, stream_ids)
    damage = Damage()
    asyncio.run(_run(settings, sources, stream_ids, specialist, sink, client_id, damage))
    damage.check()  # a damaged file's error, once the audio before the damage is published
    return 0


def ineffective_settings(settings: Settings) -> list[str]:
    """Warnings for `run` settings that do nothing in this combination (they are not errors:
    a shared TOML file may set them for other runs)."""
    source, notes = settings.source, []
    if source.input != "-" and (source.rate, source.channels) != (16000, 1):
        notes.append("--rate/--channels describe raw PCM on stdin (--input -) only: ignored")
    if source.realtime and source.mic is not None:
        notes.append("--realtime paces a file; a microphone is live already: ignored")
    if settings.mqtt.url is None and replace(settings.mqtt, url=None) != MqttSettings():
        notes.append("--mqtt-* settings do nothing without --mqtt URL: ignored")
    if settings.metrics.port is None and settings.metrics != MetricsSettings():
        notes.append("--metrics-host does nothing without --metrics-port: ignored")
    return notes


def _unique(stream_ids: list[str]) -> list[str]:
    """mic, mic-2, mic-3 ... when several sources would share an id."""
    seen: dict[str, int] = {}
    unique = []
    for stream_id in stream_ids:
        seen[stream_id] = seen.get(stream_id, 0) + 1
        unique.append(stream_id if seen[stream_id] == 1 else f"{stream_id}-{seen[stream_id]}")
    return unique


def _make_sink(settings: Settings, client_id: str, stream_ids: list[str]) -> Sink:
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


def _fusion_config(settings: Settings, labels: tuple[str, ...]) -> FusionConfig:
    """The fusion file (if any) with the flags' overrides; labels default to the specialist's."""
    fusion = settings.fusion
    config = load_fusion(Path(fusion.file), labels) if fusion.file else FusionConfig(labels)
    overrides: dict[str, Any] = {}
    if fusion.rule is not None:
        overrides["rule"] = fusion.rule
    if fusion.deadline_ms is not None:
        overrides["deadline_ms"] = fusion.deadline_ms
    return replace(config, **overrides)


def _load_alm(settings: Settings, labels: tuple[str, ...]) -> AlmBackend | None:
    """The ALM backend named by --alm, loaded now so a bad path fails at start-up."""
    if settings.alm.spec is None:
        return None
    from stream_ser import alm

    log.info("loading ALM %s", settings.alm.spec)
    return alm.load(settings.alm.spec, labels, settings.alm.options())


@dataclass
class _Shared:
    """What every stream of the process shares."""

    settings: Settings
    specialist: Specialist
    recognizer: Recognizer
    stages: UtteranceStages
    sink: Sink
    session_id: str
    observer: Metrics | None = None

    def pipeline(self, stream_id: str, source: AsyncIterator[AudioChunk],
                 stats: SourceStats, lossless: bool = False,
                 session_id: str | None = None) -> StreamPipeline:  # fmt: skip
        """A new stream's pipeline (`lossless`: its source waits for it, see StreamPipeline;
        `session_id`: the nonce in its message ids, the process's by default)."""
        card = self.specialist.card
        model = self.settings.model
        session = session_id or self.session_id
        return StreamPipeline(
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
            lossless=lossless,
        )


async def _run(  # noqa: PLR0917  (the composition root moves out of the CLI, issue #16)
    settings: Settings,
    sources: list[SourceSettings],
    stream_ids: list[str],
    specialist: Specialist,
    sink: Sink,
    client_id: str,
    damage: Damage,
) -> None:
    fusion = _fusion_config(settings, specialist.labels)
    backend = _load_alm(settings, fusion.labels)
    stop = asyncio.Event()
    install_stop_handlers(stop)
    # the ALM's cue tokens need the analyzer too: --no-descriptors must not change the cues
    needs_cues = backend is not None and backend.kind != "clap" and settings.alm.cues != "none"
    analyzer = Analyzer() if settings.output.descriptors or needs_cues else None
    side = None
    if settings.model.extra:
        side = SideSpecialists([_load_specialist(path) for path in settings.model.extra])
    async with contextlib.AsyncExitStack() as stack:
        recognizer = await stack.enter_async_context(
            Recognizer(specialist, settings.output.max_pending_windows)
        )
        alm_stage = None
        if backend is not None:
            alm_stage = await stack.enter_async_context(AlmBatcher(backend))
            # every final result is out when the streams end: answers still pending are moot
            stack.push_async_callback(alm_stage.close, False)
        stages = UtteranceStages(fusion, analyzer, alm_stage, side, settings.output.descriptors)
        metrics = await _serve_metrics(settings, stack)
        shared = _Shared(settings, specialist, recognizer, stages, sink, new_session_id(), metrics)
        streams = []
        for source, stream_id in zip(sources, stream_ids, strict=True):
            stats = SourceStats()
            streams.append(
                shared.pipeline(
                    stream_id, open_source(source, stats, damage), stats, is_recording(source)
                )
            )
        async with sink:
            announcer = Announcer(settings, sink, client_id)
            for stream_id in stream_ids:
                await announcer.announce(stream_id, socket.gethostname())
            await _run_all(settings, shared, streams, stop, client_id, announcer)
    for stage in (analyzer, side):
        if stage is not None:
            stage.close()
    for stream in streams:
        counters = stream.counters
        log.info(
            "%s done: %d utterance(s), %d window(s), %d window(s) dropped, %d model error(s)",
            stream.stream_id, counters.utterances, counters.windows, counters.windows_dropped,
            counters.model_errors,
        )  # fmt: skip


async def _run_all(
    settings: Settings,
    shared: _Shared,
    streams: list[StreamPipeline],
    stop: asyncio.Event,
    client_id: str,
    announcer: Announcer,
) -> None:
    """The local streams, and the remote ones a worker claims (--mqtt-audio), to the end."""
    interval = settings.mqtt.status_interval_s
    if not settings.source.mqtt_audio:
        await run_streams(streams, shared.sink, stop, interval, shared.observer)
        return
    assert settings.mqtt.url is not None

    def remote_pipeline(remote: RemoteStream) -> StreamPipeline:
        # each device session gets its own nonce: a device that streams again to this worker
        # starts counting utterances from 1, and its message ids must still be new
        pipeline = shared.pipeline(remote.stream_id, remote.chunks(), remote.source_stats,
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
    arriving = announcer.remote(worker.streams())
    async with asyncio.TaskGroup() as group:
        group.create_task(worker.run(stop), name="audio-worker")
        remote = run_streams(
            streams, shared.sink, stop, interval, shared.observer, arriving, worker.counters
        )
        group.create_task(remote, name="streams")


async def _serve_metrics(settings: Settings, stack: contextlib.AsyncExitStack) -> Metrics | None:
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


def _devices_command(args: argparse.Namespace) -> int:
    del args
    devices = list_input_devices()
    if not devices:
        print("no audio input devices found", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{'index':>5}  {'channels':>8}  {'rate':>6}  {'host API':<12}  name")
    for device in devices:
        print(
            f"{device['index']:>5}  {device['channels']:>8}  {device['default_rate']:>6}  "
            f"{device['host_api']:<12}  {device['name']}"
        )
    return 0
