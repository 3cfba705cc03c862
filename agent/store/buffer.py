"""Store-and-forward buffer: every reading lands in SQLite before anyone tries to send it.

Durability has two steps, so that neither a crash of the agent nor a power cut loses or
re-numbers anything the backend may have seen:

* **committed** — each reading is committed to the write-ahead log as soon as the writer
  thread takes it (readings that arrive together share one transaction). A crash or SIGKILL of
  the agent loses nothing committed; the OS holds it.
* **durable** — every ``sync_interval_s`` (at once for urgent readings) a commit runs with
  ``synchronous=FULL``, which fsyncs the whole WAL and so every commit before it. Only rows at
  or below this durable mark are handed to the uplink, so a power cut can only lose readings
  that nobody has seen, and a seq number the backend holds never returns with other content.

Each stream numbers its readings 1, 2, 3… with no gaps; the counter is committed in the same
transaction as the rows. A row is deleted only after the broker acknowledged it (``ack``);
deletions ride along with the next commit, so an acknowledgement costs no write of its own.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from agent.store import retention
from agent.model.chain import CHAINED_STREAMS, Chain
from agent.store.seqledger import Ledger
from agent.store.capacity import Space
from agent.model.reading import Reading, encode_parts, resolved_body
from agent.store.lock import StoreLock

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3

# How long the writer waits before retrying a commit that failed (disk error, lock).
_RETRY_S = 1.0
# Acknowledged rows are deleted with the next commit, or on their own after this delay or
# past this many.
_ACK_DELAY_S = 0.5
_ACK_BATCH = 2000
# Status values are written with the next commit, or on their own after this long.
_STATE_INTERVAL_S = 30.0
_IDLE_S = 5.0
# Readings per transaction: bounds the WAL a backlog commit needs (see the reserve).
_MAX_BATCH = 5_000
# Readings held in memory while the store cannot be written (disk full, failing card).
_MAX_PENDING = 50_000
_MAINTENANCE_S = 10.0
# On a full disk, readings are committed in chunks of this many (evidence first).
_FULL_CHUNK = 500
_STOP = object()


@dataclass(slots=True, frozen=True)
class _Maintain:
    done: threading.Event


@dataclass(slots=True, frozen=True)
class _Release:
    resolve: Callable[[int, str, int], tuple[int, bool] | None]


@dataclass(slots=True, frozen=True)
class Row:
    id: int
    stream: str
    seq: int
    ts_ms: int
    body: str


class StoreUnusable(OSError):
    """The store path cannot be a database (a folder, a device, no permission): nothing is
    moved aside or deleted, the agent refuses to start and says why."""


def _system_now_ms() -> int | None:
    return time.time_ns() // 1_000_000


class Store:
    """The SQLite buffer. ``append`` and ``ack`` may be called from any thread."""

    def __init__(self, path: Path | str, *, device: str, sync_interval_s: float = 1.0,
                 chain: Chain | None = None, max_bytes: int = 0, max_age_s: float = 0,
                 on_drop: Callable[[list[retention.Dropped]], None] | None = None,
                 now_ms: Callable[[], int | None] = _system_now_ms):
        self.path = Path(path)
        self.device = device
        self.sync_interval_s = sync_interval_s
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
        _check_path(self.path)
        self._lock = StoreLock(self.path)
        self._lock.acquire()  # before anything is read: another agent may be writing it
        try:
            self._open_locked()
        except BaseException:
            self._lock.release()
            raise

    def _open_locked(self) -> None:
        self._wdb, aside = _open(self.path)
        self.damaged_files: list[str] = [str(aside)] if aside else []
        """Damaged store files found at start and moved aside."""
        self._create_schema(self._wdb)
        self._rconn = _connect(self.path)
        self._rlock = threading.Lock()

        self._seq: dict[str, int] = dict(self._wdb.execute("SELECT stream, last_seq FROM streams").fetchall())
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queued = 0
        self._count_lock = threading.Lock()
        self._acked: set[int] = set()
        self._ack_lock = threading.Lock()
        self._visibility = threading.Lock()
        self._state: dict[str, str] = {}
        self._state_dirty_since: float | None = None
        self._undurable_since: float | None = None
        self._full_sync = False
        max_id = self._wdb.execute("SELECT COALESCE(MAX(id), 0) FROM readings").fetchone()[0]
        self.durable_id: int = max_id
        """Rows with an id up to here are fsynced and may be sent."""
        self._changed = threading.Condition()
        self.commits = 0
        self.durable_commits = 0
        self.commit_errors = 0
        self.last_error: str | None = None
        self._thread: threading.Thread | None = None
        self.held = self._wdb.execute("SELECT COUNT(*) FROM readings WHERE held = 1").fetchone()[0]
        """Readings whose time is not known yet: stored, not sent."""
        self.dropped: dict[str, int] = {}
        """Readings given up per stream (retention.py), for status."""
        self.full_errors = 0
        self._full = False
        self._next_maintenance = 0.0
        if self.chain is not None:
            saved = dict(self._wdb.execute(
                "SELECT key, value FROM state WHERE key IN ('chain_seq', 'chain_hash')").fetchall())
            if saved:
                self.chain.restore(int(saved["chain_seq"]), saved["chain_hash"])
        self.ledger = Ledger(self.path.with_name(self.path.name + ".ledger"))
        self.resumed: list[retention.Dropped] = self._resume(damaged=aside is not None)
        """Seq ranges a fresh store continued above (agent/store/seqledger.py), reported at start."""
        self.space = Space(self._wdb.conn, self.path, self._report)
        """Size and age limits, and the full-disk reserve (agent/store/capacity.py)."""
        self.release_gen = 0
        self.releases: list[tuple[int, str, int]] = []
        """(generation, stream, lowest id) of recent releases: the outbox pages back to them."""

    # -- schema -------------------------------------------------------------------------------

    @staticmethod
    def _create_schema(db: sqlite_utils.Database) -> None:
        # AUTOINCREMENT: ids never go back, even when the newest row has been deleted, so the
        # uplink can page through a stream by id.
        db.execute(
            "CREATE TABLE IF NOT EXISTS readings ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " stream TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL,"
            " body TEXT NOT NULL)"
        )
        db.execute("CREATE INDEX IF NOT EXISTS readings_stream ON readings(stream)")
        # v2: readings taken before the time was known are held until it is (agent/model/clock.py).
        have = db["readings"].columns_dict
        # v3: ``stored_ms``, the device's trusted time when the row was stored (NULL: none was
        # known, or a v2 row): what max_age_days is judged by, never the reading's own time.
        for name, kind in (("held", int), ("mono_ns", int), ("boot_id", str), ("wall_ms", int), ("stored_ms", int)):
            if name not in have:
                db["readings"].add_column(name, kind, not_null_default=0 if name == "held" else None)
        db.execute("CREATE INDEX IF NOT EXISTS readings_stored ON readings(stored_ms)")
        db["streams"].create({"stream": str, "last_seq": int}, pk="stream", if_not_exists=True)
        db["state"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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
        conn.executemany("INSERT OR REPLACE INTO streams (stream, last_seq) VALUES (?, ?)", self._seq.items())
        if self.chain is not None and ledger.chain is not None:
            self.chain.restore(*ledger.chain)
            conn.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                             [("chain_seq", str(ledger.chain[0])), ("chain_hash", ledger.chain[1])])
        conn.execute("COMMIT")
        out = []
        for stream, reserved in sorted(ledger.reserved.items()):
            floor = ledger.floor.get(stream, 1)
            if reserved >= floor:
                out.append(retention.Dropped(stream, reserved - floor + 1, floor, reserved, reason))
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

    def release_held(self, resolve: Callable[[int, str, int], tuple[int, bool] | None]) -> None:
        """Give held readings their time: ``resolve(mono_ns, boot_id, wall_ms)`` returns
        ``(ts_ms, trusted)`` or None to keep holding. Runs in the writer thread."""
        if self.held:
            self._q.put(_Release(resolve))

    def ack(self, ids: Iterable[int]) -> None:
        """The broker has these rows: delete them with the next commit."""
        with self._ack_lock:
            self._acked.update(ids)
            big = len(self._acked) >= _ACK_BATCH
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
        if not rows:
            return True
        rows.sort(key=lambda r: r[1])
        runs: list[list[int]] = []
        for _id, seq in rows:
            if runs and seq == runs[-1][1] + 1:
                runs[-1][1] = seq
            else:
                runs.append([seq, seq])
        dropped = [retention.Dropped(stream, hi - lo + 1, lo, hi, reason) for lo, hi in runs]
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

    def set_state(self, key: str, value: str) -> None:
        """Keep a status value (last fix, counters…) for ``lorry-agent status``; written lazily."""
        if self._state.get(key) != value:
            self._state[key] = value
            if self._state_dirty_since is None:
                self._state_dirty_since = time.monotonic()

    def flush(self, timeout: float = 10.0) -> bool:
        """Commit everything queued so far and make it durable; True once done."""
        if self._thread is None or not self._thread.is_alive():
            return self._commit_all()
        done = threading.Event()
        self._q.put(done)
        return done.wait(timeout)

    def close(self) -> None:
        """Final commit (durable), then release the database."""
        if self._thread is not None and self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(30)
        else:
            self._commit_all()
        try:  # a clean stop: the ledger's floors as they are now (a smaller announced gap later)
            self.ledger.floor.update(self._floors({}))
            self.ledger.save()
        except sqlite3.Error as e:
            log.error("store: seq ledger not updated at stop (%s)", e)
        self._wdb.conn.close()
        with self._rlock:
            self._rconn.close()
        self._lock.release()

    def _commit_all(self) -> bool:
        """Commit everything queued, without the writer thread (before start, after a stop)."""
        while True:
            batch, _markers = self._drain()
            if not self._commit(batch, durable=True):
                return False
            if not batch:
                return True

    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                first = self._q.get(timeout=self._idle_wait())
            except queue.Empty:
                first = None
            batch, markers = self._drain(first)
            stop = _STOP in markers
            flushes = [m for m in markers if isinstance(m, threading.Event)]
            for m in markers:
                if isinstance(m, _Release):
                    self._release(m.resolve)
                elif isinstance(m, _Maintain):
                    self._maintain()
                    m.done.set()
            durable = stop or bool(flushes) or self._sync_due() or any(r[4] for r in batch)
            if batch or durable or self._acks_due() or self._state_due():
                while not self._commit_all_of(batch, durable):
                    if stop:
                        log.error("final commit failed; %d readings not stored", len(batch))
                        break
                    time.sleep(_RETRY_S)
                    more, later = self._drain()
                    batch = self._bounded(batch + more)
                    durable = durable or any(r[4] for r in more)
                    stop = stop or _STOP in later
                    flushes += [m for m in later if isinstance(m, threading.Event)]
            for f in flushes:
                f.set()
            if time.monotonic() >= self._next_maintenance:
                self._maintain()

    def _commit_all_of(self, batch: list[tuple], durable: bool) -> bool:
        """Commit the batch; on a full store, evidence first and the rest in chunks, so what
        fits gets in. What was committed leaves ``batch`` (it is changed in place)."""
        if self._commit(batch, durable=durable):
            batch.clear()
            return True
        if not self._full:
            return False
        batch.sort(key=lambda item: item[0] not in retention.NEVER_SHED)  # stable: per-stream order kept
        while batch:
            chunk = batch[:_FULL_CHUNK]
            if not self._commit(chunk, durable=durable):
                return False
            del batch[:len(chunk)]
        return True

    def maintain(self, timeout: float = 30.0) -> bool:
        """Apply the size and age limits now (normally every 10 s); True once done."""
        m = _Maintain(threading.Event())
        self._q.put(m)
        return m.done.wait(timeout)

    def _bounded(self, batch: list[tuple]) -> list[tuple]:
        """While nothing can be written, keep memory bounded: give up the oldest readings that
        are not evidence (seal, alarm, ignition are always kept), and say so."""
        excess = len(batch) - _MAX_PENDING
        if excess <= 0:
            return batch
        kept, lost = [], Counter()
        for item in batch:
            if excess > 0 and item[0] not in retention.NEVER_SHED:
                lost[item[0]] += 1
                excess -= 1
            else:
                kept.append(item)
        with self._count_lock:
            self._queued -= sum(lost.values())
        self._report([retention.Dropped(s, n, 0, 0, "unwritable") for s, n in lost.items()])
        return kept

    def _maintain(self, emergency: bool = False) -> None:
        self._next_maintenance = time.monotonic() + _MAINTENANCE_S
        now = self.now_ms() if self.max_age_ms else None
        self.space.keep(self.max_bytes, self.max_age_ms, now, emergency=emergency)

    def _floors(self, seq: dict[str, int]) -> dict[str, int]:
        """Per stream, the lowest seq not yet acknowledged (for the ledger)."""
        floors = {s: n + 1 for s, n in self._seq.items()}
        floors.update({s: self._seq.get(s, 0) + 1 for s in seq if s not in floors})
        floors.update(dict(self._wdb.execute("SELECT stream, MIN(seq) FROM readings GROUP BY stream").fetchall()))
        return floors

    def _report(self, dropped: list[retention.Dropped]) -> None:
        if not dropped:
            return
        for d in dropped:
            self.dropped[d.stream] = self.dropped.get(d.stream, 0) + d.count
            log.warning("store: dropped %d %s readings (%s)", d.count, d.stream, d.reason)
        if self.on_drop is not None:
            self.on_drop(dropped)

    def _drain(self, first: Any = None) -> tuple[list[tuple], list[Any]]:
        """Everything queued right now: readings (one transaction) and control markers."""
        batch: list[tuple] = []
        markers: list[Any] = []
        item = first
        while True:
            if isinstance(item, tuple):
                batch.append(item)
            elif item is not None:
                markers.append(item)
            if len(batch) >= _MAX_BATCH:
                break
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
        return batch, markers

    def _idle_wait(self) -> float:
        now = time.monotonic()
        due = [now + _IDLE_S]
        if self._undurable_since is not None:
            due.append(self._undurable_since + self.sync_interval_s)
        if self._acked:
            due.append(now + _ACK_DELAY_S)
        if self._state_dirty_since is not None:
            due.append(self._state_dirty_since + _STATE_INTERVAL_S)
        return max(0.0, min(due) - now)

    def _sync_due(self) -> bool:
        return (
            self._undurable_since is not None
            and time.monotonic() - self._undurable_since >= self.sync_interval_s
        )

    def _acks_due(self) -> bool:
        return bool(self._acked)

    def _state_due(self) -> bool:
        return (
            self._state_dirty_since is not None
            and time.monotonic() - self._state_dirty_since >= _STATE_INTERVAL_S
        )

    def _release(self, resolve: Callable[[int, str, int], tuple[int, bool] | None]) -> None:
        conn = self._wdb.conn
        rows = conn.execute(
            "SELECT id, stream, mono_ns, boot_id, wall_ms, body FROM readings WHERE held = 1 ORDER BY id"
        ).fetchall()
        chain = self.chain
        chain_before = chain.state() if chain is not None else None
        updates = []
        for rid, stream, mono, boot, wall, body in rows:
            got = resolve(mono, boot, wall)
            if got is not None:
                body = resolved_body(body, got[0], got[1])
                if chain is not None and stream in CHAINED_STREAMS:
                    body = chain.link(body)
                updates.append((got[0], body, rid, stream))
        if not updates:
            return
        try:
            conn.execute("PRAGMA synchronous=FULL")  # durable: the backend may see them at once
            self._full_sync = True
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "UPDATE readings SET ts = ?, body = ?, held = 0 WHERE id = ?", [u[:3] for u in updates]
            )
            if chain is not None and chain.state() != chain_before:
                conn.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                                 [("chain_seq", str(chain.seq)), ("chain_hash", chain.last)])
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            if chain is not None and chain_before is not None:
                chain.restore(*chain_before)
            if conn.in_transaction:  # SQLite may have rolled back itself (SQLITE_FULL)
                conn.execute("ROLLBACK")
            self.commit_errors += 1
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("store: releasing held readings failed (%s); will retry", e)
            return
        self.held -= len(updates)
        if chain is not None and chain.state() != chain_before:
            self.ledger.chain = chain.state()
            self.ledger.save()
        lowest: dict[str, int] = {}
        for _ts, _body, rid, stream in updates:
            lowest[stream] = min(rid, lowest.get(stream, rid))
        with self._changed:
            self.release_gen += 1
            self.releases = self.releases[-99:] + [(self.release_gen, s, i) for s, i in lowest.items()]
            self._changed.notify_all()

    def _commit(self, batch: list[tuple], durable: bool) -> bool:
        """One transaction: new rows, their seq counters, pending deletions, state."""
        conn = self._wdb.conn
        with self._ack_lock:
            acked = list(self._acked)
        seq = dict(self._seq)
        rows = []
        held = 0
        chain = self.chain
        chain_before = chain.state() if chain is not None else None
        stored = self.now_ms() if batch else None
        for stream, ts, head, tail, _urgent, hold in batch:
            n = seq.get(stream, 0) + 1
            seq[stream] = n
            body = f"{head}{n}{tail}"
            if hold is None:
                if chain is not None and stream in CHAINED_STREAMS:
                    body = chain.link(body)
                rows.append((stream, n, ts, body, 0, None, None, None, stored))
            else:
                rows.append((stream, n, ts, body, 1, *hold, stored))  # chained once its time is known
                held += 1
        state = list(self._state.items()) if self._state_dirty_since is not None else []
        if self.ledger.needs_reserve(seq):  # on disk before any of these seqs can be
            try:
                self.ledger.reserve(seq, self._floors(seq))
            except sqlite3.Error as e:
                log.error("store: seq ledger not updated (%s)", e)
        try:
            if durable != self._full_sync:
                conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._full_sync = durable
            conn.execute("BEGIN IMMEDIATE")
            try:
                if rows:
                    conn.executemany(
                        "INSERT INTO readings (stream, seq, ts, body, held, mono_ns, boot_id, wall_ms, stored_ms)"
                        " VALUES (?,?,?,?,?,?,?,?,?)",
                        rows,
                    )
                    conn.executemany(
                        "INSERT INTO streams (stream, last_seq) VALUES (?, ?) "
                        "ON CONFLICT(stream) DO UPDATE SET last_seq = excluded.last_seq",
                        [(s, seq[s]) for s in {r[0] for r in rows}],
                    )
                if acked:
                    conn.executemany("DELETE FROM readings WHERE id BETWEEN ? AND ?", _ranges(acked))
                if chain is not None and chain.state() != chain_before:
                    state += [("chain_seq", str(chain.seq)), ("chain_hash", chain.last)]
                if durable:
                    # Something must be written for the FULL commit to sync the WAL.
                    state.append(("durable_at", f"{time.time():.3f}"))
                if state:
                    conn.executemany(
                        "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", state
                    )
                top = conn.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'readings'"
                ).fetchone()
                # COMMIT and forgetting the deleted ids are one step for pending(): otherwise
                # it could count a deleted row as still unacknowledged-and-acknowledged.
                self._visibility.acquire()
                try:
                    conn.execute("COMMIT")
                    if acked:
                        with self._ack_lock:
                            self._acked.difference_update(acked)
                finally:
                    self._visibility.release()
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back itself (SQLITE_FULL)
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            if chain is not None and chain_before is not None:
                chain.restore(*chain_before)  # nothing of this batch exists: nor do its links
            self.commit_errors += 1
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("store commit failed (%s); %d readings held in memory", e, len(rows))
            self._full = self.space.disk_full(e)
            if self._full:
                self.full_errors += 1
                self._maintain(emergency=True)
            return False
        self._seq = seq
        self.held += held
        if chain is not None and chain.state() != chain_before:
            self.ledger.chain = chain.state()
            self.ledger.save()
        with self._count_lock:
            self._queued -= len(rows)
        self.commits += 1
        if state:
            self._state_dirty_since = None
        if durable:
            self.durable_commits += 1
            self._undurable_since = None
            with self._changed:
                self.durable_id = top[0] if top else 0
                self._changed.notify_all()
        elif rows and self._undurable_since is None:
            self._undurable_since = time.monotonic()
        return True

    # -- reading (uplink, status) -------------------------------------------------------------

    def wait_for_change(self, seen_durable_id: int, timeout: float) -> int:
        """Block until rows beyond ``seen_durable_id`` are durable, or timeout."""
        with self._changed:
            if self.durable_id <= seen_durable_id:
                self._changed.wait(timeout)
            return self.durable_id

    def fetch(self, stream: str, after_id: int, limit: int) -> list[Row]:
        """Durable, unacknowledged rows of a stream after ``after_id``, oldest first."""
        with self._rlock:
            cur = self._rconn.execute(
                "SELECT id, stream, seq, ts, body FROM readings "
                "WHERE stream = ? AND id > ? AND id <= ? AND held = 0 ORDER BY id LIMIT ?",
                (stream, after_id, self.durable_id, limit),
            )
            rows = cur.fetchall()
        acked = self._acked
        return [Row(*r) for r in rows if r[0] not in acked]

    def newest(self, stream: str) -> Row | None:
        with self._rlock:
            r = self._rconn.execute(
                "SELECT id, stream, seq, ts, body FROM readings "
                "WHERE stream = ? AND id <= ? AND held = 0 ORDER BY id DESC LIMIT 1",
                (stream, self.durable_id),
            ).fetchone()
        return Row(*r) if r and r[0] not in self._acked else None

    def streams(self) -> list[str]:
        with self._rlock:
            return [r[0] for r in self._rconn.execute("SELECT stream FROM streams")]

    def depth(self) -> dict[str, int]:
        """Unacknowledged rows per stream, including those not yet committed."""
        return {s: d["count"] for s, d in buffer_summary(self._rconn, self._rlock).items()}

    @property
    def queued(self) -> int:
        """Readings appended but not yet committed."""
        return self._queued

    def pending(self) -> int:
        """Readings not yet acknowledged by the broker (queued, buffered or in flight)."""
        with self._count_lock:
            queued = self._queued  # read first: a reading moves from queued to a row, never back
        with self._visibility, self._rlock:
            n = self._rconn.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
            n -= len(self._acked)
        return n + queued


def _ranges(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted ids as (first, last) runs: acknowledged batches are mostly consecutive ids."""
    out: list[tuple[int, int]] = []
    for i in sorted(ids):
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def buffer_summary(conn: sqlite3.Connection, lock: threading.Lock | None = None) -> dict[str, dict]:
    sql = (
        "SELECT s.stream, s.last_seq, COUNT(r.id), MIN(CASE WHEN r.held = 0 THEN r.ts END), MIN(r.seq),"
        " COALESCE(SUM(r.held), 0) FROM streams s "
        "LEFT JOIN readings r ON r.stream = s.stream GROUP BY s.stream ORDER BY s.stream"
    )
    if lock:
        with lock:
            rows = conn.execute(sql).fetchall()
    else:
        rows = conn.execute(sql).fetchall()
    return {
        s: {"count": n, "last_seq": last, "oldest_ts_ms": oldest, "oldest_seq": first, "held": held}
        for s, last, n, oldest, first, held in rows
    }


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE), so SQLite never
    # starts one behind our back and commit points are exactly where the code says.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def _new_file_settings(db: sqlite_utils.Database) -> None:
    """Settings a database file takes only before its first table (and before WAL mode)."""
    if not db.table_names():
        # Lets a full disk get space back: pages freed by shedding can be returned to the
        # filesystem (PRAGMA incremental_vacuum), not only reused inside the file.
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")


def _check_path(path: Path) -> None:
    """The store path must be a regular file or not exist yet; anything else is refused, never
    moved aside: a folder given by mistake may hold everything else on the device."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise StoreUnusable(f"store {path}: cannot look at it: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise StoreUnusable(f"store {path} is {kind}; [store] path must name a database file "
                            f"(e.g. {path / 'buffer.db' if stat.S_ISDIR(st.st_mode) else path.with_suffix('.db')})")


# SQLite's own verdicts that a file is not a sound database (anything else, such as "unable to
# open database file" for a permission problem, proves nothing about the file).
_DAMAGED = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}


def _proves_damage(e: sqlite3.DatabaseError) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return code is None or code & 0xFF in _DAMAGED


def _open(path: Path) -> tuple[sqlite_utils.Database, Path | None]:
    """Open the buffer. A file that SQLite proves damaged is moved aside (kept for forensics)
    and a new one started: a damaged card must never put the agent in a crash loop. Any other
    failure (permissions, a vanished folder) is raised: nothing is renamed on a guess.
    Returns the database and where a damaged file went, if one did."""
    conn = None
    try:
        conn = _connect(path)
        db = sqlite_utils.Database(conn)
        _new_file_settings(db)
        db.enable_wal()
        ok = db.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {ok}")  # no error code: proven damage
        aside = None
    except sqlite3.DatabaseError as e:
        if conn is not None:
            conn.close()
        if not _proves_damage(e) or not path.is_file():
            raise StoreUnusable(f"store {path}: cannot open it: {e}") from None
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        log.error("store %s is damaged (%s); moved aside to %s, starting a new one", path, e, aside)
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{path}{suffix}")
            if src.exists():
                os.replace(src, Path(f"{aside}{suffix}"))
        db = sqlite_utils.Database(_connect(path))
        _new_file_settings(db)
        db.enable_wal()
    db.execute("PRAGMA synchronous = NORMAL")
    return db, aside
