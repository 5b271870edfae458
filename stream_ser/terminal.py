"""Readable results on a terminal: what `stream-ser run` prints when stdout is a TTY.

A person watching a microphone wants the finished utterances, not a scrolling wall of
windows. So each final result is printed for good (the line `stream-ser tail` prints, plus its
speaker/transcript and notable descriptors), while everything before it - `speaking`, each
sliding window, the provisional result - rewrites one live line at the bottom (cut to the
terminal's width so that it never wraps), which the next final replaces. `--jsonl` (or a
pipe) gives JSON Lines instead; see app.make_sink.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from stream_ser.errors import PublishError
from stream_ser.messages import ResultMessage, SpeakingMessage, StatusMessage
from stream_ser.render import clock, format_details, format_result

log = logging.getLogger(__name__)

CLEAR_LINE = "\r\x1b[K"  # back to the line's start, erase to its end


def _terminal_width() -> int:
    return shutil.get_terminal_size().columns


class TerminalSink:
    """A Sink for a person at a terminal: finals as lines, the rest on one live line."""

    def __init__(
        self,
        out: TextIO | None = None,
        unicode: bool | None = None,
        width: Callable[[], int] = _terminal_width,
    ) -> None:
        self._out = out or sys.stdout
        encoding = (getattr(self._out, "encoding", None) or "").lower().replace("-", "")
        self._unicode = encoding == "utf8" if unicode is None else unicode
        self._width = width
        self._live = False  # a live line is on screen

    async def __aenter__(self) -> TerminalSink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._write(CLEAR_LINE if self._live else "")
        self._live = False

    async def result(self, stream_id: str, message: ResultMessage) -> None:
        """A final as lines for good; a window or provisional result on the live line."""
        if message["final"]:
            lines = [format_result(message, self._unicode), *format_details(message)]
            self._write((CLEAR_LINE if self._live else "") + "\n".join(lines) + "\n")
            self._live = False
        else:
            self._show_live(format_result(message, self._unicode))

    async def speaking(self, stream_id: str, message: SpeakingMessage) -> None:
        """The start of an utterance on the live line (its end is shown by its results)."""
        if message["speaking"]:
            self._show_live(live_speaking(message))

    async def status(self, message: StatusMessage) -> None:
        """The status is not a result: logged at debug level, as JsonlSink does."""
        log.debug("status %s", message)

    async def announce(self, topic: str, payload: bytes) -> None:
        """Nothing to announce to on a terminal."""

    def counters(self) -> dict[str, int]:
        """Nothing to count."""
        return {}

    def _show_live(self, line: str) -> None:
        self._write(CLEAR_LINE + line[: max(1, self._width() - 1)])
        self._live = True

    def _write(self, text: str) -> None:
        try:
            self._out.write(text)
            self._out.flush()
        except BrokenPipeError:
            raise PublishError("stdout was closed (its reader went away)") from None


def live_speaking(message: Mapping[str, Any]) -> str:
    """The live line while an utterance has started and no result has come yet."""
    return (
        f"{clock(message.get('wall_time'))}  {message.get('stream_id', '?')!s:<7}  "
        f"#{message.get('utterance_id', '?')!s:<3}  speaking ..."
    )
