"""Cargo security end to end: seals, cold chain, geofences and the chain, through a real
mosquitto to a backend, then verified as customs would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.demo.broker import Mosquitto
from support import REPO, AgentProcess, Backend, agent_config, store_depth, store_readings, wait_until

DEMO = REPO / "agent" / "demo" / "data" / "demo.toml"


def cargo_sections(tmp_path: Path) -> dict:
    """The demo's seal, reefer and zones (agent/demo/data/demo.toml), and a chain key."""
    import tomllib

    demo = tomllib.loads(DEMO.read_text())
    key = tmp_path / "chain.key"
    key.write_text("customs-transit-key-CQ-HN-0042\n")
    key.chmod(0o600)
    return {
        "gps": {"replay": str(REPO / "agent" / "demo" / "data" / "trip.nmea.gz"), "replay_speed": 0},
        "seals": demo["seals"], "temperature": demo["temperature"], "geofences": demo["geofences"],
        "chain": {"hmac_key_file": str(key)},
        "reporting": {"min_period_s": 120, "min_distance_m": 1000, "min_heading_deg": 8},
    }


@pytest.fixture
def received(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, object]], Path]:
    """Run the whole trip once, the broker down until everything is buffered (a dead zone)."""
    tmp = tmp_path_factory.mktemp("cargo")
    broker = Mosquitto(tmp / "broker").start()
    try:
        backend = Backend(broker.port, client_id="backend-cargo")
        backend.close()
        broker.stop()
        cfg = agent_config(tmp, broker.port, **cargo_sections(tmp))
        with AgentProcess(cfg, "--until-drained") as agent:
            wait_until(lambda: store_depth(tmp / "state" / "buffer.db") > 1000, 60, "trip buffered")
            wait_until(lambda: _has(tmp, "seal", 5) and _has(tmp, "alarm", 11), 60, "all events buffered")
            broker.start()
            backend = Backend(broker.port, client_id="backend-cargo")
            assert agent.wait(120) == 0, agent.log()
        wait_until(lambda: len(backend.readings("seal")) >= 5, 20, "seal events")
        messages = backend.data_messages()
        backend.close()
    finally:
        broker.stop()
    record = tmp / "received.jsonl"
    record.write_text("".join(json.dumps({"topic": t, "payload": p}) + "\n" for t, p in messages))
    return record, messages, tmp / "chain.key"


def _has(tmp: Path, stream: str, n: int) -> bool:
    import sqlite3

    db = tmp / "state" / "buffer.db"
    if not db.exists():
        return False
    try:
        return len(store_readings(db, stream)) >= n
    except sqlite3.OperationalError:
        return False


def readings(messages: list, stream: str) -> list[dict]:
    out: list[dict] = []
    for topic, payload in messages:
        if topic.endswith("/" + stream):
            out += payload if isinstance(payload, list) else [payload]
    return out


def test_events_go_before_the_backlog(received) -> None:
    _record, messages, _key = received
    streams = [t.rsplit("/", 1)[-1] for t, _p in messages]
    first_position = streams.index("position")
    assert set(streams[:first_position]) == {"alarm", "seal"}, "alarms and seal events first"
    assert streams[:first_position].count("seal") >= 1


def test_seal_events_say_when_where_and_whether_authorised(received) -> None:
    _record, messages, _key = received
    seals = sorted(readings(messages, "seal"), key=lambda r: r["seq"])
    assert [(s["ts"], s["event"], s["authorised"]) for s in seals] == [
        ("2026-11-20T22:00:30.000Z", "sealed", True),
        ("2026-11-21T16:25:00.000Z", "opened", True),
        ("2026-11-21T16:50:00.000Z", "sealed", True),
        ("2026-11-21T18:25:00.000Z", "opened", False),
        ("2026-11-21T18:35:00.000Z", "sealed", False),
    ]
    yard = seals[1]
    assert "Youyiguan customs yard" in yard["zones"]
    assert yard["position"]["lat"] == pytest.approx(21.977, abs=0.002)
    assert yard["position"]["ts"] <= yard["ts"] and 0 <= yard["position"]["age_s"] <= 10
    lay_by = seals[3]
    assert lay_by["zones"] == [] and lay_by["position"]["lat"] == pytest.approx(21.66, abs=0.002)


def test_alarms_for_seals_cold_chain_and_zones(received) -> None:
    _record, messages, _key = received
    alarms = readings(messages, "alarm")
    seal_alarms = [(a["ts"], a["severity"]) for a in alarms if a["kind"] == "seal_opened"]
    assert sorted(seal_alarms) == [("2026-11-21T16:25:00.000Z", "info"), ("2026-11-21T18:25:00.000Z", "critical")]
    cold = [(a["state"], a["sensor"]) for a in sorted(alarms, key=lambda a: a["ts"]) if a["kind"] == "temperature"]
    assert cold == [("active", "reefer_front"), ("cleared", "reefer_front")]
    zones = [(a["state"], a["zone"]) for a in sorted(alarms, key=lambda a: a["ts"]) if a["kind"] == "geofence"]
    assert ("enter", "Youyiguan customs yard") in zones and ("exit", "Youyiguan customs yard") in zones
    assert zones.index(("enter", "Youyiguan customs yard")) < zones.index(("exit", "Youyiguan customs yard"))


def verify_chain(record: Path, key: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "verify-chain", str(record), "--key-file", str(key), *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_the_received_record_verifies_and_a_deletion_is_caught(received, tmp_path: Path) -> None:
    record, messages, key = received
    ok = verify_chain(record, key)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "CQ-HN-0042: 16 events, chain_seq 1..16: OK" in ok.stdout
    # Someone removes the lay-by opening from the record...
    events = [e for t, p in messages if t.rsplit("/", 1)[-1] in ("seal", "alarm")
              for e in (p if isinstance(p, list) else [p])]
    doctored = [e for e in events if not (e.get("event") == "opened" and e["ts"].startswith("2026-11-21T18:25"))]
    assert len(doctored) == len(events) - 1
    forged = tmp_path / "doctored.jsonl"
    forged.write_text("".join(json.dumps(e) + "\n" for e in doctored))
    bad = verify_chain(forged, key)
    assert bad.returncode == 1 and "are missing (deleted or not received)" in bad.stdout
    # ...or edits it to look authorised.
    edited = [dict(e, authorised=True) if e.get("event") == "opened" and e["ts"].startswith("2026-11-21T18:25") else e
              for e in events]
    forged.write_text("".join(json.dumps(e) + "\n" for e in edited))
    bad = verify_chain(forged, key)
    assert bad.returncode == 1 and "content does not match its hash (altered)" in bad.stdout
