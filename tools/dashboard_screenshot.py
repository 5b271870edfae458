"""The README's dashboard screenshot, and the browser helpers the dashboard tests share.

    python -m tools.dashboard_screenshot [docs/img/dashboard.png]

runs `stream-ser run --input samples/speech.flac --realtime --http 127.0.0.1:PORT`, opens the
page in Debian's headless Chromium (Playwright, no browser download), waits until the sample's
three final utterance results are drawn and saves a PNG of the page.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from playwright.async_api import Browser, Page, async_playwright

from tools.net import free_port

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
# headless as root in a sandbox with no network: without the background-networking flags,
# Chromium keeps trying (and failing) to reach Google's hosts
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SAMPLE_FINALS = 3  # samples/speech.flac: three spoken passages


def fake_microphone_flags(wav: Path) -> list[str]:
    """Chromium flags that make getUserMedia capture `wav` (16-bit PCM, looped), unasked."""
    return [
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
    ]


class DashboardServer:
    """`stream-ser run --http 127.0.0.1:PORT ARGS` in a subprocess; restartable on the same port."""

    def __init__(self, *args: str, log_dir: Path, port: int | None = None) -> None:
        self.args = args
        self.port = port or free_port()
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the process and wait until it accepts connections."""
        self.starts += 1
        command = [sys.executable, "-m", "stream_ser", "run", "--http", f"127.0.0.1:{self.port}"]
        with self._log("stdout") as stdout, self._log("stderr") as stderr:  # the child's copies
            self.process = subprocess.Popen(
                [*command, *self.args], cwd=REPO, stdout=stdout, stderr=stderr
            )
        deadline = time.monotonic() + timeout_s
        while not self._accepts():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"stream-ser exited with {self.process.returncode}: {self.stderr()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream-ser does not listen on {self.port}: {self.stderr()}")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop it (SIGTERM, then SIGKILL after `timeout_s`)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout_s)
        self.process = None

    def stdout(self) -> str:
        """What the latest start wrote on stdout."""
        return (self.log_dir / f"stdout-{self.starts}.log").read_text(errors="replace")

    def stderr(self, tail_chars: int = 3000) -> str:
        """The end of what the latest start wrote on stderr."""
        return (self.log_dir / f"stderr-{self.starts}.log").read_text(errors="replace")[
            -tail_chars:
        ]

    def _log(self, name: str) -> IO[bytes]:
        return (self.log_dir / f"{name}-{self.starts}.log").open("wb")

    def _accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
        except OSError:
            return False
        return True


@contextlib.asynccontextmanager
async def chromium(*extra_flags: str) -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=[*CHROMIUM_FLAGS, *extra_flags], timeout=60_000
        )
        try:
            yield browser
        finally:
            await browser.close()


async def wait_for_finals(
    page: Page, count: int, stream_id: str | None = None, timeout_ms: float = 60_000
) -> None:
    """Wait until the page's timeline draws `count` final utterance results (of one stream)."""
    selector = "section.stream" + (f'[data-stream="{stream_id}"]' if stream_id else "")
    await page.wait_for_function(
        "([selector, count]) =>"
        " document.querySelectorAll(`${selector} .timeline rect.final`).length >= count",
        arg=[selector, count],
        timeout=timeout_ms,
    )


async def screenshot(output: Path) -> None:
    """Run the bundled sample with --http and save the page once its finals are drawn."""
    with tempfile.TemporaryDirectory() as log_dir:
        server = DashboardServer(
            "--input", "samples/speech.flac", "--realtime", log_dir=Path(log_dir)
        )
        server.start()
        try:
            async with chromium() as browser:
                page = await browser.new_page(viewport={"width": 1100, "height": 520})
                await page.goto(server.url)
                await wait_for_finals(page, SAMPLE_FINALS)
                # the status (every 10 s) that counts them all, so the counters agree
                await page.wait_for_function(
                    "n => document.querySelector('[data-counter=utterances] b')?.textContent == n",
                    arg=str(SAMPLE_FINALS),
                    timeout=30_000,
                )
                await page.screenshot(path=str(output), full_page=True)
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "output", nargs="?", type=Path, default=REPO / "docs" / "img" / "dashboard.png"
    )
    args = parser.parse_args()
    asyncio.run(screenshot(args.output.resolve()))


if __name__ == "__main__":
    main()
