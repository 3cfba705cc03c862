"""When the store's writer acts: a group's commit, the next wake-up, a fold (agent/store/writer.py)."""

from __future__ import annotations

import time
from typing import Any

from agent.model import streams
from agent.store.journal import Journal
from agent.store.tail import Tail

# A fold is due when the journal's oldest unacknowledged reading has been durable this long,
# past this many readings, or when the journal file passes the full-disk reserve's size (4 MB,
# less on a small filesystem: agent/store/reserve.py), so that on a full disk the backlog is
# in SQLite, where the store can thin it, and the reserve can take the journal's last part.
FOLD_S = 3600.0
FOLD_ROWS = 10_000
IDLE_S = 5.0
# Readings per batch: bounds a write (and a SQLite transaction).
MAX_BATCH = 5_000


class Timing:
    _waiting: list[tuple[Any, ...]]
    _waiting_since: float
    _acked: set[int]
    _acks_at: float
    _journal_acks: list[int]
    _journal_acks_at: float
    _state_due_at: float | None
    _next_maintenance: float
    _fold_retry_at: float
    _journal_max: int
    sync_interval_s: float
    lazy_sync_s: float
    tail: Tail
    journal: Journal

    def _group(self, batch: list[tuple[Any, ...]], now: bool) -> list[tuple[Any, ...]]:
        """Readings wait in memory, unnumbered, for their group's commit: one write and one
        fsync per ``sync_interval_s``, not a write per reading (each dirties a page of the SD
        card, written back within seconds). A crash, like a power cut, loses at most that
        much of ordinary readings; seal events and alarms (urgent) go at once, with the rest."""
        if batch:
            if not self._waiting:
                self._waiting_since = time.monotonic()
            self._waiting += batch
        if not self._waiting or not (now or len(self._waiting) >= MAX_BATCH
                                     or time.monotonic() >= self._group_due_at()):
            return []
        out, self._waiting = self._waiting, []
        return out

    def _group_due_at(self) -> float:
        """When the waiting readings' group commit is due: the strictest stream's interval
        after the first of them came."""
        wait = min(self.lazy_sync_s if streams.get(r[0]).lazy else self.sync_interval_s for r in self._waiting)
        return self._waiting_since + wait

    def _idle_wait(self) -> float:
        now = time.monotonic()
        due = [now + IDLE_S, self._next_maintenance]
        if self.tail.unsynced:  # a sync that failed: due again (the group was taken already)
            due.append(now)
        if self._waiting:
            due.append(self._group_due_at())
        if self._acked:
            due.append(self._acks_at)
        if self._journal_acks:
            due.append(self._journal_acks_at)
        if self._state_due_at is not None:
            due.append(self._state_due_at)
        if self.tail.durable_since is not None:
            due.append(self.tail.durable_since + FOLD_S)
        return max(0.0, min(due) - now)

    def _sync_due(self) -> bool:
        """A group is numbered and written but not yet durable."""
        return bool(self.tail.unsynced)

    def _state_due(self) -> bool:
        return self._state_due_at is not None and time.monotonic() >= self._state_due_at

    def _fold_due(self) -> bool:
        if time.monotonic() < self._fold_retry_at:
            return False
        t = self.tail
        if t.durable_since is not None and (time.monotonic() - t.durable_since >= FOLD_S
                                            or t.durable_count >= FOLD_ROWS):
            return True
        return self.journal.size >= self._journal_max
