"""Store-and-forward buffer: every reading is on disk before anyone tries to send it.

Durability has two steps, so that neither a crash of the agent nor a power cut loses or
re-numbers anything the backend may have seen:

* **waiting** — readings wait in memory, unnumbered, for their group commit: at most
  ``sync_interval_s`` (``lazy_sync_s`` for lazy streams; urgent readings not at all).
* **durable** — the group is numbered, appended to the journal (agent/store/journal.py) in
  one ``write()`` and made durable by one ``fdatasync``. Only durable readings are handed to
  the uplink, so a crash or a power cut can only lose readings that nobody has seen and that
  had no seq yet (at most ``sync_interval_s`` of them), and a seq number the backend holds
  never returns with other content.

Readings the broker acknowledges while still in the journal never reach SQLite; the rest are
folded into it in large transactions (agent/store/fold.py), where they wait, indexed, for as
long as the lorry is out of coverage. Each stream numbers its readings 1, 2, 3… with no gaps.
A SQLite row is deleted only after the broker acknowledged it (``ack``), with the writer's
next commit.

The Store is one object in several modules: this one (opening, the calls producers and the
uplink make, seq continuity after a lost file), agent/store/writer.py (the writer thread),
agent/store/fold.py (into SQLite), agent/store/tail.py (the journal's readings in memory),
agent/store/held.py (readings waiting for a trusted time), agent/store/reader.py (what the
uplink and status read); agent/store/schema.py opens the file.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from agent.model.chain import Chain
from agent.model.reading import Reading, encode_parts
from agent.store import fold, integrity, journal, retention
from agent.store.announce import Unannounced
from agent.store.capacity import Space
from agent.store.fold import ACK_BATCH, ACK_DELAY_S
from agent.store.held import HeldReadings
from agent.store.journal import Journal
from agent.store.lock import StoreLock
from agent.store.reader import Row, StoreReader, buffer_summary
from agent.store.schema import SCHEMA_VERSION, StoreUnusable, check_path, connect, create_schema, open_db
from agent.store.seqledger import Ledger
from agent.store.tail import Tail
from agent.store.writer import JOURNAL_ACK_S, STATE_INTERVAL_S, STOP, Announced, Maintain, StoreWriter

__all__ = ["SCHEMA_VERSION", "Row", "Store", "StoreUnusable", "buffer_summary"]

log = logging.getLogger(__name__)


def _system_now_ms() -> int | None:
    return time.time_ns() // 1_000_000


class Store(StoreWriter, HeldReadings, StoreReader):
    """The SQLite buffer. ``append`` and ``ack`` may be called from any thread."""

    def __init__(self, path: Path | str, *, device: str, sync_interval_s: float = 1.0,
                 lazy_sync_s: float | None = None,
                 chain: Chain | None = None, max_bytes: int = 0, max_age_s: float = 0,
                 on_drop: Callable[[list[retention.Dropped]], None] | None = None,
                 now_ms: Callable[[], int | None] = _system_now_ms):
        self.path = Path(path)
        self.device = device
        self.sync_interval_s = sync_interval_s
        self.lazy_sync_s = max(sync_interval_s, sync_interval_s if lazy_sync_s is None else lazy_sync_s)
        """How long a reading of a lazy stream (health) may wait for the journal's fsync."""
        self.chain = chain
        """Links seal and alarm events as they are committed (agent/model/chain.py)."""
        self.max_bytes = max_bytes
        self.max_age_ms = int(max_age_s * 1000)
        self.on_drop = on_drop
        self.now_ms = now_ms
        """The device's trusted time now (None while unknown): when each row was stored, and
        what ``max_age_s`` is judged against. A reading's own time never decides what else is
        deleted: one reading dated 2099 must not age every other reading out."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        check_path(self.path)
        self._lock = StoreLock(self.path)
        self._lock.acquire()  # before anything is read: another agent may be writing it
        try:
            self._open_locked()
        except BaseException:
            self._lock.release()
            raise

    def _open_locked(self) -> None:
        self.ledger = Ledger(self.path.with_name(self.path.name + ".ledger"))
        self.full_check = integrity.needs_full_check(self.path, self.ledger.clean)
        """Whether this start ran the full integrity check (not after a clean stop)."""
        if self.ledger.clean is not None:  # consumed, on disk too: a crash from here on leaves no record
            self.ledger.clean = None
            self.ledger.save()
        self._wdb, aside = open_db(self.path, full_check=self.full_check)
        self.damaged_files: list[str] = [str(aside)] if aside else []
        """Damaged store files found at start and moved aside."""
        create_schema(self._wdb)
        self.unannounced = Unannounced(self._wdb.conn)
        earlier = list(self.unannounced.items)  # losses an earlier run found but did not announce durably
        self._announced: list[retention.Dropped] = []
        self._rconn = connect(self.path)
        self._rlock = threading.Lock()

        if self.chain is not None:
            saved = dict(self._wdb.execute(
                "SELECT key, value FROM state WHERE key IN ('chain_seq', 'chain_hash')").fetchall())
            if saved:
                self.chain.restore(int(saved["chain_seq"]), saved["chain_hash"])
        jpath = journal.path_for(self.path)
        # What a crash or power cut left in the journal goes into SQLite before anything runs.
        journal_top, self.journal_damage = fold.replay(self._wdb.conn, jpath, self.chain, self.ledger,
                                                        self.unannounced)
        self.journal = Journal(jpath)
        self.journal.reset()
        self.tail = Tail()
        self.folds = 0
        self._seq: dict[str, int] = dict(self._wdb.execute("SELECT stream, last_seq FROM streams").fetchall())
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queued = 0
        self._count_lock = threading.Lock()
        self._acked: set[int] = set()
        self._journal_acks: list[int] = []
        self._journal_acks_at = 0.0
        """Journal rows acknowledged since the last write: recorded with the next one."""
        self._ack_lock = threading.Lock()
        self._visibility = threading.Lock()
        self._state: dict[str, str] = {}
        self._state_due_at: float | None = None
        self._state_dirty: set[str] = set()
        """Status values changed since they were last journaled."""
        self._waiting: list[tuple[Any, ...]] = []
        """Readings the writer has taken, waiting unnumbered for their group commit."""
        self._waiting_since = 0.0
        self._acks_at = 0.0
        self._fold_retry_at = 0.0
        self._full_sync = False
        max_id = self._wdb.execute("SELECT COALESCE(MAX(id), 0) FROM readings").fetchone()[0]
        used = self._wdb.execute("SELECT seq FROM sqlite_sequence WHERE name = 'readings'").fetchone()
        self._next_id = max(max_id, journal_top, used[0] if used else 0) + 1
        self._visible_top: dict[str, int] = {}
        self.durable_id: int = max_id
        """The highest id offered to the uplink: it rises as readings become durable."""
        self._changed = threading.Condition()
        self.commits = 0
        self.durable_commits = 0
        self.commit_errors = 0
        self.last_error: str | None = None
        self._thread: threading.Thread | None = None
        self.held = self._wdb.execute("SELECT COUNT(*) FROM readings WHERE held = 1").fetchone()[0]  # readings_held
        """Readings whose time is not known yet: stored, not sent."""
        self.dropped: dict[str, int] = {}
        """Readings given up per stream (retention.py), for status."""
        self.full_errors = 0
        self._full = False
        self._next_maintenance = 0.0
        self.resumed: list[retention.Dropped] = (earlier + self._resume(damaged=aside is not None)
                                                  + self.journal_damage)
        """Seq ranges a fresh store continued above (agent/store/seqledger.py), reported at start."""
        self.space = Space(self._wdb.conn, self.path, self._report, self.unannounced)
        """Size and age limits, and the full-disk reserve (agent/store/capacity.py)."""
        self._journal_max = max(64 * 1024, self.space.ballast.size())
        """The journal is folded into SQLite past this size (agent/store/writer.py)."""
        self.release_gen = 0
        self.releases: list[tuple[int, str, int]] = []
        """(generation, stream, lowest id) of recent releases: the outbox pages back to them."""

    def _resume(self, damaged: bool) -> list[retention.Dropped]:
        """A fresh store after a damaged or vanished one: continue every stream above the seqs
        the ledger reserved, and the chain from its last link, so nothing the backend holds is
        numbered again. Returns the ranges that may hold readings lost with the old file."""
        ledger = self.ledger
        if self._seq or ledger.empty:
            return []
        reason = "store_damaged" if damaged else "store_missing"
        log.error("store %s is new but its ledger is not (%s): continuing above the reserved seqs",
                  self.path, reason)
        self._seq = dict(ledger.reserved)
        conn = self._wdb.conn
        conn.execute("BEGIN IMMEDIATE")
        out = []
        for stream, reserved in sorted(ledger.reserved.items()):
            floor = ledger.floor.get(stream, 1)
            if reserved >= floor:
                out.append(retention.Dropped(stream, reserved - floor + 1, floor, reserved, reason))
        conn.executemany("INSERT INTO streams (stream, last_seq) VALUES (?, ?) "
                         "ON CONFLICT(stream) DO UPDATE SET last_seq = excluded.last_seq", self._seq.items())
        if self.chain is not None and ledger.chain is not None:
            self.chain.restore(*ledger.chain)
            conn.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                             [("chain_seq", str(ledger.chain[0])), ("chain_hash", ledger.chain[1])])
        self.unannounced.write(conn, out)
        conn.execute("COMMIT")
        self.unannounced.added(out)
        return out

    # -- writing ------------------------------------------------------------------------------

    def start(self) -> None:
        self.space.take_reserve()
        if self.ledger.needs_reserve(self._seq):
            self.ledger.reserve(self._seq, self._floors(self._seq))
        self._report(self.resumed)
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    @property
    def writer_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def append(self, reading: Reading) -> None:
        """Queue a reading for the writer; raises ValueError/TypeError if it cannot be encoded.

        A reading without a time (``ts_ms`` None) is held, with ``meta`` ``mono_ns``,
        ``boot_id`` and ``wall_ms`` (the untrusted system clock) to resolve it later."""
        head, tail = encode_parts(self.device, reading)
        held = None
        if reading.ts_ms is None:
            m = reading.meta
            held = (m["mono_ns"], m["boot_id"], m["wall_ms"])
        with self._count_lock:
            self._queued += 1
        self._q.put((reading.stream, reading.ts_ms or 0, head, tail, reading.urgent, held))

    def ack(self, ids: Iterable[int]) -> None:
        """The broker has these rows: forgotten if they are still in the journal, else deleted
        from SQLite with the next commit."""
        ids = list(ids)
        in_sqlite = self.tail.discard(ids)
        if len(in_sqlite) < len(ids):
            gone = set(ids).difference(in_sqlite)
            with self._ack_lock:
                if not self._journal_acks:  # with the next group, or alone if none comes
                    self._journal_acks_at = time.monotonic() + max(JOURNAL_ACK_S, self.lazy_sync_s)
                self._journal_acks.extend(gone)
        if not in_sqlite:
            return
        with self._ack_lock:
            if not self._acked:
                self._acks_at = time.monotonic() + ACK_DELAY_S
            self._acked.update(in_sqlite)
            big = len(self._acked) >= ACK_BATCH
        if big:
            self._q.put(None)

    def set_aside(self, stream: str, ids: Iterable[int], reason: str, *, announce: bool = True,
                  timeout: float = 5.0) -> bool:
        """Give up readings that can never be delivered (agent/uplink/mqtt.py: too large for the
        broker): announced as a ``data_dropped`` alarm per seq run, then deleted like an
        acknowledgement. The alarm is committed durably first, so a power cut in between can
        announce them twice, never lose them silently. ``announce`` False only counts and logs
        (for a ``data_dropped`` alarm that is itself undeliverable: another would be too).
        Returns False, keeping the rows, when the announcement could not be made durable."""
        wanted = sorted(set(ids))
        rows: list[tuple[int, int]] = []
        with self._rlock:
            for k in range(0, len(wanted), 500):
                chunk = wanted[k:k + 500]
                rows += self._rconn.execute(
                    f"SELECT id, seq FROM readings WHERE stream = ? AND id IN ({','.join('?' * len(chunk))})",
                    (stream, *chunk)).fetchall()
        rows += [(r.id, r.seq) for r in self.tail.get(stream, set(wanted))]
        if not rows:
            return True
        dropped = [retention.Dropped(stream, hi - lo + 1, lo, hi, reason)
                   for lo, hi in fold.ranges([seq for _id, seq in rows])]
        if announce:
            self._report(dropped)
            if not self.flush(timeout):
                log.error("store: %d %s readings not set aside: their announcement is not durable yet",
                          len(rows), stream)
                return False
        else:
            self.dropped[stream] = self.dropped.get(stream, 0) + len(rows)
            log.warning("store: dropped %d %s readings (%s), not announced", len(rows), stream, reason)
        self.ack(r[0] for r in rows)
        return True

    @property
    def acks_waiting(self) -> int:
        """Acknowledged rows not yet deleted; the uplink pauses when the writer falls behind."""
        return len(self._acked)

    def get_state(self, key: str) -> str | None:
        """A value kept with ``set_state`` (this run's, or the last run's from the file)."""
        if key in self._state:
            return self._state[key]
        with self._rlock:
            row = self._rconn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_state(self, key: str, value: str, within_s: float = STATE_INTERVAL_S) -> None:
        """Keep a status value (last fix, counters…) for ``lorry-agent status``: written with
        the journal's next fsync, at the latest ``within_s`` from now."""
        if self._state.get(key) != value:
            self._state[key] = value
            self._state_dirty.add(key)
            due = time.monotonic() + within_s
            if self._state_due_at is None or due < self._state_due_at:
                self._state_due_at = due
                self._q.put(None)  # the writer's wait may end later than this

    def flush(self, timeout: float = 10.0) -> bool:
        """Write everything queued so far and make it durable; True once done."""
        if self._thread is None or not self._thread.is_alive():
            return self._commit_all()
        done = threading.Event()
        self._q.put(done)
        return done.wait(timeout)

    def sync_soon(self) -> None:
        """Make what is written durable now, without waiting (the sources have ended)."""
        if self.tail.unsynced:
            self._q.put(threading.Event())

    def close(self) -> None:
        """Final commit (durable), then release the database."""
        if self._thread is not None and self._thread.is_alive():
            self._q.put(STOP)
            self._thread.join(30)
        else:
            self._commit_all()
        try:  # a clean stop: the ledger's floors as they are now (a smaller announced gap later)
            self.ledger.floor.update(self._floors({}))
        except sqlite3.Error as e:
            log.error("store: seq floors not updated at stop (%s)", e)
        self.journal.close()
        self._wdb.conn.close()
        with self._rlock:
            self._rconn.close()  # the last connection: SQLite folds the WAL in and removes it
        # The file as this clean stop leaves it: the next start may skip the full check
        # (agent/store/integrity.py). Not after failed commits or a writer that would not stop.
        clean = not self.commit_errors and not self.writer_alive
        self.ledger.clean = integrity.fingerprint(self.path) if clean else None
        self.ledger.save()
        self._lock.release()

    def maintain(self, timeout: float = 30.0) -> bool:
        """Apply the size and age limits now (normally every 10 s); True once done."""
        m = Maintain(threading.Event())
        self._q.put(m)
        return m.done.wait(timeout)

    def _floors(self, seq: dict[str, int]) -> dict[str, int]:
        """Per stream, the lowest seq not yet acknowledged (for the ledger)."""
        floors = {s: n + 1 for s, n in self._seq.items()}
        floors.update({s: self._seq.get(s, 0) + 1 for s in seq if s not in floors})
        floors.update(self.tail.first_seq())  # the journal's readings: above any in SQLite
        # A stream's seqs rise with its ids: its lowest seq is its first row's (readings_stream),
        # found without reading the backlog (MIN(seq) would read every row).
        floors.update((s, n) for s, n in self._wdb.execute(
            "SELECT stream, (SELECT seq FROM readings r WHERE r.stream = s.stream ORDER BY r.id LIMIT 1)"
            " FROM streams s").fetchall() if n is not None)
        return floors

    def _report(self, dropped: list[retention.Dropped]) -> None:
        if not dropped:
            return
        for d in dropped:
            self.dropped[d.stream] = self.dropped.get(d.stream, 0) + d.count
            log.warning("store: dropped %d %s readings (%s)", d.count, d.stream, d.reason)
        if self.on_drop is not None:
            self.on_drop(dropped)  # their alarms are queued now: the marker follows them
            if recorded := tuple(d for d in dropped if d in self.unannounced.items):
                self._q.put(Announced(recorded))
