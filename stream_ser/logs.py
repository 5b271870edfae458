"""Logging set-up: readable lines, or one JSON object per line for log collectors.

Both go to stderr through the standard `logging` module (stdout carries results). A JSON
line holds `time` (ISO 8601 UTC), `level`, `logger` and `message`, plus `exc_info` (the
formatted traceback) when one is attached and `stack_info` when asked for. Secrets never
reach the log: stream-ser's own messages leave passwords out (see `publish.BrokerAddress`).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

TEXT_FORMAT = "stream-ser: %(levelname)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One compact JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line (without the newline)."""
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(
    level: str = "info", json: bool = False, stream: TextIO | None = None
) -> None:
    """Route all logging to stderr (or `stream`) at `level`, as text or JSON lines.

    Replaces handlers set before, so calling it twice does not duplicate lines.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
