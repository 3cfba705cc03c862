"""A loss the store finds or makes is announced, even across a crash at the worst moment
(agent/store/announce.py), and the seq ledger never claims a reading acknowledged that was not."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from agent.model.reading import Reading
from agent.store import announce
from agent.store.buffer import Store
from agent.store.retention import Dropped

REPO = Path(__file__).resolve().parents[3]


def pos(i: int) -> Reading:
    return Reading("position", 1_790_000_000_000 + i * 1000, {"lat": 22.0, "lon": 106.7, "i": i})


def lose_store_files(db: Path) -> None:
    """The store file and its journal vanish; the seq ledger beside them stays."""
    for suffix in ("", "-wal", "-shm", ".journal"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def test_the_first_reservation_counts_the_readings_it_numbers_as_unacknowledged(tmp_path: Path) -> None:
    """The ledger's floor is the lowest seq not acknowledged: the very first reading's seq, 1.
    (It was 2: a store lost after its first group then announced 2.. and never 1.)"""
    db = tmp_path / "b.db"
    child = textwrap.dedent(f"""
        import os, signal
        from agent.model.reading import Reading
        from agent.store.buffer import Store
        s = Store({str(db)!r}, device="D", sync_interval_s=0.05)
        s.start()
        s.append(Reading("position", 1_790_000_000_000, {{"i": 0}}))
        assert s.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert json.loads(db.with_name("b.db.ledger").read_text())["floor"]["position"] == 1
    lose_store_files(db)
    s = Store(db, device="D")
    try:
        (gap,) = s.resumed
        assert (gap.stream, gap.first_seq, gap.reason) == ("position", 1, "store_missing")
    finally:
        s.close()


def test_a_loss_found_at_start_is_announced_again_until_its_alarm_is_durable(tmp_path: Path) -> None:
    """A vanished store: the next start continues above the ledger and announces the range.
    Killed before that announcement's alarm was durable, the start after announces it again;
    once the alarm is durable, never again."""
    db = tmp_path / "b.db"
    s = Store(db, device="D", sync_interval_s=0.05)
    s.start()
    for i in range(5):
        s.append(pos(i))
    assert s.flush()
    s.close()
    lose_store_files(db)
    child = textwrap.dedent(f"""
        import os, signal
        from agent.store.buffer import Store
        def crash(dropped):  # before any alarm about them exists
            print([(d.stream, d.first_seq, d.reason) for d in dropped], flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        s = Store({str(db)!r}, device="D", on_drop=crash)
        s.start()
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == -signal.SIGKILL, out.stderr
    assert out.stdout.strip() == "[('position', 1, 'store_missing')]"

    announced: list[Dropped] = []

    def alarm(dropped: list[Dropped]) -> None:  # as the agent does (agent/daemon/runner.py)
        for d in dropped:
            announced.append(d)
            s.append(Reading("alarm", 1_790_000_000_000, {"kind": "data_dropped", "first_seq": d.first_seq},
                             urgent=True))

    s = Store(db, device="D", sync_interval_s=0.05, on_drop=alarm)
    s.start()
    try:
        assert [(d.stream, d.first_seq, d.reason) for d in announced] == [("position", 1, "store_missing")]
        assert s.flush() and s.flush()  # the alarm durable, then the record of the loss gone
        assert [json.loads(r.body)["first_seq"] for r in s.fetch("alarm", 0, 10)] == [1]
    finally:
        s.close()
    announced.clear()
    s = Store(db, device="D", sync_interval_s=0.05, on_drop=alarm)
    try:
        assert s.resumed == []
    finally:
        s.close()


def test_a_crash_between_shedding_and_its_alarm_announces_the_shed_readings_at_the_next_start(
        tmp_path: Path) -> None:
    """Retention deletes readings and records the loss in the same transaction: a crash
    before the alarm is durable cannot make the gap silent."""
    db = tmp_path / "b.db"
    child = textwrap.dedent(f"""
        import os, signal
        from agent.model.reading import Reading
        from agent.store.buffer import Store
        clock = [1_790_000_000_000]
        s = Store({str(db)!r}, device="D", sync_interval_s=0.05, max_age_s=3600,
                  now_ms=lambda: clock[0], on_drop=lambda dropped: os.kill(os.getpid(), signal.SIGKILL))
        s.start()
        for i in range(20):
            s.append(Reading("position", 1_790_000_000_000 + i * 1000, {{"i": i}}))
        assert s.flush()
        clock[0] += 7_200_000  # two hours later: all of them past max_age_s
        s.maintain()  # killed in it, as it reports the loss
    """)
    p = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    s = Store(db, device="D")
    try:
        assert s.fetch("position", 0, 100) == []
        assert [(d.stream, d.first_seq, d.last_seq, d.reason) for d in s.resumed] == \
            [("position", 1, 20, "too_old")]
        assert announce.KEY in {k for (k,) in s._rconn.execute("SELECT key FROM state")}  # noqa: SLF001
    finally:
        s.close()
    assert os.path.exists(db)
