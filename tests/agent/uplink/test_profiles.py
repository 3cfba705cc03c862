"""Uplink profiles by region and monthly data budgets (agent/uplink/regions.py, agent/uplink/socketmeter.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, load
from agent.config.regions import UplinkProfileConfig
from agent.demo import trip
from agent.demo.broker import Mosquitto
from agent.uplink.regions import UplinkPlan
from backlog import backlog
from linksim import LinkSim
from support import (
    REPO,
    AgentProcess,
    Backend,
    agent_config,
    last_seqs,
    store_depth,
    store_state,
    wait_until,
    write_config,
)

DEPOT = {"name": "Chongqing depot", "kind": "depot", "seal_opening": "authorised",
         "circle": {"lat": 29.4838, "lon": 106.4460, "radius_m": 1000}}
PROFILES = [
    {"name": "depot-wifi", "zones": ["Chongqing depot"],
     "live": ["position", "ignition", "temperature", "can", "health"]},
    {"name": "roaming", "live": ["position"], "monthly_budget_mb": 50},
]


def saved_status(db: Path) -> dict[str, Any]:
    """The status the agent keeps in its store (what ``lorry-agent status`` shows)."""
    saved = store_state(db).get("status")
    return json.loads(saved) if saved else {"uplink": {"data": {"profile": None, "profiles": {}}}}


def over_budget(db: Path, profile: str) -> bool:
    return saved_status(db)["uplink"]["data"]["profiles"].get(profile, {}).get("over_budget", False)


# -- the plan on its own ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


def test_plan_follows_zones_holds_bulks_and_stops_at_the_budget() -> None:
    zones: list[str] = []
    mono = FakeClock()
    profiles = [UplinkProfileConfig(name="depot", zones=["yard"], live=["position", "temperature", "health"]),
                UplinkProfileConfig(name="laos", zones=["Laos"], live=["position"], every_s={"temperature": 600},
                              monthly_budget_mb=1),
                UplinkProfileConfig(name="home", live=["position", "temperature"])]
    plan = UplinkPlan(profiles, zones=lambda: zones, wall=lambda: 1_795_000_000.0, mono=mono)
    plan.tick()
    assert plan.active.name == "home" and plan.allowed("temperature") and not plan.allowed("health")
    assert plan.allowed("alarm") and plan.allowed("seal")
    zones[:] = ["Laos"]
    g = plan.generation
    plan.tick()
    assert plan.active.name == "laos" and plan.generation > g
    assert plan.allowed("temperature")  # a bulk stream goes, then waits its interval
    plan.drained("temperature")
    assert not plan.allowed("temperature")
    mono.t += 601
    plan.tick()
    assert plan.allowed("temperature")
    plan.charge(1024 * 1024)
    assert plan.over_budget() and not plan.allowed("position") and plan.allowed("alarm")
    assert plan.snapshot()["profiles"]["laos"]["over_budget"] is True
    zones[:] = ["yard", "Laos"]  # the first matching profile wins
    plan.tick()
    assert plan.active.name == "depot" and plan.allowed("health") and plan.allowed("position")
    # The month's usage survives a restart.
    again = UplinkPlan(profiles, zones=lambda: ["Laos"], saved_usage=plan.saved(), wall=lambda: 1_795_000_000.0)
    again.tick()
    assert again.over_budget()


def test_profile_config_errors_name_the_problem(tmp_path: Path) -> None:
    base = {"device": {"id": "D"}, "geofences": [DEPOT]}
    cases = [
        ({"profiles": [{"name": "a", "zones": ["Nowhere"]}]}, "Nowhere are not [[geofences]] names"),
        ({"profiles": [{"name": "a", "live": ["positions"]}]}, "unknown stream(s) positions"),
        ({"profiles": [{"name": "a", "every_s": {"seal": 60}}]}, "always sent at once"),
        ({"profiles": [{"name": "a"}, {"name": "b"}]}, "only one profile may be without zones"),
    ]
    for extra, message in cases:
        path = write_config(tmp_path / "bad.toml", base | extra)
        with pytest.raises(ConfigError) as e:
            load(path)
        assert message in str(e.value), str(e.value)


# -- end to end ------------------------------------------------------------------------------------


def test_streams_held_on_the_road_go_out_at_the_depot(tmp_path: Path, broker: Mosquitto, backend: Backend) -> None:
    """Health is sent only on the depot's Wi-Fi: readings taken on the road wait in the store
    and go out when the lorry is back in the depot; positions go everywhere."""
    capture = tmp_path / "trip.nmea"
    truth = trip.write(capture, interval_s=1, max_hours=180 / 3600)
    db = tmp_path / "state" / "buffer.db"
    cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": 10},
                       health={"interval_s": 0.5}, geofences=[DEPOT], profiles=PROFILES)
    with AgentProcess(cfg) as agent:
        wait_until(lambda: len(backend.readings("position")) >= len(truth), 40, "the whole trip's positions")
        st = saved_status(db)["uplink"]["data"]
        assert st["profile"] == "roaming" and "health" in st["held"], st
        sent = len(backend.readings("health"))
        time.sleep(2)
        assert len(backend.readings("health")) == sent, "health is held on the road"
        assert store_depth(db) > 0
        assert 0 < sent, "health went out while the lorry was still in the depot"
        assert agent.terminate() == 0
    held = last_seqs(db)["health"] - sent
    assert held > 0
    # Back at the depot: the first fixes of the trip are inside it.
    home = tmp_path / "home.nmea"
    trip.write(home, interval_s=1, max_hours=20 / 3600)
    cfg2 = agent_config(tmp_path, broker.port, name="home.toml", gps={"replay": str(home), "replay_speed": 5},
                        health={"interval_s": 0.5}, geofences=[DEPOT], profiles=PROFILES)
    with AgentProcess(cfg2) as agent:
        want = last_seqs(db)["health"]
        wait_until(lambda: {r["seq"] for r in backend.readings("health")} >= set(range(1, want + 1)), 30,
                   "every health reading, the held ones included")
        wait_until(lambda: saved_status(db)["uplink"]["data"]["profile"] == "depot-wifi", 10, "status: depot-wifi")
        assert agent.terminate() == 0


def test_monthly_budget_counted_at_the_socket_stops_all_but_evidence(tmp_path: Path, broker: Mosquitto,
                                                                     backend: Backend) -> None:
    db = tmp_path / "state" / "buffer.db"
    backlog(db, 3000, events=6)
    want = last_seqs(db)
    budget_mb = 0.02  # ~21 kB: a few messages of positions
    profiles = [{"name": "roaming", "live": ["position"], "monthly_budget_mb": budget_mb}]
    with LinkSim(broker.port) as link:
        # Health every second (held: not live in this profile) keeps the saved status fresh.
        cfg = agent_config(tmp_path, link.port, mqtt_extra={"max_message_bytes": 4096}, profiles=profiles,
                           health={"interval_s": 1})
        with AgentProcess(cfg) as agent:
            wait_until(lambda: len(backend.readings("alarm")) >= want["alarm"]
                       and len(backend.readings("seal")) >= want["seal"], 30, "every event")
            wait_until(lambda: over_budget(db, "roaming"), 30,
                       "the budget to run out")
            time.sleep(1.5)
            got = len(backend.readings("position"))
            time.sleep(1.5)
            assert len(backend.readings("position")) == got < want["position"], "positions stop at the budget"
            assert agent.terminate() == 0
        st = saved_status(db)["uplink"]
        wire = link.bytes_up + link.bytes_down
    used = st["data"]["profiles"]["roaming"]["bytes"]
    assert used >= budget_mb * 1024 * 1024
    text = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(cfg)], capture_output=True,
                          text=True, cwd=REPO, timeout=30).stdout
    assert "profile: roaming" in text and "OVER BUDGET" in text and "bytes on the wire" in text, text
    # Counted by the kernel at the agent's socket = what crossed the link, but for the goodbye
    # (offline status, DISCONNECT) still unacknowledged when the socket closed.
    assert 0 <= wire - st["wire_bytes"] <= 64, (st["wire_bytes"], wire)
    assert used == st["wire_bytes"]
    # A restart does not reset the month.
    with AgentProcess(cfg) as agent:
        time.sleep(3)
        assert len(backend.readings("position")) == got
        assert agent.terminate() == 0
    assert saved_status(db)["uplink"]["data"]["profiles"]["roaming"]["bytes"] >= used
