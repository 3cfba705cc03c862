"""The stream catalogue (agent/model/streams.py): one row per stream, read by every place that
decides by a stream's name; and the rule for a stream it does not know: sent, never stuck.

The bug this pins: a new stream was silently never sent once ``[[profiles]]`` were configured,
because the profile validator had its own list of names and a profile sent only what it named.
"""

from __future__ import annotations

import ast
import re
import time
from pathlib import Path

import pytest

from agent.config import ConfigError, load
from agent.config.regions import UplinkProfileConfig
from agent.demo.broker import Mosquitto
from agent.model import streams
from agent.model.reading import Reading
from agent.store import retention
from agent.store.buffer import Store
from agent.uplink.outbox import Outbox
from agent.uplink.regions import DEFAULT, UplinkPlan
from support import REPO, AgentProcess, Backend, agent_config, store_depth, wait_until, write_config

DEVICE = "CQ-HN-0042"
START_MS = 1_795_000_000_000


def test_the_catalogue_gives_what_the_scattered_lists_said() -> None:
    """Behaviour unchanged: every list derived from the catalogue is what the code had."""
    assert streams.NAMES == ("alarm", "seal", "position", "ignition", "temperature", "can", "health")
    assert streams.CHAINED == {"seal", "alarm"}
    assert set(streams.NEVER_SHED) == {"seal", "alarm", "ignition"}
    assert set(streams.ALWAYS_LIVE) == {"alarm", "seal"}
    assert streams.NEWEST_FIRST == {"position"}
    assert streams.SHED_STEPS == (("health", 1), ("can", 1), ("position", 3), ("temperature", 3), ("position", 1),
                                  ("can", 1))
    assert UplinkProfileConfig(name="x").live == ["position", "ignition", "temperature", "can", "health"]
    assert DEFAULT.live == ["position", "ignition", "temperature", "can", "health"]
    assert streams.ordered(["zzz", "health", "can", "aaa", "alarm", "position"]) == [
        "alarm", "position", "can", "health", "aaa", "zzz"]
    assert retention.NEVER_SHED is streams.NEVER_SHED


def test_an_unknown_stream_gets_the_documented_default_row() -> None:
    row = streams.get("transit")
    assert not row.catalogued and not row.chained and not row.never_shed and not row.always_live
    assert not row.newest_first and row.shed == ()
    assert streams.get("seal").catalogued and streams.get("seal").chained


def test_the_catalogue_covers_the_contract_and_the_fleet_acl() -> None:
    """Every stream topic docs/contract.md names is a catalogue row and the reverse; the
    fleet's broker ACL (docs/mosquitto.acl) lets a device write every one."""
    contract = (REPO / "docs" / "contract.md").read_text()
    topics = set(re.findall(r"^\| `\{topic_prefix\}/\{device\}/(\w+)` \| 1 \| no \|", contract, re.M))
    assert topics - {"cmd"} == set(streams.NAMES)
    acl = (REPO / "docs" / "mosquitto.acl").read_text()
    for name in streams.NAMES:
        assert f"pattern write lorry/%u/{name}\n" in acl, name


STREAM_FREE = ["agent/store", "agent/uplink", "agent/compact", "agent/config/regions.py", "agent/model"]


def test_no_stream_name_is_spelled_outside_the_catalogue() -> None:
    """Where the agent decides by a stream's name (store, uplink, profiles, chain), it asks the
    catalogue: no stream name as a string literal there."""
    found = []
    for root in STREAM_FREE:
        path = REPO / root
        for f in [path] if path.is_file() else sorted(path.rglob("*.py")):
            if f.name == "streams.py":
                continue
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Constant) and node.value in streams.BY_NAME:
                    found.append(f"{f.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not found, "\n".join(found)


# -- profiles ---------------------------------------------------------------------------------------


def test_profiles_may_name_every_catalogued_stream_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in streams.NAMES:
        if not streams.get(name).always_live:
            UplinkProfileConfig(name="p", live=[name], every_s={name: 60})
    with pytest.raises(ValueError, match="unknown stream.s. transit; allowed: alarm, seal, position"):
        UplinkProfileConfig(name="p", live=["transit"])
    # A row in the catalogue is all a new stream needs to be named in a profile.
    monkeypatch.setitem(streams.BY_NAME, "transit", streams.Stream("transit"))
    assert UplinkProfileConfig(name="p", live=["transit"]).live == ["transit"]


def test_a_stream_no_profile_can_name_is_live_under_every_profile_until_the_budget() -> None:
    zones: list[str] = []
    profiles = [UplinkProfileConfig(name="laos", zones=["Laos"], live=[], every_s={"temperature": 600},
                                    monthly_budget_mb=1),
                UplinkProfileConfig(name="home", live=["position"])]
    plan = UplinkPlan(profiles, zones=lambda: zones, wall=lambda: 1_795_000_000.0)
    plan.tick()
    assert plan.allowed("transit") and plan.allowed("position")
    assert not plan.allowed("health"), "a catalogued stream a profile does not name is held, as before"
    zones[:] = ["Laos"]
    plan.tick()
    assert plan.allowed("transit") and not plan.allowed("position") and not plan.allowed("health")
    plan.charge(1024 * 1024)
    assert plan.over_budget() and not plan.allowed("transit") and plan.allowed("alarm")
    assert "transit" not in plan.snapshot()["held"]


def test_an_unknown_stream_goes_out_under_profiles_end_to_end(tmp_path: Path, broker: Mosquitto,
                                                              backend: Backend) -> None:
    """A driver's new stream nobody added to the catalogue yet, with ``[[profiles]]``
    configured: it arrives (before the fix it waited in the store for ever); the catalogued
    stream the profile does not name is held, as documented."""
    db = tmp_path / "state" / "buffer.db"
    store = Store(db, device=DEVICE)
    store.start()
    for i in range(5):
        store.append(Reading("position", START_MS + i * 1000, {"lat": 22.0 + i / 1e4, "lon": 106.7, "fix": "gps"}))
        store.append(Reading("transit", START_MS + i * 1000, {"declaration": "CN-VN-0001", "step": i}))
        store.append(Reading("health", START_MS + i * 1000, {"uptime_s": i}))
    store.close()
    cfg = agent_config(tmp_path, broker.port, profiles=[{"name": "roaming", "live": ["position"]}])
    with AgentProcess(cfg) as agent:
        wait_until(lambda: sorted(r["seq"] for r in backend.readings("transit")) == [1, 2, 3, 4, 5], 20,
                   "every transit reading")
        wait_until(lambda: len(backend.readings("position")) >= 5, 10, "the positions")
        time.sleep(1)
        assert backend.readings("health") == [], "health is held by this profile"
        assert agent.terminate() == 0
    assert store_depth(db) == 5, "only the held health readings are left"


def test_the_config_file_accepts_what_the_catalogue_holds(tmp_path: Path) -> None:
    base = {"device": {"id": "D"}}
    ok = write_config(tmp_path / "ok.toml", base | {"profiles": [{"name": "a", "live": list(streams.HOLDABLE)}]})
    assert load(ok).profiles[0].live == list(streams.HOLDABLE)
    bad = write_config(tmp_path / "bad.toml", base | {"profiles": [{"name": "a", "live": ["transit"]}]})
    with pytest.raises(ConfigError, match="unknown stream.s. transit"):
        load(bad)


def test_the_outbox_serves_in_catalogue_order_and_unknown_streams_last(tmp_path: Path) -> None:
    store = Store(tmp_path / "b.db", device=DEVICE, sync_interval_s=0.05)
    store.start()
    try:
        for stream in ("transit", "health", "can", "seal", "ignition"):
            store.append(Reading(stream, START_MS, {"x": 1}))
        store.flush()
        box = Outbox(store, max_batch=10, max_bytes=1 << 20)
        order = []
        while (b := box.next_batch()) is not None:
            order.append(b.stream)
            store.ack(b.ids)
        assert order == ["seal", "ignition", "can", "health", "transit"]
    finally:
        store.close()
