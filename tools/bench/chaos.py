"""Replay the attacks of issue #17 (items 1-12) against a real mosquitto and real processes.

Each attack starts its own broker and stream-ser processes (`run`, `run --mqtt-audio` as a
worker, `send`), does what the issue describes in a few seconds, and counts what reached a
subscriber. One table row per attack:

    attack    item and name
    expected  what a correct stream-ser delivers (results, or the behaviour named)
    delivered what a subscriber got (distinct result ids, or the behaviour seen)
    dup       results received more than once (same `id`)
    tb        Python tracebacks in the processes' stderr
    exit      exit codes of the processes, in start order (`-`: killed after a timeout)
    verdict   ok / FAIL

    .venv/bin/python -m tools.bench.chaos --model tests/tiny          # all attacks (~3-4 min)
    .venv/bin/python -m tools.bench.chaos --only corrupt-spool --json out.json

Needs mosquitto on PATH; `disk-full` needs root (it mounts a small tmpfs) and is skipped
otherwise. Exit status: 0 when every attack that ran is ok, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import soundfile

from stream_ser.worker import OWNER_TTL_S
from tools.bench.chaos_lab import (
    Broker,
    Proc,
    Row,
    Subscriber,
    bursts,
    count_ids,
    stream_ser,
    table,
    wait_until,
)

PREFIX = "chaos"


@dataclass
class Lab:
    """What every attack gets: a fresh folder, the model, the processes' environment."""

    directory: Path
    model: str | None
    procs: list[Proc] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {"XDG_STATE_HOME": str(self.directory / "state"), "PYTHONUNBUFFERED": "1"}

    def proc(self, name: str, *args: str) -> Proc:
        process = Proc(name, stream_ser(*args), self.directory / "logs", self.env)
        self.procs.append(process)
        return process

    def run_args(self, broker: Broker, *args: str) -> list[str]:
        """`run` flags every attack shares (tiny output, no descriptors)."""
        model = ["--model", self.model] if self.model else []
        return ["run", "--mqtt", broker.url, "--mqtt-topic-prefix", PREFIX, "--no-descriptors",
                "--no-model-windows", "--mqtt-status-interval-s", "1", *model, *args]  # fmt: skip

    def worker(self, broker: Broker, name: str, *args: str) -> Proc:
        process = self.proc(name, *self.run_args(broker, "--mqtt-audio", "--mqtt-client-id", name,
                                                 *args))  # fmt: skip
        return process

    def send(self, broker: Broker, name: str, path: Path, stream_id: str, *args: str) -> Proc:
        return self.proc(name, "send", "--input", str(path), "--stream-id", stream_id, "--mqtt",
                         broker.url, "--mqtt-topic-prefix", PREFIX, *args)  # fmt: skip

    def tracebacks(self) -> int:
        return sum(p.tracebacks() for p in self.procs)

    def close(self) -> None:
        for process in self.procs:
            if process.process.poll() is None:
                process.kill()


def jsonl(text: str, kind: str) -> list[dict[str, Any]]:
    """The results of type `kind` in a process's JSON Lines output."""
    found = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            message = json.loads(line)
            if isinstance(message, dict) and message.get("type") == kind:
                found.append(message)
    return found


def online(subscriber: Subscriber, client_id: str) -> Callable[[], bool]:
    """True once the retained status of `client_id` says online."""

    def check() -> bool:
        payload = subscriber.last(f"{PREFIX}/status/{client_id}")
        with contextlib.suppress(ValueError, AttributeError):
            return bool(payload) and json.loads(payload or b"{}").get("state") == "online"
        return False

    return check


def finals_row(name: str, lab: Lab, sub: Subscriber, expected: int, codes: list[int | None],
               codes_ok: bool = True, note: str = "") -> Row:  # fmt: skip
    """The common row: distinct final results against `expected`."""
    distinct, duplicates = count_ids(sub.results())
    tracebacks = lab.tracebacks()
    ok = distinct == expected and duplicates == 0 and tracebacks == 0 and codes_ok
    return Row(name, f"{expected} finals", f"{distinct} finals", duplicates, tracebacks, codes,
               ok, note)  # fmt: skip


DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
WINDOWED_S = 3.0  # bursts long enough for window results with any model (the bundled: 2 s)


# --- the attacks ----------------------------------------------------------------------------


def results_past(subscriber: Subscriber, count: int) -> Callable[[], bool]:
    """True once `subscriber` holds more than `count` results."""

    def check() -> bool:
        return len(subscriber.results()) > count

    return check


def session_ids(lab: Lab) -> Row:
    """1: one device streams 5 short sessions to the same worker: 5 distinct final ids."""
    broker = Broker(lab.directory / "broker").start()
    sub = Subscriber(broker, [f"{PREFIX}/+/utterance", f"{PREFIX}/status/+"])
    worker = lab.worker(broker, "w1")
    wait_until(online(sub, "w1"), 30)
    path = bursts(lab.directory / "door.wav", 1, off_s=1.5)
    codes: list[int | None] = []
    for index in range(5):
        codes.append(lab.send(broker, f"send{index}", path, "door", "--speed", "4").wait(30))
        wait_until(results_past(sub, index), 8)
    wait_until(lambda: len(sub.results()) >= 5, 5)
    codes.append(worker.stop())
    row = finals_row("1 session-ids", lab, sub, 5, codes, codes == [0] * 6)
    sub.close()
    broker.stop()
    return row


def same_client_id(lab: Lab) -> Row:
    """2: two runs of files with the same stem (same default client id and spool) at once."""
    broker = Broker(lab.directory / "broker").start()
    sub = Subscriber(broker, [f"{PREFIX}/+/utterance"])
    runs = []
    for side in ("a", "b"):
        path = bursts(lab.directory / side / "talk.wav", 3)
        runs.append(lab.proc(f"run-{side}", *lab.run_args(
            broker, "--input", str(path), "--realtime", "--speed", "2")))  # fmt: skip
    codes = [run.wait(60) for run in runs]
    wait_until(lambda: len(sub.results()) >= 6, 5)
    refused = [run for run, code in zip(runs, codes, strict=True) if code == 2]
    one_line = all(len(run.stderr.strip().splitlines()) == 1 for run in refused)
    expected = 3 if len(refused) == 1 and one_line else 6
    codes_ok = codes == [0, 0] or (sorted(c or 0 for c in codes) == [0, 2] and one_line)
    row = finals_row("2 same-client-id", lab, sub, expected, codes, codes_ok,
                     "6 finals, or 3 and a one-line refusal")  # fmt: skip
    sub.close()
    broker.stop()
    return row


def refused_topic(lab: Lab) -> Row:
    """3a: a stream id with NUL (from a TOML file) is refused at start; the next run with the
    same client id delivers everything."""
    broker = Broker(lab.directory / "broker").start()
    sub = Subscriber(broker, [f"{PREFIX}/+/utterance"])
    config = lab.directory / "nul.toml"
    config.write_text('[source]\nstream_id = "bad\\u0000id"\n')
    path = bursts(lab.directory / "talk.wav", 2)
    first = lab.proc("nul", *lab.run_args(broker, "--config", str(config), "--input", str(path),
                                          "--mqtt-client-id", "same", "--mqtt-connect-timeout-s",
                                          "3"))  # fmt: skip
    codes = [first.wait(30)]
    second = lab.proc("next", *lab.run_args(broker, "--input", str(path), "--mqtt-client-id",
                                            "same", "--mqtt-connect-timeout-s", "3"))  # fmt: skip
    codes.append(second.wait(30))
    wait_until(lambda: len(sub.results()) >= 2, 3)
    row = finals_row("3a refused-topic", lab, sub, 2, codes, codes == [2, 0],
                     "exit 2 for the NUL id, then 2 finals")  # fmt: skip
    sub.close()
    broker.stop()
    return row


def refused_size(lab: Lab) -> Row:
    """3b: finals exceed the broker's message_size_limit: they are set aside and the windows
    behind them (small enough) are still delivered."""
    broker = Broker(lab.directory / "broker", ["message_size_limit 700"]).start()
    sub = Subscriber(broker, [f"{PREFIX}/+/window"])
    path = bursts(lab.directory / "talk.wav", 3, on_s=WINDOWED_S)
    run = lab.proc("run", *lab.run_args(broker, "--input", str(path), "--model-windows",
                                        "--jsonl", "--mqtt-client-id", "big",
                                        "--mqtt-connect-timeout-s", "3"))  # fmt: skip
    codes = [run.wait(40)]
    produced = len(jsonl(run.stdout, "window"))
    wait_until(lambda: len(sub.results("window", None)) >= produced, 3)
    distinct, duplicates = count_ids(sub.results("window", None))
    tracebacks = lab.tracebacks()
    ok = produced > 0 and distinct == produced and tracebacks == 0 and codes[0] is not None
    sub.close()
    broker.stop()
    return Row("3b refused-size", f"{produced} windows", f"{distinct} windows", duplicates,
               tracebacks, codes, ok, "finals > limit, windows < limit")  # fmt: skip


def disk_full(lab: Lab) -> Row:
    """4: the spool folder is on a nearly full file system: keep running, drop and count."""
    mount = lab.directory / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)],
                             capture_output=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        return Row("4 disk-full", "-", "skipped", note="needs root to mount a tmpfs")
    try:
        with contextlib.suppress(OSError), (mount / "filler").open("wb") as filler:
            filler.write(b"\0" * 150 * 1024)
        broker = Broker(lab.directory / "broker").start()
        sub = Subscriber(broker, [f"{PREFIX}/+/utterance"])
        path = bursts(lab.directory / "talk.wav", 3)
        run = lab.proc("run", *lab.run_args(broker, "--input", str(path), "--model-windows",
                                            "--mqtt-spool-dir", str(mount)))  # fmt: skip
        codes = [run.wait(40)]
        wait_until(lambda: len(sub.results()) >= 3, 3)
        row = finals_row("4 disk-full", lab, sub, 3, codes, codes == [0], "10 KB free")
        sub.close()
        broker.stop()
        return row
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, check=False)


def corrupt_spool(lab: Lab) -> Row:
    """5: the spool file is garbage behind a valid SQLite header: move it aside, start fresh."""
    broker = Broker(lab.directory / "broker").start()
    sub = Subscriber(broker, [f"{PREFIX}/+/utterance"])
    spool = lab.directory / "spool"
    spool.mkdir()
    (spool / "corrupt.sqlite3").write_bytes(b"SQLite format 3\0" + os.urandom(8192))
    path = bursts(lab.directory / "talk.wav", 2)
    run = lab.proc("run", *lab.run_args(broker, "--input", str(path), "--mqtt-client-id",
                                        "corrupt", "--mqtt-spool-dir", str(spool)))  # fmt: skip
    codes = [run.wait(40)]
    wait_until(lambda: len(sub.results()) >= 2, 3)
    row = finals_row("5 corrupt-spool", lab, sub, 2, codes, codes == [0])
    sub.close()
    broker.stop()
    return row


def truncated_file(lab: Lab) -> Row:
    """6: a FLAC cut at 90 %: every utterance wholly in the readable part, then exit 1."""
    whole = bursts(lab.directory / "whole.flac", 32, on_s=0.8, off_s=0.7)
    data = whole.read_bytes()
    cut = lab.directory / "cut.flac"
    cut.write_bytes(data[: len(data) * 9 // 10])
    readable_s = _readable_seconds(cut)
    # burst k spans 0.5 + 1.5k .. 1.3 + 1.5k s; its end is decided 500 ms (hangover) later
    expected = sum(1 for k in range(32) if 1.3 + 1.5 * k + 0.5 + 0.1 <= readable_s)
    model = ["--model", lab.model] if lab.model else []
    run = lab.proc("run", "run", "--input", str(cut), "--no-descriptors", "--no-model-windows",
                   *model)  # fmt: skip
    codes = [run.wait(40)]
    distinct = len({m["id"] for m in jsonl(run.stdout, "utterance") if m.get("final")})
    tracebacks = lab.tracebacks()
    ok = distinct >= expected and codes == [1] and tracebacks == 0
    return Row("6 truncated-file", f"{expected} finals, exit 1", f"{distinct} finals", 0,
               tracebacks, codes, ok, f"{readable_s:.1f} s readable")  # fmt: skip


def _readable_seconds(path: Path) -> float:
    frames = 0
    with contextlib.suppress(Exception), soundfile.SoundFile(path) as audio:
        for block in audio.blocks(blocksize=1600):
            frames += len(block)
    return frames / 16000


def broker_hang(lab: Lab) -> Row:
    """7: the broker is SIGSTOPped for 12 s mid-run (keep-alive 5 s): every window is
    delivered or counted as dropped."""
    broker = Broker(lab.directory / "broker").start()
    sub = Subscriber(broker, [f"{PREFIX}/+/window", f"{PREFIX}/+/utterance",
                              f"{PREFIX}/status/+"])  # fmt: skip
    path = bursts(lab.directory / "talk.wav", 8, on_s=WINDOWED_S)
    run = lab.proc("run", *lab.run_args(broker, "--input", str(path), "--realtime",
                                        "--model-windows", "--jsonl", "--mqtt-client-id", "hang",
                                        "--mqtt-keepalive-s", "5"))  # fmt: skip
    wait_until(online(sub, "hang"), 30)
    time.sleep(1.5)
    broker.pause()
    time.sleep(12.0)
    broker.resume()
    codes = [run.wait(60)]
    produced = len(jsonl(run.stdout, "window"))
    wait_until(lambda: len(sub.results("window", None)) >= produced, 5)
    delivered, duplicates = count_ids(sub.results("window", None))
    status = json.loads(sub.last(f"{PREFIX}/status/hang") or b"{}")
    dropped = int(status.get("counters", {}).get("spool_dropped_windows", 0))
    tracebacks = lab.tracebacks()
    ok = produced > 0 and delivered + dropped == produced and tracebacks == 0 and codes == [0]
    sub.close()
    broker.stop()
    return Row("7 broker-hang", f"{produced} windows", f"{delivered} + {dropped} counted",
               duplicates, tracebacks, codes, ok, "delivered + counted dropped")  # fmt: skip


def bad_owner_record(lab: Lab) -> Row:
    """8: retained owner records with wrong types; the worker must still claim the streams."""
    broker = Broker(lab.directory / "broker").start()
    sub = Subscriber(broker, [f"{PREFIX}/+/utterance", f"{PREFIX}/status/+"])
    for stream_id, owner in (("porch", b'{"worker": []}'), ("gate", b'{"worker": 5}')):
        sub.client.publish(f"{PREFIX}/audio/{stream_id}/owner", owner, qos=1, retain=True)
    worker = lab.worker(broker, "w8")
    wait_until(online(sub, "w8"), 30)
    path = bursts(lab.directory / "talk.wav", 2)
    codes = [lab.send(broker, f"send-{s}", path, s, "--speed", "4").wait(30)
             for s in ("porch", "gate")]  # fmt: skip
    wait_until(lambda: len(sub.results()) >= 4, 10)
    codes.append(worker.stop())
    row = finals_row("8 bad-owner-record", lab, sub, 4, codes, codes == [0, 0, 0])
    sub.close()
    broker.stop()
    return row


def backoff_reset(lab: Lab) -> Row:
    """9: four 2-second broker kills while a device streams 8 utterances to a worker."""
    broker = Broker(lab.directory / "broker", persistence=True).start()
    sub = Subscriber(broker, [f"{PREFIX}/+/utterance", f"{PREFIX}/status/+"])
    worker = lab.worker(broker, "w9")
    wait_until(online(sub, "w9"), 30)
    path = bursts(lab.directory / "talk.wav", 8)
    sender = lab.send(broker, "send", path, "yard")
    for _ in range(4):
        time.sleep(1.5)
        broker.kill()
        time.sleep(2.0)
        broker.start()
    codes = [sender.wait(60)]
    wait_until(lambda: len({r["id"] for r in sub.results()}) >= 8, 15)
    codes.append(worker.stop())
    row = finals_row("9 backoff-reset", lab, sub, 8, codes, codes == [0, 0])
    sub.close()
    broker.stop()
    return row


def hello_flood(lab: Lab) -> Row:
    """10: 500 fake hellos: memory and the retained status stay small after they end."""
    broker = Broker(lab.directory / "broker").start()
    sub = Subscriber(broker, [f"{PREFIX}/status/+"])
    worker = lab.worker(broker, "w10")
    wait_until(online(sub, "w10"), 30)
    time.sleep(1.0)
    before = worker.rss_mb()
    for index in range(500):
        hello = {"stream_id": f"fake{index}", "sample_rate": 16000, "channels": 1, "seq": 0}
        sub.client.publish(f"{PREFIX}/audio/fake{index}/hello", json.dumps(hello), qos=1)
    time.sleep(14.0)  # past the idle timeout (10 s) of streams that never send audio
    after = worker.rss_mb()
    status = sub.last(f"{PREFIX}/status/w10") or b""
    codes = [worker.stop()]
    tracebacks = lab.tracebacks()
    ok = len(status) <= 16_384 and after - before <= 20 and tracebacks == 0 and codes == [0]
    sub.close()
    broker.stop()
    return Row("10 hello-flood", "status <= 16 KB, RSS +<= 20 MB",
               f"status {len(status) / 1024:.0f} KB, RSS {after - before:+.0f} MB", 0,
               tracebacks, codes, ok, "500 hellos, after they idle out")  # fmt: skip


def acl_refused(lab: Lab) -> Row:
    """11: the broker refuses the worker's subscriptions: it must fail loudly. mosquitto's
    dynamic-security plugin refuses them in the SUBACK (an `acl_file` grants every SUBACK and
    filters messages later, which no client can tell); an anonymous client has no role."""
    dynsec = lab.directory / "dynsec.json"
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(dynsec), "admin", "admin-pw"],
                   check=True, capture_output=True, timeout=30)  # fmt: skip
    broker = Broker(lab.directory / "broker")
    broker.config.write_text(
        f"user {getpass.getuser()}\nper_listener_settings false\nallow_anonymous true\n"
        f"plugin {DYNSEC_PLUGIN}\nplugin_opt_config_file {dynsec}\n"
        f"listener {broker.port} 127.0.0.1\n"
    )
    broker.start()
    worker = lab.worker(broker, "w11")
    code = worker.wait(15)
    tracebacks = lab.tracebacks()
    lines = worker.stderr.strip().splitlines()
    loud = code not in (0, None) and any("error" in line.lower() for line in lines)
    broker.stop()
    seen = "still running after 15 s" if code is None else f"exited, {len(lines)} line(s)"
    return Row(
        "11 acl-refused",
        "exit != 0 with an error",
        seen,
        0,
        tracebacks,
        [code],
        loud and tracebacks == 0,
    )


def orphaned_streams(lab: Lab) -> Row:
    """12: a worker and the broker die together; another worker must take the stream over."""
    broker = Broker(lab.directory / "broker", persistence=True).start()
    sub = Subscriber(broker, [f"{PREFIX}/+/utterance", f"{PREFIX}/status/+"])
    first = lab.worker(broker, "w12a")
    wait_until(online(sub, "w12a"), 30)
    long_talk = bursts(lab.directory / "long.wav", 6)
    sender = lab.send(broker, "send-1", long_talk, "hall")
    time.sleep(4.0)  # claimed (owner record retained and saved)
    first.kill()
    broker.kill()
    sender.kill()
    broker.start()
    before = len({r["id"] for r in sub.results()})
    second = lab.worker(broker, "w12b")
    wait_until(online(sub, "w12b"), 30)
    time.sleep(OWNER_TTL_S + 1)  # the dead worker's claim must expire first
    codes = [lab.send(broker, "send-2", bursts(lab.directory / "talk.wav", 3), "hall").wait(40)]
    wait_until(lambda: len({r["id"] for r in sub.results()}) >= before + 3, 15)
    codes.append(second.stop())
    after = len({r["id"] for r in sub.results()})
    tracebacks = lab.tracebacks()
    ok = after - before == 3 and tracebacks == 0 and codes == [0, 0]
    sub.close()
    broker.stop()
    return Row("12 orphaned-streams", "3 finals from the new worker", f"{after - before} finals",
               0, tracebacks, codes, ok, "the device resumes after the claim expiry")  # fmt: skip


ATTACKS: dict[str, Callable[[Lab], Row]] = {
    "session-ids": session_ids,
    "same-client-id": same_client_id,
    "refused-topic": refused_topic,
    "refused-size": refused_size,
    "disk-full": disk_full,
    "corrupt-spool": corrupt_spool,
    "truncated-file": truncated_file,
    "broker-hang": broker_hang,
    "bad-owner-record": bad_owner_record,
    "backoff-reset": backoff_reset,
    "hello-flood": hello_flood,
    "acl-refused": acl_refused,
    "orphaned-streams": orphaned_streams,
}


# --- running and reporting ------------------------------------------------------------------


def run_attack(name: str, model: str | None, keep: Path | None) -> Row:
    """One attack in a fresh folder; an exception in the script itself becomes a FAIL row."""
    with _folder(keep, name) as directory:
        lab = Lab(directory, model)
        started = time.monotonic()
        try:
            row = ATTACKS[name](lab)
        except Exception as err:  # the script's own failure: report it, go on with the next
            row = Row(name, "-", "attack failed", note=f"{type(err).__name__}: {err}")
        finally:
            lab.close()
        row.note = (row.note + "; " if row.note else "") + f"{time.monotonic() - started:.0f} s"
        return row


@contextlib.contextmanager
def _folder(keep: Path | None, name: str) -> Iterator[Path]:
    if keep is not None:
        directory = keep / name
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix=f"chaos-{name}-") as temporary:
        yield Path(temporary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="specialist directory (default: the bundled model)")
    parser.add_argument("--only", action="append", choices=sorted(ATTACKS),
                        help="run this attack only (repeatable)")  # fmt: skip
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--keep", metavar="DIR", help="keep each attack's folder (logs) here")
    args = parser.parse_args(argv)
    rows = []
    for name in args.only or list(ATTACKS):
        row = run_attack(name, args.model, Path(args.keep) if args.keep else None)
        print(f"{row.attack}: {'ok' if row.ok else 'FAIL'} ({row.delivered})", file=sys.stderr)
        rows.append(row)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    ran = [r for r in rows if r.delivered != "skipped"]
    return 0 if all(r.ok for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
