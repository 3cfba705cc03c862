"""The SQLite store: seq numbering, durability, acknowledgement, damaged files."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.model.chain import Chain
from agent.model.reading import Reading
from agent.store.buffer import Store

REPO = Path(__file__).resolve().parents[3]


def pos(i: int) -> Reading:
    return Reading("position", 1_790_000_000_000 + i * 1000, {"lat": 22.0 + i * 1e-5, "lon": 106.7, "i": i})


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "b.db", device="CQ-HN-0042", sync_interval_s=0.05)
    s.start()
    yield s
    s.close()


def all_rows(s: Store, stream: str) -> list:
    return s.fetch(stream, 0, 1_000_000)


def test_each_stream_numbers_from_one_without_gaps(store: Store) -> None:
    for i in range(5):
        store.append(pos(i))
        store.append(Reading("seal", 1_790_000_000_000 + i, {"seal": "S1", "event": "opened"}, urgent=True))
    assert store.flush()
    assert [r.seq for r in all_rows(store, "position")] == [1, 2, 3, 4, 5]
    assert [r.seq for r in all_rows(store, "seal")] == [1, 2, 3, 4, 5]
    body = json.loads(all_rows(store, "position")[2].body)
    assert body == {"device": "CQ-HN-0042", "stream": "position", "seq": 3, "ts": "2026-09-21T14:13:22.000Z",
                    "lat": 22.00002, "lon": 106.7, "i": 2}


def test_seq_survives_restart_even_when_everything_was_acknowledged(tmp_path: Path) -> None:
    s = Store(tmp_path / "b.db", device="D")
    s.start()
    for i in range(3):
        s.append(pos(i))
    s.flush()
    s.ack(r.id for r in all_rows(s, "position"))
    s.close()
    s = Store(tmp_path / "b.db", device="D")
    s.start()
    try:
        assert s.pending() == 0
        s.append(pos(9))
        s.flush()
        (row,) = all_rows(s, "position")
        assert row.seq == 4
        assert row.id > 3, "ids never go back, so the uplink can page by id"
    finally:
        s.close()


def test_ack_deletes_only_what_the_broker_has(store: Store) -> None:
    for i in range(10):
        store.append(pos(i))
    store.flush()
    rows = all_rows(store, "position")
    store.ack([rows[0].id, rows[5].id])
    assert [r.seq for r in all_rows(store, "position")] == [2, 3, 4, 5, 7, 8, 9, 10], \
        "acked rows are never offered again"
    store.flush()
    assert store.pending() == 8
    assert store.depth() == {"position": 8}


def test_only_durable_rows_are_offered(tmp_path: Path) -> None:
    s = Store(tmp_path / "b.db", device="D", sync_interval_s=60)
    s.start()
    try:
        s.append(pos(1))
        time.sleep(0.2)
        assert s.queued == 1 and s.pending() == 1, "waiting for its group commit, counted"
        assert all_rows(s, "position") == [], "and not offered before it is fsynced"
        s.append(Reading("alarm", 1, {"kind": "test"}, urgent=True))
        deadline = time.monotonic() + 5
        while not all_rows(s, "alarm") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(all_rows(s, "alarm")) == 1, "an urgent reading is made durable at once"
        assert len(all_rows(s, "position")) == 1, "and with it everything committed before"
    finally:
        s.close()


def test_a_reading_that_cannot_be_encoded_takes_no_seq(store: Store) -> None:
    with pytest.raises(ValueError):
        store.append(Reading("position", 1, {"lat": math.nan}))
    with pytest.raises(ValueError):
        store.append(Reading("position", 1, {"seq": 5}))
    store.append(pos(1))
    store.flush()
    assert [r.seq for r in all_rows(store, "position")] == [1]


def test_a_crash_loses_nothing_committed_and_reuses_no_seq(tmp_path: Path) -> None:
    """SIGKILL: what a group commit made durable is all there; readings still waiting for
    theirs (at most sync_interval_s of them, as in a power cut) had no seq yet, so none is
    reused or missing."""
    db = tmp_path / "b.db"
    child = textwrap.dedent(f"""
        import sys, time
        from agent.model.reading import Reading
        from agent.store.buffer import Store
        s = Store({str(db)!r}, device="D", sync_interval_s=3600)
        s.start()
        for i in range(5000):
            s.append(Reading("position", i, {{"i": i}}))
        assert s.flush()
        for i in range(10):
            s.append(Reading("position", i, {{"late": i}}))
        time.sleep(0.2)
        print("committed", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "committed"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    s = Store(db, device="D")
    try:
        rows = all_rows(s, "position")
        assert [r.seq for r in rows] == list(range(1, 5001))
        s.start()
        s.append(pos(0))
        s.flush()
        assert all_rows(s, "position")[-1].seq == 5001
    finally:
        s.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_store_is_moved_aside_and_replaced(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "b.db"
    if damage == "garbage":
        db.write_bytes(b"this is not a database, it is a lorry\n" * 200)
    else:
        s = Store(db, device="D")
        s.start()
        for i in range(3000):
            s.append(pos(i))
        s.close()
        data = db.read_bytes()
        db.write_bytes(data[: len(data) // 3] + b"\0" * 100)
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    s = Store(db, device="D")
    s.start()
    try:
        s.append(pos(1))
        s.flush()
        seqs = [r.seq for r in all_rows(s, "position")]
        if damage == "garbage":  # no ledger either: a first start
            assert seqs == [1] and s.resumed == []
        else:  # numbered above everything the damaged store may have handed out
            assert len(seqs) == 1 and seqs[0] > 3000, seqs
            (gap,) = s.resumed
            assert (gap.stream, gap.first_seq, gap.last_seq, gap.reason) == \
                ("position", 1, seqs[0] - 1, "store_damaged")
        aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
        assert aside, "the damaged file is kept for forensics"
        assert s.damaged_files == [str(p) for p in sorted(aside) if not p.name.endswith(("-wal", "-shm"))]
    finally:
        s.close()


def test_a_vanished_store_continues_its_seqs_and_chain(tmp_path: Path) -> None:
    """The ledger next to the store keeps the seq reservations and the chain's head: a store
    deleted (or lost with its WAL) starts above them, and the chain links on."""
    db = tmp_path / "b.db"
    chain = Chain("D")
    s = Store(db, device="D", chain=chain)
    s.start()
    for i in range(50):
        s.append(pos(i))
    s.append(Reading("seal", 1000, {"event": "opened"}, urgent=True))
    s.flush()
    acked = [r.id for r in all_rows(s, "position")[:20]]
    s.ack(acked)
    s.flush()
    last_link = chain.state()
    s.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    chain2 = Chain("D")
    s = Store(db, device="D", chain=chain2)
    assert chain2.state() == last_link
    s.start()
    try:
        s.append(pos(99))
        s.append(Reading("seal", 2000, {"event": "sealed"}, urgent=True))
        s.flush()
        (p,) = all_rows(s, "position")
        (seal,) = all_rows(s, "seal")
        assert p.seq > 50 and seal.seq > 1
        body = json.loads(seal.body)
        assert body["chain_seq"] == 2 and body["prev_hash"] == last_link[1]
        by_stream = {d.stream: d for d in s.resumed}
        assert by_stream["position"].first_seq == 21 and by_stream["position"].last_seq == p.seq - 1
        assert by_stream["position"].reason == "store_missing"
    finally:
        s.close()
