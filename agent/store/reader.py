"""Reading the store: what the uplink may send next, and what status shows.

The uplink's reads go through their own connection (the writer thread owns the other): only
durable rows (up to ``durable_id``), never held ones, never rows acknowledged and waiting for
their deletion.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from typing import Any

_SKIP_CHUNK_MAX = 4096
"""Rows read at a time while skipping acknowledged rows that wait for their deletion."""


@dataclass(slots=True, frozen=True)
class Row:
    id: int
    stream: str
    seq: int
    ts_ms: int
    body: str


class StoreReader:
    """The reading half of the Store (agent/store/buffer.py), which sets these up."""

    _rconn: sqlite3.Connection
    _rlock: threading.Lock
    _changed: threading.Condition
    _count_lock: threading.Lock
    _visibility: threading.Lock
    _acked: set[int]
    _queued: int
    durable_id: int

    def wait_for_change(self, seen_durable_id: int, timeout: float) -> int:
        """Block until rows beyond ``seen_durable_id`` are durable, or timeout."""
        with self._changed:
            if self.durable_id <= seen_durable_id:
                self._changed.wait(timeout)
            return self.durable_id

    def fetch(self, stream: str, after_id: int, limit: int) -> list[Row]:
        """Durable, unacknowledged rows of a stream after ``after_id``, oldest first.

        Acknowledged rows stay in the table until the writer's next commit deletes them, so
        they are skipped here, past the SQL ``LIMIT``: ``limit`` rows of them must not hide the
        rows behind (the outbox would take the stream for drained and wait for new rows)."""
        top = self.durable_id
        out: list[Row] = []
        want = limit
        while True:
            with self._rlock:
                rows = self._rconn.execute(
                    "SELECT id, stream, seq, ts, body FROM readings "
                    "WHERE stream = ? AND id > ? AND id <= ? AND held = 0 ORDER BY id LIMIT ?",
                    (stream, after_id, top, want),
                ).fetchall()
            acked = self._acked
            out += [Row(*r) for r in rows if r[0] not in acked]
            if len(out) >= limit or len(rows) < want:
                return out[:limit]
            after_id = rows[-1][0]
            want = min(want * 2, _SKIP_CHUNK_MAX)  # a long acknowledged run: bigger steps

    def newest(self, stream: str) -> Row | None:
        """The newest durable, unacknowledged, not held row of a stream."""
        top = self.durable_id
        want = 1
        while True:
            with self._rlock:
                rows = self._rconn.execute(
                    "SELECT id, stream, seq, ts, body FROM readings "
                    "WHERE stream = ? AND id <= ? AND held = 0 ORDER BY id DESC LIMIT ?",
                    (stream, top, want),
                ).fetchall()
            acked = self._acked
            for r in rows:
                if r[0] not in acked:
                    return Row(*r)
            if len(rows) < want:
                return None
            top = rows[-1][0] - 1
            want = min(want * 2, _SKIP_CHUNK_MAX)

    def streams(self) -> list[str]:
        with self._rlock:
            return [r[0] for r in self._rconn.execute("SELECT stream FROM streams")]

    def depth(self) -> dict[str, int]:
        """Unacknowledged rows per stream, including those not yet committed."""
        return {s: d["count"] for s, d in buffer_summary(self._rconn, self._rlock).items()}

    @property
    def queued(self) -> int:
        """Readings appended but not yet committed."""
        return self._queued

    def pending(self) -> int:
        """Readings not yet acknowledged by the broker (queued, buffered or in flight)."""
        with self._count_lock:
            queued = self._queued  # read first: a reading moves from queued to a row, never back
        with self._visibility, self._rlock:
            n: int = self._rconn.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
            n -= len(self._acked)
        return n + queued


def buffer_summary(conn: sqlite3.Connection, lock: threading.Lock | None = None) -> dict[str, dict[str, Any]]:
    sql = (
        "SELECT s.stream, s.last_seq, COUNT(r.id), MIN(CASE WHEN r.held = 0 THEN r.ts END), MIN(r.seq),"
        " COALESCE(SUM(r.held), 0) FROM streams s "
        "LEFT JOIN readings r ON r.stream = s.stream GROUP BY s.stream ORDER BY s.stream"
    )
    if lock:
        with lock:
            rows = conn.execute(sql).fetchall()
    else:
        rows = conn.execute(sql).fetchall()
    return {
        s: {"count": n, "last_seq": last, "oldest_ts_ms": oldest, "oldest_seq": first, "held": held}
        for s, last, n, oldest, first, held in rows
    }
