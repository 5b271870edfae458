"""The `stream-ser` command.

Exit codes: 0 done, 1 a runtime failure (unreadable input, unreachable broker, model
failure), 2 invalid settings or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace

from stream_ser import __version__, app, eval_commands, plot, send, tail
from stream_ser.errors import ConfigError, StreamSerError
from stream_ser.logs import configure_logging
from stream_ser.publish import default_client_id
from stream_ser.settings import (
    MAX_CLIENT_ID_BYTES,
    MetricsSettings,
    MqttSettings,
    Settings,
    add_arguments,
    build_settings,
    check_name,
    split_sources,
)
from stream_ser.source import Damage, default_stream_id, list_input_devices
from stream_ser.web import require_aiohttp
from stream_ser.web.options import HttpSettings

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
    eval_commands.add_eval_arguments(scores)
    scores.set_defaults(command=eval_commands.eval_command)
    calibrate = commands.add_parser(
        "calibrate", help="learn fusion weights and temperatures on a development manifest"
    )
    eval_commands.add_calibrate_arguments(calibrate)
    calibrate.set_defaults(command=eval_commands.calibrate_command)
    plot.register(commands)
    send.register(commands)
    tail.register(commands)
    return parser


def _run_command(args: argparse.Namespace) -> int:
    per_source = [build_settings(variant) for variant in split_sources(args)]
    settings = per_source[0]
    configure_logging(settings.output.log_level, settings.output.log_json)
    for note in dict.fromkeys(n for s in per_source for n in ineffective_settings(s)):
        log.warning("%s", note)
    sources = [s.source for s in per_source if s.source.input or s.source.mic]
    if not sources and not settings.source.mqtt_audio and not settings.http.address:
        raise ConfigError(
            "no audio source: give --input FILE, --input -, --mic [DEVICE], --mqtt-audio"
            " or --http ADDRESS"
        )
    if settings.http.address:
        require_aiohttp()
    if any(source.input is not None and source.mic is not None for source in sources):
        raise ConfigError("a source is either --input or --mic, not both")
    if [source.input for source in sources].count("-") > 1:
        raise ConfigError("stdin (--input -) can be read only once")
    if settings.source.mqtt_audio and settings.mqtt.url is None:
        raise ConfigError("--mqtt-audio needs --mqtt URL")
    specialist = app.load_specialist(settings.model.path, settings.model.intra_op_threads, settings)
    stream_ids = _unique([default_stream_id(source) for source in sources])
    only = stream_ids[0] if len(stream_ids) == 1 and not settings.source.mqtt_audio else "worker"
    client_id = settings.mqtt.client_id or default_client_id(only)
    check_name("--mqtt-client-id", client_id, MAX_CLIENT_ID_BYTES)  # the default's length
    sink = app.make_sink(settings, client_id, stream_ids)
    damage = Damage()
    asyncio.run(app.run(settings, sources, stream_ids, specialist, sink, client_id, damage=damage))
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
    if settings.http.address is None and settings.http != HttpSettings():
        notes.append("--http-* settings do nothing without --http ADDRESS: ignored")
    return notes


def _unique(stream_ids: list[str]) -> list[str]:
    """mic, mic-2, mic-3 ... when several sources would share an id."""
    seen: dict[str, int] = {}
    unique = []
    for stream_id in stream_ids:
        seen[stream_id] = seen.get(stream_id, 0) + 1
        unique.append(stream_id if seen[stream_id] == 1 else f"{stream_id}-{seen[stream_id]}")
    return unique


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
