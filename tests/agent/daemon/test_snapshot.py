"""The running agent's snapshot lives in RAM when systemd gives it a runtime directory: the store
is not rewritten every second for it, and `lorry-agent status` still shows the live agent."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from agent.cli.statusview import collect
from agent.daemon.snapshot import LIVE_FILE_KEY, SNAPSHOT_KEY, LiveSnapshot, read_live, runtime_file
from agent.demo import trip
from support import AgentProcess, agent_config, store_state, wait_until


def stored(db: Path) -> dict[str, str]:
    try:
        return store_state(db)  # the journal's newest included
    except sqlite3.Error:
        return {}  # not created yet


def stored_snapshot(db: Path) -> dict[str, Any]:
    return json.loads(stored(db).get(SNAPSHOT_KEY, "null")) or {}


def sources(tmp: Path) -> dict[str, Any]:
    """A seal, and a GPS giving a position a second: commits every second, which took the
    snapshot with them before."""
    capture = tmp / "trip.nmea"
    trip.write(capture, interval_s=1, max_hours=0.05)
    return {"gps": {"replay": str(capture), "replay_speed": 1}, "seals": [{"name": "door", "driver": "sim"}]}


def test_a_runtime_directory_takes_the_live_snapshot_off_the_store(tmp_path: Path, broker: Any) -> None:
    run = tmp_path / "run"
    run.mkdir()
    cfg = agent_config(tmp_path, broker.port, **sources(tmp_path))
    db = tmp_path / "state" / "buffer.db"
    with AgentProcess(cfg, env={"RUNTIME_DIRECTORY": str(run)}) as agent:
        live = run / "status.json"
        wait_until(live.exists, 20, "the live snapshot file")
        wait_until(lambda: bool(stored_snapshot(db)), 20, "the start snapshot in the store")
        at_start = stored_snapshot(db)
        first = json.loads(live.read_text())
        time.sleep(3)  # ticks every second: the file moves on, the store's copy must not
        assert json.loads(live.read_text())["updated"] > first["updated"]
        assert stored_snapshot(db) == at_start
        assert stored(db)[LIVE_FILE_KEY] == str(live)
        shown = collect(db)
        assert shown["agent_running"] is True, shown
        assert shown["drivers"] and "seals:door" in shown["drivers"]
        assert agent.terminate() == 0
    assert not live.exists()  # a file left behind would look like a live agent
    final = stored_snapshot(db)
    assert final["stopped"] and final["updated"] > at_start["updated"]
    assert collect(db)["agent_running"] is False


def test_without_a_runtime_directory_the_store_keeps_it(tmp_path: Path, broker: Any) -> None:
    cfg = agent_config(tmp_path, broker.port, **sources(tmp_path))
    db = tmp_path / "state" / "buffer.db"
    with AgentProcess(cfg, env={"RUNTIME_DIRECTORY": ""}) as agent:
        wait_until(lambda: bool(stored_snapshot(db)), 20, "a snapshot in the store")
        first = stored_snapshot(db)["updated"]
        wait_until(lambda: stored_snapshot(db)["updated"] > first, 20, "the store's snapshot to move on")
        assert stored(db)[LIVE_FILE_KEY] == ""
        assert collect(db)["agent_running"] is True
        assert agent.terminate() == 0


def test_runtime_file_follows_systemds_variable() -> None:
    assert runtime_file({}) is None
    assert runtime_file({"RUNTIME_DIRECTORY": ""}) is None
    assert runtime_file({"RUNTIME_DIRECTORY": "/run/lorry-agent"}) == Path("/run/lorry-agent/status.json")
    assert runtime_file({"RUNTIME_DIRECTORY": "/run/a:/run/b"}) == Path("/run/a/status.json")


def test_an_unwritable_runtime_directory_falls_back_and_a_garbled_file_is_ignored(tmp_path: Path) -> None:
    live = LiveSnapshot(tmp_path / "missing" / "status.json")
    assert live.write({"updated": 1.0}) is False and live.failed
    path = tmp_path / "status.json"
    assert LiveSnapshot(path).write({"updated": 2.0}) is True
    assert read_live({LIVE_FILE_KEY: str(path)}) == {"updated": 2.0}
    for garbage in ("{", "[1, 2]", "\x00\xff"):
        path.write_text(garbage)
        assert read_live({LIVE_FILE_KEY: str(path)}) is None
    assert read_live({LIVE_FILE_KEY: ""}) is None and read_live({}) is None
