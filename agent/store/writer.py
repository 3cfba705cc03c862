"""The store's writer thread: seq numbering, the journal's group commit, folds, durability.

One thread owns the journal (agent/store/journal.py) and the SQLite write connection. Readings
wait in memory for their group commit (agent/store/timing.py): every ``sync_interval_s``
(``lazy_sync_s`` for lazy streams such as health; at once for urgent readings, a flush or the
stop) the group is numbered (seq per stream, linked into the chain if its stream is chained),
appended to the journal in one ``write()`` and made durable by one ``fdatasync``: only then
may the uplink send it. Acknowledged readings are forgotten; the others are folded into SQLite
in large transactions (agent/store/fold.py) once an hour, past 10,000 readings, when the
journal passes 4 MB, and at the stop. When the journal cannot be written, readings go straight
into SQLite (durably); on a full disk evidence first and the rest in chunks, and while nothing
can be written memory stays bounded by giving up the least valuable readings, announced.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.model import streams
from agent.store import fold, retention
from agent.store.announce import Unannounced
from agent.store.bounds import Bounds
from agent.store.capacity import Space
from agent.store.fold import Folding
from agent.store.seqledger import Ledger
from agent.store.tail import TailRow
from agent.store.timing import MAX_BATCH, Timing

log = logging.getLogger(__name__)

# How long the writer waits before retrying what failed (disk error, lock).
_RETRY_S = 1.0
# Status values ride along with the journal's next fsync, or go on their own after this long
# (Store.set_state may ask for sooner).
STATE_INTERVAL_S = 900.0
# Acknowledgements of journal rows ride along with the next group's write, or go on their own
# (written, never fsynced for their sake) after ``lazy_sync_s``, at least this long: a write of
# its own costs as much as a group's (measured on ext4: 2 pages for 25 bytes, the file's size
# in the inode being one of them), and an acknowledgement missing after a crash only means a
# reading sent twice, which the backend de-duplicates by seq.
JOURNAL_ACK_S = 5.0
_MAINTENANCE_S = 10.0
# On a full disk, readings are committed in chunks of this many (evidence first).
_FULL_CHUNK = 500
# After a failed fold (SQLite unwritable, the journal still fine), the next try waits this long.
_FOLD_RETRY_S = 10.0
STOP = object()


@dataclass(slots=True, frozen=True)
class Maintain:
    done: threading.Event


@dataclass(slots=True, frozen=True)
class Announced:
    """Queued behind the ``data_dropped`` alarms of these losses (agent/store/announce.py)."""
    dropped: tuple[retention.Dropped, ...]


@dataclass(slots=True, frozen=True)
class Release:
    resolve: Callable[[int, str, int], tuple[int, bool] | None]


class StoreWriter(Folding, Bounds, Timing):
    """The writer-thread half of the Store (agent/store/buffer.py), which sets these up."""

    _q: queue.SimpleQueue[Any]
    _journal_acks: list[int]
    _journal_acks_at: float
    _queued: int
    _count_lock: threading.Lock
    _state_due_at: float | None
    _state_dirty: set[str]
    _waiting: list[tuple[Any, ...]]
    _waiting_since: float
    _acks_at: float
    _fold_retry_at: float
    _journal_max: int
    _full: bool
    _next_maintenance: float
    _next_id: int
    _visible_top: dict[str, int]
    _changed: threading.Condition
    durable_id: int
    commit_errors: int
    full_errors: int
    last_error: str | None
    held: int
    release_gen: int
    releases: list[tuple[int, str, int]]
    ledger: Ledger
    space: Space
    unannounced: Unannounced
    _announced: list[retention.Dropped]
    sync_interval_s: float
    lazy_sync_s: float
    max_bytes: int
    max_age_ms: int
    now_ms: Callable[[], int | None]

    if TYPE_CHECKING:  # provided by the Store's other parts
        def _release(self, resolve: Callable[[int, str, int], tuple[int, bool] | None]) -> None: ...
        def _floors(self, seq: dict[str, int]) -> dict[str, int]: ...
        def _report(self, dropped: list[retention.Dropped]) -> None: ...

    def _commit_all(self) -> bool:
        """Everything queued and journaled into SQLite, without the writer thread (before
        start, after a stop)."""
        while True:
            batch, _markers = self._drain()
            batch, self._waiting = self._waiting + batch, []
            if not self._fold_in(batch):
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
            urgent = any(r[4] for r in batch)
            batch = self._group(batch, now=bool(stop or flushes or urgent
                                                or any(isinstance(m, Maintain) for m in markers)))
            if batch and not self._take(batch):
                while not self._fold_in(batch):  # the journal failed: SQLite, durably
                    if stop:
                        log.error("final commit failed; %d readings not stored", len(batch))
                        break
                    time.sleep(_RETRY_S)
                    more, later = self._drain()
                    batch = self._bounded(batch + more)
                    markers += later  # every one of them is handled below
                    stop = stop or STOP in later
                    flushes += [m for m in later if isinstance(m, threading.Event)]
            if stop or flushes or urgent or self._sync_due() or self._state_due():
                self._sync()
            for m in markers:
                if isinstance(m, Release):
                    # Held readings are released in SQLite: the journal's go there first, once
                    # one of them can be.
                    if any(m.resolve(*r.hold) is not None for r in self.tail.all_rows() if r.hold):
                        self._fold_in([])
                    self._release(m.resolve)
                elif isinstance(m, Maintain):  # asked for: the limits apply to every reading
                    self._fold_in([])
                    self._maintain()
                    m.done.set()
                elif isinstance(m, Announced):
                    self._announced += m.dropped
            # Their alarms (urgent, queued before the marker) are durable once nothing is unsynced.
            if self._announced and not self.tail.unsynced and self.unannounced.forget(self._wdb.conn,
                                                                                        self._announced):
                self._announced = []
            if stop or self._fold_due():
                if not self._fold_in([]):
                    self._fold_retry_at = time.monotonic() + _FOLD_RETRY_S
                    self._bound_tail()
                if stop and (left := len(self.tail.all_rows())):
                    log.error("final fold failed; the journal keeps %d readings for the next start", left)
            elif self._acked:
                self._delete_acked(now=bool(flushes))
            if self._journal_acks and time.monotonic() >= self._journal_acks_at:
                self._write_acks()
            for f in flushes:
                f.set()
            if time.monotonic() >= self._next_maintenance:
                self._maintain()

    # -- numbering and the journal ------------------------------------------------------------

    def _number(self, batch: list[tuple[Any, ...]]) -> tuple[list[TailRow], list[list[Any]]]:
        """Seq, id and chain link for each reading (the caller restores them on failure)."""
        rows, records = [], []
        chain = self.chain
        stored = self.now_ms()
        seq = self._seq
        for stream, ts, head, tail, _urgent, hold in batch:
            n = seq.get(stream, 0) + 1
            seq[stream] = n
            body = f"{head}{n}{tail}"
            link = None
            if hold is None and chain is not None and stream in streams.CHAINED:
                body = chain.link(body)  # held ones are chained once their time is known
                link = chain.state()
            row = TailRow(self._next_id, stream, n, ts, body, hold, stored)
            self._next_id += 1
            rows.append(row)
            records.append(fold.record(row, link))
        return rows, records

    def _reserve(self, new: list[TailRow]) -> None:
        """The seq ledger covers every seq handed out before any of them can be offered.
        Written after the journal's append (before its fsync): a crash in between leaves the
        readings in the journal, not a reservation beside a store that looks lost. The floors
        count ``new`` as unacknowledged."""
        if not self.ledger.needs_reserve(self._seq):
            return
        try:
            floors = self._floors(self._seq)
            for r in new:
                if r.seq < floors.get(r.stream, r.seq + 1):
                    floors[r.stream] = r.seq
            self.ledger.reserve(self._seq, floors)
        except sqlite3.Error as e:
            log.error("store: seq ledger not updated (%s)", e)

    def _snapshot(self) -> tuple[dict[str, int], int, tuple[int, str] | None]:
        return dict(self._seq), self._next_id, self.chain.state() if self.chain is not None else None

    def _restore(self, saved: tuple[dict[str, int], int, tuple[int, str] | None]) -> None:
        self._seq, self._next_id, chain = saved  # nothing of the batch exists: nor do its links
        if self.chain is not None and chain is not None:
            self.chain.restore(*chain)

    def _take(self, batch: list[tuple[Any, ...]]) -> bool:
        """Number the batch and append it to the journal (made durable by the next sync)."""
        saved = self._snapshot()
        rows, records = self._number(batch)
        if not self._write_acks(records):
            self._restore(saved)
            return False
        self.tail.add_unsynced(rows)
        self._reserve(rows)
        self.held += sum(1 for r in rows if r.hold is not None)
        with self._count_lock:
            self._queued -= len(rows)
        return True

    def _write_acks(self, records: list[list[Any]] | None = None) -> bool:
        """Append ``records`` after the journal rows acknowledged since the last write (so a
        replay, or a look from outside, knows they went; never fsynced for their sake)."""
        with self._ack_lock:
            acks, self._journal_acks = self._journal_acks, []
        ok = self.journal.append(([["a", fold.ranges(acks)]] if acks else []) + (records or []))
        if not ok:
            with self._ack_lock:
                self._journal_acks += acks
        return ok

    def _sync(self) -> None:
        """fdatasync the journal (status values ride along): its readings become durable and
        are offered. If the journal fails, they go into SQLite instead."""
        state = self._state_due_at is not None
        if not self.tail.unsynced and not state:
            return
        changed = [["s", k, self._state[k]] for k in list(self._state_dirty)]
        if changed and not self.journal.append(changed):
            self._fold_in([])
            return
        if not self.journal.sync():
            self._fold_in([])
            return
        rows = self.tail.synced(time.monotonic())
        self.durable_commits += 1
        self._state_due_at = None
        for _s, k, v in changed:
            if self._state.get(k) == v:  # not set again meanwhile (another thread)
                self._state_dirty.discard(k)
        self._made_visible(rows)
        self._save_chain()

    def _made_visible(self, rows: list[TailRow]) -> None:
        """Wake the uplink. Rows with ids below what it was offered already (possible only
        after a failure put newer rows into SQLite first) make it page back, as released
        held readings do."""
        if not rows:
            return
        lowest: dict[str, int] = {}
        for r in rows:
            if r.hold is None and r.id < lowest.get(r.stream, r.id + 1):
                lowest[r.stream] = r.id
        with self._changed:
            behind = [(s, i) for s, i in lowest.items() if i <= self._visible_top.get(s, 0)]
            for r in rows:
                if r.id > self._visible_top.get(r.stream, 0):
                    self._visible_top[r.stream] = r.id
            if behind:
                self.release_gen += 1
                self.releases = self.releases[-99:] + [(self.release_gen, s, i) for s, i in behind]
            self.durable_id = max(self.durable_id, max(r.id for r in rows))
            self._changed.notify_all()

    def _save_chain(self) -> None:
        if self.chain is not None and self.chain.state() != self.ledger.chain and self.chain.seq:
            self.ledger.chain = self.chain.state()
            self.ledger.save()

    # -- SQLite -------------------------------------------------------------------------------

    def _fold_in(self, batch: list[tuple[Any, ...]]) -> bool:
        """The journal's readings and ``batch`` into SQLite, durably, and the journal emptied.
        On a full store: the journal's first, then evidence first in chunks, so what fits gets
        in. What was committed leaves ``batch`` (it is changed in place)."""
        if self._fold(batch):
            batch.clear()
            return True
        if not self._full:
            return False
        rows = sorted(self.tail.all_rows(), key=lambda r: r.stream not in streams.NEVER_SHED)
        unsynced = {r.id for r in self.tail.unsynced}
        for k in range(0, len(rows), _FULL_CHUNK):
            try:
                self._sql_commit(rows[k:k + _FULL_CHUNK], durable=True, whole_tail=False)
            except sqlite3.Error as e:
                self._failed("store commit failed", e, len(rows) - k)
                return False
            self._made_visible([r for r in rows[k:k + _FULL_CHUNK] if r.id in unsynced])
        batch.sort(key=lambda item: item[0] not in streams.NEVER_SHED)  # stable: per-stream order kept
        while True:  # the tail is in SQLite now: each of these folds is whole, the last one too
            chunk = batch[:_FULL_CHUNK]
            if not self._fold(chunk):
                return False
            del batch[:len(chunk)]
            if not batch:
                return True

    def _fold(self, batch: list[tuple[Any, ...]]) -> bool:
        saved = self._snapshot()
        new, _records = self._number(batch)
        fresh = self.tail.unsynced + new  # not offered yet (the others were, from the tail)
        rows = self.tail.all_rows() + new
        if not rows and not batch and self.journal.size == 0:
            return True
        self.tail.folding = {r.id for r in rows}
        try:
            self._reserve(new)
            self._sql_commit(rows, durable=True, whole_tail=True)
        except sqlite3.Error as e:
            self._restore(saved)
            self._failed("store commit failed", e, len(rows))
            return False
        finally:
            self.tail.folding = set()
        self.held += sum(1 for r in new if r.hold is not None)
        with self._count_lock:
            self._queued -= len(new)
        self._state_due_at = None
        self._state_dirty.clear()
        self._made_visible(fresh)
        self._save_chain()
        return True

    def _failed(self, what: str, e: sqlite3.Error, n: int) -> None:
        self.commit_errors += 1
        self.last_error = f"{type(e).__name__}: {e}"
        log.error("%s (%s); %d readings kept for the next try", what, e, n)
        self._full = self.space.disk_full(e)
        if self._full:
            self.full_errors += 1
            self._maintain(emergency=True)

    def _maintain(self, emergency: bool = False) -> None:
        self._next_maintenance = time.monotonic() + _MAINTENANCE_S
        now = self.now_ms() if self.max_age_ms else None
        self.space.keep(self.max_bytes, self.max_age_ms, now, emergency=emergency)

    # -- timing -------------------------------------------------------------------------------

    def _drain(self, first: Any = None) -> tuple[list[tuple[Any, ...]], list[Any]]:
        """Everything queued right now: readings (one write) and control markers."""
        batch: list[tuple[Any, ...]] = []
        markers: list[Any] = []
        item = first
        while True:
            if isinstance(item, tuple):
                batch.append(item)
            elif item is not None:
                markers.append(item)
            if len(batch) >= MAX_BATCH:
                break
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
        return batch, markers
