"""What a store holds, read only, from outside the agent (``lorry-agent status``, tests): SQLite's
summary with the journal's readings not folded into it yet, and the newest status values.

The journal (agent/store/journal.py) holds the newest readings and status values until the
next fold, so SQLite alone would show a running or crashed agent's buffer hours behind. A
journal record is not in SQLite exactly when its seq is above its stream's ``last_seq``
(agent/store/fold.py). Acknowledgements are not journaled: a running agent may have sent some
of what is counted here (its own status says how many wait).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from agent.store import journal
from agent.store.fold import acked_ids
from agent.store.reader import buffer_summary


def journal_path(store: Path) -> Path:
    return store.with_name(store.name + ".journal")


def summary(conn: sqlite3.Connection, store: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Per stream as :func:`buffer_summary`, the journal's readings included; and the status
    values (``state``), the journal's newer ones over SQLite's."""
    buffers = buffer_summary(conn)
    state = dict(conn.execute("SELECT key, value FROM state").fetchall())
    folded = {stream: b["last_seq"] or 0 for stream, b in buffers.items()}
    records = journal.read(journal_path(store)).records
    acked = acked_ids(records)
    for rec in records:
        try:
            if rec[0] == "s":
                state[str(rec[1])] = str(rec[2])
                continue
            _kind, _id, stream, seq, ts, _body, hold = rec[:7]
            stream, seq = str(stream), int(seq)
        except (ValueError, TypeError, IndexError):
            continue
        if seq <= folded.get(stream, 0) or _id in acked:
            continue  # in SQLite already, or acknowledged
        b = buffers.setdefault(stream, {"count": 0, "last_seq": 0, "oldest_ts_ms": None,
                                        "oldest_seq": None, "held": 0})
        b["count"] += 1
        b["last_seq"] = max(b["last_seq"] or 0, seq)
        if hold:
            b["held"] += 1
        elif b["oldest_ts_ms"] is None:
            b["oldest_ts_ms"] = ts
        if b["oldest_seq"] is None:
            b["oldest_seq"] = seq
    return buffers, state


def depth(store: Path) -> int:
    """Readings on disk, not known to be acknowledged: SQLite's rows and the journal's."""
    if not store.exists():
        return 0
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
    try:
        return sum(b["count"] for b in summary(conn, store)[0].values())
    finally:
        conn.close()


def readings(conn: sqlite3.Connection, store: Path) -> list[tuple[str, int, str, bool]]:
    """(stream, seq, body, held) of every reading on disk not known to be acknowledged:
    SQLite's rows, then the journal's not folded yet."""
    out = [(s, n, b, bool(h)) for s, n, b, h in conn.execute("SELECT stream, seq, body, held FROM readings")]
    folded = dict(conn.execute("SELECT stream, last_seq FROM streams").fetchall())
    records = journal.read(journal_path(store)).records
    acked = acked_ids(records)
    for rec in records:
        try:
            if rec[0] != "r" or rec[1] in acked or int(rec[3]) <= folded.get(rec[2], 0):
                continue
            out.append((str(rec[2]), int(rec[3]), str(rec[5]), bool(rec[6])))
        except (ValueError, TypeError, IndexError):
            continue
    return out


def open_ro(store: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)


def last_seqs(conn: sqlite3.Connection, store: Path) -> dict[str, int]:
    """Per stream, the last seq handed out: SQLite's counter, or the journal's newest record."""
    out: dict[str, int] = dict(conn.execute("SELECT stream, last_seq FROM streams").fetchall())
    for rec in journal.read(journal_path(store)).records:
        try:
            if rec[0] == "r" and int(rec[3]) > out.get(rec[2], 0):
                out[str(rec[2])] = int(rec[3])
        except (ValueError, TypeError, IndexError):
            continue
    return out
