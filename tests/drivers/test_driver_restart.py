"""A driver thread that dies is never unnoticed: restarted with backoff, counted, and fatal to a
run that waits for the data (`--dry-run`, `--until-drained`).

The crashing drivers are small subclasses of real ones, selected through the real registry
(drivers/__init__.py REGISTRY) by an ordinary config: the agent under test is the real one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import drivers
from agent.config import load
from agent.daemon.runner import Agent
from agent.demo import trip
from agent.demo.broker import free_port
from drivers.gps.receiver import NmeaGps
from drivers.seal.sim import SimSeal
from support import REPO, agent_config, store_readings, wait_until

HERE = Path(__file__).resolve().parent


class FlakySeal(SimSeal):
    """A live source whose first CRASHES runs raise (a driver bug), then runs as the real one."""

    CRASHES = 3
    starts: list[float] = []

    def run(self, stop: threading.Event) -> None:
        FlakySeal.starts.append(time.monotonic())
        if len(FlakySeal.starts) <= self.CRASHES:
            raise RuntimeError(f"bug #{len(FlakySeal.starts)} in the seal driver")
        super().run(stop)


class CrashingReplay(NmeaGps):
    """A replay that crashes after its first few fixes (a bug met half-way through a capture)."""

    def _emit(self, fixes: Any) -> None:
        fixes = list(fixes)
        if fixes and self.nmea.counters.fixes > 5:
            raise ZeroDivisionError("bug in the fix handling")
        super()._emit(iter(fixes))


@pytest.fixture
def flaky_seal(monkeypatch: pytest.MonkeyPatch) -> type[FlakySeal]:
    FlakySeal.starts = []
    monkeypatch.setitem(drivers.REGISTRY["seal"], "sim",
                        drivers.REGISTRY["seal"]["sim"]._replace(driver=f"{__name__}:FlakySeal"))
    return FlakySeal


def _health_bodies(db: Path) -> list[dict[str, Any]]:
    return [json.loads(body) for _s, _n, body, _h in store_readings(db, "health")]


def test_a_crashing_live_driver_is_restarted_with_backoff_and_counted(tmp_path: Path,
                                                                      flaky_seal: type[FlakySeal]) -> None:
    cfg = load(agent_config(tmp_path, free_port(), time={"trust_system_clock": "always"}, health={"interval_s": 0.5},
                            seals=[{"name": "door", "driver": "sim"}]))
    agent = Agent(cfg)
    assert isinstance(agent.drivers[0], FlakySeal), "selected through the registry"
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        wait_until(lambda: len(flaky_seal.starts) == flaky_seal.CRASHES + 1, 30, "the driver running again")
        wait_until(lambda: any(b.get("restarts") == {"seals:door": 3} for b in _health_bodies(agent.store.path)),
                   10, "a health reading with the restarts")
        st = agent.snapshot()["drivers"]["seals:door"]
        assert (st["restarts"], st["crashes"], st["dead"]) == (3, 3, False)
        assert st["last_crash"] == "RuntimeError: bug #3 in the seal driver"
        assert "events" in st, "the driver's own status is still there"
    finally:
        agent.stop()
        runner.join(30)
    assert not runner.is_alive()
    # Backoff: about 1, 2, 4 s (jittered down to half), never a tight loop.
    gaps = [b - a for a, b in zip(flaky_seal.starts, flaky_seal.starts[1:])]
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0 and gaps[2] >= 2.0, gaps
    assert gaps[2] > gaps[0]
    # And `lorry-agent status` shows it, read from the store as a technician would.
    r = subprocess.run([sys.executable, "-m", "agent", "status", "--json", "--config", str(tmp_path / "agent.toml")],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    drivers_status = json.loads(r.stdout)["drivers"]
    assert drivers_status["seals:door"]["restarts"] == 3
    assert drivers_status["seals:door"]["last_crash"] == "RuntimeError: bug #3 in the seal driver"


def test_health_has_no_restarts_while_drivers_run_well(tmp_path: Path) -> None:
    cfg = load(agent_config(tmp_path, free_port(), time={"trust_system_clock": "always"}, health={"interval_s": 0.5},
                            seals=[{"name": "door", "driver": "sim"}]))
    agent = Agent(cfg)
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        wait_until(lambda: len(_health_bodies(agent.store.path)) >= 1, 10, "a health reading")
        assert agent.snapshot()["drivers"]["seals:door"] | {"restarts": 0, "crashes": 0, "dead": False} \
            == agent.snapshot()["drivers"]["seals:door"]
    finally:
        agent.stop()
        runner.join(30)
    assert all("restarts" not in b and "dead_sources" not in b for b in _health_bodies(agent.store.path))


def _run_with_crashing_replay(tmp_path: Path, *args: str, port: int) -> subprocess.CompletedProcess[str]:
    """``lorry-agent run`` in a fresh process whose registry selects CrashingReplay for NMEA."""
    capture = tmp_path / "trip.nmea"
    trip.write(capture, interval_s=5, max_hours=0.1)
    cfg = agent_config(tmp_path, port, gps={"replay": str(capture), "replay_speed": 0})
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent)!r}]  # this module, and tests/ for support
        import drivers
        drivers.register("gps", "nmea", config="drivers.gps.config:GpsConfig",
                         driver="test_driver_restart:CrashingReplay")
        from agent.cli import main
        sys.exit(main(["run", "--config", {str(cfg)!r}, *{list(args)!r}]))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_a_crashed_replay_makes_dry_run_exit_non_zero(tmp_path: Path) -> None:
    r = _run_with_crashing_replay(tmp_path, "--dry-run", port=free_port())
    assert r.returncode == 1, r.stderr
    assert ("lorry-agent: source gps died: ZeroDivisionError: bug in the fix handling; "
            "it ended early (a replay is not restarted)") in r.stderr
    assert "Traceback" not in r.stderr, "the crash is named, not dumped"
    published = [json.loads(line) for line in r.stdout.splitlines()]
    assert published, "what was read before the crash is still published"


def test_a_crashed_replay_makes_until_drained_exit_non_zero(tmp_path: Path, broker: Any) -> None:
    r = _run_with_crashing_replay(tmp_path, "--until-drained", port=broker.port)
    assert r.returncode == 1, r.stderr
    assert "lorry-agent: source gps died: ZeroDivisionError: bug in the fix handling" in r.stderr


def test_a_replay_that_ends_well_exits_zero(tmp_path: Path) -> None:
    capture = tmp_path / "trip.nmea"
    trip.write(capture, interval_s=5, max_hours=0.1)
    cfg = agent_config(tmp_path, free_port(), gps={"replay": str(capture), "replay_speed": 0})
    r = subprocess.run([sys.executable, "-m", "agent", "run", "--dry-run", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "died" not in r.stderr
