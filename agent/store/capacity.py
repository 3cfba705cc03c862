"""The store's room: its size and age limits, and staying alive on a full disk.

agent/store/retention.py decides what goes; this module makes it go without needing space the disk
does not have. In WAL mode even a DELETE needs free space (the WAL grows before anything is
freed), so a small reserve file (agent/store/reserve.py) is kept next to the store and the WAL is
kept under half of it. On SQLITE_FULL the reserve is given back, the WAL folded into the
database, old readings shed in chunks (each committed and checkpointed), the freed pages
returned to the filesystem (``auto_vacuum = INCREMENTAL``), and the reserve taken again.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from agent.store import retention
from agent.store.announce import Unannounced
from agent.store.reserve import Ballast

log = logging.getLogger(__name__)

# On a full disk: shed down to this share of what the data uses now.
EMERGENCY_KEEP = 0.7
# Rows deleted per shedding transaction: bounds the WAL that giving data up needs.
SHED_CHUNK = 500
# Pages returned to the filesystem per step on a full disk.
VACUUM_STEP = 16


class Space:
    """Runs in the store's writer thread, on its connection."""

    def __init__(self, conn: sqlite3.Connection, path: Path,
                 report: Callable[[list[retention.Dropped]], None], unannounced: Unannounced):
        self.conn = conn
        self.path = path
        self.report = report
        self.unannounced = unannounced
        self.ballast = Ballast(path.with_name(path.name + ".reserve"))
        # The WAL must fit in the reserve: on a full disk a checkpoint has to move it into the
        # database (which grows by as much) before anything can be freed.
        self.wal_bytes = max(64 * 1024, self.ballast.size() // 2)
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint = {self.wal_bytes // page}")
        conn.execute(f"PRAGMA journal_size_limit = {self.wal_bytes}")

    def take_reserve(self) -> None:
        self.ballast.ensure(headroom=self.wal_bytes)

    def keep(self, max_bytes: int, max_age_ms: int, now_ms: int | None, emergency: bool = False) -> None:
        """Keep the buffer within [store] max_mb and max_age_days (judged at ``now_ms``, the
        device's trusted time; no age limit while it is unknown).

        On a full disk (``emergency``): give the reserve back, fold the WAL into the database,
        shed within the file (unless it already has room inside), return the freed pages to
        the filesystem, and take the reserve again for the next time."""
        conn = self.conn
        try:
            limit = max_bytes
            if emergency:
                self.ballast.release()
                self.checkpoint()
                used = retention.used_bytes(conn)
                if _free_pages_bytes(conn) < (1 - EMERGENCY_KEEP) * used:
                    limit = int(used / retention.TARGET * EMERGENCY_KEEP)
            else:
                self.take_reserve()
            if max_age_ms and now_ms is not None:
                for plan in retention.plan_expiry(conn, now_ms - max_age_ms):
                    self._execute(plan, emergency)
            while limit and (shed := retention.plan_shed(conn, limit)) is not None:
                self._execute(shed, emergency)
            if emergency:
                self._give_back()
                self.take_reserve()
        except sqlite3.Error as e:
            log.error("store maintenance failed: %s", e)

    def disk_full(self, e: sqlite3.Error) -> bool:
        """SQLITE_FULL, or an I/O error on a filesystem with no room left (a failed WAL write)."""
        code = getattr(e, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL:
            return True
        if code is not None and code & 0xFF == sqlite3.SQLITE_IOERR:
            try:
                st = os.statvfs(self.path.parent)
                return st.f_bavail * st.f_frsize < 64 * 1024
            except OSError:
                return False
        return False

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it: gives its space back."""
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as e:
            log.warning("store checkpoint failed: %s", e)

    def _execute(self, plan: retention.Plan, emergency: bool) -> None:
        """Delete a plan's rows in chunks, each its own transaction, each loss reported once
        committed; on a full disk each followed by a checkpoint so the WAL stays small."""
        conn = self.conn
        for k in range(0, len(plan.rows), SHED_CHUNK):
            conn.execute("BEGIN IMMEDIATE")
            try:
                dropped = retention.delete(conn, plan.stream, plan.rows[k:k + SHED_CHUNK], plan.reason)
                self.unannounced.write(conn, [dropped])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back itself (SQLITE_FULL)
                    conn.execute("ROLLBACK")
                raise
            self.unannounced.added([dropped])
            self.report([dropped])
            if emergency:
                self.checkpoint()

    def _give_back(self) -> None:
        """Return the database's free pages to the filesystem, a few at a time: each step
        needs WAL space for the pages it moves, and its checkpoint frees that again."""
        conn = self.conn
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        while free:
            # executescript: sqlite3_exec steps the pragma to the end (execute() frees one page).
            conn.executescript(f"PRAGMA incremental_vacuum({VACUUM_STEP});")
            self.checkpoint()
            before, free = free, conn.execute("PRAGMA freelist_count").fetchone()[0]
            if free >= before:  # an old store without auto_vacuum, or nothing movable
                break


def _free_pages_bytes(conn: sqlite3.Connection) -> int:
    free: int = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size: int = conn.execute("PRAGMA page_size").fetchone()[0]
    return free * size
