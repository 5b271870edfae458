"""`stream-ser tail`: a live, readable view of the results on a broker, in a file or on stdin.

One line per result (duplicates, by message `id`, are shown once), one per change of a
process's status and of a stream's `speaking` state:

    14:02:07.512  room1    #3    final  angry     62%   angry   ████▉    calm    █▋  ...
        ... sad     ▊        A +0.61 V -0.50  1.20-4.80 s
    14:02:09.004  status  stream-ser-host-room1  offline  (room1)  utterances=3 windows=12

(stage: `final`, `prov` for a provisional utterance result or `win` for a sliding window
(`--windows`); top label and probability, bars of the top three, arousal/valence when the
result has them, the stream time judged; under a final, its speaker/transcript and notable
descriptors: see stream_ser/render.py).

`--json` prints each result as received instead (JSON Lines, e.g. for `stream-ser plot`).
`stream-ser tail FILE` (or `--file FILE`; `-` is stdin) reads saved or piped JSON Lines
(`stream-ser run ... | stream-ser tail -`): every message type the broker carries is shown the
same way; a line that is not a valid message is reported on stderr with its number and skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import stat
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import aiomqtt

from stream_ser.errors import ConfigError, PublishError
from stream_ser.logs import configure_logging
from stream_ser.mqtt import (
    Backoff,
    CheckedClient,
    SubscriptionRefused,
    broker_client,
    describe_connect_error,
    keep_connected,
    parse_broker_url,
)
from stream_ser.render import (
    clock,
    format_details,
    format_result,
    format_status,
    result_problem,
    status_problem,
)
from stream_ser.settings import MqttSettings

log = logging.getLogger(__name__)

DEDUP_IDS = 10_000  # message ids remembered for de-duplication
CONNECT_TIMEOUT_S = 10.0


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
                return self._status(client, _json_object(payload))
            case [stream, "speaking"]:
                return self._speaking(stream, _json_object(payload))
            case [_, "utterance" | "window"]:
                return self._result(_json_object(payload))
            case _:
                return []

    def handle_message(self, message: Mapping[str, Any]) -> list[str]:
        """Lines for one message read from JSON Lines (a file, stdin), routed by its `type`;
        the options' stream and windows filters apply as to a broker's topics."""
        kind = message.get("type")
        stream = message.get("stream_id")
        if self.options.stream is not None and kind != "status" and stream != self.options.stream:
            return []
        if kind == "utterance" or (kind == "window" and self.options.windows):
            return self._result(message)
        if kind == "speaking":
            return self._speaking(str(stream), message)
        if kind == "status":
            return self._status(str(message.get("client_id", "-")), message)
        return []

    def _result(self, message: Mapping[str, Any] | None) -> list[str]:
        if message is not None and (problem := result_problem(message)) is not None:
            log.warning("ignored a result: %s", problem)
            return []
        if message is None or not self._first_time(str(message.get("id", ""))):
            return []
        self.results += 1
        if self.options.json:
            return [json.dumps(message, separators=(",", ":"))]
        details = format_details(message) if message.get("final") is True else []
        return [format_result(message, self.unicode), *details]

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

    def _status(self, client_id: str, message: Mapping[str, Any] | None) -> list[str]:
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

    def _speaking(self, stream_id: str, message: Mapping[str, Any] | None) -> list[str]:
        """A change of the retained voice activity (messages.speaking_message)."""
        if message is None or self.options.json or not isinstance(message.get("speaking"), bool):
            return []
        word = "speaking" if message["speaking"] else "quiet"
        if self._states.get(stream_id) == word:
            return []
        self._states[stream_id] = word
        return [f"{clock(message.get('wall_time'))}  {stream_id:<7}  {word}"]


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
    parser = commands.add_parser(
        "tail", help="print results as they arrive: from a broker, a JSON Lines file or stdin"
    )
    parser.add_argument(
        "path", nargs="?", metavar="FILE", help="read JSON Lines from FILE ('-': stdin)"
    )
    parser.add_argument("--file", metavar="FILE", help="the same as the FILE argument")
    parser.add_argument("--mqtt", metavar="URL", help="broker URL mqtt(s)://...")
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
    if (args.mqtt is None) == (_input_path(args) is None):
        raise ConfigError("tail reads from one place: give --mqtt URL, or a FILE ('-': stdin)")
    if args.path is not None and args.file is not None:
        raise ConfigError("give the file once: FILE or --file FILE")
    if not args.mqtt_topic_prefix or any(c in args.mqtt_topic_prefix for c in "#+"):
        raise ConfigError("--mqtt-topic-prefix must be non-empty and contain no '#' or '+'")
    if args.stream is not None and (not args.stream or any(c in args.stream for c in "/#+")):
        raise ConfigError("--stream must be non-empty and contain no '/', '#' or '+'")
    if args.count is not None and args.count < 1:
        raise ConfigError("--count must be >= 1")
    tls_files = (args.mqtt_ca_file, args.mqtt_cert_file, args.mqtt_key_file)
    if not (args.mqtt or "").startswith("mqtts://") and tls_files != (None,) * 3:
        raise ConfigError("--mqtt-ca-file/--mqtt-cert-file/--mqtt-key-file need mqtts://")


def _input_path(args: argparse.Namespace) -> str | None:
    return args.path if args.path is not None else args.file  # type: ignore[no-any-return]


def tail_command(args: argparse.Namespace) -> int:
    """Run `stream-ser tail`; Ctrl-C (or SIGTERM) ends it with exit code 0."""
    _validate(args)
    configure_logging("warning")  # skipped lines, lost links: `stream-ser: WARNING: ...`
    options = TailOptions(
        topic_prefix=args.mqtt_topic_prefix,
        stream=args.stream,
        windows=args.windows,
        count=args.count,
        json=args.json,
    )
    unicode = (sys.stdout.encoding or "").lower().replace("-", "") == "utf8"
    view = TailView(options, unicode=unicode)
    try:
        if (path := _input_path(args)) is not None:
            _tail_file(path, view)
        else:
            _tail_broker(args, view)
    except BrokenPipeError:  # `stream-ser tail ... | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _tail_broker(args: argparse.Namespace, view: TailView) -> None:
    address = parse_broker_url(args.mqtt, args.mqtt_password_file, args.mqtt_username)
    settings = tail_settings(args)
    asyncio.run(
        _tail_until_signal(
            lambda: broker_client(settings, address, _client_id()), view, str(address)
        )
    )


def _tail_file(path: str, view: TailView) -> None:
    """JSON Lines from a file or stdin, to their end. Reading a pipe, Ctrl-C is left to the
    writer (the same signal reaches it): its last results still arrive before the pipe ends."""
    try:
        if path == "-":
            if stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode):
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            read_jsonl(sys.stdin.buffer, view, sys.stdout)
            return
        try:
            lines = open(path, "rb")  # noqa: SIM115  (closed below; OSError only from open)
        except OSError as err:
            raise ConfigError(f"cannot read {path}: {err.strerror}") from err
        with lines:
            read_jsonl(lines, view, sys.stdout)
    except KeyboardInterrupt:
        pass  # Ctrl-C ends a tail of a file or a terminal at once, exit code 0


def read_jsonl(lines: Iterable[bytes], view: TailView, out: TextIO) -> int:
    """Print each line's message as `view` renders it until the input ends or `count` results;
    a line that is not a JSON object or not a valid message is reported and skipped.
    Returns the number of lines skipped."""
    skipped = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        problem, message = _parse_line(line)
        if message is not None and message.get("type") in ("utterance", "window"):
            problem = result_problem(message)
        if problem is not None or message is None:
            skipped += 1
            log.warning("line %d: %s; skipped", number, problem)
            continue
        for text in view.handle_message(message):
            out.write(text + "\n")
        out.flush()
        if view.options.count is not None and view.results >= view.options.count:
            break
    if skipped:
        log.warning("%d line(s) skipped", skipped)
    return skipped


def _parse_line(line: bytes) -> tuple[str | None, dict[str, Any] | None]:
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "not JSON", None
    if not isinstance(message, dict):
        return "not a JSON object", None
    if not isinstance(message.get("type"), str):
        return "no message type", None
    return None, message


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
