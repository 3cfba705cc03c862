"""End to end against a real mosquitto: replayed GPS → store → broker → backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.demo import trip
from agent.demo.broker import Mosquitto
from support import AgentProcess, Backend, agent_config, store_depth, wait_until


def make_trip(tmp: Path, minutes: float = 20, interval: float = 5) -> tuple[Path, list[trip.TruthFix]]:
    path = tmp / "trip.nmea"
    return path, trip.write(path, interval_s=interval, max_hours=minutes / 60)


def assert_matches_truth(reading: dict, truth: trip.TruthFix) -> None:
    assert reading["device"] == "CQ-HN-0042"
    assert reading["stream"] == "position"
    assert reading["ts"] == truth.ts.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    # ddmm.mmmmm carries 1.7e-7 degrees; the truth is rounded to 1e-7.
    assert reading["lat"] == pytest.approx(truth.lat, abs=3e-7)
    assert reading["lon"] == pytest.approx(truth.lon, abs=3e-7)
    assert reading["speed_kmh"] == pytest.approx(truth.speed_kmh, abs=0.015)  # 0.01 kn steps, 2 decimals
    assert reading["course"] == pytest.approx(truth.course, abs=0.006)
    assert reading["alt_m"] == pytest.approx(truth.alt_m, abs=0.051)
    assert reading["sats"] == truth.sats
    assert reading["hdop"] == pytest.approx(truth.hdop)
    assert reading["fix"] == "gps"


def test_every_fix_arrives_exactly_once_with_correct_values(tmp_path: Path, broker: Mosquitto,
                                                            backend: Backend) -> None:
    capture, truth = make_trip(tmp_path)
    cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": 0})
    with AgentProcess(cfg, "--until-drained") as agent:
        assert agent.wait(60) == 0, agent.log()
    wait_until(lambda: len(backend.readings("position")) >= len(truth), 10, "all positions")
    got = backend.readings("position")
    seqs = [r["seq"] for r in got]
    assert sorted(seqs) == list(range(1, len(truth) + 1)), "each seq exactly once, none missing"
    by_seq = {r["seq"]: r for r in got}
    for seq, t in enumerate(truth, start=1):
        assert_matches_truth(by_seq[seq], t)
    assert [v for v, _retained in backend.status_values()] == ["online", "offline"]
    late = Backend(broker.port)  # a subscriber arriving later gets the retained status
    try:
        wait_until(lambda: late.status_values() == [("offline", True)], 5, "retained offline")
    finally:
        late.close()


def test_backlog_goes_newest_first_then_oldest_first(tmp_path: Path, broker: Mosquitto) -> None:
    capture, truth = make_trip(tmp_path)
    # The backend's persistent session must exist before the broker goes away.
    backend = Backend(broker.port, client_id="backend-backlog")
    backend.close()
    broker.stop()
    cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": 0},
                       mqtt_extra={"max_batch": 50})
    with AgentProcess(cfg, "--until-drained") as agent:
        wait_until(lambda: store_depth(tmp_path / "state" / "buffer.db") == len(truth), 30, "backlog buffered")
        broker.start()
        backend = Backend(broker.port, client_id="backend-backlog")
        assert agent.wait(60) == 0, agent.log()
    try:
        wait_until(lambda: len(backend.readings("position")) >= len(truth), 15, "backlog delivered")
        msgs = [obj for _t, obj in backend.data_messages("position")]
        first = msgs[0]
        assert isinstance(first, dict) and first["seq"] == len(truth), "the newest position goes first, alone"
        rest = [r["seq"] for m in msgs[1:] for r in (m if isinstance(m, list) else [m])]
        assert rest == list(range(1, len(truth))), "then the backlog oldest-first, without gaps"
        assert all(len(m) <= 50 for m in msgs if isinstance(m, list))
        assert any(isinstance(m, list) and len(m) == 50 for m in msgs), "the backlog is batched"
    finally:
        backend.close()


def test_broker_outage_loses_nothing(tmp_path: Path, broker: Mosquitto, backend: Backend) -> None:
    capture, truth = make_trip(tmp_path, minutes=60, interval=1)
    # 3600 fixes at 600x: about 6 s of replay, with the broker down for 2 s in the middle.
    cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": 600})
    with AgentProcess(cfg, "--until-drained") as agent:
        wait_until(lambda: len(backend.readings()) > 500, 20, "first readings")
        broker.stop()
        depth = store_depth(tmp_path / "state" / "buffer.db")
        wait_until(lambda: store_depth(tmp_path / "state" / "buffer.db") > depth + 300, 20,
                   "buffer filling while offline")
        broker.start()
        assert agent.wait(60) == 0, agent.log()
    wait_until(lambda: {r["seq"] for r in backend.readings()} >= set(range(1, len(truth) + 1)), 15, "everything")
    got = backend.readings("position")
    assert {r["seq"] for r in got} == set(range(1, len(truth) + 1)), "seq without gaps"
    by_seq: dict[int, dict] = {}
    for r in got:
        assert by_seq.setdefault(r["seq"], r) == r, "a re-sent reading carries the same content"
    for seq, t in enumerate(truth, start=1):
        assert_matches_truth(by_seq[seq], t)


def test_sigkill_while_buffering_and_draining_loses_nothing(tmp_path: Path, broker: Mosquitto,
                                                            backend: Backend) -> None:
    capture, truth = make_trip(tmp_path, minutes=60, interval=1)
    db = tmp_path / "state" / "buffer.db"
    broker.stop()
    cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": 0})
    with AgentProcess(cfg) as agent:
        wait_until(lambda: store_depth(db) == len(truth), 30, "everything buffered")
        agent.kill()  # power cut while offline
    # Drain slowly (one reading per message, one message in flight) and kill mid-way.
    drain = agent_config(tmp_path, broker.port, name="drain.toml", mqtt_extra={"max_batch": 1, "max_inflight": 1})
    broker.start()
    with AgentProcess(drain) as agent:
        wait_until(lambda: len(backend.readings()) > len(truth) // 3, 30, "draining under way")
        agent.kill()
    delivered_before = len(backend.readings())
    assert delivered_before < len(truth), "the kill happened mid-drain"
    with AgentProcess(drain, "--until-drained") as agent:
        assert agent.wait(120) == 0, agent.log()
    wait_until(lambda: {r["seq"] for r in backend.readings()} >= set(range(1, len(truth) + 1)), 15, "everything")
    by_seq: dict[int, dict] = {}
    for r in backend.readings("position"):
        assert by_seq.setdefault(r["seq"], r) == r, "a re-sent reading carries the same seq and content"
    assert sorted(by_seq) == list(range(1, len(truth) + 1))
    assert store_depth(db) == 0


def test_last_will_says_offline_when_the_agent_dies(tmp_path: Path, broker: Mosquitto, backend: Backend) -> None:
    cfg = agent_config(tmp_path, broker.port)
    with AgentProcess(cfg) as agent:
        wait_until(lambda: ("online", False) in backend.status_values(), 20, "online")
        agent.kill()
    wait_until(lambda: backend.status_values()[-1][0] == "offline", 20, "last will")
