"""docs/websocket.md's browser example, run in headless Chromium (Debian's) with a fake
microphone playing real speech: the page streams over /v1/stream and shows final results.

Needs Playwright (the `web-test` extra) and /usr/bin/chromium; skipped without them."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.test_web import served

CHROMIUM = "/usr/bin/chromium"


def browser_example() -> str:
    doc = (REPO / "docs" / "websocket.md").read_text(encoding="utf-8")
    section = doc.split("## A browser example", 1)[1]
    return section.split("```html\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
async def test_the_documented_browser_example_streams_a_microphone(
    tmp_path: Path, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    async_api = pytest.importorskip("playwright.async_api")
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    speech, _ = speech_with_pauses
    static = tmp_path / "static"
    static.mkdir()
    (static / "example.html").write_text(browser_example(), encoding="utf-8")
    args = [
        "--no-sandbox",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={speech}",
    ]
    errors: list[str] = []

    def failed(response: Any) -> None:
        if response.status >= 400 and not response.url.endswith("/favicon.ico"):
            errors.append(f"{response.status} {response.url}")

    async with (
        asyncio.timeout(120),
        served(tiny_model, static) as s,
        async_api.async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = await browser.new_page()
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.on("response", failed)
            await page.goto(f"{s.url}/static/example.html")
            await page.click("#start")  # a user gesture: the audio context may start
            await page.wait_for_function(
                "document.getElementById('out').textContent.trim().length > 0", timeout=60_000
            )
            shown = await page.text_content("#out")
        finally:
            await browser.close()
    assert errors == []
    label, probability = (shown or "").splitlines()[0].split()
    assert label in {"neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprise"}
    assert 0 < float(probability) <= 1
    finals = [m for m in s.hub.history("browser") if m["type"] == "utterance" and m["final"]]
    assert finals and finals[0]["top_label"] == label
