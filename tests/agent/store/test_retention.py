"""A full store: positions thinned first, evidence never dropped, every loss reported."""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent.model.reading import Reading
from agent.store import retention
from agent.store.buffer import Store
from support import journal_on_a_full_disk, wait_until

T0 = 1_790_000_000_000


def pos(i: int) -> Reading:
    return Reading("position", T0 + i * 1000, {"lat": 22.0 + i * 1e-6, "lon": 106.7, "pad": "x" * 150})


def seal(i: int) -> Reading:
    return Reading("seal", T0 + i * 1000, {"seal": "door", "event": "opened", "i": i}, urgent=True)


def make(tmp_path: Path, **kw) -> tuple[Store, list]:
    drops: list = []
    s = Store(tmp_path / "b.db", device="D", sync_interval_s=0.05, on_drop=drops.extend, **kw)
    s.start()
    return s, drops


def rows(s: Store, stream: str) -> list:
    return s.fetch(stream, 0, 10**9)


def test_over_the_limit_positions_are_thinned_and_seals_kept(tmp_path: Path) -> None:
    s, drops = make(tmp_path, max_bytes=2 * 1024 * 1024)
    try:
        for i in range(20_000):
            s.append(pos(i))
            if i % 1000 == 0:
                s.append(seal(i))
            if i % 10 == 0:
                s.append(Reading("health", T0 + i * 1000, {"uptime_s": i}))
        s.flush()
        assert s.maintain()
        assert retention.used_bytes(s._rconn) <= 2 * 1024 * 1024
        assert len(rows(s, "seal")) == 20, "seal events are never shed"
        kept = [r.seq for r in rows(s, "position")]
        assert 2_000 < len(kept) < 20_000
        assert kept[-retention.KEEP_NEWEST:] == list(range(20_001 - retention.KEEP_NEWEST, 20_001)), \
            "the newest positions are kept whole"
        assert kept[0] == 1, "thinning keeps the first of each group: the track still starts where it did"
        old, new = kept[: len(kept) // 4], kept[-len(kept) // 4:]
        assert (old[-1] - old[0]) / len(old) > 2 * (new[-1] - new[0]) / len(new), "old track thinned, new kept dense"
        by_stream = {d.stream for d in drops}
        assert "health" in by_stream and "position" in by_stream and "seal" not in by_stream
        assert s.dropped["position"] == 20_000 - len(kept)
        assert all(d.reason == "store_full" and d.first_seq <= d.last_seq for d in drops)
    finally:
        s.close()


def test_readings_past_the_age_limit_go_but_alarms_stay(tmp_path: Path) -> None:
    """Age is time waited in the store, by the device's trusted clock."""
    now = [T0]
    s, drops = make(tmp_path, max_age_s=3600, now_ms=lambda: now[0])
    try:
        for i in range(0, 7200, 60):
            now[0] = T0 + i * 1000  # each stored as it was taken
            s.append(pos(i))
            s.flush()
        s.append(Reading("alarm", T0, {"kind": "seal_opened"}, urgent=True))
        s.flush()
        assert s.maintain()
        assert min(r.ts_ms for r in rows(s, "position")) >= T0 + (7140 - 3600) * 1000
        assert len(rows(s, "alarm")) == 1
        assert drops and drops[0].reason == "too_old" and drops[0].stream == "position"
    finally:
        s.close()


def test_a_reading_dated_far_ahead_ages_nothing_else_out(tmp_path: Path) -> None:
    """A receiver's bad epoch dated 2099 once made every real position "too old": a reading's
    own time must never decide what else is deleted."""
    now = [T0]
    s, drops = make(tmp_path, max_age_s=3600, now_ms=lambda: now[0])
    try:
        for i in range(50):
            s.append(pos(i))
        s.append(Reading("position", 4_070_908_800_000, {"lat": 22.0, "lon": 106.7}))  # 2099-01-01
        s.flush()
        now[0] += 1800_000  # half an hour later
        assert s.maintain()
        assert len(rows(s, "position")) == 51 and not drops
    finally:
        s.close()


def test_no_age_limit_while_no_trusted_time_is_known(tmp_path: Path) -> None:
    """Rows stored before any trusted time have no age; a clock that only later becomes
    trusted does not make them expire at once."""
    now: list[int | None] = [None]
    s, drops = make(tmp_path, max_age_s=60, now_ms=lambda: now[0])
    try:
        for i in range(20):
            s.append(pos(i))
        s.flush()
        assert s.maintain() and len(rows(s, "position")) == 20
        now[0] = T0 + 86_400_000
        assert s.maintain() and len(rows(s, "position")) == 20 and not drops
    finally:
        s.close()


def test_disk_full_sheds_positions_and_keeps_going(tmp_path: Path) -> None:
    """SQLITE_FULL (the file may not grow: a full card) is simulated with max_page_count."""
    s, drops = make(tmp_path)
    try:
        for i in range(5_000):
            s.append(pos(i))
        s.flush()
        assert s.maintain()  # folded into SQLite: what a full disk may shed
        pages = s._wdb.conn.execute("PRAGMA page_count").fetchone()[0]
        s._wdb.conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        with journal_on_a_full_disk(s):
            for i in range(5_000, 9_000):
                s.append(pos(i))
                if i % 500 == 0:
                    s.append(seal(i))
            wait_until(lambda: s.queued == 0, 60, "everything written after shedding")
            assert s.full_errors >= 1 and s.journal.write_errors >= 1
            assert len(rows(s, "seal")) == 8, "no seal event lost to a full disk"
            assert drops and all(d.stream == "position" for d in drops)
            assert rows(s, "position")[-1].seq == 9_000, "the newest positions got in"
            assert s.writer_alive
        # Space returns: business as usual.
        s._wdb.conn.execute("PRAGMA max_page_count = 1073741823")
        s.append(seal(99_999))
        s.flush()
        assert json.loads(rows(s, "seal")[-1].body)["i"] == 99_999
    finally:
        s.close()


def test_readings_that_cannot_be_written_are_bounded_in_memory(tmp_path: Path, monkeypatch) -> None:
    import agent.store.bounds as bounds_mod
    import agent.store.writer as store_mod

    monkeypatch.setattr(bounds_mod, "MAX_PENDING", 1_000)
    monkeypatch.setattr(store_mod, "_RETRY_S", 0.01)
    s, drops = make(tmp_path)
    try:
        s._wdb.conn.execute("PRAGMA max_page_count = 1")  # nothing fits at all
        with journal_on_a_full_disk(s):
            for i in range(3_000):
                s.append(pos(i))
            s.append(seal(1))
            wait_until(lambda: s.queued <= 1_100, 20, "memory bounded")
            assert any(d.reason == "unwritable" and d.stream == "position" for d in drops)
        s._wdb.conn.execute("PRAGMA max_page_count = 1073741823")
        wait_until(lambda: s.queued == 0, 20, "written once possible")
        s.flush()
        assert len(rows(s, "seal")) == 1
        time.sleep(0.1)
    finally:
        s.close()
