"""The outbox: what the uplink sends next, in what order and in what batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.model.reading import Reading
from agent.store.buffer import Store
from agent.uplink.outbox import Outbox


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "b.db", device="D", sync_interval_s=0.05)
    s.start()
    yield s
    s.close()


def fill(store: Store, stream: str, n: int, **data: object) -> None:
    for i in range(n):
        store.append(Reading(stream, 1_790_000_000_000 + i, {"i": i, **data}))
    store.flush()


def drain(outbox: Outbox, store: Store | None = None) -> list[tuple[str, list[int]]]:
    """(stream, seqs) of each message, acknowledging as we go when a store is given."""
    out = []
    while (b := outbox.next_batch()) is not None:
        obj = json.loads(b.json())
        out.append((b.stream, [r["seq"] for r in obj] if isinstance(obj, list) else [obj["seq"]]))
        if isinstance(obj, list):
            assert len(obj) > 1, "a lone reading is sent as an object, not a one-element array"
        if store is not None:
            store.ack(b.ids)
    return out


def test_backlog_sends_the_newest_position_first_then_oldest_first(store: Store) -> None:
    fill(store, "position", 10)
    msgs = drain(Outbox(store, max_batch=4, max_bytes=1 << 20))
    assert msgs == [("position", [10]), ("position", [1, 2, 3, 4]), ("position", [5, 6, 7, 8]), ("position", [9])]


def test_a_single_position_is_just_sent(store: Store) -> None:
    fill(store, "position", 1)
    assert drain(Outbox(store, max_batch=4, max_bytes=1 << 20)) == [("position", [1])]


def test_events_go_before_positions_and_other_streams_after(store: Store) -> None:
    fill(store, "can", 2)
    fill(store, "position", 3)
    fill(store, "alarm", 2)
    fill(store, "zzz-custom", 1)
    msgs = drain(Outbox(store, max_batch=10, max_bytes=1 << 20))
    assert msgs == [("alarm", [1, 2]), ("position", [3]), ("position", [1, 2]), ("can", [1, 2]), ("zzz-custom", [1])]


def test_messages_respect_the_byte_limit(store: Store) -> None:
    fill(store, "position", 20, pad="x" * 100)
    size = len(store.fetch("position", 0, 1)[0].body)
    limit = 3 * size + 10
    outbox = Outbox(store, max_batch=100, max_bytes=limit)
    msgs = []
    while (b := outbox.next_batch()) is not None:
        assert len(b.json()) <= limit
        msgs.append(b.count)
    assert sum(msgs) == 20 and max(msgs) == 3


def test_a_reading_larger_than_the_limit_still_goes_alone(store: Store) -> None:
    fill(store, "position", 2, pad="x" * 500)
    assert [b for b in drain(Outbox(store, max_batch=100, max_bytes=100))] == [("position", [2]), ("position", [1])]


def test_a_new_connection_resends_what_was_not_acknowledged(store: Store) -> None:
    fill(store, "position", 6)
    outbox = Outbox(store, max_batch=2, max_bytes=1 << 20)
    first = outbox.next_batch()
    second = outbox.next_batch()
    assert first is not None and second is not None
    store.ack(first.ids)  # the newest made it; the batch [1, 2] was in flight when the link dropped
    outbox.reset()
    # Still a backlog: the newest unacknowledged goes first again (whether or not the writer
    # has deleted the acknowledged 6 yet).
    assert drain(outbox) == [("position", [5]), ("position", [1, 2]), ("position", [3, 4])]


def test_idle_outbox_notices_new_durable_rows(store: Store) -> None:
    outbox = Outbox(store, max_batch=10, max_bytes=1 << 20)
    assert outbox.next_batch() is None
    fill(store, "position", 1)
    assert drain(outbox, store) == [("position", [1])]
    fill(store, "position", 1)
    assert drain(outbox, store) == [("position", [2])]


def test_a_small_message_reads_about_what_it_sends(store: Store, monkeypatch) -> None:
    """A slow link's messages are small; each reads rows for its byte budget, not
    ``max_batch`` rows (issue 14: 2,000 positions read to send 16), and skips none."""
    fill(store, "position", 3_000, pad="x" * 200)
    read: list[int] = []
    page = store.page

    def counted(stream: str, after_id: int, limit: int) -> tuple[list, int | None]:
        rows, more = page(stream, after_id, limit)
        read.append(len(rows))
        return rows, more

    monkeypatch.setattr(store, "page", counted)
    outbox = Outbox(store, max_batch=2_000, max_bytes=4_096)
    sent = []
    for _ in range(20):
        b = outbox.next_batch()
        assert b is not None and len(b.json()) <= 4_096
        sent += b.ids
    assert sum(read) <= 2 * len(sent) + 8, (sum(read), len(sent))
    rest = drain(outbox, store)
    assert len(sent) + sum(len(seqs) for _, seqs in rest) == 3_000, "every position once"


@pytest.fixture
def idle_store(tmp_path: Path):
    """A store without its writer thread: acknowledged rows stay in the table (waiting for
    their deletion, as between the writer's commits) until the test flushes."""
    s = Store(tmp_path / "idle.db", device="D")
    yield s
    s.close()


def test_acknowledged_rows_waiting_for_deletion_do_not_hide_the_rest_of_a_stream(idle_store: Store) -> None:
    """A connection dies with some batches acknowledged and later ones in flight (mosquitto
    closing after a refusal). Until the writer deletes the acknowledged rows, the next
    connection must still find the unacknowledged ones behind them: the store once applied
    its LIMIT before skipping acknowledged rows, so the stream looked drained, the outbox went
    idle, and with no new readings (durable_id unchanged) never looked again."""
    fill(idle_store, "position", 10)
    outbox = Outbox(idle_store, max_batch=4, max_bytes=1 << 20)
    first = [outbox.next_batch() for _ in range(3)]
    assert [b.ids for b in first if b] == [(10,), (1, 2, 3, 4), (5, 6, 7, 8)]
    idle_store.ack((10,))
    idle_store.ack((1, 2, 3, 4))  # acknowledged; 5..8 in flight when the connection is lost

    outbox.reset()  # the next connection
    assert drain(outbox) == [("position", [9]), ("position", [5, 6, 7, 8])]
    assert outbox.next_batch() is None
    outbox.reset()
    assert [r.seq for r in idle_store.fetch("position", 0, 1)] == [5]
    assert idle_store.newest("position") is not None and idle_store.newest("position").seq == 9  # type: ignore[union-attr]

    idle_store.flush()  # the deletion: nothing changes for the outbox
    assert drain(outbox) == [("position", [9]), ("position", [5, 6, 7, 8])]


def test_a_long_run_of_acknowledged_rows_is_skipped_in_growing_steps(idle_store: Store) -> None:
    fill(idle_store, "position", 300)
    idle_store.ack(range(1, 296))
    idle_store.ack((300,))
    assert [r.seq for r in idle_store.fetch("position", 0, 2)] == [296, 297]
    assert [r.seq for r in idle_store.fetch("position", 0, 10)] == [296, 297, 298, 299]
    assert idle_store.newest("position").seq == 299  # type: ignore[union-attr]
    idle_store.ack((296, 297, 298, 299))
    assert idle_store.fetch("position", 0, 5) == [] and idle_store.newest("position") is None
