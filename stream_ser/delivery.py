"""What one broker link has been sent from the spool, and what it is known to have received.

A QoS 1 message leaves the spool once the broker acknowledges it. A QoS 0 message has no
acknowledgement: it leaves the spool once a later QoS 1 publish on the same link has been
acknowledged (a broker handles one client's packets in order, so everything sent before
that has arrived). A link lost before that sends it again on the next link instead of
losing it; subscribers drop the duplicate by its `id`.

A broker that will not take a message (bigger than its `message_size_limit`, a topic it
rejects) closes the link as soon as the message arrives, and would do so on every attempt:
the first message the link had not confirmed when it was lost within SUSPECT_S of being
sent is blamed, and one blamed STRIKES times in a row is set aside as a dead letter, so that
delivery goes on behind it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from stream_ser.spool import Spool, Spooled

log = logging.getLogger(__name__)

SUSPECT_S = 2.0  # a link lost this soon after a message went out may have been closed over it
STRIKES = 2  # times in a row a message is blamed for a lost link before it is set aside


@dataclass(frozen=True)
class _Sent:
    message: Spooled
    at_s: float  # time.monotonic() when it went out


class LinkLedger:
    """The spooled messages the current link has sent and not yet confirmed."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.last_sent = 0  # highest sequence number sent on this link
        self._unconfirmed: list[_Sent] = []
        self._strikes: dict[int, int] = {}

    def sending(self, message: Spooled) -> None:
        """`message` goes out now on this link."""
        self._unconfirmed.append(_Sent(message, time.monotonic()))
        self.last_sent = message.seq

    def confirm(self) -> None:
        """A QoS 1 acknowledgement arrived on this link: everything sent before it arrived."""
        seqs = [sent.message.seq for sent in self._unconfirmed]
        self._unconfirmed.clear()
        for seq in seqs:
            self._strikes.pop(seq, None)
        self.spool.remove_many(seqs)

    def refused(self, message: Spooled, reason: str) -> None:
        """The broker answered `message` with a refusal: set it aside (never retried)."""
        self._unconfirmed = [sent for sent in self._unconfirmed if sent.message != message]
        self.confirm()
        self.spool.set_aside(message, reason)

    def lost(self) -> bool:
        """The link is gone; what it had not confirmed goes out again on the next one.
        True if a message blamed for it was set aside."""
        now_s = time.monotonic()
        suspects = [sent.message for sent in self._unconfirmed if now_s - sent.at_s <= SUSPECT_S]
        self._unconfirmed.clear()
        self.last_sent = 0
        return bool(suspects) and self._blame(suspects[0])

    def _blame(self, suspect: Spooled) -> bool:
        strikes = self._strikes.get(suspect.seq, 0) + 1
        self._strikes[suspect.seq] = strikes
        if strikes < STRIKES:
            return False
        del self._strikes[suspect.seq]
        reason = f"the broker closed the connection on receiving it, {strikes} times in a row"
        self.spool.set_aside(suspect, reason)
        log.error(
            "the broker will not take a %s message of %d bytes on %s (%s; its "
            "message_size_limit, or a topic it rejects?): set aside in the dead_letters table "
            "of %s and counted (spool_dead_letters); delivery goes on",
            suspect.kind, len(suspect.payload), suspect.topic[:200], reason, self.spool.path,
        )  # fmt: skip
        return True
