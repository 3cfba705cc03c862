"""What to send next: the store → uplink hand-off, shared by every transport.

Per connection the outbox pages through each stream by row id, in stream priority order (the
stream catalogue's order, agent/model/streams.py), and packs consecutive readings of one stream
into one message (a JSON array; a lone reading is a JSON object). When a connection starts with
a backlog of a ``newest_first`` stream (positions), its newest reading goes first on its own, so
the dispatcher sees where the lorry is now, then the backlog oldest-first.

Each batch handed out ends in one outcome (agent/uplink/outcome.py): accepted (the transport
calls ``Store.ack``: the rows go), kept (``keep``: due again, at once or after a delay, the
stream waiting meanwhile) or rejected (``Store.set_aside``). A new connection starts paging
from the beginning again, so whatever was in flight when a link dropped is sent again with the
same seq and content.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from agent.model import streams
from agent.store.buffer import Row, Store

# Stop handing out batches while this many acknowledged rows wait for deletion: on a fast link
# acknowledgements can outrun the store writer, and the ids would pile up in memory.
MAX_ACKS_WAITING = 10_000
# Until a stream's rows have been seen: a small reading's size (a position is about 250 B).
_GUESS_ROW_BYTES = 128


@dataclass(slots=True, frozen=True)
class Batch:
    """Consecutive readings of one stream; the uplink encodes them (JSON or compact)."""
    stream: str
    ids: tuple[int, ...]
    bodies: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.ids)

    def json(self) -> bytes:
        """A lone reading is a JSON object, a batch an array (docs/contract.md)."""
        if len(self.bodies) == 1:
            return self.bodies[0].encode()
        return ("[" + ",".join(self.bodies) + "]").encode()

    def halves(self) -> tuple[Batch, Batch]:
        k = len(self.ids) // 2
        return (Batch(self.stream, self.ids[:k], self.bodies[:k]), Batch(self.stream, self.ids[k:], self.bodies[k:]))


class Outbox:
    def __init__(self, store: Store, *, max_batch: int, max_bytes: int, plan: Any = None):
        self.store = store
        self.max_batch = max_batch
        self.max_bytes = max_bytes
        self.plan = plan
        """An UplinkPlan (agent/uplink/regions.py): which streams may go now. None: all of them."""
        self._retry_at: dict[str, float] = {}
        """Streams whose kept batch waits for its retry: monotonic time it is due. Kept across
        connections: a broker may close the connection after refusing (mosquitto 2.0 does)."""
        self.reset()

    def reset(self) -> None:
        """A new connection: everything unacknowledged is due again (a stream waiting to retry
        a refused batch when its time comes)."""
        self._cursor: dict[str, int] = {}
        self._sent_newest: dict[str, int] = {}
        self._newest_done: set[str] = set()
        self._split: dict[str, int] = {}
        """Streams whose next message holds at most this many readings (once)."""
        self._row_bytes: dict[str, float] = {}
        """Per stream, the mean size of the rows last read: how many to read for a budget."""
        self._idle_at = -1
        self._order: list[str] = []
        self._order_at = -1
        self._release_seen = self.store.release_gen
        self._plan_seen = -1

    def rewind(self, batch: Batch) -> None:
        """This batch is due again (the broker refused it as it was): page back to it."""
        if batch.ids[0] <= self._cursor.get(batch.stream, 0):
            self._cursor[batch.stream] = batch.ids[0] - 1
        self._idle_at = -1

    def keep(self, batch: Batch, retry_in_s: float = 0.0, *, split: bool = False) -> None:
        """The batch stays in the store, due again: at once, or after ``retry_in_s``, its
        stream waiting meanwhile (the other streams go on); ``split``: the stream's next
        message holds at most half as many readings."""
        self.rewind(batch)
        if split and batch.count > 1:
            self._split[batch.stream] = batch.count // 2
        if retry_in_s > 0:
            self._retry_at[batch.stream] = max(self._retry_at.get(batch.stream, 0.0), time.monotonic() + retry_in_s)

    @property
    def waiting(self) -> dict[str, float]:
        """Streams waiting to retry a kept batch → seconds until they may."""
        now = time.monotonic()
        return {s: max(0.0, t - now) for s, t in list(self._retry_at.items())}

    def next_batch(self, max_bytes: int | None = None) -> Batch | None:
        """The next message's readings, at most ``max_bytes`` of JSON (default: the limit)."""
        if self.store.release_gen != self._release_seen:
            self._page_back_to_released()
        if self._retry_at:
            now = time.monotonic()
            for stream in [s for s, t in self._retry_at.items() if t <= now]:
                del self._retry_at[stream]
                self._idle_at = -1
        plan = self.plan
        if plan is not None and plan.generation != self._plan_seen:
            self._plan_seen = plan.generation
            self._idle_at = -1
        durable = self.store.durable_id
        if durable == self._idle_at or self.store.acks_waiting >= MAX_ACKS_WAITING:
            return None
        if durable != self._order_at:
            self._order, self._order_at = streams.ordered(self.store.streams()), durable
        budget = min(self.max_bytes, max_bytes) if max_bytes else self.max_bytes
        for stream in self._order:
            if stream in self._retry_at or (plan is not None and not plan.allowed(stream)):
                continue
            if stream not in self._newest_done and streams.get(stream).newest_first:
                first = self._newest_if_backlog(stream)
                if first is not None:
                    return first
            batch = self._page(stream, budget)
            if batch is not None:
                return batch
            if plan is not None:
                plan.drained(stream)
        self._idle_at = durable
        return None

    def _page_back_to_released(self) -> None:
        """Held readings got their time: they sit behind the cursor, so page back to them."""
        for gen, stream, first in self.store.releases:
            if gen > self._release_seen and first <= self._cursor.get(stream, 0):
                self._cursor[stream] = first - 1
        self._release_seen = self.store.release_gen
        self._idle_at = -1
        self._order_at = -1

    def _newest_if_backlog(self, stream: str) -> Batch | None:
        oldest = self.store.fetch(stream, self._cursor.get(stream, 0), 1)
        if not oldest:
            return None  # nothing durable yet: decide when there is
        self._newest_done.add(stream)
        newest = self.store.newest(stream)
        if newest is None or newest.id == oldest[0].id:
            return None
        self._sent_newest[stream] = newest.id
        return Batch(stream, (newest.id,), (newest.body,))

    def _page(self, stream: str, max_bytes: int) -> Batch | None:
        """The next message of a stream: up to ``max_batch`` readings and ``max_bytes``. Rows
        are read in pages sized to what the budget holds (by the stream's recent row size),
        not ``max_batch`` at a time: a slow link's message of 16 positions must not read
        2,000 (reads per message would be 100 times what it sends)."""
        limit = self._split.pop(stream, self.max_batch)
        skip = self._sent_newest.get(stream)
        after: int | None = self._cursor.get(stream, 0)
        picked: list[Row] = []
        size = 2
        while after is not None and len(picked) < limit and size < max_bytes:
            avg = self._row_bytes.get(stream, _GUESS_ROW_BYTES)
            want = max(8, min(limit - len(picked), int((max_bytes - size) / avg * 1.25) + 1))
            rows, more = self.store.page(stream, after, want)
            if rows:
                self._row_bytes[stream] = sum(len(r.body) + 1 for r in rows) / len(rows)
            for row in rows:
                if row.id == skip:
                    self._cursor[stream] = row.id
                    continue
                size += len(row.body) + 1
                if picked and size > max_bytes or len(picked) == limit:
                    more = None
                    break
                picked.append(row)
                self._cursor[stream] = row.id
            after = more
        if not picked:
            return None
        return Batch(stream, tuple(r.id for r in picked), tuple(r.body for r in picked))
