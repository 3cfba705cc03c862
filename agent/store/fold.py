"""Folding the journal's readings into SQLite, and the journal back in at start.

A fold is one transaction with ``synchronous=FULL``: every reading of the journal the broker
has not acknowledged (agent/store/tail.py), the seq counters of every stream up to the last
seq handed out (acknowledged readings included, so a seq never returns), the chain's head and
the status values. Then the journal is emptied. The rule that makes a journal replayable at
any moment: ``streams.last_seq`` only moves in a fold, and a fold holds every journal record
at or below it; so at start a record is new exactly when its seq is above its stream's
``last_seq`` (a power cut between the fold and the journal's truncation replays nothing twice).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from agent.model.chain import Chain
from agent.store import journal, retention
from agent.store.announce import Unannounced
from agent.store.seqledger import Ledger
from agent.store.tail import Tail, TailRow

log = logging.getLogger(__name__)

# Acknowledged SQLite rows are deleted with the next commit, or on their own after this delay
# or past this many.
ACK_DELAY_S = 0.5
ACK_BATCH = 2000

# OR IGNORE: a journal replayed after a fold in parts (a full disk) finds some of its rows in.
_INSERT = ("INSERT OR IGNORE INTO readings (id, stream, seq, ts, body, held, mono_ns, boot_id, wall_ms, stored_ms)"
           " VALUES (?,?,?,?,?,?,?,?,?,?)")
_LAST_SEQ = ("INSERT INTO streams (stream, last_seq) VALUES (?, ?) "
             "ON CONFLICT(stream) DO UPDATE SET last_seq = MAX(last_seq, excluded.last_seq)")


def row_values(r: TailRow) -> tuple[Any, ...]:
    hold = r.hold or (None, None, None)
    return (r.id, r.stream, r.seq, r.ts, r.body, int(r.hold is not None), *hold, r.stored_ms)


def record(r: TailRow, chain: tuple[int, str] | None) -> list[Any]:
    """A reading's journal record (with the chain's head after it, for a chained one)."""
    return ["r", r.id, r.stream, r.seq, r.ts, r.body, list(r.hold) if r.hold else None, r.stored_ms,
            list(chain) if chain else None]


def write_rows(conn: sqlite3.Connection, rows: list[TailRow], seq: dict[str, int], state: dict[str, str],
               chain: Chain | None, acked: list[int], top_id: int = 0) -> None:
    """One fold's statements, inside the caller's transaction. ``top_id``: the highest id
    handed out, kept so ids never go back (the journal's acknowledged rows never got here)."""
    if rows:
        conn.executemany(_INSERT, [row_values(r) for r in rows])
    if top_id and not conn.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'readings'",
                                   (top_id,)).rowcount:
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('readings', ?)", (top_id,))
    if seq:
        conn.executemany(_LAST_SEQ, list(seq.items()))
    if acked:
        conn.executemany("DELETE FROM readings WHERE id BETWEEN ? AND ?", ranges(acked))
    values = dict(state)
    if chain is not None and chain.seq:
        values |= {"chain_seq": str(chain.seq), "chain_hash": chain.last}
    if values:
        conn.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", list(values.items()))


def ranges(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted numbers (ids, seqs) as (first, last) runs: acknowledged batches are mostly
    consecutive ids, readings given up mostly consecutive seqs."""
    out: list[tuple[int, int]] = []
    for i in sorted(ids):
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def journal_row(rec: list[Any]) -> TailRow | None:
    """A reading's journal record (:func:`record`) as a row; None for a record of another kind.
    Raises ValueError, TypeError or IndexError for one of an unknown shape."""
    if rec[0] != "r":
        return None
    _kind, rid, stream, n, ts, body, hold, stored, _link = rec
    return TailRow(int(rid), str(stream), int(n), int(ts), str(body),
                   (int(hold[0]), str(hold[1]), int(hold[2])) if hold else None,
                   None if stored is None else int(stored))


def replay(conn: sqlite3.Connection, jpath: Any, chain: Chain | None, ledger: Ledger,
           unannounced: Unannounced) -> tuple[int, list[retention.Dropped]]:
    """Fold what a journal left (a crash, a power cut) into SQLite before anything else runs.
    Returns the highest id it held and the seq ranges it proves lost (damaged frames),
    recorded as unannounced with the fold."""
    got = journal.read(jpath)
    if got.damaged_bytes:
        log.error("store journal %s: %d damaged bytes skipped", jpath, got.damaged_bytes)
    if got.torn_bytes:
        log.warning("store journal %s: an unfinished last write (%d bytes) ignored: it was never "
                    "durable, so never sent", jpath, got.torn_bytes)
    last = dict(conn.execute("SELECT stream, last_seq FROM streams").fetchall())
    rows: list[TailRow] = []
    seen: dict[str, list[int]] = defaultdict(list)
    """Seqs above ``last_seq`` the journal holds, acknowledged ones included: what gaps are judged by."""
    state: dict[str, str] = {}
    head: tuple[int, str] | None = None
    top = 0
    acked = acked_ids(got.records)
    for rec in got.records:
        try:
            if rec[0] == "s":
                state[str(rec[1])] = str(rec[2])
            elif (row := journal_row(rec)) is not None:
                top = max(top, row.id)
                if rec[8]:
                    head = (int(rec[8][0]), str(rec[8][1]))
                if row.seq > last.get(row.stream, 0):
                    seen[row.stream].append(row.seq)
                    if row.id not in acked:
                        rows.append(row)
        except (ValueError, TypeError, IndexError) as e:
            log.error("store journal %s: a record of an unknown shape ignored (%s)", jpath, e)
    seq = {stream: max(seqs) for stream, seqs in seen.items()}
    dropped = _gaps(seen, last)
    if got.damaged_bytes:
        # The damaged frames may have held the newest seqs, durable and sent: continue above
        # everything the ledger reserved (as after a damaged store), and say so.
        for stream, reserved in ledger.reserved.items():
            have = max(seq.get(stream, 0), last.get(stream, 0))
            if reserved > have:
                dropped.append(retention.Dropped(stream, reserved - have, have + 1, reserved, "journal_damaged"))
                seq[stream] = reserved
    if chain is not None and head is not None and head[0] > chain.seq:
        chain.restore(*head)
    if not (rows or seq or state):
        return top, dropped
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        write_rows(conn, rows, seq, state, chain if head else None, [], top)
        unannounced.write(conn, dropped)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.execute("PRAGMA synchronous=NORMAL")
    unannounced.added(dropped)
    log.info("store journal %s: %d readings recovered", jpath, len(rows))
    return top, dropped


def acked_ids(records: list[list[Any]]) -> set[int]:
    """The ids the journal's acknowledgement records name."""
    out: set[int] = set()
    for rec in records:
        if rec[0] == "a" and len(rec) == 2 and isinstance(rec[1], list):
            for run in rec[1]:
                if isinstance(run, list) and len(run) == 2 and all(isinstance(v, int) for v in run):
                    if 0 <= run[1] - run[0] <= 1_000_000:
                        out.update(range(run[0], run[1] + 1))
    return out


def _gaps(seen: dict[str, list[int]], last: dict[str, int]) -> list[retention.Dropped]:
    """Seqs missing between the journal's records of a stream (only damage makes them)."""
    out = []
    for stream, seqs in seen.items():
        prev = last.get(stream, 0)
        for n in sorted(seqs):
            if n > prev + 1:
                out.append(retention.Dropped(stream, n - prev - 1, prev + 1, n - 1, "journal_damaged"))
            prev = max(prev, n)
    return out


class Folding:
    """The fold half of the store's writer (agent/store/writer.py)."""

    _wdb: Any
    _seq: dict[str, int]
    _state: dict[str, str]
    _acked: set[int]
    _ack_lock: threading.Lock
    _visibility: threading.Lock
    _full_sync: bool
    tail: Tail
    journal: journal.Journal
    chain: Chain | None
    commits: int
    durable_commits: int
    folds: int

    _next_id: int
    _acks_at: float

    if TYPE_CHECKING:
        def _failed(self, what: str, e: sqlite3.Error, n: int) -> None: ...

    def _delete_acked(self, now: bool = False) -> None:
        if not now and time.monotonic() < self._acks_at and len(self._acked) < ACK_BATCH:
            return
        try:
            self._sql_commit([], durable=False, whole_tail=False)
        except sqlite3.Error as e:
            self._failed("store: deleting acknowledged readings failed", e, 0)


    def _sql_commit(self, rows: list[TailRow], *, durable: bool, whole_tail: bool) -> None:
        """Rows (and everything else a fold carries) in one transaction; raises sqlite3.Error.
        ``whole_tail``: the rows are the journal's whole content, which may then be emptied;
        else only these rows leave the tail (a fold in parts on a full disk)."""
        conn = self._wdb.conn
        with self._ack_lock:
            acked = list(self._acked)
        if durable != self._full_sync:
            conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._full_sync = durable
        conn.execute("BEGIN IMMEDIATE")
        try:
            if whole_tail:
                write_rows(conn, rows, dict(self._seq), dict(self._state), self.chain, acked, self._next_id - 1)
            else:
                write_rows(conn, rows, {}, {}, None, acked)
            # COMMIT, forgetting the deleted ids and moving folded rows out of the tail are one
            # step for pending() and the reads: no row counted twice or not at all.
            with self._visibility:
                conn.execute("COMMIT")
                if acked:
                    with self._ack_lock:
                        self._acked.difference_update(acked)
                if rows:
                    self.tail.remove({r.id for r in rows})
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back itself (SQLITE_FULL)
                conn.execute("ROLLBACK")
            raise
        self.commits += 1
        if durable:
            self.durable_commits += 1
        if whole_tail:
            self.folds += 1
            self.journal.reset()
