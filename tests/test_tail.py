"""`stream-ser tail`: a live view of a real broker's results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from stream_ser.messages import StreamInfo, speaking_message
from stream_ser.render import bar, format_result
from stream_ser.tail import TailOptions, TailView
from tests.conftest import LABELS, REPO, Broker, run_cli
from tests.schema import check_result
from tools.net import free_port

PREFIX = "tail-test"
STATUS = f"{PREFIX}/status/ser-host-room1"


def result(
    stream_id: str, utterance_id: int, start_ms: int, end_ms: int, **extra: Any
) -> dict[str, Any]:
    """A synthetic schema-1 result whose top label cycles through the labels."""
    top = LABELS[utterance_id % len(LABELS)]
    rest = (1 - 0.65) / (len(LABELS) - 1)
    distribution = {label: 0.65 if label == top else rest for label in LABELS}
    kind = extra.pop("type", "utterance")
    final = kind == "utterance"
    suffix = "f" if final else f"w{end_ms}"
    return {
        "schema_version": 1, "type": kind,
        "id": f"s1:{stream_id}:{utterance_id}:{suffix}", "stream_id": stream_id,
        "utterance_id": utterance_id, "start_ms": start_ms, "end_ms": end_ms,
        "wall_time": "2026-01-01T10:00:00.000Z", "distribution": distribution,
        "top_label": top, "top_probability": 0.65, "entropy": 1.67, "model_id": "tiny",
        "latency_ms": 2.0, "final": final, "arousal": None, "valence": None,
        **({"end_reason": "silence", "flags": [],
            "sources": {"specialist": {"model_id": "tiny", "distribution": distribution}}}
           if final else {}),
        **extra,
    }  # fmt: skip


def status(state: str, utterances: int = 0) -> bytes:
    return json.dumps({
        "schema_version": 1, "type": "status", "state": state, "streams": ["room1"],
        "wall_time": "2026-01-01T10:00:00.000Z", "counters": {"utterances": utterances},
    }).encode()  # fmt: skip


def speaking(stream_id: str, utterance_id: int, now: bool) -> bytes:
    """The retained voice-activity message the pipeline publishes."""
    stream = StreamInfo(stream_id, "session", "model", LABELS)
    return json.dumps(speaking_message(stream, utterance_id, now, 1000)).encode()


def payload(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def test_bars_are_proportional_and_padded() -> None:
    assert bar(1.0, 10) == "█" * 10
    assert bar(0.0, 10) == " " * 10
    assert bar(0.55, 10) == "█████▌    "
    assert bar(0.5, 10, unicode=False) == "#####     "


def test_view_deduplicates_and_reports_changes_only() -> None:
    view = TailView(TailOptions(topic_prefix=PREFIX))
    first = result("room1", 1, 1000, 3000, arousal=0.61, valence=-0.5)
    check_result(first, LABELS)  # the synthetic results follow the schema
    lines = view.handle(f"{PREFIX}/room1/utterance", payload(first))
    assert len(lines) == 1 and "A +0.61 V -0.50" in lines[0] and "final" in lines[0]
    assert view.handle(f"{PREFIX}/room1/utterance", payload(first)) == []  # same id
    assert len(view.handle(STATUS, status("online"))) == 1
    assert view.handle(STATUS, status("online", 5)) == []  # a refresh, not a change
    assert "offline" in view.handle(STATUS, status("offline"))[0]
    topic = f"{PREFIX}/room1/speaking"
    assert view.handle(topic, speaking("room1", 1, True))[0].split()[1:] == ["room1", "speaking"]
    assert view.handle(topic, speaking("room1", 1, True)) == []  # no change
    assert view.handle(topic, speaking("room1", 1, False))[0].split()[1:] == ["room1", "quiet"]
    assert view.handle(topic, speaking("room1", 2, False)) == []
    assert view.handle(topic, b"ON") == []  # not the message format: ignored
    assert view.handle("other/room1/utterance", payload(first)) == []
    assert view.handle(f"{PREFIX}/room1/utterance", b"not json") == []
    assert view.results == 1


def test_json_mode_prints_results_only() -> None:
    view = TailView(TailOptions(topic_prefix=PREFIX, json=True))
    message = result("room1", 2, 0, 1000)
    assert json.loads(view.handle(f"{PREFIX}/room1/utterance", payload(message))[0]) == message
    assert view.handle(STATUS, status("online")) == []


def test_line_shows_top_three_and_provisional() -> None:
    message = result("room1", 3, 1200, 4800) | {"final": False}
    line = format_result(message)
    ranked = sorted(message["distribution"], key=lambda k: -message["distribution"][k])
    assert "prov" in line and "#3" in line and "65%" in line and "1.20-4.80 s" in line
    assert line.count("█") >= 5  # the top label's bar
    assert sum(label in line for label in ranked[1:]) >= 2  # two runners-up named
    assert "A " not in line  # arousal/valence null in this result
    assert "A -0.20 V +0.40" in format_result(
        result("room1", 3, 0, 900, arousal_valence={"arousal": -0.2, "valence": 0.4})
    )  # the object form is read too


async def start_tail(broker: Broker, *args: str) -> asyncio.subprocess.Process:
    """`stream-ser tail` as a subprocess; returns once its first line (the status) is out."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream_ser", "tail", "--mqtt", broker.url,
        "--mqtt-topic-prefix", PREFIX, *args,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def read_line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(20):
        return (await process.stdout.readline()).decode()


@contextlib.asynccontextmanager
async def subscribed_tail(broker: Broker, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`stream-ser tail` once subscribed (it has printed a retained status); killed at the end
    if it still runs."""
    async with asyncio.timeout(10), aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish(STATUS, status("online"), qos=1, retain=True)
    process = await start_tail(broker, *args)
    try:
        assert "online" in await read_line(process)
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_tail_prints_live_results_from_a_real_broker(broker: Broker) -> None:
    async with subscribed_tail(broker, "--count", "3") as process:
        first = result("room1", 1, 500, 2500, arousal=0.3, valence=0.2)
        async with asyncio.timeout(10), aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.publish(f"{PREFIX}/room1/window", payload(result(
                "room1", 1, 500, 1500, type="window")), qos=0)  # fmt: skip
            await client.publish(f"{PREFIX}/room1/utterance", payload(first), qos=1)
            await client.publish(f"{PREFIX}/room1/utterance", payload(first), qos=1)
            await client.publish(f"{PREFIX}/room1/speaking", speaking("room1", 2, True), qos=1,
                                 retain=True)  # fmt: skip
            await client.publish(f"{PREFIX}/kitchen/utterance", payload(
                result("kitchen", 1, 0, 900) | {"final": False}), qos=1)  # fmt: skip
            await client.publish(STATUS, status("offline", 2), qos=1, retain=True)
            await client.publish(f"{PREFIX}/room1/utterance", payload(
                result("room1", 2, 3000, 4000)), qos=1)  # fmt: skip
        async with asyncio.timeout(20):
            out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 5, lines
    assert "room1" in lines[0] and "#1" in lines[0] and "final" in lines[0]
    assert "A +0.30 V +0.20" in lines[0] and "0.50-2.50 s" in lines[0]
    assert lines[1].split()[1:] == ["room1", "speaking"]
    assert "kitchen" in lines[2] and "prov" in lines[2]
    assert "offline" in lines[3] and "utterances=2" in lines[3]
    assert "#2" in lines[4] and "window" not in out.decode()


async def test_tail_exits_cleanly_on_ctrl_c(broker: Broker) -> None:
    async with asyncio.timeout(10), aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish(STATUS, status("online"), qos=1, retain=True)
    process = await start_tail(broker, "--windows")
    try:
        assert "online" in await read_line(process)
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            _, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    assert b"Traceback" not in err


def test_tail_reports_an_unreachable_broker() -> None:
    done = run_cli("tail", "--mqtt", f"mqtt://127.0.0.1:{free_port()}", timeout_s=60)
    assert done.returncode == 1
    assert "cannot connect to broker" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
async def test_tail_follows_a_running_pipeline(
    broker: Broker, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    """The real publisher's messages, not hand-made ones: speaking/quiet around each result."""
    path, clip_count = speech_with_pauses
    async with subscribed_tail(broker, "--count", str(2 * clip_count)) as process:
        done = await asyncio.to_thread(
            run_cli, "run", "--input", str(path), "--model", str(tiny_model), "--mqtt",
            broker.url, "--mqtt-topic-prefix", PREFIX, "--mqtt-client-id", "tailed",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        async with asyncio.timeout(30):  # provisional + final of each utterance
            out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    lines = [line.split() for line in out.decode().splitlines()]
    assert len([words for words in lines if "final" in words]) == clip_count
    activity = [words[2] for words in lines if words[1] != "status" and len(words) == 3]
    assert activity == ["speaking", "quiet"] * clip_count


def test_window_results_look_different_from_provisional_ones() -> None:
    window = format_result(result("room1", 3, 1200, 2200, type="window"))
    provisional = format_result(result("room1", 3, 1200, 2200) | {"final": False})
    final = format_result(result("room1", 3, 1200, 2200))
    assert "win" in window and "prov" not in window
    assert "prov" in provisional and "final" in final
    assert len({window, provisional, final}) == 3
