"""The journal's readings in memory: the newest ones, numbered, waiting for the broker.

Rows enter as ``unsynced`` (in the journal, not yet fsynced: never offered), become durable
with the journal's next fsync (offered to the uplink), and leave when the broker acknowledges
them or when they are folded into SQLite. Shared by the writer thread and the uplink's reads.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class TailRow:
    id: int
    stream: str
    seq: int
    ts: int
    body: str
    hold: tuple[int, str, int] | None
    """(mono_ns, boot_id, wall_ms) of a reading waiting for a trusted time; None otherwise."""
    stored_ms: int | None


class Tail:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._durable: dict[str, dict[int, TailRow]] = {}
        """Per stream, id → row, in id order (ids only grow)."""
        self.unsynced: list[TailRow] = []
        self.durable_since: float | None = None
        """When the oldest durable row became durable (monotonic): when a fold is due."""
        self.folding: set[int] = set()
        """Ids a fold is writing into SQLite right now: an acknowledgement of one must also
        delete it there."""

    def add_unsynced(self, rows: list[TailRow]) -> None:
        with self._lock:
            self.unsynced += rows

    def synced(self, now: float) -> list[TailRow]:
        """The journal's fsync made every unsynced row durable; returns them."""
        with self._lock:
            rows = self.unsynced
            for row in rows:
                self._durable.setdefault(row.stream, {})[row.id] = row
            if rows and self.durable_since is None:
                self.durable_since = now
            self.unsynced = []
            return rows

    def discard(self, ids: Iterable[int]) -> list[int]:
        """Acknowledged: forget these; returns the ids that were not here (they are in SQLite)."""
        other = []
        with self._lock:
            for i in ids:
                for rows in self._durable.values():
                    if rows.pop(i, None) is not None:
                        if i in self.folding:
                            other.append(i)
                        break
                else:
                    other.append(i)
            if not any(self._durable.values()):
                self.durable_since = None
        return other

    def all_rows(self) -> list[TailRow]:
        """Every row here, durable or not, by id."""
        with self._lock:
            durable = [r for rows in self._durable.values() for r in rows.values()]
            return sorted(durable + self.unsynced, key=lambda r: r.id)

    def remove(self, ids: set[int]) -> None:
        """Folded into SQLite, or given up (memory bound while SQLite takes nothing)."""
        with self._lock:
            self.unsynced = [r for r in self.unsynced if r.id not in ids]
            for stream in list(self._durable):
                rows = self._durable[stream]
                for i in [i for i in rows if i in ids]:
                    del rows[i]
                if not rows:
                    del self._durable[stream]
            if not self._durable:
                self.durable_since = None

    def page(self, stream: str, after_id: int, limit: int) -> list[TailRow]:
        """Durable rows of a stream after ``after_id`` not waiting for a time, oldest first."""
        with self._lock:
            rows = self._durable.get(stream)
            if not rows:
                return []
            ids = list(rows)
            out = []
            for i in ids[bisect_right(ids, after_id):]:
                row = rows[i]
                if row.hold is None:
                    out.append(row)
                    if len(out) >= limit:
                        break
            return out

    def newest(self, stream: str) -> TailRow | None:
        with self._lock:
            rows = self._durable.get(stream, {})
            return next((r for r in reversed(rows.values()) if r.hold is None), None)

    def get(self, stream: str, ids: set[int]) -> list[TailRow]:
        with self._lock:
            rows = self._durable.get(stream, {})
            return [rows[i] for i in ids if i in rows]

    def depth(self) -> dict[str, int]:
        """Rows per stream, unsynced included."""
        with self._lock:
            out = {s: len(rows) for s, rows in self._durable.items() if rows}
            for row in self.unsynced:
                out[row.stream] = out.get(row.stream, 0) + 1
            return out

    def first_seq(self) -> dict[str, int]:
        """Per stream, the lowest seq held here."""
        with self._lock:
            out: dict[str, int] = {}
            for row in (*(r for rows in self._durable.values() for r in rows.values()), *self.unsynced):
                if row.seq < out.get(row.stream, row.seq + 1):
                    out[row.stream] = row.seq
            return out

    def streams(self) -> set[str]:
        with self._lock:
            return {s for s, rows in self._durable.items() if rows}

    @property
    def durable_count(self) -> int:
        with self._lock:
            return sum(len(rows) for rows in self._durable.values())
