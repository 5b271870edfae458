"""Logging as text or JSON lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest

from stream_ser.logs import configure_logging


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    """Put pytest's own handlers back after the test replaced them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def fail(message: str) -> None:
    """Raise, so that the logged record carries a real traceback."""
    raise ValueError(message)


@pytest.mark.usefixtures("restore_root_logger")
def test_json_lines_carry_time_level_logger_message_and_traceback() -> None:
    out = io.StringIO()
    configure_logging("info", json=True, stream=out)
    log = logging.getLogger("stream_ser.test")
    log.debug("not shown at info")
    log.info("connected to %s", "mqtt://broker:1883")
    try:
        fail('bad "value"\nsecond line')
    except ValueError:
        log.exception("it failed")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 2
    first, second = lines
    assert set(first) == {"time", "level", "logger", "message"}
    assert first["level"] == "info"
    assert first["logger"] == "stream_ser.test"
    assert first["message"] == "connected to mqtt://broker:1883"
    assert datetime.fromisoformat(first["time"].replace("Z", "+00:00")).tzinfo is not None
    assert second["level"] == "error"
    assert 'ValueError: bad "value"\nsecond line' in second["exc_info"]
    assert second["exc_info"].startswith("Traceback")


@pytest.mark.usefixtures("restore_root_logger")
def test_text_format_and_reconfiguring_does_not_duplicate() -> None:
    out = io.StringIO()
    configure_logging("warning", stream=out)
    configure_logging("warning", stream=out)
    logging.getLogger("stream_ser").info("hidden")
    logging.getLogger("stream_ser").warning("spool %d waiting", 3)
    assert out.getvalue() == "stream-ser: WARNING: spool 3 waiting\n"
