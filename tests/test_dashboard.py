"""The live dashboard page in a real headless Chromium (Debian's, driven by Playwright).

Each test starts a real `stream-ser run --http 127.0.0.1:PORT` and a real browser; audio is real
speech, fed over /v1/stream or read from a file, or captured by Chromium's fake microphone.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soundfile
from playwright.async_api import ConsoleMessage, Page

from tools.dashboard_screenshot import (
    CHROMIUM,
    DashboardServer,
    chromium,
    fake_microphone_flags,
    wait_for_finals,
)

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.is_file(),
        reason=f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install chromium; "
        ".ci/run installs it)",
    ),
    pytest.mark.slow,  # each starts a stream-ser process and a browser (several seconds)
]

DEADLINE_S = 90.0  # each test as a whole
WAIT_MS = 60_000  # one wait in the page
CHUNK_S = 0.1  # audio per WebSocket message


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DashboardServer]:
    """`stream-ser run --http` alone: serves the page and the API, waits for streams."""
    process = DashboardServer(log_dir=tmp_path)
    process.start()
    yield process
    process.stop()


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    """A fresh page in headless Chromium."""
    async with chromium() as browser:
        async with asyncio.timeout(DEADLINE_S):
            tab = await browser.new_page(viewport={"width": 1100, "height": 700})
        tab.set_default_timeout(WAIT_MS)
        yield tab


async def feed(server: DashboardServer, path: Path, stream_id: str) -> list[dict[str, Any]]:
    """Send a speech file as s16le over /v1/stream, then the end frame; every message back."""
    audio, rate = soundfile.read(path, dtype="float32")
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    step = int(rate * CHUNK_S) * 2
    query = f"rate={rate}&channels=1&format=s16le&mode=lossless&stream_id={stream_id}"
    url = f"{server.url.replace('http', 'ws', 1)}/v1/stream?{query}"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as socket:
        for start in range(0, len(pcm), step):
            await socket.send_bytes(pcm[start : start + step])
        await socket.send_str(json.dumps({"type": "end"}))
        messages = [json.loads(frame.data) async for frame in socket]  # until the server closes
        assert socket.close_code == 1000, (socket.close_code, server.stderr())
    return messages


def finals_of(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m.get("type") == "utterance" and m["final"]]


async def connect(page: Page, url: str) -> None:
    """Open the dashboard at `url`; return once its WebSocket is connected."""
    await page.goto(url)
    await page.wait_for_selector('#connection[data-state="connected"]')


async def card_finals(page: Page, stream_id: str) -> int:
    """How many final utterance results the stream's timeline draws."""
    selector = f'section.stream[data-stream="{stream_id}"] .timeline rect.final'
    return int(await page.locator(selector).count())


async def test_the_page_loads_with_no_console_errors(server: DashboardServer, page: Page) -> None:
    problems: list[str] = []
    page.on("console", lambda m: _note_error(problems, m))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    async with asyncio.timeout(DEADLINE_S):
        response = await page.goto(server.url)
        assert response is not None and response.ok
        await page.wait_for_selector('#connection[data-state="connected"]')
        assert await page.is_visible("#empty")
        assert await page.is_enabled("#mic")  # 127.0.0.1 is a secure context
        await page.wait_for_timeout(500)  # late errors (a module failing after load)
    assert problems == []


def _note_error(problems: list[str], message: ConsoleMessage) -> None:
    if message.type in ("error", "warning"):
        problems.append(f"console {message.type}: {message.text}")


async def test_a_stream_fed_over_websocket_shows_every_final(
    server: DashboardServer, page: Page, speech_with_pauses: tuple[Path, int]
) -> None:
    """Bars, descriptors and a timeline with exactly the finals the server published."""
    path, clip_count = speech_with_pauses
    async with asyncio.timeout(DEADLINE_S):
        await connect(page, server.url)
        messages = await feed(server, path, "fed")
        published = finals_of(messages)
        assert [m["utterance_id"] for m in published] == list(range(1, clip_count + 1))
        await wait_for_finals(page, len(published), "fed", WAIT_MS)
        await page.wait_for_timeout(300)  # nothing more may be drawn
        assert await card_finals(page, "fed") == len(published)
        card = page.locator('section.stream[data-stream="fed"]')
        last = published[-1]
        words = await card.locator(".final-label").text_content()
        assert words is not None and f"utterance {last['utterance_id']}" in words
        assert last["top_label"] in words
        bars = card.locator(".bar")
        assert await bars.count() == len(last["distribution"])
        top_width = await card.locator(".bar.top .fill").evaluate(
            "e => e.getBoundingClientRect().width"
        )
        assert top_width > 10  # a drawn bar, not an empty track
        provisionals = [m for m in messages if m.get("type") == "utterance" and not m["final"]]
        assert await card.locator(".timeline rect.provisional").count() == len(provisionals) > 0
        windows = [m for m in messages if m.get("type") == "window"]
        assert await card.locator(".timeline rect.window").count() == len(windows) > 0
        looks = await card.locator(".timeline").evaluate(TIMELINE_LOOKS)
        assert looks["window_opacity"] < 0.5 <= looks["final_opacity"]  # windows faint
        assert looks["provisional_dashes"] not in ("", "none")  # provisional bands dashed
        assert await card.locator(".word").count() > 0  # descriptors in words


async def test_a_file_run_shows_its_finals_from_the_history(
    tmp_path: Path, page: Page, speech_with_pauses: tuple[Path, int]
) -> None:
    """`run --input FILE --http`: a page opened after the file was read draws every final."""
    path, clip_count = speech_with_pauses
    server = DashboardServer("--input", str(path), log_dir=tmp_path)
    server.start()
    try:
        async with asyncio.timeout(DEADLINE_S):
            published = await wait_for_stdout_finals(server, clip_count)
            await page.goto(server.url)
            await wait_for_finals(page, clip_count, path.stem, WAIT_MS)
            await page.wait_for_timeout(300)  # nothing more may be drawn
            assert await card_finals(page, path.stem) == len(published) == clip_count
            counters = page.locator(f'section.stream[data-stream="{path.stem}"] [data-counter]')
            await counters.first.wait_for()  # the status counters, from the replayed status
    finally:
        server.stop()


async def wait_for_stdout_finals(server: DashboardServer, count: int) -> list[dict[str, Any]]:
    """The final results the process printed (JSON Lines), once there are `count`."""
    while True:
        text = server.stdout()
        complete = text[: text.rfind("\n") + 1].splitlines()  # not a line being written
        published = finals_of([json.loads(line) for line in complete if line.startswith("{")])
        if len(published) >= count:
            return published
        await asyncio.sleep(0.2)


TIMELINE_LOOKS = """timeline => {
  const style = (selector) => getComputedStyle(timeline.querySelector(selector));
  const final = style("rect.final");
  return {window_opacity: Number(style("rect.window").opacity),
          final_opacity: Number(final.opacity) * Number(final.fillOpacity),
          provisional_dashes: style("rect.provisional").strokeDasharray};
}"""


async def test_the_screenshot_shows_drawn_bars_and_timeline(
    server: DashboardServer, page: Page, speech_with_pauses: tuple[Path, int]
) -> None:
    from PIL import Image

    path, clip_count = speech_with_pauses
    async with asyncio.timeout(DEADLINE_S):
        await connect(page, server.url)
        messages = await feed(server, path, "shot")
        await wait_for_finals(page, clip_count, "shot", WAIT_MS)
        png = await page.locator('section.stream[data-stream="shot"]').screenshot()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    pixels = np.asarray(image).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50, "the card is (nearly) a single colour"
    top = finals_of(messages)[-1]["top_label"]
    colour = await page.evaluate(
        "label => import('./static/colors.js').then(m => m.labelColor(label))", top
    )
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    drawn = np.all(np.abs(pixels.astype(int) - rgb) <= 3, axis=1).sum()
    assert drawn > 500, f"few pixels ({drawn}) in the colour of {top}: no bar or band drawn"


async def test_the_page_reconnects_when_the_server_restarts(
    server: DashboardServer, page: Page
) -> None:
    async with asyncio.timeout(DEADLINE_S):
        await page.goto(server.url)
        connection = page.locator("#connection")
        await page.wait_for_selector('#connection[data-state="connected"]')
        await page.wait_for_selector("#process:text('server online')")  # the replayed status
        await asyncio.to_thread(server.stop)
        await page.wait_for_selector('#connection[data-state="reconnecting"]')
        assert "reconnecting" in (await connection.text_content() or "")
        assert await page.text_content("#process") == ""  # no stale status shown
        await asyncio.to_thread(server.start)  # the same port
        await page.wait_for_selector('#connection[data-state="connected"]')
        await page.wait_for_selector("#process:text('server online')")


async def test_the_page_passes_its_token_on_to_the_websockets(tmp_path: Path, page: Page) -> None:
    """With --http-token-file, /?token=T connects; without the token the page says it is refused."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    server = DashboardServer("--http-token-file", str(token_file), log_dir=tmp_path)
    server.start()
    try:
        async with asyncio.timeout(DEADLINE_S):
            await connect(page, f"{server.url}/?token=s3cret-token")
            await page.goto(server.url)
            await page.wait_for_selector('#connection[data-state="reconnecting"]')
            text = await page.text_content("#connection") or ""
            assert "refused: missing or wrong token" in text
    finally:
        server.stop()


async def test_memory_is_bounded_to_the_last_minutes(server: DashboardServer, page: Page) -> None:
    """With ?minutes=1, a 10-minute stream keeps one minute; replayed ids are applied once;
    a new session starts the stream anew; the speaking indicator follows speaking messages."""
    async with asyncio.timeout(DEADLINE_S):
        await page.goto(f"{server.url}/?minutes=1")
        kept = await page.evaluate(APPLY_TEN_MINUTES)
    assert kept["applied_twice"] is False
    assert kept["span_ms"] <= 60_000 + 2_000
    assert kept["windows"] <= 60 * 2 + 4  # two windows a second
    assert kept["finals"] == kept["drawn_finals"] <= 13
    assert kept["session_reset_windows"] == 1
    assert kept["speaking"] == ["true", "speaking", "false", "silent"]


# 10 minutes of one stream: 2 windows a second, a 4 s utterance every 5 s with its final; then
# one message replayed (must be ignored), a message of a new session (starts the stream anew),
# and the speaking indicator switched on and off.
APPLY_TEN_MINUTES = """async () => {
  const dashboard = window.streamSer.dashboard;
  const base = {schema_version: 1, stream_id: "long", distribution: {happy: 0.7, sad: 0.3},
                top_label: "happy", top_probability: 0.7, entropy: 0.88, model_id: "m",
                latency_ms: 1, arousal: 0.1, valence: 0.2, wall_time: "2026-12-03T00:00:00.000Z"};
  let last = null;
  for (let t = 0; t < 600_000; t += 500) {
    const u = Math.floor(t / 5000) + 1;
    last = {...base, type: "window", final: false, id: `s1:long:${u}:w${t + 2000}`,
            utterance_id: u, start_ms: t, end_ms: t + 2000};
    dashboard.apply(last);
    if (t % 5000 === 4500) {
      dashboard.apply({...base, type: "utterance", final: true, id: `s1:long:${u}:f`,
                       utterance_id: u, start_ms: t - 4500, end_ms: t - 500});
    }
  }
  const stream = dashboard.streams.get("long");
  const windows = stream.windows.length;
  const applied_twice = dashboard.apply(last);
  await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
  const result = {applied_twice, windows, span_ms: stream.endMs - stream.startMs,
    finals: stream.finals().length,
    drawn_finals: document.querySelectorAll('[data-stream="long"] .timeline rect.final').length};
  dashboard.apply({...base, type: "window", final: false, id: "s2:long:1:w2000",
                   utterance_id: 1, start_ms: 0, end_ms: 2000});
  result.session_reset_windows = dashboard.streams.get("long").windows.length;
  const indicator = () => document.querySelector('[data-stream="long"] .speaking');
  result.speaking = [];
  for (const speaking of [true, false]) {
    dashboard.apply({schema_version: 1, type: "speaking", stream_id: "long", speaking,
                     utterance_id: 2, at_ms: 3000, wall_time: base.wall_time});
    await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
    result.speaking.push(indicator().dataset.speaking, indicator().textContent);
  }
  return result;
}"""


async def test_the_browser_microphone_becomes_a_stream_with_a_final(
    tmp_path: Path, server: DashboardServer, ravdess_clips: list[Path]
) -> None:
    """Chromium's fake capture plays real speech (then silence) into getUserMedia."""
    speech, rate = soundfile.read(ravdess_clips[0], dtype="float32")
    wav = tmp_path / "speech.wav"
    soundfile.write(
        wav, np.concatenate([speech, np.zeros(2 * rate, np.float32)]), rate, subtype="PCM_16"
    )
    async with asyncio.timeout(DEADLINE_S), chromium(*fake_microphone_flags(wav)) as browser:
        tab = await browser.new_page()
        tab.set_default_timeout(WAIT_MS)
        await connect(tab, server.url)
        await tab.click("#mic")
        await tab.wait_for_selector('#mic-state[data-state="live"]')
        state = await tab.text_content("#mic-state") or ""
        stream_id = state.split("stream ")[1].split(" ")[0]
        assert stream_id.startswith("browser-")
        await wait_for_finals(tab, 1, stream_id, WAIT_MS)
        await tab.click("#mic")
        await tab.wait_for_selector('#mic-state[data-state="stopped"]', state="attached")
        label = await tab.locator(
            f'section.stream[data-stream="{stream_id}"] .final-label'
        ).text_content()
        assert label is not None and label.startswith("utterance 1")
        rate = await tab.evaluate("new AudioContext().sampleRate")  # the browser's capture rate
    log = server.stderr(tail_chars=100_000)
    assert f"stream {stream_id} from a WebSocket client: {rate} Hz, 1 channel(s), f32le" in log
