"""Trusted time: readings before the first fix, an unsynchronised clock, clock jumps."""

from __future__ import annotations

import json
import os
import pty as ptymod
import time
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.demo import trip
from agent.demo.broker import Mosquitto
from agent.model.clock import TimeKeeper
from agent.model.reading import Reading
from agent.pipeline.pipeline import Pipeline
from agent.store.buffer import Store
from agent.uplink.outbox import Outbox
from support import AgentProcess, Backend, agent_config, wait_until

DAY_NS = 86_400 * 10**9
GPS_MS = 1_795_000_000_000  # what the satellites say


class FakeClocks:
    """A monotonic clock we advance, and a wall clock that can be wrong and jump."""

    def __init__(self) -> None:
        self.mono = 5_000 * 10**9
        self.wall = 1_700_000_000 * 10**9  # the Pi booted believing it is Nov 2023

    def keeper(self, trust: str = "never", synced: bool = False) -> TimeKeeper:
        return TimeKeeper(trust_system_clock=trust, wall_ns=lambda: self.wall, mono_ns=lambda: self.mono,
                          synchronised=lambda: synced)

    def tick(self, seconds: float) -> None:
        self.mono += int(seconds * 1e9)
        self.wall += int(seconds * 1e9)


def test_gps_time_is_used_and_the_system_clock_can_jump() -> None:
    c = FakeClocks()
    k = c.keeper()
    assert k.stamp().source == "pending", "no GPS, clock not synchronised: time unknown"
    taken = c.mono
    c.tick(30)
    k.observe_gps(GPS_MS, c.mono)
    assert k.stamp(taken).ts_ms == GPS_MS - 30_000, "a reading from before the fix gets its true time"
    c.wall += 3 * DAY_NS  # NTP or a user steps the clock by days...
    c.tick(10)
    assert k.stamp().ts_ms == GPS_MS + 10_000, "...and GPS-based stamps do not move"
    c.wall -= 7 * DAY_NS
    c.tick(10)
    assert k.stamp().ts_ms == GPS_MS + 20_000
    assert k.system_clock_error_s() == pytest.approx(
        (1_700_000_000 * 10**9 + 50 * 10**9 - 4 * DAY_NS) / 1e9 - (GPS_MS + 20_000) / 1e3)


@pytest.mark.parametrize(("trust", "synced", "source"), [
    ("auto", True, "system"), ("auto", False, "pending"), ("always", False, "system"), ("never", True, "pending"),
])
def test_when_the_system_clock_is_trusted(trust: str, synced: bool, source: str) -> None:
    c = FakeClocks()
    stamp = c.keeper(trust, synced).stamp(c.mono - 2 * 10**9)
    assert stamp.source == source
    if source == "system":
        assert stamp.ts_ms == c.wall // 1_000_000 - 2000


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "b.db", device="D", sync_interval_s=0.05)
    s.start()
    yield s
    s.close()


def held(stream: str, mono: int, boot: str = "boot-1", wall_ms: int = 1_700_000_000_000, **data) -> Reading:
    return Reading(stream, None, data, meta={"mono_ns": mono, "boot_id": boot, "wall_ms": wall_ms})


def test_held_readings_wait_then_go_out_with_their_true_time(store: Store) -> None:
    outbox = Outbox(store, max_batch=50, max_bytes=1 << 20)
    store.append(held("temperature", mono=1_000 * 10**9, sensor="reefer_front", c=3.5))
    store.append(Reading("temperature", GPS_MS + 5_000, {"sensor": "reefer_front", "c": 3.6}))
    store.flush()
    first = outbox.next_batch()
    assert first is not None and json.loads(first.json())["seq"] == 2, "the held one waits"
    store.ack(first.ids)
    assert outbox.next_batch() is None
    assert store.held == 1
    store.release_held(lambda mono, boot, wall: (GPS_MS - 60_000, True) if boot == "boot-1" else None)
    store.flush()
    wait_until(lambda: store.held == 0, 5, "released")
    late = outbox.next_batch()
    assert late is not None, "the outbox pages back to the released reading"
    body = json.loads(late.json())
    assert body == {"device": "D", "stream": "temperature", "seq": 1, "ts": "2026-11-18T11:05:40.000Z",
                    "sensor": "reefer_front", "c": 3.5}


def test_untrusted_time_is_flagged(store: Store) -> None:
    store.append(held("seal", mono=1, boot="old-boot", wall_ms=1_700_000_000_000, seal="S1", event="opened"))
    store.flush()
    store.release_held(lambda mono, boot, wall: (wall, False))
    store.flush()
    wait_until(lambda: store.held == 0, 5, "released")
    (row,) = store.fetch("seal", 0, 10)
    body = json.loads(row.body)
    assert body["ts"] == "2023-11-14T22:13:20.000Z" and body["ts_trusted"] is False and body["seq"] == 1


def test_pipeline_holds_until_gps_then_corrects(tmp_path: Path) -> None:
    c = FakeClocks()
    cfg = config_mod.parse({"device": {"id": "D"}, "store": {"path": str(tmp_path / "b.db")},
                            "gps": {"replay": "x.nmea"}, "time": {"max_hold_s": 600}})
    s = Store(cfg.store.path, device="D", sync_interval_s=0.05)
    s.start()
    try:
        p = Pipeline(cfg, s, c.keeper())
        p.emit(Reading("temperature", None, {"c": 4.0}, meta={"mono_ns": c.mono}))
        c.tick(20)
        p.emit(Reading("position", GPS_MS, {"lat": 22.0, "lon": 106.7, "speed_kmh": 50.0, "course": 0.0,
                                            "sats": 9, "hdop": 0.9}, meta={"mono_ns": c.mono}))
        s.flush()
        assert s.held == 1
        s.release_held(p.resolve_held)
        s.flush()
        wait_until(lambda: s.held == 0, 5, "released")
        (t,) = s.fetch("temperature", 0, 10)
        assert t.ts_ms == GPS_MS - 20_000 and "ts_trusted" not in t.body
        # Never a GPS fix: after max_hold_s the system clock's time goes out, flagged.
        p2 = Pipeline(cfg, s, keeper := c.keeper())
        p2.emit(Reading("temperature", None, {"c": 5.0}, meta={"mono_ns": c.mono}))
        s.flush()
        s.release_held(p2.resolve_held)
        s.flush()
        assert s.held == 1, "not yet"
        c.tick(601)
        s.release_held(p2.resolve_held)
        s.flush()
        wait_until(lambda: s.held == 0, 5, "released after max_hold_s")
        assert keeper.has_gps_time is False
        t2 = s.fetch("temperature", t.id, 10)[0]
        assert '"ts_trusted":false' in t2.body
    finally:
        s.close()


def test_readings_before_the_first_fix_get_gps_time_end_to_end(tmp_path: Path, broker: Mosquitto,
                                                               backend: Backend) -> None:
    """The system clock says late Nov 2026; the GPS says 20 Nov. Health readings taken before the
    first fix must carry GPS-based times once the receiver speaks."""
    master, slave = ptymod.openpty()
    try:
        cfg = agent_config(tmp_path, broker.port, gps={"port": os.ttyname(slave)},
                           health={"interval_s": 0.5}, time={"trust_system_clock": "never"})
        with AgentProcess(cfg) as agent:
            time.sleep(2.5)  # a few health readings, no time for them yet
            assert backend.readings("health") == []
            fixes = list(trip.drive(interval_s=1, max_hours=0.01))
            started = time.monotonic()
            for f in fixes[:5]:
                os.write(master, (trip.rmc(f) + trip.gga(f)).encode())
                time.sleep(0.2)
            wait_until(lambda: len(backend.readings("health")) >= 3, 20, "health readings released")
            health = backend.readings("health")
            for h in health:
                # Taken in the seconds before the first fix (22:00:00 GPS time), not "now".
                assert "2026-11-20T21:59:50" <= h["ts"] <= "2026-11-20T22:00:05", h["ts"]
                assert "ts_trusted" not in h
            seqs = [h["seq"] for h in health]
            assert sorted(seqs) == list(range(1, len(seqs) + 1))
            assert time.monotonic() - started < 20
            assert agent.terminate() == 0
    finally:
        os.close(master)
        os.close(slave)
