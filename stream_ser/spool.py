"""A bounded on-disk outbox for results waiting for the broker (SQLite, survives restarts).

Every result is written here first and removed only once the broker has acknowledged it,
so a broker outage or a restart of stream-ser loses nothing; delivery is in append order.

Overflow rule: beyond `max_messages` waiting results, the oldest *window* result is dropped
for each new one; utterance results are kept until `hard_limit`, beyond which the oldest
utterance result is dropped. Every drop is counted (and reported on the status topic).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from stream_ser.errors import PublishError

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL
)
"""


@dataclass(frozen=True)
class Spooled:
    """One waiting message."""

    seq: int
    kind: str  # "utterance", "window" or "speaking"
    topic: str
    qos: int
    payload: bytes
    retain: bool = False


@dataclass
class SpoolStats:
    """Counters for the status topic."""

    spool_dropped_windows: int = 0
    spool_dropped_utterances: int = 0


class Spool:
    """The outbox; synchronous, owned by one event loop."""

    def __init__(self, path: Path, max_messages: int = 10_000, hard_limit: int = 100_000) -> None:
        if not 1 <= max_messages <= hard_limit:
            raise PublishError("spool: need 1 <= max_messages <= hard_limit")
        self.path = path
        self.max_messages = max_messages
        self.hard_limit = hard_limit
        self.stats = SpoolStats()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise PublishError(f"cannot open the spool {path}: {err}") from err
        (self._waiting,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        if self._waiting:
            log.info("spool %s: %d result(s) from an earlier run to deliver", path, self._waiting)

    def __len__(self) -> int:
        return int(self._waiting)

    def append(self, kind: str, topic: str, qos: int, payload: bytes, retain: bool = False) -> None:
        """Store one message, applying the overflow rule first (speaking changes count as
        window results: they are the first to go)."""
        waiting = len(self)
        if waiting >= self.max_messages and self._drop_oldest(("window", "speaking")):
            self.stats.spool_dropped_windows += 1
        elif waiting >= self.hard_limit and self._drop_oldest(("utterance",)):
            self.stats.spool_dropped_utterances += 1
            log.error("spool full (%d): dropped the oldest utterance result", self.hard_limit)
        self._db.execute(
            "INSERT INTO outbox (kind, topic, qos, retain, payload) VALUES (?, ?, ?, ?, ?)",
            (kind, topic, qos, int(retain), payload),
        )
        self._waiting += 1

    def oldest(self, limit: int) -> list[Spooled]:
        """Up to `limit` waiting messages, oldest first."""
        rows = self._db.execute(
            "SELECT seq, kind, topic, qos, payload, retain FROM outbox ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            Spooled(seq, kind, topic, qos, bytes(data), bool(retain))
            for seq, kind, topic, qos, data, retain in rows
        ]

    def remove(self, seq: int) -> None:
        """Forget a delivered message."""
        self.remove_many([seq])

    def remove_many(self, seqs: list[int]) -> None:
        """Forget delivered messages, in one statement."""
        if not seqs:
            return
        marks = ", ".join("?" for _ in seqs)
        deleted = self._db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", seqs).rowcount
        self._waiting -= deleted

    def close(self) -> None:
        """Close the database; waiting messages stay for the next run."""
        self._db.close()

    def _drop_oldest(self, kinds: tuple[str, ...]) -> bool:
        marks = ", ".join("?" for _ in kinds)
        row = self._db.execute(
            f"SELECT seq FROM outbox WHERE kind IN ({marks}) ORDER BY seq LIMIT 1", kinds
        ).fetchone()
        if row is None:
            return False
        self.remove(row[0])
        return True
