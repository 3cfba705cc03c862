"""Dead zone: what folding the journal into SQLite costs the SD card, per day.

With the broker down nothing is acknowledged, so the store folds the journal's readings into
SQLite (agent/store/fold.py: hourly, past 10,000 readings or 4 MB of journal). A 200 s window
of bench_wear.py holds no fold, so its "down" figure leaves this out; this adds it.

Project figure: a Store (writer thread, as in the agent) takes ``--rows`` position readings
(an hour at the typical load is ~600) and folds them (``maintain()``, which folds first), then
its WAL is checkpointed into the database, as SQLite does on its own later; repeated ``--folds``
times on the same store (a backlog growing). Pages counted: ``write_bytes`` of
``/proc/self/io`` around the fold and the checkpoint (every 4 KiB page made dirty: what
writeback sends to the card), the page cache written back before each fold.

Baseline, same run, same rows, same disk: bare ``sqlite3`` ``executemany`` of the same bodies
into a table of the store's shape (id, stream, seq, ts, body, held, stored_ms; the store's
indexes), WAL, one transaction per fold, checkpointed the same way: SQLite's floor for putting
these rows into an indexed table. The ratio says what the store's fold adds (the counters, the
status values, its indexes' upkeep).

    python bench/bench_fold.py [--rows 600] [--folds 6]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from pathlib import Path

import _wear_proc as kp
from _positions import DEVICE, positions

from agent.model.reading import encode_parts
from agent.store.buffer import Store

PAGE = 4096


def written() -> int:
    return kp.io_counters(os.getpid())["write_bytes"]


def settle() -> None:
    """Everything dirty written back, so the next count starts from clean pages."""
    os.sync()
    time.sleep(0.2)


def bench_store(path: Path, batches: list[list]) -> list[float]:
    pages = []
    store = Store(path, device=DEVICE, sync_interval_s=3600)
    store.start()
    try:
        for batch in batches:
            for r in batch:
                store.append(r)
            if not store.flush(timeout=120):
                raise RuntimeError("flush timed out")
            settle()
            before = written()
            if not store.maintain(timeout=120):
                raise RuntimeError("maintain timed out")
            with store._rlock:  # noqa: SLF001 - the checkpoint SQLite would run later
                store._rconn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # noqa: SLF001
            pages.append((written() - before) / PAGE)
            if store.folds < len(pages):
                raise RuntimeError("maintain() did not fold the journal")
    finally:
        store.close()
    return pages


def bench_sqlite(path: Path, batches: list[list[tuple]]) -> list[float]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL,"
                 " seq INTEGER NOT NULL, ts INTEGER NOT NULL, body TEXT NOT NULL, held INTEGER NOT NULL,"
                 " stored_ms INTEGER)")
    conn.execute("CREATE INDEX readings_stream ON readings(stream)")
    conn.execute("CREATE INDEX readings_stored ON readings(stored_ms)")
    pages = []
    for rows in batches:
        settle()
        before = written()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO readings (stream, seq, ts, body, held, stored_ms) VALUES (?,?,?,?,0,?)", rows)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        pages.append((written() - before) / PAGE)
    conn.close()
    return pages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=600, help="readings per fold (an hour at the typical load: ~600)")
    ap.add_argument("--folds", type=int, default=6)
    ap.add_argument("--tmp", type=Path, default=None, help="a folder on a disk (not tmpfs: it counts no writes)")
    a = ap.parse_args()
    readings = list(positions(a.rows * a.folds))
    batches = [readings[k:k + a.rows] for k in range(0, len(readings), a.rows)]
    rows = []
    for seq, r in enumerate(readings, 1):
        head, tail = encode_parts(DEVICE, r)
        rows.append((r.stream, seq, r.ts_ms, f"{head}{seq}{tail}", r.ts_ms))
    row_batches = [rows[k:k + a.rows] for k in range(0, len(rows), a.rows)]
    body_pages = sum(len(r[3]) for r in rows[:a.rows]) / PAGE

    with tempfile.TemporaryDirectory(prefix="bench-fold-", dir=a.tmp) as tmp:
        base = bench_sqlite(Path(tmp) / "baseline.db", row_batches)
        mine = bench_store(Path(tmp) / "buffer.db", batches)
    if not any(base):
        raise SystemExit(f"bench_fold: {tmp} counts no writes (tmpfs?): give --tmp a folder on a disk")
    m, b = sum(mine) / len(mine), sum(base) / len(base)
    print(f"fold of {a.rows:,} positions (~{body_pages:.0f} pages of JSON), {a.folds} times on a growing store")
    print(f"  store fold + checkpoint        {m:8.1f} pages per fold  {[round(p) for p in mine]}")
    print(f"  baseline sqlite3, 1 txn        {b:8.1f} pages per fold  {[round(p) for p in base]}")
    print(f"  ratio store/baseline           {m / b:8.2f}x")
    per_day = 24 * 600 / a.rows / 1e6 * PAGE  # MB a day per page a fold, at ~600 readings an hour
    print(f"  per day at ~600 readings/h     {m * per_day:8.1f} MB (baseline {b * per_day:.1f} MB; "
          f"the JSON itself {body_pages * per_day:.1f} MB)")


if __name__ == "__main__":
    main()
