"""What a store holds, read only, from outside the agent (``lorry-agent status``, tests): SQLite's
summary with the journal's readings not folded into it yet, and the newest status values.

The journal (agent/store/journal.py) holds the newest readings and status values until the
next fold, so SQLite alone would show a running or crashed agent's buffer hours behind. A
journal record is not in SQLite exactly when its seq is above its stream's ``last_seq``
(agent/store/fold.py). Acknowledgements are journaled with the next write: a running agent
may have sent a few of what is counted here.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from agent.store import journal
from agent.store.fold import acked_ids, journal_row
from agent.store.reader import buffer_summary
from agent.store.tail import TailRow


def open_ro(store: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)


def _journal(store: Path) -> tuple[list[TailRow], set[int], dict[str, str]]:
    """The journal's readings (records of an unknown shape skipped), the ids acknowledged,
    and its status values, in order."""
    records = journal.read(journal.path_for(store)).records
    rows: list[TailRow] = []
    state: dict[str, str] = {}
    for rec in records:
        try:
            if rec[0] == "s":
                state[str(rec[1])] = str(rec[2])
            elif (row := journal_row(rec)) is not None:
                rows.append(row)
        except (ValueError, TypeError, IndexError):
            continue
    return rows, acked_ids(records), state


def _unfolded(conn: sqlite3.Connection, store: Path) -> tuple[list[TailRow], dict[str, str]]:
    """The journal's readings not in SQLite and not acknowledged, and its status values."""
    folded = dict(conn.execute("SELECT stream, last_seq FROM streams").fetchall())
    rows, acked, state = _journal(store)
    return [r for r in rows if r.seq > folded.get(r.stream, 0) and r.id not in acked], state


def summary(conn: sqlite3.Connection, store: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Per stream as :func:`buffer_summary`, the journal's readings included; and the status
    values (``state``), the journal's newer ones over SQLite's."""
    buffers = buffer_summary(conn)
    state = dict(conn.execute("SELECT key, value FROM state").fetchall())
    rows, newer = _unfolded(conn, store)
    state.update(newer)
    for r in rows:
        b = buffers.setdefault(r.stream, {"count": 0, "last_seq": 0, "oldest_ts_ms": None,
                                          "oldest_seq": None, "held": 0})
        b["count"] += 1
        b["last_seq"] = max(b["last_seq"] or 0, r.seq)
        if r.hold:
            b["held"] += 1
        elif b["oldest_ts_ms"] is None:
            b["oldest_ts_ms"] = r.ts
        if b["oldest_seq"] is None:
            b["oldest_seq"] = r.seq
    return buffers, state


def depth(store: Path) -> int:
    """Readings on disk, not known to be acknowledged: SQLite's rows and the journal's."""
    if not store.exists():
        return 0
    conn = open_ro(store)
    try:
        return sum(b["count"] for b in summary(conn, store)[0].values())
    finally:
        conn.close()


def readings(conn: sqlite3.Connection, store: Path) -> list[tuple[str, int, str, bool]]:
    """(stream, seq, body, held) of every reading on disk not known to be acknowledged:
    SQLite's rows, then the journal's not folded yet."""
    out = [(s, n, b, bool(h)) for s, n, b, h in conn.execute("SELECT stream, seq, body, held FROM readings")]
    return out + [(r.stream, r.seq, r.body, r.hold is not None) for r in _unfolded(conn, store)[0]]


def last_seqs(conn: sqlite3.Connection, store: Path) -> dict[str, int]:
    """Per stream, the last seq handed out: SQLite's counter, or the journal's newest record."""
    out: dict[str, int] = dict(conn.execute("SELECT stream, last_seq FROM streams").fetchall())
    for r in _journal(store)[0]:
        out[r.stream] = max(out.get(r.stream, 0), r.seq)
    return out
