"""Reading the store: what the uplink may send next, and what status shows.

The uplink's reads go through their own connection (the writer thread owns the other) and
the journal's readings in memory (agent/store/tail.py), merged by id: only durable rows, never
held ones, never rows acknowledged and waiting for their deletion.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from dataclasses import dataclass
from typing import Any

from agent.store.tail import Tail, TailRow

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
    tail: Tail

    def wait_for_change(self, seen_durable_id: int, timeout: float) -> int:
        """Block until rows beyond ``seen_durable_id`` are durable, or timeout."""
        with self._changed:
            if self.durable_id <= seen_durable_id:
                self._changed.wait(timeout)
            return self.durable_id

    def fetch(self, stream: str, after_id: int, limit: int) -> list[Row]:
        """Durable, unacknowledged rows of a stream after ``after_id``, oldest first."""
        return self.page(stream, after_id, limit)[0]

    def page(self, stream: str, after_id: int, limit: int) -> tuple[list[Row], int | None]:
        """``fetch``, and where to go on from: the last id returned when ``limit`` rows were
        found (more may follow), else None (the stream has no more)."""
        # The journal's first: a row folded into SQLite in between is then found in one or
        # both (the fold commits before it leaves the tail), never in neither.
        extra = self.tail.page(stream, after_id, limit)
        rows, more = self._sql_page(stream, after_id, limit)
        if not extra:
            return rows, more
        merged = {r.id: r for r in rows} | {r.id: _row(r) for r in extra}
        out = [merged[i] for i in sorted(merged)][:limit]
        return out, out[-1].id if len(out) == limit else None

    def _sql_page(self, stream: str, after_id: int, limit: int) -> tuple[list[Row], int | None]:
        """SQLite's part of ``page``. Acknowledged rows stay in the table until the writer's
        next commit deletes them, so they are skipped here, past the SQL ``LIMIT``: ``limit``
        rows of them must not hide the rows behind (the outbox would take the stream for
        drained and wait for new rows)."""
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
            if len(out) >= limit:
                return out[:limit], out[limit - 1].id
            if len(rows) < want:
                return out, None
            after_id = rows[-1][0]
            want = min(want * 2, _SKIP_CHUNK_MAX)  # a long acknowledged run: bigger steps

    def newest(self, stream: str) -> Row | None:
        """The newest durable, unacknowledged, not held row of a stream."""
        row = self.tail.newest(stream)  # the journal's are newer than any in SQLite
        return _row(row) if row is not None else self._sql_newest(stream)

    def _sql_newest(self, stream: str) -> Row | None:
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
            names = [r[0] for r in self._rconn.execute("SELECT stream FROM streams")]
        return names + sorted(self.tail.streams() - set(names))

    def depth(self) -> dict[str, int]:
        """Readings per stream in SQLite (``streams.depth``, kept by triggers:
        agent/store/schema.py) and in the journal."""
        with self._visibility:
            with self._rlock:
                out = dict(self._rconn.execute("SELECT stream, depth FROM streams ORDER BY stream").fetchall())
            for stream, n in self.tail.depth().items():
                out[stream] = out.get(stream, 0) + n
        return dict(sorted(out.items()))

    @property
    def queued(self) -> int:
        """Readings appended but not yet committed."""
        return self._queued

    def pending(self) -> int:
        """Readings not yet acknowledged by the broker (queued, buffered or in flight)."""
        with self._count_lock:
            queued = self._queued  # read first: a reading moves from queued to a row, never back
        with self._visibility:
            with self._rlock:
                n: int = self._rconn.execute("SELECT COALESCE(SUM(depth), 0) FROM streams").fetchone()[0]
            n += sum(self.tail.depth().values()) - len(self._acked)
        return n + queued


# Per stream, without reading the backlog: the count kept in ``streams.depth``, the first row
# by id from the readings_stream index (seqs rise with ids, so it holds the lowest seq; the
# first one not held is the reading that has waited longest), held rows from the partial
# readings_held index (almost always none).
_SUMMARY = (
    "SELECT s.stream, s.last_seq, s.depth,"
    " (SELECT ts FROM readings r WHERE r.stream = s.stream AND r.held = 0 ORDER BY r.id LIMIT 1),"
    " (SELECT seq FROM readings r WHERE r.stream = s.stream ORDER BY r.id LIMIT 1),"
    " (SELECT COUNT(*) FROM readings r WHERE r.held = 1 AND r.stream = s.stream)"
    " FROM streams s ORDER BY s.stream"
)
# A store not yet opened by this version (no ``depth``): counted the slow way, once.
_SUMMARY_V3 = (
    "SELECT s.stream, s.last_seq, COUNT(r.id), MIN(CASE WHEN r.held = 0 THEN r.ts END), MIN(r.seq),"
    " COALESCE(SUM(r.held), 0) FROM streams s "
    "LEFT JOIN readings r ON r.stream = s.stream GROUP BY s.stream ORDER BY s.stream"
)


def buffer_summary(conn: sqlite3.Connection, lock: threading.Lock | None = None) -> dict[str, dict[str, Any]]:
    """Per stream: rows buffered, last seq, the oldest unsent reading's time and seq, held rows."""
    with lock or contextlib.nullcontext():
        cols = {r[1] for r in conn.execute("PRAGMA table_info(streams)")}
        rows = conn.execute(_SUMMARY if "depth" in cols else _SUMMARY_V3).fetchall()
    return {
        s: {"count": n, "last_seq": last, "oldest_ts_ms": oldest, "oldest_seq": first, "held": held}
        for s, last, n, oldest, first, held in rows
    }


def _row(r: TailRow) -> Row:
    return Row(r.id, r.stream, r.seq, r.ts, r.body)
