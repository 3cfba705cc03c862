"""Held readings: taken before the time was known, stored, and released once it is.

A reading without a trusted time (a Pi without RTC before GPS or NTP) is committed with its
seq and a pending time, and not offered to the uplink. When the pipeline can resolve its time
(agent/pipeline/pipeline.py ``resolve_held``), the writer thread fills the time in, links it
into the event chain if its stream is chained, and commits durably; the outbox pages back to
it (``release_gen`` / ``releases``).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import sqlite_utils

from agent.model import streams
from agent.model.chain import Chain
from agent.model.reading import resolved_body
from agent.store.seqledger import Ledger
from agent.store.writer import Release

log = logging.getLogger(__name__)


class HeldReadings:
    """The held-reading half of the Store (agent/store/buffer.py); runs in its writer thread."""

    _wdb: sqlite_utils.Database
    _q: queue.SimpleQueue[Any]
    _full_sync: bool
    _changed: threading.Condition
    chain: Chain | None
    ledger: Ledger
    held: int
    commit_errors: int
    last_error: str | None
    release_gen: int
    releases: list[tuple[int, str, int]]

    def release_held(self, resolve: Callable[[int, str, int], tuple[int, bool] | None]) -> None:
        """Give held readings their time: ``resolve(mono_ns, boot_id, wall_ms)`` returns
        ``(ts_ms, trusted)`` or None to keep holding. Runs in the writer thread."""
        if self.held:
            self._q.put(Release(resolve))

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
                if chain is not None and stream in streams.CHAINED:
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
