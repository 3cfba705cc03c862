"""The journal (agent/store/journal.py): group commits, folds, replay after a crash or a cut."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agent.store.bounds as bounds_mod
import agent.store.buffer as buffer_mod
import agent.store.timing as timing_mod
import agent.store.writer as writer_mod
from agent.model.reading import Reading
from agent.store import journal, peek
from agent.store.buffer import Store
from support import journal_on_a_full_disk, wait_until

T0 = 1_790_000_000_000


def pos(i: int) -> Reading:
    return Reading("position", T0 + i * 1000, {"lat": 22.0 + i * 1e-5, "lon": 106.7, "i": i})


def seal(i: int) -> Reading:
    return Reading("seal", T0 + i * 1000, {"seal": "door", "event": "opened", "i": i}, urgent=True)


def sql_count(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
    finally:
        conn.close()


def everything(s: Store, stream: str) -> list:
    return s.fetch(stream, 0, 10**9)


# -- the file format ---------------------------------------------------------------------------------


records = st.lists(st.lists(st.one_of(st.integers(-2**40, 2**40), st.text(max_size=40), st.none()),
                            min_size=1, max_size=6), max_size=20)


@settings(max_examples=300, deadline=None)
@given(records)
def test_records_come_back_as_written(recs: list) -> None:
    got = journal.parse(b"".join(journal.frame(r) for r in recs))
    assert got.records == recs and not got.damaged_bytes and not got.torn_bytes


@settings(max_examples=300, deadline=None)
@given(records, st.data())
def test_a_write_cut_short_loses_only_the_frame_it_cut(recs: list, data: st.DataObject) -> None:
    frames = [journal.frame(r) for r in recs]
    whole = b"".join(frames)
    cut = data.draw(st.integers(0, len(whole)))
    got = journal.parse(whole[:cut])
    ends = [sum(len(f) for f in frames[:k + 1]) for k in range(len(frames))]
    complete = sum(1 for e in ends if e <= cut)
    assert got.records == recs[:complete] and not got.damaged_bytes


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_garbage_never_raises_and_never_yields_a_record_it_did_not_frame(data: bytes) -> None:
    got = journal.parse(data)
    assert got.damaged_bytes + got.torn_bytes <= len(data)
    assert all(isinstance(r, list) and r for r in got.records)


def test_a_damaged_frame_in_the_middle_is_skipped_and_the_rest_kept() -> None:
    frames = [journal.frame(["r", i]) for i in range(5)]
    bad = bytearray(frames[2])
    bad[-1] ^= 0xFF
    got = journal.parse(b"".join([*frames[:2], bytes(bad), *frames[3:]]))
    assert [r[1] for r in got.records] == [0, 1, 3, 4] and got.damaged_bytes == len(bad)


# -- the store ----------------------------------------------------------------------------------------


def test_a_group_of_readings_costs_one_write_and_one_fsync_in_all(tmp_path: Path) -> None:
    s = Store(tmp_path / "b.db", device="D", sync_interval_s=3600)
    s.start()
    try:
        for i in range(50):
            s.append(pos(i))
        time.sleep(0.3)
        assert s.queued == 50 and everything(s, "position") == [], "waiting for the group commit, not offered"
        assert s.journal.size == 0 and s.journal.syncs == 0 and s.commits == 0, "no write per reading"
        assert s.flush()
        assert s.journal.size > 0
        assert [r.seq for r in everything(s, "position")] == list(range(1, 51))
        assert s.journal.syncs == 1 and s.commits == 0
    finally:
        s.close()


def test_acknowledged_readings_never_reach_sqlite_and_seqs_go_on(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    s = Store(db, device="D", sync_interval_s=0.05)
    s.start()
    try:
        for i in range(20):
            s.append(pos(i))
        s.flush()
        s.ack(r.id for r in everything(s, "position"))
        assert s.pending() == 0
    finally:
        s.close()
    assert sql_count(db) == 0 and (tmp_path / "b.db.journal").stat().st_size == 0
    s = Store(db, device="D")
    s.start()
    try:
        s.append(pos(99))
        s.flush()
        assert [r.seq for r in everything(s, "position")] == [21]
    finally:
        s.close()


def test_acknowledgements_ride_with_the_next_group_not_a_write_of_their_own(tmp_path: Path, monkeypatch) -> None:
    """A write of its own costs as much as a group's: acknowledgements wait for the next group
    (or lazy_sync_s, whichever comes first), not a few seconds."""
    monkeypatch.setattr(buffer_mod, "JOURNAL_ACK_S", 0.1)
    db = tmp_path / "b.db"
    jpath = tmp_path / "b.db.journal"
    s = Store(db, device="D", sync_interval_s=0.05, lazy_sync_s=30)
    s.start()
    try:
        for i in range(5):
            s.append(pos(i))
        s.flush()
        size = jpath.stat().st_size
        s.ack(r.id for r in everything(s, "position"))
        time.sleep(0.3)
        s.flush()  # wakes the writer: nothing to write but the acknowledgements
        assert jpath.stat().st_size == size, "an acknowledgement alone was written"
        s.append(pos(5))
        s.flush()
        kinds = [r[0] for r in journal.read(jpath).records]
        assert kinds == ["r"] * 5 + ["a", "r"], kinds
    finally:
        s.close()


def test_unacknowledged_readings_are_folded_into_sqlite_in_one_transaction(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(timing_mod, "FOLD_ROWS", 100)
    db = tmp_path / "b.db"
    s = Store(db, device="D", sync_interval_s=0.05)
    s.start()
    try:
        for i in range(150):
            s.append(pos(i))
        s.flush()
        s.append(pos(150))  # the next turn of the writer sees the fold due
        wait_until(lambda: s.folds >= 1, 10, "a fold")
        assert sql_count(db) >= 150 and s.commits == 1
        s.flush()
        assert [r.seq for r in everything(s, "position")] == list(range(1, 152)), "none lost, none twice"
    finally:
        s.close()


def test_an_urgent_reading_is_durable_at_once_with_everything_before_it(tmp_path: Path) -> None:
    s = Store(tmp_path / "b.db", device="D", sync_interval_s=3600)
    s.start()
    try:
        s.append(pos(1))
        s.append(seal(2))
        wait_until(lambda: everything(s, "seal"), 5, "the seal event offered")
        assert len(everything(s, "position")) == 1
    finally:
        s.close()


def test_health_readings_wait_for_the_lazy_interval_or_ride_along(tmp_path: Path) -> None:
    s = Store(tmp_path / "b.db", device="D", sync_interval_s=0.05, lazy_sync_s=3600)
    s.start()
    try:
        s.append(Reading("health", T0, {"uptime_s": 1}))
        time.sleep(0.3)
        assert everything(s, "health") == [] and s.journal.syncs == 0 and s.queued == 1
        s.append(pos(1))
        wait_until(lambda: everything(s, "position"), 5, "the position synced")
        assert len(everything(s, "health")) == 1, "the health reading rode along"
    finally:
        s.close()


def _crash_leaving_a_journal(db: Path) -> None:
    """What a crash leaves: the writer's journal, never folded (the Store is not closed)."""
    s = Store(db, device="D", sync_interval_s=3600)
    s.start()
    for i in range(30):
        s.append(pos(i))
    s.append(seal(30))
    s.flush()
    s.ack([everything(s, "position")[0].id])  # acknowledged: journaled with the next write
    s.append(pos(31))
    s._q.put(writer_mod.STOP)  # the writer ends without its final fold, as if killed
    s._thread.join(5)  # type: ignore[union-attr]
    s.journal.close()
    s._wdb.conn.close()
    s._lock.release()


def test_a_crash_leaves_the_journal_and_the_next_start_folds_it_in(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(writer_mod.StoreWriter, "_fold_in", lambda self, batch: False)
    db = tmp_path / "b.db"
    _crash_leaving_a_journal(db)
    monkeypatch.undo()
    assert sql_count(db) == 0 and peek.depth(db) == 31, "status counts what waits in the journal"
    s = Store(db, device="D")
    s.start()
    try:
        assert [r.seq for r in everything(s, "position")] == list(range(2, 32)), "the acknowledged one is not back"
        assert len(everything(s, "seal")) == 1 and not s.resumed
        s.append(pos(40))
        s.flush()
        assert everything(s, "position")[-1].seq == 32
    finally:
        s.close()


def test_a_damaged_journal_announces_what_it_may_have_lost_and_reuses_no_seq(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(writer_mod.StoreWriter, "_fold_in", lambda self, batch: False)
    db = tmp_path / "b.db"
    _crash_leaving_a_journal(db)
    monkeypatch.undo()
    jpath = tmp_path / "b.db.journal"
    data = bytearray(jpath.read_bytes())
    at = data.index(b'"position",10,')
    data[at + 40] ^= 0x01  # one bit inside the record with seq 10: its frame fails its CRC
    jpath.write_bytes(bytes(data))
    s = Store(db, device="D")
    s.start()
    try:
        seqs = [r.seq for r in everything(s, "position")]
        assert 10 not in seqs and 11 in seqs
        gaps = [(d.first_seq, d.last_seq, d.reason) for d in s.resumed if d.stream == "position"]
        assert (10, 10, "journal_damaged") in gaps
        s.append(pos(50))
        s.flush()
        assert everything(s, "position")[-1].seq > 10_000, "above every seq the ledger reserved"
    finally:
        s.close()


def test_sqlite_unwritable_with_a_working_journal_keeps_memory_bounded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bounds_mod, "MAX_PENDING", 200)
    monkeypatch.setattr(timing_mod, "FOLD_ROWS", 100)
    monkeypatch.setattr(writer_mod, "_FOLD_RETRY_S", 0.01)
    drops: list = []
    s = Store(tmp_path / "b.db", device="D", sync_interval_s=0.01, on_drop=drops.extend)
    s.start()
    try:
        s._wdb.conn.execute("PRAGMA max_page_count = 1")  # SQLite takes nothing
        for i in range(500):
            s.append(pos(i))
            if i % 100 == 0:
                s.append(seal(i))
        wait_until(lambda: any(d.reason == "store_full" for d in drops), 20, "the oldest positions given up")
        wait_until(lambda: len(s.tail.all_rows()) <= 260, 20, "memory bounded")
        gone = [d for d in drops if d.reason == "store_full"]
        assert all(d.stream == "position" and d.first_seq >= 1 for d in gone), "announced by seq; evidence kept"
        assert len(everything(s, "seal")) == 5
        s._wdb.conn.execute("PRAGMA max_page_count = 1073741823")
    finally:
        s.close()


def test_status_values_ride_along_and_are_readable_from_outside(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    s = Store(db, device="D", sync_interval_s=0.05)
    s.start()
    try:
        s.set_state("k", "v1", within_s=0)
        conn = sqlite3.connect(db)
        wait_until(lambda: peek.summary(conn, db)[1].get("k") == "v1", 10, "the value in the journal")
        conn.close()
        assert s.commits == 0
    finally:
        s.close()
    assert os.path.getsize(tmp_path / "b.db.journal") == 0


@pytest.mark.parametrize("stream", ["position", "seal"])
def test_a_reading_that_cannot_be_written_takes_no_seq(tmp_path: Path, stream: str) -> None:
    s = Store(tmp_path / "b.db", device="D", sync_interval_s=0.01)
    s.start()
    try:
        with journal_on_a_full_disk(s):
            s._wdb.conn.execute("PRAGMA max_page_count = 1")
            s.append(Reading(stream, T0, {"i": 1}, urgent=stream == "seal"))
            wait_until(lambda: s.journal.write_errors >= 1, 5, "a failed write")
        s._wdb.conn.execute("PRAGMA max_page_count = 1073741823")
        assert s.flush()
        assert [r.seq for r in everything(s, stream)] == [1]
    finally:
        s.close()


def test_a_fold_sends_nothing_again(tmp_path: Path, monkeypatch) -> None:
    """Rows already offered from the journal move into SQLite: the uplink must not page back
    to them (it would send them twice)."""
    monkeypatch.setattr(timing_mod, "FOLD_ROWS", 50)
    s = Store(tmp_path / "b.db", device="D", sync_interval_s=0.01)
    s.start()
    try:
        for i in range(40):
            s.append(pos(i))
        s.flush()
        gen = s.release_gen
        for i in range(40, 60):
            s.append(pos(i))
        s.flush()
        wait_until(lambda: s.folds >= 1, 10, "a fold")
        assert s.release_gen == gen
        assert [r.seq for r in everything(s, "position")] == list(range(1, 61))
    finally:
        s.close()
