"""A backlog at rest costs nothing: start-up, maintenance, status and stop read what they
need, never every buffered row (issue 14: a million positions re-read every 10 s once).

Every statement the store runs is recorded (``set_trace_callback``) and its plan checked
(``EXPLAIN QUERY PLAN``: no scan of ``readings``); the work is counted in SQLite VM steps
(``set_progress_handler``) on a backlog ten times larger, and must not grow with it. The full
integrity check runs only when the file may be damaged (agent/store/integrity.py).
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import agent.store.buffer as buffer_mod
import agent.store.schema as schema_mod
from agent.model.reading import Reading
from agent.store.buffer import Store, buffer_summary

T0 = 1_790_000_000_000
NOW = T0 + 3_600_000


def backlog(db: Path, positions: int) -> None:
    """Positions, a seal event every 1,000, and a few readings held for a trusted time."""
    s = Store(db, device="D", sync_interval_s=30, now_ms=lambda: T0)
    s.start()
    for i in range(positions):
        s.append(Reading("position", T0 + i * 1000, {"lat": 22.0 + i * 1e-6, "lon": 106.7, "i": i}))
        if i % 1000 == 500:
            s.append(Reading("seal", T0 + i * 1000, {"seal": "door", "event": "opened"}, urgent=True))
    for i in range(3):
        s.append(Reading("temperature", None, {"c": 4.0 + i}, meta={"mono_ns": i, "boot_id": "b", "wall_ms": T0}))
    assert s.flush(60)
    s.close()


def traced(monkeypatch: pytest.MonkeyPatch, hook: Callable[[sqlite3.Connection], None]) -> None:
    """Every connection the store opens gets ``hook`` first."""
    real = schema_mod.connect

    def connect(path: Path) -> sqlite3.Connection:
        conn = real(path)
        hook(conn)
        return conn

    monkeypatch.setattr(schema_mod, "connect", connect)
    monkeypatch.setattr(buffer_mod, "connect", connect)


def idle_life(db: Path) -> None:
    """What a parked agent with a backlog does: open, start, maintenance passes (size and age
    limits checked with a trusted clock), status figures, the newest position, a clean stop."""
    s = Store(db, device="D", max_bytes=1 << 30, max_age_s=86_400, now_ms=lambda: NOW)
    s.start()
    try:
        assert s.maintain() and s.maintain()
        assert s.pending() > 0 and s.depth()["position"] > 0 and s.held == 3
        with s._rlock:
            summary = buffer_summary(s._rconn)
        assert summary["temperature"]["held"] == 3
        assert s.newest("position") is not None
    finally:
        s.close()


# A plan line that walks the readings table or one of its full indexes (``r`` is its alias in
# the status query); the partial readings_held index holds only held rows.
FULL_SCAN = re.compile(r"^SCAN (readings|r)\b(?!.*INDEX readings_held)")


def test_no_statement_scans_the_backlog_at_start_idle_or_stop(tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "b.db"
    backlog(db, 3_000)
    statements: list[str] = []
    traced(monkeypatch, lambda conn: conn.set_trace_callback(statements.append))
    idle_life(db)
    assert not [s for s in statements if re.search(r"quick_check|integrity_check", s, re.I)], \
        "a file untouched since a clean stop needs no full check"
    assert any("stored_ms <" in s for s in statements), "the age limit was checked"
    explain = sqlite3.connect(db)
    scans = {}
    for sql in dict.fromkeys(statements):
        if not re.match(r"\s*(SELECT|UPDATE|DELETE)\b", sql, re.I):
            continue
        plan = [row[3] for row in explain.execute(f"EXPLAIN QUERY PLAN {sql}")]
        if any(FULL_SCAN.match(line) for line in plan):
            scans[sql] = plan
    explain.close()
    assert not scans, "statements that read the whole backlog:\n" + "\n".join(f"{k}\n  {v}" for k, v in scans.items())


def vm_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, positions: int) -> int:
    db = tmp_path / f"{positions}" / "b.db"
    backlog(db, positions)
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    with monkeypatch.context() as m:
        traced(m, lambda conn: conn.set_progress_handler(count, 100))
        idle_life(db)
    return steps[0] * 100


def test_the_work_does_not_grow_with_the_backlog(tmp_path: Path, monkeypatch) -> None:
    small = vm_steps(tmp_path, monkeypatch, 2_000)
    big = vm_steps(tmp_path, monkeypatch, 20_000)
    assert big < 1.5 * small + 20_000, f"{small:,} VM steps with 2,000 rows, {big:,} with 20,000"


def _ledger(db: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(db.with_name(db.name + ".ledger").read_text())
    return data


def test_the_full_check_runs_only_when_the_file_may_be_damaged(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    ledger = db.with_name(db.name + ".ledger")
    backlog(db, 200)
    stale = _ledger(db)
    assert stale["clean"], "a clean stop records the file it leaves"
    s = Store(db, device="D")
    assert not s.full_check, "untouched since a clean stop: no full check"
    assert _ledger(db)["clean"] is None, "the record is consumed at start: a crash from here on leaves none"
    s.start()
    s.append(Reading("position", T0, {"lat": 1.0, "lon": 2.0}))
    assert s.flush()
    crashed = _ledger(db)  # what a power cut now would leave
    s.close()
    ledger.write_text(json.dumps(crashed))
    s = Store(db, device="D")
    assert s.full_check, "no clean stop recorded: checked in full"
    s.close()
    ledger.write_text(json.dumps(stale))
    s = Store(db, device="D")
    assert s.full_check, "a record of an older state of the file vouches for nothing"
    s.close()


def test_a_file_damaged_after_a_clean_stop_is_still_found(tmp_path: Path) -> None:
    """Same size, same name: a page overwritten behind the agent's back (a failing card, a
    botched copy) changes the file's times, so the full check runs and proves the damage."""
    db = tmp_path / "b.db"
    backlog(db, 3_000)
    data = bytearray(db.read_bytes())
    page = 4096
    for k in range(page * 3, len(data) - page, page * 7):
        data[k:k + 64] = b"\xa5" * 64
    db.write_bytes(bytes(data))
    s = Store(db, device="D")
    s.start()
    try:
        assert s.full_check and s.damaged_files
        s.append(Reading("position", T0, {"lat": 1.0, "lon": 2.0}))
        assert s.flush()
        (row,) = s.fetch("position", 0, 10)
        assert row.seq > 3_000, "numbered above the damaged file's seqs (the ledger)"
        assert [(d.stream, d.reason) for d in s.resumed if d.stream == "position"] == [("position", "store_damaged")]
    finally:
        s.close()


def test_a_store_from_before_depth_is_counted_once_and_kept_right(tmp_path: Path) -> None:
    """Stores of schema 3 have no ``streams.depth``: counted on the first start, then kept by
    triggers through inserts, acknowledgements and shedding."""
    db = tmp_path / "b.db"
    backlog(db, 1_500)
    conn = sqlite3.connect(db)
    conn.executescript("DROP TRIGGER readings_added; DROP TRIGGER readings_removed; DROP INDEX readings_held;"
                       "ALTER TABLE streams DROP COLUMN depth; PRAGMA user_version = 3;")
    old = buffer_summary(conn)  # lorry-agent status on a store this version has not opened yet
    conn.close()
    assert old["position"]["count"] == 1_500 and old["temperature"]["held"] == 3
    s = Store(db, device="D")
    s.start()
    try:
        assert s.depth() == {"position": 1_500, "seal": 1, "temperature": 3}
        s.append(Reading("position", T0, {"lat": 1.0, "lon": 2.0}))
        s.flush()
        s.ack(r.id for r in s.fetch("position", 0, 100))
        s.flush()
        s.max_bytes = 150 * 1024
        assert s.maintain()  # over the limit: sheds positions
        with s._rlock:
            summary = buffer_summary(s._rconn)
            counted = dict(s._rconn.execute("SELECT stream, COUNT(*) FROM readings GROUP BY stream").fetchall())
        assert s.dropped.get("position"), "shedding ran"
        assert s.depth() == counted and {k: v["count"] for k, v in summary.items()} == counted
        assert s.pending() == sum(counted.values())
        assert summary["seal"] == old["seal"] and summary["temperature"] == old["temperature"]
        assert summary["position"]["oldest_seq"] > 100, "the acknowledged ones are gone"
    finally:
        s.close()
