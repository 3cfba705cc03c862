"""Write path: readings per second sustained into the store, until every one is durable.

Project figure: ``Store.append`` of N position readings (writer thread running, as in the
agent), then ``flush()``; the clock stops when flush returns, i.e. when every reading is
committed *and* fsynced (``synchronous=FULL``) and so would be handed to the uplink. The
append-only rate (what a driver thread sees) is printed too.

Baseline, same run, same disk: bare ``sqlite3`` ``executemany`` of the very same JSON bodies
(pre-encoded, seq already in them) into a table of the same shape (AUTOINCREMENT id, stream,
seq, ts, body, index on stream), WAL, one transaction, committed with ``synchronous=FULL``.
That is the floor for getting these bytes durable in SQLite with no encoding, no numbering,
no queue and no thread; the store does all of those on top, so a ratio near 1 means its
overhead is small. Goal: >= 20,000 readings/s durable.

    python bench/bench_store.py [--count 200000]
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

from _positions import DEVICE, positions

from agent.model.reading import encode_parts
from agent.store.buffer import Store

GOAL = 20_000


def bench_store(path: Path, readings: list) -> tuple[float, float]:
    store = Store(path, device=DEVICE)
    store.start()
    try:
        t0 = time.perf_counter()
        for r in readings:
            store.append(r)
        t_append = time.perf_counter() - t0
        if not store.flush(timeout=600):
            raise RuntimeError("flush timed out")
        t_durable = time.perf_counter() - t0
        n = store.pending()
        if n != len(readings) or store.durable_id != len(readings):
            raise RuntimeError(f"store holds {n} rows, durable_id {store.durable_id}; expected {len(readings)}")
    finally:
        store.close()
    return t_append, t_durable


def bench_sqlite(path: Path, rows: list[tuple]) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " stream TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL, body TEXT NOT NULL)"
    )
    conn.execute("CREATE INDEX readings_stream ON readings(stream)")
    t0 = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO readings (stream, seq, ts, body) VALUES (?,?,?,?)", rows)
    conn.execute("COMMIT")
    t = time.perf_counter() - t0
    conn.close()
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=200_000)
    n = ap.parse_args().count

    readings = list(positions(n))
    rows = []
    for seq, r in enumerate(readings, 1):
        head, tail = encode_parts(DEVICE, r)
        rows.append((r.stream, seq, r.ts_ms, f"{head}{seq}{tail}"))

    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        t_base = bench_sqlite(Path(tmp) / "baseline.db", rows)
        t_append, t_durable = bench_store(Path(tmp) / "buffer.db", readings)

    store_rate, base_rate = n / t_durable, n / t_base
    print(f"write path, {n:,} position readings (~{sum(len(r[3]) for r in rows) // n} B each)")
    print(f"  Store.append only (driver side)      {n / t_append:>10,.0f} readings/s ({t_append:.2f} s)")
    print(f"  Store.append + flush, all durable    {store_rate:>10,.0f} readings/s ({t_durable:.2f} s)")
    print(f"  baseline sqlite3 executemany, 1 txn  {base_rate:>10,.0f} readings/s ({t_base:.2f} s)")
    print(f"  ratio store/baseline                 {store_rate / base_rate:>10.2f}x")
    print(f"  goal >= {GOAL:,} readings/s durable: {'met' if store_rate >= GOAL else 'NOT met'}")

if __name__ == "__main__":
    main()
