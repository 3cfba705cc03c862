"""Losses the backend has not been told of yet, kept until their announcement is durable.

When the store gives readings up or continues above seqs it may have lost (retention, a
damaged journal, a fresh store after a lost one), the gap is committed at once while its
``data_dropped`` alarm is only queued: a crash or a power cut in between would leave a gap that
no alarm explains, and the next start, finding the gap already committed, would not see it
again. So each loss is recorded in the ``state`` table in the same transaction that makes it,
reported again at every start while it is there, and forgotten once the journal holds its alarm
durably (agent/store/writer.py). A cut between the two announces it twice: the backend sees the
same range twice, never none.
"""

from __future__ import annotations

import json
import logging
import sqlite3

from agent.store.retention import Dropped

log = logging.getLogger(__name__)

KEY = "unannounced_drops"


def _load(conn: sqlite3.Connection) -> list[Dropped]:
    row = conn.execute("SELECT value FROM state WHERE key = ?", (KEY,)).fetchone()
    if row is None:
        return []
    try:
        return [Dropped(str(s), int(n), int(lo), int(hi), str(why)) for s, n, lo, hi, why in json.loads(row[0])]
    except (ValueError, TypeError) as e:  # a damaged value: say so; the losses it held are unknown
        log.error("store: unannounced losses unreadable (%s); ignored", e)
        return []


def _value(items: list[Dropped]) -> str:
    return json.dumps([[d.stream, d.count, d.first_seq, d.last_seq, d.reason] for d in items],
                      separators=(",", ":"))


class Unannounced:
    """The store's record of losses whose alarm is not durable yet (the writer thread's)."""

    def __init__(self, conn: sqlite3.Connection):
        self.items = _load(conn)
        self.failing = False

    def write(self, conn: sqlite3.Connection, dropped: list[Dropped]) -> None:
        """Record ``dropped`` inside the caller's transaction; call :meth:`added` after its commit."""
        if dropped:
            conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (KEY, _value(self.items + dropped)))

    def added(self, dropped: list[Dropped]) -> None:
        self.items = self.items + dropped

    def forget(self, conn: sqlite3.Connection, done: list[Dropped]) -> bool:
        """Their alarms are durable: the record goes (one small commit). False on an error
        (a full disk): the caller tries again later; a start before that announces them again."""
        left = [d for d in self.items if d not in done]
        if len(left) == len(self.items):
            return True
        try:
            with conn:
                if left:
                    conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (KEY, _value(left)))
                else:
                    conn.execute("DELETE FROM state WHERE key = ?", (KEY,))
        except sqlite3.Error as e:
            if not self.failing:
                log.error("store: announced losses not forgotten yet (%s); will retry", e)
            self.failing = True
            return False
        self.items, self.failing = left, False
        return True
