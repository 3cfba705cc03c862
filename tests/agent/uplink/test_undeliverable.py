"""A reading no broker message can carry is set aside, announced, and its stream moves on
(agent/uplink/mqtt.py); a broker that is down, restarting or behind a flaky link never causes that.

A backlog is written into the store first, with one position far larger than the broker's
maximum packet (mosquitto ``max_packet_size``); then the real agent drains it.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.demo.broker import Mosquitto
from agent.model.chain import Chain
from agent.model.reading import Reading
from agent.store.buffer import Store
from linksim import LinkSim
from support import AgentProcess, Backend, agent_config, last_seqs, store_depth, store_state, wait_until

DEVICE = "CQ-HN-0042"
START_MS = 1_795_000_000_000


def backlog(db: Path, positions: int, *, oversize: dict[int, int] | None = None) -> None:
    """Buffered positions (seq 1…n), those in ``oversize`` (seq → bytes) padded to that size."""
    store = Store(db, device=DEVICE, chain=Chain(DEVICE))
    store.start()
    rng = random.Random(3)
    for i in range(1, positions + 1):
        data: dict[str, Any] = {"lat": round(29.56 + i * 1e-4, 7), "lon": round(106.55 + i * 1e-4, 7),
                                "speed_kmh": round(rng.uniform(40, 80), 2), "course": round(rng.uniform(0, 360), 1),
                                "sats": rng.randint(7, 14), "hdop": 0.9, "fix": "gps"}
        if oversize and i in oversize:
            data["note"] = "x" * oversize[i]
        store.append(Reading("position", START_MS + i * 1000, data))
    store.close()


def final_status(db: Path) -> dict[str, Any]:
    return json.loads(store_state(db)["status"])


def dropped_alarms(backend: Backend) -> list[dict[str, Any]]:
    return [a for a in backend.readings("alarm") if a.get("kind") == "data_dropped"]


def config(tmp: Path, port: int, protocol: str, **mqtt: Any) -> Path:
    # Trusted time from the system clock, so the data_dropped alarm is stamped and sent at once.
    return agent_config(tmp, port, mqtt_extra={"protocol": protocol, **mqtt}, time={"trust_system_clock": "always"})


@pytest.mark.parametrize("max_packet", [300, 1000])
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_reading_larger_than_the_brokers_maximum_packet_is_set_aside(tmp_path: Path, protocol: str,
                                                                         max_packet: int) -> None:
    """MQTT 5: the broker announces its Maximum Packet Size, the reading goes aside at once
    (``too_large``). MQTT 3.1.1: the broker just closes the connection each time the reading
    is sent; batches are split first, then the reading alone is set aside (``undeliverable``).
    Either way the later positions arrive and the agent drains its buffer."""
    broker = Mosquitto(tmp_path / "broker", extra_conf=[f"max_packet_size {max_packet}"]).start()
    backend = Backend(broker.port)
    try:
        db = tmp_path / "state" / "buffer.db"
        backlog(db, 12, oversize={4: 2000})
        cfg = config(tmp_path, broker.port, protocol)
        with AgentProcess(cfg, "--until-drained") as agent:
            assert agent.wait(90) == 0, agent.log()[-4000:]
        want = set(range(1, 13)) - {4}
        wait_until(lambda: {r["seq"] for r in backend.readings("position")} >= want, 10, "every other position")
        assert 4 not in {r["seq"] for r in backend.readings("position")}
        assert store_depth(db) == 0
        reason = "too_large" if protocol == "5" else "undeliverable"
        st = final_status(db)
        log = agent.log()
        assert f"set aside as {reason}" in log, log[-3000:]
        if max_packet >= 1000:  # the alarm fits: the backend is told which seq and why
            wait_until(lambda: dropped_alarms(backend), 10, "the data_dropped alarm")
            (a,) = dropped_alarms(backend)
            assert (a["dropped_stream"], a["count"], a["first_seq"], a["last_seq"], a["reason"]) == (
                "position", 1, 4, 4, reason)
            assert st["store"]["dropped"] == {"position": 1}
        else:  # a chained alarm is ~400 bytes: it cannot go either, and is not announced again
            assert st["store"]["dropped"] == {"position": 1, "alarm": 1}
            assert last_seqs(db)["alarm"] == 1, "no cascade of alarms about alarms"
        up = st["uplink"]
        if protocol == "5":
            assert up["connects"] == 1, "never sent: the broker announced its limit"
        else:
            assert up["connects"] <= 30, up
    finally:
        backend.close()
        broker.stop()


def test_a_reading_over_max_message_bytes_is_set_aside(tmp_path: Path, broker: Mosquitto, backend: Backend) -> None:
    """``[mqtt] max_message_bytes`` is the size the broker is promised never to see exceeded
    (mosquitto acknowledges and silently discards an over-limit message from a 3.1.1 client):
    a reading whose message alone is bigger is set aside, announced, never sent."""
    db = tmp_path / "state" / "buffer.db"
    backlog(db, 6, oversize={6: 3000})
    cfg = config(tmp_path, broker.port, "3.1.1", max_message_bytes=1024)
    with AgentProcess(cfg, "--until-drained") as agent:
        assert agent.wait(60) == 0, agent.log()[-4000:]
    wait_until(lambda: dropped_alarms(backend), 10, "the data_dropped alarm")
    (a,) = dropped_alarms(backend)
    assert (a["dropped_stream"], a["first_seq"], a["last_seq"], a["reason"]) == ("position", 6, 6, "too_large")
    assert sorted(r["seq"] for r in backend.readings("position")) == [1, 2, 3, 4, 5]
    assert all(len(p) <= 1024 for t, p, _r in backend.messages if not t.endswith("/status"))


def test_set_aside_announces_durably_then_deletes(tmp_path: Path) -> None:
    """Store.set_aside: one data_dropped per seq run, queued and made durable before the rows
    go (a power cut in between can announce twice, never lose silently), then deleted like an
    acknowledgement; an unannounced set-aside is still counted."""
    from agent.uplink.outbox import Outbox

    events: list[tuple[str, Any]] = []
    holder: dict[str, Store] = {}

    def on_drop(dropped: list[Any]) -> None:
        for d in dropped:
            events.append(("dropped", (d.stream, d.count, d.first_seq, d.last_seq, d.reason)))
            holder["s"].append(Reading("alarm", START_MS, {"kind": "data_dropped", "reason": d.reason}, urgent=True))

    store = holder["s"] = Store(tmp_path / "b.db", device=DEVICE, sync_interval_s=60, on_drop=on_drop)
    store.start()
    try:
        for i in range(6):
            store.append(Reading("position", START_MS + i, {"i": i}))
        store.flush()
        rows = store.fetch("position", 0, 10)
        chosen = [rows[1].id, rows[2].id, rows[4].id]  # seqs 2-3 and 5: two runs
        assert store.set_aside("position", chosen, "undeliverable") is True
        assert events == [("dropped", ("position", 2, 2, 3, "undeliverable")),
                          ("dropped", ("position", 1, 5, 5, "undeliverable"))]
        assert store.durable_id >= max(r.id for r in rows) + 2, "the alarms were durable before the deletion"
        assert [r.seq for r in store.fetch("position", 0, 10)] == [1, 4, 6]
        assert store.set_aside("alarm", [store.fetch("alarm", 0, 1)[0].id], "too_large", announce=False)
        assert len(events) == 2 and store.dropped == {"position": 3, "alarm": 1}
        store.flush()
        assert store.pending() == 4  # positions 1, 4, 6 and the second alarm
        box = Outbox(store, max_batch=10, max_bytes=10_000)
        first = box.next_batch()
        assert first is not None and first.stream == "alarm"
        box.rewind(first)  # refused as it was: due again
        again = box.next_batch()
        assert again is not None and again.ids == first.ids
    finally:
        store.close()


# -- never because the broker is merely down, restarting or far away ------------------------------


def assert_nothing_dropped(backend: Backend, db: Path, want: dict[str, int], agent: AgentProcess) -> None:
    wait_until(lambda: {r["seq"] for r in backend.readings("position")} >= set(range(1, want["position"] + 1)),
               20, "every position")
    assert not dropped_alarms(backend)
    st = final_status(db)
    assert st["store"]["dropped"] == {} and st["uplink"]["set_aside"] == 0, st["uplink"]
    assert "set aside" not in agent.log()


def test_a_broker_that_is_down_causes_no_drop(tmp_path: Path, broker: Mosquitto, backend: Backend) -> None:
    db = tmp_path / "state" / "buffer.db"
    backlog(db, 500)
    want = last_seqs(db)
    broker.stop()
    cfg = config(tmp_path, broker.port, "3.1.1", max_batch=20)
    with AgentProcess(cfg, "--until-drained") as agent:
        time.sleep(4)  # many failed connection attempts
        broker.start()
        assert agent.wait(60) == 0, agent.log()[-4000:]
    assert_nothing_dropped(backend, db, want, agent)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_restarting_broker_and_a_link_dropping_mid_message_cause_no_drop(tmp_path: Path, broker: Mosquitto,
                                                                          backend: Backend, protocol: str) -> None:
    """A slow roaming link that loses its connection every second or so, messages in flight
    each time, plus quick broker restarts: the connection is lost right after sending again
    and again, yet no reading is ever set aside (smaller messages at worst)."""
    db = tmp_path / "state" / "buffer.db"
    backlog(db, 800)
    want = last_seqs(db)
    rng = random.Random(11)
    with LinkSim(broker.port, rtt_s=0.4, rate_bps=64_000) as link:
        cfg = config(tmp_path, link.port, protocol, max_message_bytes=8192)
        stop = threading.Event()

        def chaos() -> None:
            k = 0
            while not stop.wait(rng.uniform(0.6, 1.6)):
                k += 1
                if k % 5 == 0:
                    broker.restart()
                else:
                    link.drop()

        with AgentProcess(cfg, "--until-drained") as agent:
            wait_until(lambda: len(backend.readings()) > 20, 30, "first readings")
            t = threading.Thread(target=chaos, daemon=True)
            t.start()
            time.sleep(15)
            stop.set()
            t.join(10)
            assert agent.wait(120) == 0, agent.log()[-4000:]
        assert link.connections >= 10
    assert_nothing_dropped(backend, db, want, agent)
