"""A bounded on-disk outbox for results waiting for the broker (SQLite, survives restarts).

Every result is written here first and removed only once the broker has acknowledged it,
so a broker outage or a restart of stream-ser loses nothing; delivery is in append order.
One process at a time: the spool is locked (a second process with the same MQTT client id
is refused at start-up).

Overflow rule: beyond `max_messages` waiting results, the oldest *window* result is dropped
for each new one; utterance results are kept until `hard_limit`, beyond which the oldest
utterance result is dropped. Beyond `max_bytes` of waiting payloads, the oldest window
results go first, then the oldest utterance results. A full disk ("database or disk is
full") drops the oldest window result to make room, else the new result. Every drop is
counted (and reported on the status topic).

A message the broker refuses is moved to the `dead_letters` table of the same file (kept,
never retried). A spool that cannot be read (corrupt, or written by an incompatible
version) is moved aside with a warning, and an empty one is started.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from stream_ser.errors import ConfigError, PublishError

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    set_aside_at REAL NOT NULL  -- Unix time (s)
);
"""
COLUMNS = ("seq", "kind", "topic", "qos", "retain", "payload")
KINDS = ("utterance", "window", "speaking", "announce")
WINDOW_KINDS = ("window", "speaking")  # the first to go when the spool is full
UTTERANCE_KINDS = ("utterance", "announce")
BAD_ROWS = f"""
SELECT COUNT(*) FROM outbox WHERE qos NOT IN (0, 1, 2) OR retain NOT IN (0, 1)
    OR kind NOT IN ({", ".join(f"'{kind}'" for kind in KINDS)})
    OR typeof(topic) != 'text' OR topic = '' OR typeof(payload) NOT IN ('blob', 'text')
"""
SQLITE_FULL = 13  # "database or disk is full"
SQLITE_IOERR = 10  # e.g. the shared-memory file could not be grown on a full disk
UNREADABLE = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
RESERVE_BYTES = 2**20  # disk space held for the spool, released when the disk is full


@dataclass(frozen=True)
class Spooled:
    """One waiting message."""

    seq: int
    kind: str  # "utterance", "window", "speaking" or "announce"
    topic: str
    qos: int
    payload: bytes
    retain: bool = False


@dataclass
class SpoolStats:
    """Counters for the status topic."""

    spool_dropped_windows: int = 0  # window results and speaking changes (the first to go)
    spool_dropped_utterances: int = 0  # utterance results and discovery configs
    spool_dead_letters: int = 0  # refused by the broker: set aside in `dead_letters`


def is_storage_full(err: sqlite3.Error) -> bool:
    """A write failed for want of disk space (or the I/O error a full disk gives)."""
    code = getattr(err, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (SQLITE_FULL, SQLITE_IOERR)


class Spool:
    """The outbox; synchronous, owned by one event loop."""

    def __init__(
        self,
        path: Path,
        max_messages: int = 10_000,
        hard_limit: int = 100_000,
        max_bytes: int = 256 * 2**20,
    ) -> None:
        if not 1 <= max_messages <= hard_limit or max_bytes < 1:
            raise PublishError("spool: need 1 <= max_messages <= hard_limit and max_bytes >= 1")
        self.path = path
        self.max_messages = max_messages
        self.hard_limit = hard_limit
        self.max_bytes = max_bytes
        self.stats = SpoolStats()
        self._undeleted: set[int] = set()  # delivered, but the disk was too full to delete them
        self._full_logged = False
        self._cap_bytes: int | None = None  # while the disk is full: the spool's size limit
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PublishError(f"cannot open the spool {path}: {err}") from err
        self._lock = _lock(path)
        self._reserve = Reserve(path.with_name(path.name + ".reserve"))
        try:
            self._db = _open_usable(path, self._reserve)
        except BaseException:
            os.close(self._lock)
            raise
        self._reserve.take()
        self._waiting, self._bytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM outbox"
        ).fetchone()
        if self._waiting:
            log.info("spool %s: %d result(s) from an earlier run to deliver", path, self._waiting)

    def __len__(self) -> int:
        return int(self._waiting) - len(self._undeleted)

    @property
    def waiting_bytes(self) -> int:
        """Payload bytes waiting."""
        return int(self._bytes)

    def append(self, kind: str, topic: str, qos: int, payload: bytes, retain: bool = False) -> None:
        """Store one message, applying the overflow rule first (speaking changes count as
        window results: they are the first to go)."""
        if not self._make_room(len(payload)):
            self._count_drop(kind)
            log.error("spool: a %s result of %d bytes exceeds --mqtt-spool-max-mb: dropped",
                      kind, len(payload))  # fmt: skip
            return
        try:
            self._insert(kind, topic, qos, payload, retain)
        except sqlite3.Error as err:
            if not is_storage_full(err):
                raise PublishError(f"spool {self.path}: {err}") from err
            self._append_on_full_disk(err, kind, topic, qos, payload, retain)

    def oldest(self, limit: int, after: int = 0) -> list[Spooled]:
        """Up to `limit` waiting messages with a sequence number above `after`, oldest first."""
        rows = self._db.execute(
            "SELECT seq, kind, topic, qos, payload, retain FROM outbox WHERE seq > ? "
            "ORDER BY seq LIMIT ?",
            (after, limit + len(self._undeleted)),
        ).fetchall()
        return [
            Spooled(seq, kind, topic, qos, bytes(data), bool(retain))
            for seq, kind, topic, qos, data, retain in rows
            if seq not in self._undeleted
        ][:limit]

    def remove(self, seq: int) -> None:
        """Forget a delivered message."""
        self.remove_many([seq])

    def remove_many(self, seqs: list[int]) -> None:
        """Forget delivered messages, in one statement (kept in memory if the disk is full)."""
        seqs = [*seqs, *self._undeleted]
        if not seqs:
            return
        try:
            sizes = self._delete(seqs)
        except sqlite3.Error as err:
            if not is_storage_full(err):
                raise PublishError(f"spool {self.path}: {err}") from err
            try:
                if not self._on_full_disk(err):
                    raise
                sizes = self._delete(seqs)
            except sqlite3.Error:
                self._undeleted.update(seqs)  # not sent again; deleted once there is room
                return
        self._undeleted.clear()
        self._waiting -= len(sizes)
        self._bytes -= sum(sizes)
        if self._cap_bytes is not None and not self._waiting and self._reserve.take():
            self._cap_bytes = None
            self._full_logged = False
            log.info("spool %s: the disk has room again", self.path)

    def set_aside(self, message: Spooled, reason: str) -> None:
        """Move a message the broker refuses to the `dead_letters` table, and count it."""
        self.stats.spool_dead_letters += 1
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO dead_letters "
                "SELECT seq, kind, topic, qos, retain, payload, ?, ? FROM outbox WHERE seq = ?",
                (reason, time.time(), message.seq),
            )
        except sqlite3.Error as err:
            if not is_storage_full(err):
                raise PublishError(f"spool {self.path}: {err}") from err
            log.error("spool: no room to keep a refused message in dead_letters: dropped")
        self.remove(message.seq)

    def close(self) -> None:
        """Close the database and release the lock; waiting messages stay for the next run."""
        self._db.close()
        os.close(self._lock)

    def _delete(self, seqs: list[int]) -> list[int]:
        marks = ", ".join("?" for _ in seqs)
        rows = self._db.execute(
            f"DELETE FROM outbox WHERE seq IN ({marks}) RETURNING length(payload)", seqs
        ).fetchall()
        return [size for (size,) in rows]

    def _insert(self, kind: str, topic: str, qos: int, payload: bytes, retain: bool) -> None:
        self._db.execute(
            "INSERT INTO outbox (kind, topic, qos, retain, payload) VALUES (?, ?, ?, ?, ?)",
            (kind, topic, qos, int(retain), payload),
        )
        self._waiting += 1
        self._bytes += len(payload)

    def _append_on_full_disk(
        self, err: sqlite3.Error, kind: str, topic: str, qos: int, payload: bytes, retain: bool
    ) -> None:
        """Make room: shrink the write-ahead log, else drop the oldest window result; if there
        is still none, the new message is dropped. Drops are counted."""
        self._on_full_disk(err)
        for make_room in (self._shrink_log, lambda: self._drop_oldest(WINDOW_KINDS)):
            with contextlib.suppress(sqlite3.Error, PublishError):
                make_room()
            try:
                self._insert(kind, topic, qos, payload, retain)
            except sqlite3.Error as again:
                if not is_storage_full(again):
                    raise PublishError(f"spool {self.path}: {again}") from again
            else:
                return
        self._count_drop(kind)

    def _shrink_log(self) -> None:
        """Copy the write-ahead log into the database and truncate it (frees the disk space
        of every superseded page version)."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _on_full_disk(self, err: sqlite3.Error) -> bool:
        """Log it once; release the reserve, if still held, and hold the spool near its size
        from now on (new results displace old ones) until it is empty and the reserve is
        back. True if the reserve was released."""
        if not self._full_logged:
            self._full_logged = True
            log.error(
                "spool %s: %s; free space on that disk: meanwhile results are dropped to make "
                "room (window results first) and counted", self.path, err,
            )  # fmt: skip
        if not self._reserve.release():
            return False
        self._cap_bytes = self._bytes + RESERVE_BYTES // 4
        return True

    def _make_room(self, size: int) -> bool:
        """Apply the overflow rule for a new message of `size` bytes; False if the message
        alone is larger than the byte limit allows."""
        waiting = len(self)
        dropped = waiting >= self.max_messages and self._drop_oldest(WINDOW_KINDS)
        if not dropped and waiting >= self.hard_limit and self._drop_oldest(UTTERANCE_KINDS):
            log.error("spool full (%d): dropped the oldest utterance result", self.hard_limit)
        limit = min(self.max_bytes, self._cap_bytes or self.max_bytes)
        if size > limit:
            return False
        while self._bytes + size > limit:
            if not self._drop_oldest(WINDOW_KINDS) and not self._drop_oldest(UTTERANCE_KINDS):
                return False
        return True

    def _drop_oldest(self, kinds: tuple[str, ...]) -> bool:
        marks = ", ".join("?" for _ in kinds)
        row = self._db.execute(
            f"SELECT seq, kind FROM outbox WHERE kind IN ({marks}) ORDER BY seq LIMIT 1", kinds
        ).fetchone()
        if row is None:
            return False
        before = self._waiting
        self.remove(row[0])
        if self._waiting == before:  # not deleted (full disk): no room made
            return False
        self._count_drop(row[1])
        return True

    def _count_drop(self, kind: str) -> None:
        if kind in WINDOW_KINDS:
            self.stats.spool_dropped_windows += 1
        else:
            self.stats.spool_dropped_utterances += 1


class Reserve:
    """A file holding RESERVE_BYTES of the spool's disk; released when the disk is full, it
    gives room to delete delivered results and to checkpoint the write-ahead log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def take(self) -> bool:
        """Hold the space (kept from an earlier run too); False if the disk has not got it."""
        try:
            with self.path.open("ab") as reserve:
                os.posix_fallocate(reserve.fileno(), 0, RESERVE_BYTES)
        except OSError:
            self.release()
            return False
        return True

    def release(self) -> bool:
        """Give the space back to the disk; False if it was not held."""
        try:
            self.path.unlink()
        except OSError:
            return False
        return True


def _lock(path: Path) -> int:
    """An exclusive lock on `{path}.lock` for the life of the process (released at exit,
    even by SIGKILL); ConfigError if another process holds it."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise PublishError(f"cannot open the spool lock {lock_path}: {err.strerror}") from err
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(descriptor)
        raise ConfigError(
            f"the spool {path} is in use by another stream-ser process with the same MQTT "
            "client id; give each process its own --stream-id or --mqtt-client-id"
        ) from err
    return descriptor


def _open_usable(path: Path, reserve: Reserve) -> sqlite3.Connection:
    """The spool's database; an unreadable one is moved aside first (and a new one started).
    A disk too full to open it, even once the reserve is released, gives an in-memory spool
    for this run."""
    try:
        db = _connect(path)
        problem = _problem(db)
    except sqlite3.Error as err:
        if is_storage_full(err) and reserve.release():
            log.warning("spool %s: %s; released its reserve", path, err)
            return _open_usable(path, reserve)
        if is_storage_full(err):
            log.error(
                "spool %s: %s; keeping results in memory for this run (they do not survive "
                "a restart, and what the file holds waits for a run with room)", path, err,
            )  # fmt: skip
            return _connect(Path(":memory:"))
        if getattr(err, "sqlite_errorcode", None) not in UNREADABLE:
            raise PublishError(f"cannot open the spool {path}: {err}") from err
        problem = str(err)
    else:
        if problem is None:
            return db
        db.close()
    aside = _move_aside(path)
    log.warning(
        "the spool %s is unusable (%s): moved to %s, starting with an empty spool; the "
        "results it held are not delivered", path, problem, aside,
    )  # fmt: skip
    try:
        return _connect(path)
    except sqlite3.Error as err:
        raise PublishError(f"cannot open the spool {path}: {err}") from err


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA journal_size_limit=1048576")  # the log shrinks back after a burst
        db.execute("PRAGMA wal_autocheckpoint=100")  # the log stays well within the reserve
        db.executescript(SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


def _problem(db: sqlite3.Connection) -> str | None:
    """Why the database cannot serve as a spool, or None."""
    (check,) = db.execute("PRAGMA quick_check(1)").fetchone()
    if check != "ok":
        return f"integrity check failed: {check}"
    columns = tuple(row[1] for row in db.execute("PRAGMA table_info(outbox)"))
    if columns != COLUMNS:
        return f"its outbox has columns {', '.join(columns)} (an incompatible version's spool)"
    (bad,) = db.execute(BAD_ROWS).fetchone()
    if bad:
        return f"{bad} message(s) with invalid fields"
    return None


def _move_aside(path: Path) -> Path:
    """Rename the database (and its -wal/-shm files) to `{name}.corrupt-{time}`."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        if source.exists():
            try:
                source.rename(aside.with_name(aside.name + suffix))
            except OSError as err:
                raise PublishError(f"cannot move the unusable spool {path} aside: {err}") from err
    return aside
