"""`stream-ser tail`: a live, readable view of the results on a broker.

One line per result (duplicates, by message `id`, are shown once), one per change of a
process's status and of a stream's `speaking` state:

    14:02:07.512  room1    #3    final  angry     62%   angry   ████▉    calm    █▋  ...
        ... sad     ▊        A +0.61 V -0.50  1.20-4.80 s
    14:02:09.004  status  stream-ser-host-room1  offline  (room1)  utterances=3 windows=12

(stage: `final`, `prov` for a provisional utterance result or `win` for a sliding window
(`--windows`); top label and probability, bars of the top three, arousal/valence when the
result has them, the stream time judged).

`--json` prints each result as received instead (JSON Lines, e.g. for `stream-ser plot`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO, TypeGuard

import aiomqtt

from stream_ser.errors import ConfigError, PublishError
from stream_ser.mqtt import (
    Backoff,
    CheckedClient,
    SubscriptionRefused,
    broker_client,
    describe_connect_error,
    keep_connected,
    parse_broker_url,
)
from stream_ser.plot import read_affect
from stream_ser.settings import MqttSettings

log = logging.getLogger(__name__)

DEDUP_IDS = 10_000  # message ids remembered for de-duplication
BAR_WIDTH = 8  # characters for probability 1.0
TOP_K = 3
CONNECT_TIMEOUT_S = 10.0
_EIGHTHS = " ▏▎▍▌▋▊▉"


@dataclass(frozen=True)
class TailOptions:
    """What `stream-ser tail` subscribes to and how it prints."""

    topic_prefix: str = "stream-ser"
    stream: str | None = None  # None: every stream
    windows: bool = False  # also show sliding-window results
    count: int | None = None  # exit after this many results
    json: bool = False  # print results as JSON Lines


def subscriptions(options: TailOptions) -> list[tuple[str, int]]:
    """(topic filter, QoS) pairs for the options."""
    prefix, stream = options.topic_prefix, options.stream or "+"
    topics = [
        (f"{prefix}/{stream}/utterance", 1),
        (f"{prefix}/{stream}/speaking", 1),
        (f"{prefix}/status/+", 1),
    ]
    if options.windows:
        topics.append((f"{prefix}/{stream}/window", 0))
    return topics


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def bar(probability: float, width: int = BAR_WIDTH, unicode: bool = True) -> str:
    """A horizontal bar `width` characters wide at probability 1, padded to `width`."""
    probability = min(1.0, max(0.0, probability))
    if not unicode:
        return ("#" * round(probability * width)).ljust(width)
    eighths = round(probability * width * 8)
    text = "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")
    return text.ljust(width)


def clock(wall_time: Any) -> str:
    """HH:MM:SS.mmm in local time of an ISO 8601 time (now if missing or invalid)."""
    moment = datetime.now().astimezone()
    if isinstance(wall_time, str):
        with contextlib.suppress(ValueError):
            moment = datetime.fromisoformat(wall_time.replace("Z", "+00:00")).astimezone()
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def format_result(message: Mapping[str, Any], unicode: bool = True) -> str:
    """One readable line for a window or utterance result."""
    distribution = message.get("distribution") or {}
    ranked = sorted(distribution.items(), key=lambda item: -item[1])[:TOP_K]
    width = max((len(label) for label, _ in ranked), default=0)
    top = " ".join(f"{label:<{width}} {bar(p, unicode=unicode)}" for label, p in ranked)
    parts = [
        clock(message.get("wall_time")),
        f"{message.get('stream_id', '?'):<7}",
        f"#{message.get('utterance_id', '?'):<3}",
        stage_tag(message),
        f"{message.get('top_label', '?'):<{max(width, 7)}}",
        f"{float(message.get('top_probability', 0.0)):4.0%} ",
        top,
    ]
    if (affect := read_affect(message)) is not None:
        parts.append(f"A {affect[0]:+.2f} V {affect[1]:+.2f}")
    start, end = message.get("start_ms"), message.get("end_ms")
    if _is_number(start) and _is_number(end):
        parts.append(f"{start / 1000:.2f}-{end / 1000:.2f} s")
    return "  ".join(parts)


def stage_tag(message: Mapping[str, Any]) -> str:
    """`final`, `prov ` (a provisional utterance result) or `win  ` (a sliding window)."""
    kind = message.get("type")
    if message.get("final", kind == "utterance") is True:
        return "final"
    return "win  " if kind == "window" else "prov "


def format_status(client_id: str, message: Mapping[str, Any]) -> str:
    """One line for a process's status."""
    counters = message.get("counters") or {}
    shown = " ".join(
        f"{name}={counters[name]}"
        for name in ("utterances", "windows", "windows_dropped", "spool_waiting")
        if name in counters
    )
    streams = ",".join(str(s) for s in message.get("streams") or [])
    line = f"{clock(message.get('wall_time'))}  status  {client_id}  {message.get('state', '?')}"
    return f"{line}  ({streams})  {shown}".rstrip()


class TailView:
    """Turns received messages into lines: de-duplicated results, status and speaking changes.

    Pure (no I/O), so it is tested without a broker.
    """

    def __init__(self, options: TailOptions, unicode: bool = True) -> None:
        self.options = options
        self.unicode = unicode
        self.results = 0
        self._seen: set[str] = set()
        self._order: deque[str] = deque()
        self._states: dict[str, str] = {}

    def handle(self, topic: str, payload: bytes) -> list[str]:
        """Lines to print for one message (none for duplicates and unchanged states)."""
        prefix = self.options.topic_prefix + "/"
        if not topic.startswith(prefix):
            return []
        match topic[len(prefix) :].split("/"):
            case ["status", client]:
                return self._status(client, payload)
            case [stream, "speaking"]:
                return self._speaking(stream, payload)
            case [_, "utterance" | "window"]:
                return self._result(payload)
            case _:
                return []

    def _result(self, payload: bytes) -> list[str]:
        message = _json_object(payload)
        if message is not None and (problem := result_problem(message)) is not None:
            log.warning("ignored a result: %s", problem)
            return []
        if message is None or not self._first_time(str(message.get("id", ""))):
            return []
        self.results += 1
        if self.options.json:
            return [json.dumps(message, separators=(",", ":"))]
        return [format_result(message, self.unicode)]

    def _first_time(self, message_id: str) -> bool:
        if not message_id:
            return True  # nothing to de-duplicate on
        if message_id in self._seen:
            return False
        self._seen.add(message_id)
        self._order.append(message_id)
        if len(self._order) > DEDUP_IDS:
            self._seen.discard(self._order.popleft())
        return True

    def _status(self, client_id: str, payload: bytes) -> list[str]:
        message = _json_object(payload)
        if message is None or self.options.json:
            return []
        if (problem := status_problem(message)) is not None:
            log.warning("ignored a status of %s: %s", client_id, problem)
            return []
        state = str(message.get("state"))
        if self._states.get(f"status/{client_id}") == state:
            return []
        self._states[f"status/{client_id}"] = state
        return [format_status(client_id, message)]

    def _speaking(self, stream_id: str, payload: bytes) -> list[str]:
        """A change of the retained voice activity (messages.speaking_message)."""
        message = None if self.options.json else _json_object(payload)
        if message is None or not isinstance(message.get("speaking"), bool):
            return []
        word = "speaking" if message["speaking"] else "quiet"
        if self._states.get(stream_id) == word:
            return []
        self._states[stream_id] = word
        return [f"{clock(message.get('wall_time'))}  {stream_id:<7}  {word}"]


# the fields `tail` shows and the types they must have (absent ones are shown as '?')
RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "stream_id": (str,),
    "utterance_id": (int,),
    "top_label": (str,),
    "top_probability": (int, float),
    "final": (bool,),
    "distribution": (dict,),
}


def _wrong_types(message: Mapping[str, Any], fields: Mapping[str, tuple[type, ...]]) -> str | None:
    for name, types in fields.items():
        value = message.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"field {name!r} is not of type {'/'.join(t.__name__ for t in types)}"
    return None


def result_problem(message: Mapping[str, Any]) -> str | None:
    """Why a result cannot be shown (a field of the wrong type), or None."""
    if (problem := _wrong_types(message, RESULT_FIELDS)) is not None:
        return problem
    distribution = message.get("distribution") or {}
    if not all(isinstance(k, str) and _is_number(v) for k, v in distribution.items()):
        return "field 'distribution' is not an object of label: probability"
    affect = message.get("arousal_valence")
    numbers = [message.get(name) for name in ("top_probability", "start_ms", "end_ms")]
    numbers += [message.get("arousal"), message.get("valence"), *distribution.values()]
    numbers += list(affect.values()) if isinstance(affect, dict) else []
    if not all(_fits_float(value) for value in numbers if _is_number(value)):
        return "a number is too large"
    return None


MAX_ABS_FLOAT = 1e15  # larger values are shown as they came, not formatted


def _fits_float(value: float) -> bool:
    try:
        return math.isfinite(float(value)) and abs(float(value)) < MAX_ABS_FLOAT
    except OverflowError:
        return False


def status_problem(message: Mapping[str, Any]) -> str | None:
    """Why a status cannot be shown (a field of the wrong type), or None."""
    problem = _wrong_types(message, {"state": (str,), "streams": (list,), "counters": (dict,)})
    return problem


def _json_object(payload: bytes) -> dict[str, Any] | None:
    try:
        message = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        log.warning("ignored a message that is not JSON")
        return None
    return message if isinstance(message, dict) else None


def tail_settings(args: argparse.Namespace) -> MqttSettings:
    """The broker settings of `tail`'s flags."""
    return MqttSettings(
        url=args.mqtt,
        topic_prefix=args.mqtt_topic_prefix,
        ca_file=args.mqtt_ca_file,
        cert_file=args.mqtt_cert_file,
        key_file=args.mqtt_key_file,
        username=args.mqtt_username,
        password_file=args.mqtt_password_file,
        connect_timeout_s=CONNECT_TIMEOUT_S,
    )


async def tail(
    client_factory: Callable[[], CheckedClient],
    view: TailView,
    out: TextIO,
    stop: asyncio.Event,
    address: str,
) -> None:
    """Print until `stop` is set or `view.options.count` results; reconnect if the link drops.

    A broker unreachable at start raises PublishError, as does a subscription the broker
    refuses; later losses are retried with backoff.
    """
    connected_once = False

    async def session(backoff: Backoff) -> None:
        nonlocal connected_once
        if stop.is_set():
            return
        async with client_factory() as client:
            connected_once = True
            backoff.reset()
            for topic, qos in subscriptions(view.options):
                await client.subscribe_checked(topic, qos)
            await _print_messages(client, view, out, stop)

    def lost(err: Exception, delay: float) -> float:
        if isinstance(err, SubscriptionRefused):
            raise err
        if not connected_once:
            reason = describe_connect_error(err)
            raise PublishError(f"cannot connect to broker {address}: {reason}") from err
        log.warning("broker %s: %s; reconnecting in %.1f s", address, err, delay)
        return delay

    async def pause(delay_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay_s)

    await keep_connected(session, lost, Backoff(first_s=1.0), sleep=pause)


async def _print_messages(
    client: aiomqtt.Client, view: TailView, out: TextIO, stop: asyncio.Event
) -> bool:
    """True once done (stopped, or `count` results printed)."""
    messages = aiter(client.messages)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while True:
            received = asyncio.ensure_future(anext(messages))
            await asyncio.wait({received, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not received.done():
                received.cancel()
                await asyncio.gather(received, return_exceptions=True)
                return True
            message = received.result()
            payload = message.payload if isinstance(message.payload, bytes) else b""
            for line in view.handle(str(message.topic), payload):
                out.write(line + "\n")
            out.flush()
            count = view.options.count
            if count is not None and view.results >= count:
                return True
    finally:
        stopping.cancel()


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `tail` subcommand."""
    parser = commands.add_parser("tail", help="print the results on a broker as they arrive")
    parser.add_argument("--mqtt", required=True, metavar="URL", help="broker URL mqtt(s)://...")
    parser.add_argument("--mqtt-topic-prefix", default="stream-ser", metavar="PREFIX")
    parser.add_argument("--mqtt-username", help="broker username (default: the URL's)")
    parser.add_argument(
        "--mqtt-password-file",
        help="file whose first line is the password (else $STREAM_SER_MQTT_PASSWORD)",
    )
    parser.add_argument("--mqtt-ca-file", help="CA certificate file for mqtts://")
    parser.add_argument("--mqtt-cert-file", help="client certificate file for mqtts://")
    parser.add_argument("--mqtt-key-file", help="client private key file for mqtts://")
    parser.add_argument("--stream", metavar="ID", help="only this stream (default: all)")
    parser.add_argument("--windows", action="store_true", help="also show window results")
    parser.add_argument("--count", type=int, metavar="N", help="exit after N results")
    parser.add_argument("--json", action="store_true", help="print results as JSON Lines")
    parser.set_defaults(command=tail_command)


def _validate(args: argparse.Namespace) -> None:
    if not args.mqtt_topic_prefix or any(c in args.mqtt_topic_prefix for c in "#+"):
        raise ConfigError("--mqtt-topic-prefix must be non-empty and contain no '#' or '+'")
    if args.stream is not None and (not args.stream or any(c in args.stream for c in "/#+")):
        raise ConfigError("--stream must be non-empty and contain no '/', '#' or '+'")
    if args.count is not None and args.count < 1:
        raise ConfigError("--count must be >= 1")
    tls_files = (args.mqtt_ca_file, args.mqtt_cert_file, args.mqtt_key_file)
    if not args.mqtt.startswith("mqtts://") and tls_files != (None,) * 3:
        raise ConfigError("--mqtt-ca-file/--mqtt-cert-file/--mqtt-key-file need mqtts://")


def tail_command(args: argparse.Namespace) -> int:
    """Run `stream-ser tail`; Ctrl-C (or SIGTERM) ends it with exit code 0."""
    _validate(args)
    address = parse_broker_url(args.mqtt, args.mqtt_password_file, args.mqtt_username)
    options = TailOptions(
        topic_prefix=args.mqtt_topic_prefix,
        stream=args.stream,
        windows=args.windows,
        count=args.count,
        json=args.json,
    )
    unicode = (sys.stdout.encoding or "").lower().replace("-", "") == "utf8"
    view = TailView(options, unicode=unicode)
    settings = tail_settings(args)
    try:
        asyncio.run(
            _tail_until_signal(
                lambda: broker_client(settings, address, _client_id()), view, str(address)
            )
        )
    except BrokenPipeError:  # `stream-ser tail ... | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _client_id() -> str:
    """A client id of its own per run, so that two tails never take over each other's link."""
    return f"stream-ser-tail-{os.getpid()}-{secrets.token_hex(3)}"


async def _tail_until_signal(
    client_factory: Callable[[], CheckedClient], view: TailView, address: str
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await tail(client_factory, view, sys.stdout, stop, address)
