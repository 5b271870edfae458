"""The spool under attack: two processes, refused messages, a full disk, corrupt files, a
hung broker. Real processes, a real mosquitto, real SQLite files."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from stream_ser.messages import status_message
from stream_ser.publish import MqttSink
from stream_ser.settings import MqttSettings
from stream_ser.spool import RESERVE_BYTES, Spool
from tests.conftest import REPO, Broker, run_cli
from tests.test_spool import PREFIX, Subscriber, long_recording


def start(*args: str) -> subprocess.Popen[bytes]:
    """`stream-ser run ARGS` in the background, stderr captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "stream_ser", "run", *args],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


async def finish(process: subprocess.Popen[bytes], timeout_s: float = 120) -> str:
    """Wait for the process; its stderr."""
    _, stderr = await asyncio.to_thread(process.communicate, timeout=timeout_s)
    return stderr.decode()


def offline_counters(subscriber: Subscriber) -> dict[str, Any]:
    (offline,) = [m for m in subscriber.messages if m.get("state") == "offline" and m["counters"]]
    counters: dict[str, Any] = offline["counters"]
    return counters


async def listening(broker: Broker) -> tuple[Subscriber, asyncio.Task[None]]:
    subscriber = Subscriber(broker)
    task = asyncio.create_task(subscriber.run())
    async with asyncio.timeout(10):
        await subscriber.subscribed.wait()
    return subscriber, task


@pytest.mark.slow
async def test_a_second_process_with_the_same_client_id_is_refused(
    tmp_path: Path, broker: Broker, tiny_model: Path, ravdess_clips: list[Path]
) -> None:
    """Two runs with the same client id would share one spool: the second one is refused at
    start-up with one line naming the flags to change; the first delivers everything."""
    recording = long_recording(tmp_path / "talk.wav", ravdess_clips, 3)
    subscriber, task = await listening(broker)
    options = ["--model", str(tiny_model), "--mqtt", broker.url, "--mqtt-topic-prefix", PREFIX,
               "--mqtt-client-id", "same"]  # fmt: skip
    first = start("--input", str(recording), "--realtime", "--speed", "2", *options)
    try:
        async with asyncio.timeout(60):
            await subscriber.online.wait()
        second = await asyncio.to_thread(run_cli, "run", "--input", str(recording), *options)
        assert second.returncode == 2, second.stderr
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith("stream-ser: error: the spool ")
        assert "--stream-id" in line and "--mqtt-client-id" in line
        stderr = await finish(first)
        assert first.returncode == 0, stderr
        async with asyncio.timeout(30):
            await subscriber.offline.wait()
    finally:
        first.kill()
        task.cancel()
    assert subscriber.final_ids() == list(range(1, offline_counters(subscriber)["utterances"] + 1))
    assert offline_counters(subscriber)["utterances"] == 3


@pytest.mark.slow
async def test_messages_the_broker_refuses_are_set_aside_and_delivery_goes_on(
    tmp_path: Path, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    """A broker whose message_size_limit is below a final's size closes the link on every
    final: each is set aside after two tries, everything else is delivered, in order."""
    path, clip_count = speech_with_pauses
    broker = Broker(tmp_path)
    with broker.config.open("a") as config:
        config.write("message_size_limit 1000\n")  # finals ~1.5 kB; the rest < 1 kB
    broker.start()
    spool_dir = tmp_path / "spool"
    try:
        subscriber, task = await listening(broker)
        done = await asyncio.to_thread(
            run_cli, "run", "--input", str(path), "--model", str(tiny_model), "--mqtt",
            broker.url, "--mqtt-topic-prefix", PREFIX, "--mqtt-client-id", "refused",
            "--mqtt-spool-dir", str(spool_dir),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        async with asyncio.timeout(30):
            await subscriber.offline.wait()
        task.cancel()
    finally:
        broker.stop()
    assert "Traceback" not in done.stderr
    assert "set aside in the dead_letters table" in done.stderr
    counters = offline_counters(subscriber)
    assert counters["spool_dead_letters"] == clip_count == counters["utterances"]
    assert counters["spool_waiting"] == 0
    provisional = [m["utterance_id"] for m in subscriber.messages
                   if m.get("type") == "utterance" and not m["final"]]  # fmt: skip
    assert provisional == list(range(1, clip_count + 1))  # delivery went on past each final
    windows = {m["id"] for m in subscriber.messages if m.get("type") == "window"}
    assert len(windows) == counters["windows"]
    with sqlite3.connect(spool_dir / "refused.sqlite3") as db:
        kept = db.execute("SELECT kind, length(payload) FROM dead_letters ORDER BY seq").fetchall()
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)
    assert [kind for kind, _ in kept] == ["utterance"] * clip_count
    assert all(size > 1000 for _, size in kept)


async def test_a_topic_the_broker_rejects_is_set_aside(tmp_path: Path, broker: Broker) -> None:
    """A topic with NUL (a remote device's stream id, say): mosquitto drops the connection on
    it. It is set aside after two tries; the message behind it is delivered."""
    settings = MqttSettings(url=broker.url, topic_prefix=PREFIX, connect_timeout_s=5.0)
    subscriber, task = await listening(broker)
    path = tmp_path / "o.sqlite3"
    try:
        async with asyncio.timeout(60):
            async with MqttSink(settings, "nul", ["s"], Spool(path)) as sink:
                for index, stream_id in ((1, "bad\0id"), (2, "s")):
                    message = {"type": "utterance", "final": True, "id": f"u{index}"}
                    await sink.result(stream_id, message | {"utterance_id": index})  # type: ignore[arg-type]
                await sink.status(status_message("offline", ["s"], {"utterances": 2}))
            await subscriber.offline.wait()
    finally:
        task.cancel()
    assert sink.counters()["spool_dead_letters"] == 1
    assert subscriber.final_ids() == [2]
    with sqlite3.connect(path) as db:
        (topic,) = db.execute("SELECT topic FROM dead_letters").fetchone()
    assert topic == f"{PREFIX}/bad\0id/utterance"


@pytest.mark.parametrize(
    ("value", "flag"),
    [
        ('[source]\nstream_id = "a\\u0000b"\n', "--stream-id"),
        ('[mqtt]\nclient_id = "a\\u0000b"\n', "--mqtt-client-id"),
        ("", "--mqtt-client-id"),  # '#' given as a flag below
        ('[source]\nstream_id = "' + "x" * 70_000 + '"\n', "--stream-id"),
        ('[mqtt]\nclient_id = "' + "x" * 300 + '"\n', "--mqtt-client-id"),
    ],
)
def test_invalid_stream_and_client_ids_are_refused_at_start_up(
    tmp_path: Path, tiny_model: Path, value: str, flag: str
) -> None:
    config = tmp_path / "settings.toml"
    config.write_text(value)
    clip = tmp_path / "silence.wav"
    soundfile.write(clip, np.zeros(16000, dtype=np.float32), 16000)
    extra = [] if value else ["--mqtt-client-id", "a#b"]
    done = run_cli("run", "--input", str(clip), "--model", str(tiny_model), "--config",
                   str(config), "--mqtt", "mqtt://127.0.0.1:1", *extra)  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"stream-ser: error: {flag}")


def test_the_spool_is_bounded_in_bytes_windows_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "o.sqlite3", max_bytes=1000)
    for index in range(3):
        spool.append("window", "w", 0, b"w" * 200)
        spool.append("utterance", "u", 1, f"u{index}".encode() * 50)  # 100 bytes each
    assert spool.waiting_bytes == 900
    spool.append("utterance", "u", 1, b"x" * 300)  # 1200 > 1000: the oldest window goes
    assert [m.kind for m in spool.oldest(10)] == ["utterance", "window", "utterance", "window",
                                                  "utterance", "utterance"]  # fmt: skip
    spool.append("utterance", "u", 1, b"y" * 500)  # both windows, then the oldest utterance
    assert [len(m.payload) for m in spool.oldest(10)] == [100, 100, 300, 500]
    spool.append("utterance", "u", 1, b"z" * 1001)  # can never fit: dropped itself
    assert spool.stats.spool_dropped_windows == 3
    assert spool.stats.spool_dropped_utterances == 2
    assert spool.waiting_bytes == 1000
    spool.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 4 MB tmpfs, mounted for the test (needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave_bytes: int) -> None:
    """Fill the disk up to `leave_bytes` of free space."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave_bytes))


def test_a_full_disk_releases_the_reserve_and_holds_the_spool_near_its_size(
    small_disk: Path,
) -> None:
    spool = Spool(small_disk / "o.sqlite3")
    reserve = small_disk / "o.sqlite3.reserve"
    assert reserve.stat().st_size == RESERVE_BYTES
    for _ in range(20):
        spool.append("utterance", "u", 1, b"u" * 500)
    fill(small_disk, 0)
    for index in range(2000):  # 1 MB of window results, an utterance result every tenth
        spool.append("window", "w", 0, b"w" * 500)
        if index % 10 == 0:
            spool.append("utterance", "u", 1, b"f" * 500)
    assert not reserve.exists()  # released to the spool
    kinds = [m.kind for m in spool.oldest(100_000)]
    assert kinds.count("utterance") == 220  # window results made room for every one
    assert spool.stats.spool_dropped_windows == 2000 - kinds.count("window") > 1000
    assert spool.stats.spool_dropped_utterances == 0
    assert spool.waiting_bytes <= 20 * 500 + RESERVE_BYTES // 4
    spool.remove_many([m.seq for m in spool.oldest(100_000)])  # delivered: deletable
    assert len(spool) == 0 and not reserve.exists()  # the disk is still full
    (small_disk / "filler").unlink()
    spool.append("utterance", "u", 1, b"x")
    spool.remove_many([m.seq for m in spool.oldest(10)])
    assert reserve.stat().st_size == RESERVE_BYTES  # taken back: no more holding
    spool.close()
    reopened = Spool(small_disk / "o.sqlite3")
    assert len(reopened) == 0
    reopened.close()


@pytest.mark.slow
async def test_a_full_disk_drops_and_counts_and_every_run_goes_on(
    tmp_path: Path, small_disk: Path, tiny_model: Path, ravdess_clips: list[Path]
) -> None:
    """The broker goes away, results pile up in a spool on a disk that fills: drops are
    counted, the run goes on and delivers the rest once the broker is back; the next run,
    on the still-full disk, starts and delivers too."""
    broker = Broker(tmp_path)
    broker.start()
    fill(small_disk, RESERVE_BYTES + 100 * 1024)
    recording = long_recording(tmp_path / "talk.wav", ravdess_clips, 10)
    options = ["--model", str(tiny_model), "--mqtt", broker.url, "--mqtt-topic-prefix", PREFIX,
               "--mqtt-client-id", "full", "--mqtt-spool-dir", str(small_disk),
               "--mqtt-connect-timeout-s", "3"]  # fmt: skip
    try:
        watcher, watching = await listening(broker)
        process = start("--input", str(recording), "--realtime", "--speed", "4", *options)
        async with asyncio.timeout(60):
            await watcher.online.wait()
        watching.cancel()
        broker.stop()
        await asyncio.sleep(9)  # results pile up in the spool, and fill the disk
        broker.start()
        subscriber, task = await listening(broker)
        stderr = await finish(process)
        assert process.returncode == 0, stderr
        async with asyncio.timeout(30):
            await subscriber.offline.wait()
        task.cancel()
        assert "database or disk is full" in stderr
        assert "Traceback" not in stderr
        counters = offline_counters(subscriber)
        windows = {m["id"] for m in subscriber.messages if m.get("type") == "window"}
        finals = subscriber.final_ids()
        assert len(windows) + counters["spool_dropped_windows"] >= counters["windows"]
        assert finals == sorted(finals)
        assert len(finals) + counters["spool_dropped_utterances"] >= counters["utterances"]
        assert finals[-1] == counters["utterances"]  # delivery works again on the full disk

        fill(small_disk, 0)  # the next run starts on a disk without a byte free
        subscriber, task = await listening(broker)
        silent = tmp_path / "short.wav"
        soundfile.write(silent, soundfile.read(ravdess_clips[0], dtype="float32")[0], 16000)
        done = await asyncio.to_thread(run_cli, "run", "--input", str(silent), *options)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        async with asyncio.timeout(30):
            await subscriber.offline.wait()
        task.cancel()
        assert subscriber.final_ids() == [1]
    finally:
        broker.stop()


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    page = 4096  # the second page holds the outbox table
    data[page : page + 64] = bytes(b ^ 0xFF for b in data[page : page + 64])
    path.write_bytes(bytes(data))


def invalid_qos(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE outbox SET qos = 7 WHERE seq = 2")


def older_schema(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE outbox")
        db.execute(
            "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT "
            "NOT NULL, topic TEXT NOT NULL, qos INTEGER NOT NULL, payload BLOB NOT NULL)"
        )
        db.execute("INSERT INTO outbox (kind, topic, qos, payload) VALUES ('utterance', 't', "
                   "1, x'7b7d')")  # fmt: skip


@pytest.mark.parametrize("damage", [flip_bytes, invalid_qos, older_schema])
async def test_a_corrupt_spool_is_moved_aside_and_a_fresh_one_started(
    tmp_path: Path, broker: Broker, tiny_model: Path, damage: Any
) -> None:
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir / "corrupt.sqlite3")
    for index in range(50):
        spool.append("utterance", f"{PREFIX}/old/utterance", 1, b'{"old": %d}' % index)
    spool.close()
    damage(spool_dir / "corrupt.sqlite3")
    clip = tmp_path / "silence.wav"
    soundfile.write(clip, np.zeros(16000, dtype=np.float32), 16000)
    subscriber, task = await listening(broker)
    done = await asyncio.to_thread(
        run_cli, "run", "--input", str(clip), "--model", str(tiny_model), "--mqtt", broker.url,
        "--mqtt-topic-prefix", PREFIX, "--mqtt-client-id", "corrupt", "--mqtt-spool-dir",
        str(spool_dir),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "is unusable" in done.stderr and "starting with an empty spool" in done.stderr
    async with asyncio.timeout(30):
        await subscriber.offline.wait()
    task.cancel()
    assert len(list(spool_dir.glob("corrupt.sqlite3.corrupt-*"))) >= 1
    assert not [m for m in subscriber.messages if "old" in m]
    reopened = Spool(spool_dir / "corrupt.sqlite3")
    assert len(reopened) == 0
    reopened.close()


def continuous_speech(path: Path, clips: list[Path], count: int) -> Path:
    """Clips back to back: with a long VAD hangover, one long utterance of window results."""
    pieces = [soundfile.read(clips[i % len(clips)], dtype="float32")[0] for i in range(count)]
    soundfile.write(path, np.concatenate(pieces), 16000)
    return path


@pytest.mark.slow
async def test_window_results_survive_a_hung_broker(
    tmp_path: Path, tiny_model: Path, ravdess_clips: list[Path]
) -> None:
    """SIGSTOP the broker while window results stream (QoS 0: nothing acknowledges them), then
    kill it, as a watchdog would, and start it again: what the hung broker had not read is
    gone with it. Every window result the old link had not confirmed is sent again on the
    new one: none is lost."""
    broker = Broker(tmp_path, persistence=True)
    with broker.config.open("a") as config:  # the subscriber's session survives the kill,
        config.write("autosave_interval 1\nqueue_qos0_messages true\n")  # windows queue for it
    broker.start()
    recording = continuous_speech(tmp_path / "talk.wav", ravdess_clips, 8)
    try:
        subscriber, task = await listening(broker)
        process = start("--input", str(recording), "--realtime", "--speed", "2", "--model",
                        str(tiny_model), "--mqtt", broker.url, "--mqtt-topic-prefix", PREFIX,
                        "--mqtt-client-id", "hung", "--vad-hangover-ms", "3000",
                        "--vad-max-utterance-ms", "60000")  # fmt: skip
        async with asyncio.timeout(60):
            await subscriber.online.wait()
        await asyncio.sleep(3)  # the broker saves the subscriber's session meanwhile
        assert broker.process is not None
        broker.process.send_signal(signal.SIGSTOP)
        await asyncio.sleep(3)  # window results pile up unread in the hung broker's socket
        broker.process.kill()
        broker.process.wait(timeout=10)
        broker.start()
        stderr = await finish(process)
        assert process.returncode == 0, stderr
        assert "retrying" in stderr  # the loss was noticed
        assert "Traceback" not in stderr
        async with asyncio.timeout(30):
            await subscriber.offline.wait()
        task.cancel()
    finally:
        if broker.process is not None:
            broker.process.send_signal(signal.SIGCONT)  # if the test failed while it hung
        broker.stop()
    counters = offline_counters(subscriber)
    windows = {m["id"] for m in subscriber.messages if m.get("type") == "window"}
    assert counters["spool_dropped_windows"] == 0
    assert counters["windows"] > 20
    assert len(windows) == counters["windows"]
    assert subscriber.final_ids() == list(range(1, counters["utterances"] + 1))
