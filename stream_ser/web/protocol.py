"""The WebSocket protocol's rules, without aiohttp: parameters, token, close codes.

docs/websocket.md documents the protocol for clients; this module is what the server checks.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Literal, cast

from stream_ser.errors import AudioInputError, ConfigError
from stream_ser.push import SampleFormat, check_format
from stream_ser.settings import MAX_STREAM_ID_BYTES, check_name

MODES = ("live", "lossless")
Mode = Literal["live", "lossless"]
END_FRAME = {"type": "end"}


class Close(IntEnum):
    """The close codes the server sends (docs/websocket.md)."""

    NORMAL = 1000  # the stream ended and every result was sent
    GOING_AWAY = 1001  # the server is shutting down
    UNSUPPORTED_DATA = 1003  # audio that does not fit the format, or an unknown text frame
    POLICY = 1008  # missing or wrong token, or a cross-origin page without a token
    TOO_BIG = 1009  # a message larger than the limit
    INTERNAL = 1011  # a fault in the server
    TRY_AGAIN_LATER = 1013  # the connection limit is reached
    BAD_PARAMETERS = 4400  # rate, channels, format, mode or stream_id invalid
    IDLE = 4408  # no message for too long
    STREAM_ID_IN_USE = 4409  # a live stream of the server has this id
    TOO_SLOW = 4429  # the client did not read its results fast enough


class Refusal(Exception):
    """A connection or message the server closes the socket for."""

    def __init__(self, code: Close, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class StreamParams:
    """The query parameters of /v1/stream."""

    rate: int  # Hz
    channels: int
    sample_format: SampleFormat
    stream_id: str
    mode: Mode


def stream_params(query: Mapping[str, str]) -> StreamParams:
    """Parse and check /v1/stream's query; Refusal(BAD_PARAMETERS) naming the problem."""
    known = {"rate", "channels", "format", "stream_id", "mode", "token"}
    if unknown := sorted(set(query) - known):
        raise Refusal(Close.BAD_PARAMETERS, f"unknown parameter(s): {', '.join(unknown)}")
    rate = _integer(query, "rate", 16000)
    channels = _integer(query, "channels", 1)
    sample_format = query.get("format", "s16le")
    mode = query.get("mode", "live")
    stream_id = query.get("stream_id") or f"ws-{secrets.token_hex(3)}"
    try:
        check_format(rate, channels, sample_format)
        check_name("stream_id", stream_id, MAX_STREAM_ID_BYTES)
    except (AudioInputError, ConfigError) as err:
        raise Refusal(Close.BAD_PARAMETERS, str(err)) from err
    if mode not in MODES:
        raise Refusal(Close.BAD_PARAMETERS, f"mode {mode!r} is not one of {', '.join(MODES)}")
    return StreamParams(
        rate, channels, cast(SampleFormat, sample_format), stream_id, cast(Mode, mode)
    )


@dataclass(frozen=True)
class EventsParams:
    """The query parameters of /v1/events."""

    stream_id: str | None  # one stream's messages (and the status); None: every stream's
    history: bool  # the retained messages first


def events_params(query: Mapping[str, str]) -> EventsParams:
    """Parse and check /v1/events' query; Refusal(BAD_PARAMETERS) naming the problem."""
    if unknown := sorted(set(query) - {"stream_id", "history", "token"}):
        raise Refusal(Close.BAD_PARAMETERS, f"unknown parameter(s): {', '.join(unknown)}")
    stream_id = query.get("stream_id") or None
    if stream_id is not None:
        try:
            check_name("stream_id", stream_id, MAX_STREAM_ID_BYTES)
        except ConfigError as err:
            raise Refusal(Close.BAD_PARAMETERS, str(err)) from err
    history = query.get("history", "1")
    if history not in ("0", "1"):
        raise Refusal(Close.BAD_PARAMETERS, f"history {history!r} is not 0 or 1")
    return EventsParams(stream_id, history == "1")


def _integer(query: Mapping[str, str], name: str, default: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    if not text.isdigit() or len(text) > 9:  # noqa: PLR2004
        raise Refusal(Close.BAD_PARAMETERS, f"{name} {text!r} is not a whole number")
    return int(text)


def is_end(text: str) -> bool:
    """True for the text frame that ends a stream: {"type": "end"}."""
    try:
        return bool(json.loads(text) == END_FRAME)
    except (ValueError, RecursionError):
        return False


def read_token(token: str | None, token_file: str | None) -> str | None:
    """The bearer token from --http-token or the first line of --http-token-file."""
    if token_file is None:
        return token
    try:
        lines = Path(token_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--http-token-file {token_file}: cannot read it ({err})") from err
    if not lines or not lines[0].strip():
        raise ConfigError(f"--http-token-file {token_file}: the first line is empty")
    return lines[0].strip()


def authorized(expected: str | None, header: str | None, query_token: str | None) -> bool:
    """True when no token is set, or the request presents it (`Authorization: Bearer T`
    or `?token=T`); compared in constant time."""
    if expected is None:
        return True
    presented = query_token
    if header is not None and header[:7].lower() == "bearer ":
        presented = header[7:].strip()
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


def same_origin(origin: str | None, host: str) -> bool:
    """True when the request comes from no browser page (no Origin) or from a page of this
    server: a page elsewhere must not read results from a server on localhost."""
    if origin is None:
        return True
    scheme, _, rest = origin.partition("://")
    return scheme in ("http", "https") and rest.rstrip("/") == host
