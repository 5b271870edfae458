"""Stopping a command cleanly on SIGINT/SIGTERM/SIGHUP (shared by `run` and `send`)."""

from __future__ import annotations

import asyncio
import signal


def install_stop_handlers(stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM/SIGHUP set `stop`; the command then drains and exits cleanly
    (SIGHUP: the terminal a foreground run was started from has closed)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
