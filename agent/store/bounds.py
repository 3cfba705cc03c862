"""Memory stays bounded while the store cannot write: the least valuable readings are given
up, announced (agent/store/writer.py calls these)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import TYPE_CHECKING, Any

from agent.model import streams
from agent.store import fold, retention
from agent.store.tail import Tail

# Readings held in memory while nothing can be written (disk full, failing card).
MAX_PENDING = 50_000


class Bounds:
    _queued: int
    _count_lock: threading.Lock
    tail: Tail

    if TYPE_CHECKING:
        def _report(self, dropped: list[retention.Dropped]) -> None: ...

    def _bounded(self, batch: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """While nothing can be written, keep memory bounded: give up the oldest readings that
        are not evidence (seal, alarm, ignition are always kept), and say so."""
        excess = len(batch) - MAX_PENDING
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

    def _bound_tail(self) -> None:
        """While SQLite cannot take the journal's readings, keep memory bounded as for readings
        nothing can be written: the oldest that are not evidence go, announced by seq."""
        rows = self.tail.all_rows()
        excess = len(rows) - MAX_PENDING
        if excess <= 0:
            return
        gone = [r for r in rows if r.stream not in streams.NEVER_SHED and r.hold is None][:excess]
        self.tail.remove({r.id for r in gone})
        # Numbered, so announced by seq range: the store (SQLite) could not keep them.
        self._report([retention.Dropped(s, hi - lo + 1, lo, hi, "store_full")
                      for s in sorted({r.stream for r in gone})
                      for lo, hi in fold.ranges([r.seq for r in gone if r.stream == s])])

