"""What the store gives up when it must: the oldest, least valuable readings, never evidence.

When the buffer outgrows ``[store] max_mb`` (or the disk is full), readings are shed in this
order until it is back under 80 % of the limit: old `health`, old `can`, two of every three
old `position` readings (the track stays, at a third of the density), the same for old
`temperature`, then the oldest positions. (Thinning by half would free no space: SQLite
merges pages only once they are about a third full, and new rows never go into old pages.)
Seal events, alarms and ignition changes are never shed. (Both lists are the stream
catalogue's ``shed`` and ``never_shed`` columns, agent/model/streams.py; a stream the catalogue
does not know is shed for age, never for size.) Readings that have waited longer
than ``max_age_days`` go the same way. Every loss is reported as a `data_dropped` alarm, so a
gap in seq at the backend is always explained.

Age is how long a reading has waited in the store: the device's trusted time now minus its
trusted time when the row was stored (``stored_ms``), never the readings' own times: one
reading dated 2099 (a receiver's bad epoch) would otherwise make every other one "old".
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from agent.model.streams import NEVER_SHED, SHED_STEPS

TARGET = 0.8
# The newest readings of a stream are what the backend needs most when the link returns.
KEEP_NEWEST = 100


@dataclass(frozen=True, slots=True)
class Dropped:
    stream: str
    count: int
    first_seq: int
    last_seq: int
    reason: str  # "store_full", "too_old", "unwritable", "store_damaged", "store_missing", "journal_damaged",
    # "too_large", "undeliverable"


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes the data occupies (the file does not shrink; freed pages are reused)."""
    pages: int = conn.execute("PRAGMA page_count").fetchone()[0]
    free: int = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size: int = conn.execute("PRAGMA page_size").fetchone()[0]
    return (pages - free) * size


@dataclass(frozen=True, slots=True)
class Plan:
    """Rows to give up, oldest first; deleted in chunks so no transaction needs much journal."""
    stream: str
    rows: list[tuple[int, int]]  # (id, seq)
    reason: str


def plan_shed(conn: sqlite3.Connection, limit_bytes: int) -> Plan | None:
    """The next rows to give up while the data is over TARGET × limit, or None when under it
    or when nothing sheddable is left."""
    if used_bytes(conn) <= TARGET * limit_bytes:
        return None
    for stream, every in SHED_STEPS:
        rows = _oldest(conn, stream, every)
        if rows:
            return Plan(stream, rows, "store_full")
    return None


def plan_expiry(conn: sqlite3.Connection, stored_before_ms: int) -> list[Plan]:
    """Sheddable readings stored before ``stored_before_ms`` (rows stored while no trusted
    time was known have none, and are only ever shed for size).

    Runs every 10 s: it must read only the expired rows, never the backlog. ``INDEXED BY``
    holds the plan to a range of readings_stored; left alone, SQLite would rather walk the
    whole table through readings_stream (to get ``stream`` in order), 266 MB a pass for a
    million positions. What it still reads is the rows it deletes, and evidence (never shed)
    older than the limit."""
    by_stream: dict[str, list[tuple[int, int]]] = {}
    for rid, stream, seq in conn.execute(
        f"SELECT id, stream, seq FROM readings INDEXED BY readings_stored WHERE stored_ms < ? AND held = 0 "
        f"AND stream NOT IN ({','.join('?' * len(NEVER_SHED))})", (stored_before_ms, *NEVER_SHED)
    ).fetchall():
        by_stream.setdefault(stream, []).append((rid, seq))
    return [Plan(stream, sorted(rows), "too_old") for stream, rows in sorted(by_stream.items())]


def _oldest(conn: sqlite3.Connection, stream: str, every: int) -> list[tuple[int, int]]:
    """The older half of a stream: all of it (``every`` 1), or all but one in ``every``."""
    row = conn.execute("SELECT depth FROM streams WHERE stream = ?", (stream,)).fetchone()  # kept by triggers
    total = row[0] if row else 0
    candidates = (total - KEEP_NEWEST) // 2
    if candidates <= 0:
        return []
    rows = conn.execute(
        "SELECT id, seq FROM readings WHERE stream = ? ORDER BY id LIMIT ?", (stream, candidates)
    ).fetchall()
    if every > 1:
        rows = [r for k, r in enumerate(rows) if k % every]  # keeps the first of each group
    return rows


def delete(conn: sqlite3.Connection, stream: str, rows: list[tuple[int, int]], reason: str) -> Dropped:
    """Delete these rows, inside the caller's transaction."""
    conn.executemany("DELETE FROM readings WHERE id = ?", [(r[0],) for r in rows])
    seqs = [r[1] for r in rows]
    return Dropped(stream, len(rows), min(seqs), max(seqs), reason)
