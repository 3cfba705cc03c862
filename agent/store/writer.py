"""The store's writer thread: group commit, seq numbering, acknowledged deletions, durability.

One thread owns the write connection. It commits whatever is queued in one transaction, assigns
each stream's ``seq`` in the same transaction as the rows (and links chained events), deletes
acknowledged rows with the next commit, writes status values lazily, and every
``sync_interval_s`` (at once for urgent readings) commits with ``synchronous=FULL``, which
fsyncs the whole WAL: the new durable mark is what the uplink may send. On a full disk it
commits evidence first and the rest in chunks; while nothing can be written it keeps memory
bounded by giving up the least valuable readings, announced.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlite_utils

from agent.model import streams
from agent.model.chain import Chain
from agent.store import retention
from agent.store.capacity import Space
from agent.store.seqledger import Ledger

log = logging.getLogger(__name__)

# How long the writer waits before retrying a commit that failed (disk error, lock).
_RETRY_S = 1.0
# Acknowledged rows are deleted with the next commit, or on their own after this delay or
# past this many.
_ACK_DELAY_S = 0.5
ACK_BATCH = 2000
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
STOP = object()


@dataclass(slots=True, frozen=True)
class Maintain:
    done: threading.Event


@dataclass(slots=True, frozen=True)
class Release:
    resolve: Callable[[int, str, int], tuple[int, bool] | None]


class StoreWriter:
    """The writer-thread half of the Store (agent/store/buffer.py), which sets these up."""

    _wdb: sqlite_utils.Database
    _q: queue.SimpleQueue[Any]
    _seq: dict[str, int]
    _queued: int
    _count_lock: threading.Lock
    _acked: set[int]
    _ack_lock: threading.Lock
    _visibility: threading.Lock
    _state: dict[str, str]
    _state_dirty_since: float | None
    _undurable_since: float | None
    _full_sync: bool
    _full: bool
    _next_maintenance: float
    _changed: threading.Condition
    durable_id: int
    commits: int
    durable_commits: int
    commit_errors: int
    full_errors: int
    last_error: str | None
    held: int
    chain: Chain | None
    ledger: Ledger
    space: Space
    sync_interval_s: float
    max_bytes: int
    max_age_ms: int
    now_ms: Callable[[], int | None]

    if TYPE_CHECKING:  # provided by the Store's other parts
        def _release(self, resolve: Callable[[int, str, int], tuple[int, bool] | None]) -> None: ...
        def _floors(self, seq: dict[str, int]) -> dict[str, int]: ...
        def _report(self, dropped: list[retention.Dropped]) -> None: ...

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
            stop = STOP in markers
            flushes = [m for m in markers if isinstance(m, threading.Event)]
            for m in markers:
                if isinstance(m, Release):
                    self._release(m.resolve)
                elif isinstance(m, Maintain):
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
                    stop = stop or STOP in later
                    flushes += [m for m in later if isinstance(m, threading.Event)]
            for f in flushes:
                f.set()
            if time.monotonic() >= self._next_maintenance:
                self._maintain()

    def _commit_all_of(self, batch: list[tuple[Any, ...]], durable: bool) -> bool:
        """Commit the batch; on a full store, evidence first and the rest in chunks, so what
        fits gets in. What was committed leaves ``batch`` (it is changed in place)."""
        if self._commit(batch, durable=durable):
            batch.clear()
            return True
        if not self._full:
            return False
        batch.sort(key=lambda item: item[0] not in streams.NEVER_SHED)  # stable: per-stream order kept
        while batch:
            chunk = batch[:_FULL_CHUNK]
            if not self._commit(chunk, durable=durable):
                return False
            del batch[:len(chunk)]
        return True

    def _bounded(self, batch: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """While nothing can be written, keep memory bounded: give up the oldest readings that
        are not evidence (seal, alarm, ignition are always kept), and say so."""
        excess = len(batch) - _MAX_PENDING
        if excess <= 0:
            return batch
        kept: list[tuple[Any, ...]] = []
        lost: Counter[str] = Counter()
        for item in batch:
            if excess > 0 and item[0] not in streams.NEVER_SHED:
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

    def _drain(self, first: Any = None) -> tuple[list[tuple[Any, ...]], list[Any]]:
        """Everything queued right now: readings (one transaction) and control markers."""
        batch: list[tuple[Any, ...]] = []
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

    def _commit(self, batch: list[tuple[Any, ...]], durable: bool) -> bool:
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
                if chain is not None and stream in streams.CHAINED:
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


def _ranges(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted ids as (first, last) runs: acknowledged batches are mostly consecutive ids."""
    out: list[tuple[int, int]] = []
    for i in sorted(ids):
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out
