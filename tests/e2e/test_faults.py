"""Fault injection, end to end: real agent processes against a real mosquitto, on loopback.

Power cuts (SIGKILL) at random moments, a flapping broker, a black-holed network, a full disk,
a damaged store, a wall clock that jumps by days, and a memory soak. Each test checks what the
backend can prove (docs/contract.md): per stream every seq from 1 to the store's ``last_seq``
arrives (gaps only where a ``data_dropped`` alarm announced them), a re-sent reading carries
the same content, the seal/alarm chain verifies, and the store stays a sound database.

Randomness is seeded: ``LORRY_FAULT_SEED`` (printed with every failure) replays a run;
``LORRY_POWER_CUTS`` sets the number of power-cut cycles (default 200).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import select
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.demo import trip
from agent.demo.broker import Mosquitto
from agent.tools.verify import verify
from support import REPO, AgentProcess, Backend, agent_config, last_seqs, store_depth, store_readings, wait_until

SEED = int(os.environ.get("LORRY_FAULT_SEED", "20261121"))
POWER_CUTS = int(os.environ.get("LORRY_POWER_CUTS", "200"))
START = trip.START  # the generated trip's first fix: 2026-11-20T22:00:00Z
DEVICE = "CQ-HN-0042"
CHAIN_KEY = "fault-injection-chain-key-CQ-HN-0042\n"


def log_result(name: str, **facts: Any) -> None:
    """What a fault test measured, for the run's record (visible with ``pytest -s``)."""
    print(f"\n[faults] {name}: " + ", ".join(f"{k}={v}" for k, v in facts.items()), flush=True)


# -- inputs: trips, scripted cargo ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[trip.TruthFix]]]:
    """Generated 1 Hz trips, written once for the module."""
    folder = tmp_path_factory.mktemp("trips")
    out = {}
    for name, seconds in (("3min", 180), ("10min", 600), ("12min", 720), ("45min", 2700), ("20s", 20),
                          ("6h", 6 * 3600)):
        path = folder / f"trip-{name}.nmea"
        out[name] = (path, trip.write(path, interval_s=1, max_hours=seconds / 3600))
    return out


def at(seconds: float) -> dt.datetime:
    return START + dt.timedelta(seconds=seconds)


def chain_key(tmp: Path) -> Path:
    key = tmp / "chain.key"
    key.write_text(CHAIN_KEY)
    key.chmod(0o600)
    return key


def cargo(tmp: Path, *, seal_every_s: float, seal_events: int, seal_from_s: float = 2, temp_interval_s: float = 1,
          swing_s: float = 5, swings: int = 40) -> dict[str, Any]:
    """A scripted seal (many events: openings, cuts, low battery, each raising a chained alarm),
    a reefer swinging in and out of its range (temperature readings and alarms), a depot
    geofence around the trip's start (enter/exit alarms) and a chain key."""
    kinds = ["opened", "sealed", "tampered", "sealed", "battery_low"]
    events = [{"at": at(seal_from_s + k * seal_every_s), "event": kinds[k % len(kinds)]} for k in range(seal_events)]
    profile = [{"at": at(k * swing_s), "c": 4.0 if k % 2 == 0 else 12.0} for k in range(swings)]
    return {
        "seals": [{"name": "container_door", "driver": "sim", "seal_id": "ES-0042-01", "events": events}],
        "temperature": [{"name": "reefer_front", "driver": "sim", "interval_s": temp_interval_s, "high_c": 8,
                         "min_duration_s": 0, "hysteresis_c": 0.5, "profile": profile}],
        "geofences": [{"name": "Chongqing depot", "kind": "depot", "seal_opening": "authorised",
                       "circle": {"lat": 29.4838, "lon": 106.4460, "radius_m": 300}}],
        "chain": {"hmac_key_file": str(chain_key(tmp))},
    }


def scripted_seal_times(sections: dict[str, Any], until: dt.datetime) -> list[str]:
    return [e["at"].strftime("%Y-%m-%dT%H:%M:%S.000Z") for e in sections["seals"][0]["events"] if e["at"] <= until]


# -- what the backend can prove -------------------------------------------------------------------


def db_query(db: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def dedup(readings: list[dict[str, Any]]) -> tuple[dict[str, dict[int, dict]], list[tuple[str, int]]]:
    """Readings by stream and seq (first copy wins, as a de-duplicating backend keeps them),
    and every (stream, seq) received again with other content."""
    by: dict[str, dict[int, dict]] = {}
    conflicts = []
    for r in readings:
        assert r["device"] == DEVICE
        first = by.setdefault(r["stream"], {}).setdefault(r["seq"], r)
        if first != r:
            conflicts.append((r["stream"], r["seq"]))
    return by, conflicts


def dropped_ranges(by: dict[str, dict[int, dict]]) -> dict[str, list[tuple[int, int]]]:
    """seq ranges the device announced it gave up: ``data_dropped`` alarms (docs/cargo.md)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for a in by.get("alarm", {}).values():
        if a.get("kind") == "data_dropped" and a.get("first_seq"):
            out.setdefault(a["dropped_stream"], []).append((a["first_seq"], a["last_seq"]))
    return out


def missing_seqs(backend: Backend, db: Path) -> dict[str, list[int]]:
    """Per stream, the seqs up to the store's last_seq that neither arrived nor were announced
    as given up. (A thinned range is announced whole only for the readings actually shed; the
    kept ones in it still arrive, and are not required here.)"""
    by, _ = dedup(backend.readings())
    ranges = dropped_ranges(by)
    missing = {}
    for stream, last in last_seqs(db).items():
        got = by.get(stream, {})
        lost = [s for s in range(1, last + 1)
                if s not in got and not any(lo <= s <= hi for lo, hi in ranges.get(stream, []))]
        if lost:
            missing[stream] = lost
    return missing


def check_delivery(backend: Backend, db: Path, *, timeout: float = 30, allow_dropped: bool = False) -> dict[str, Any]:
    """Everything the store numbered has arrived, identical when re-sent; the chain verifies;
    the store is sound. Returns counts for the record."""
    def complete() -> bool:
        return not missing_seqs(backend, db)

    try:
        wait_until(complete, timeout, "every seq of every stream at the backend")
    except AssertionError:
        miss = missing_seqs(backend, db)
        raise AssertionError(f"seqs missing at the backend (seed {SEED}): "
                             + "; ".join(f"{s}: {len(v)} e.g. {v[:10]}" for s, v in miss.items())) from None
    readings = backend.readings()
    by, conflicts = dedup(readings)
    assert not conflicts, f"re-sent readings with other content (seed {SEED}): {conflicts[:10]}"
    last = last_seqs(db)
    for stream, seqs in by.items():
        assert max(seqs) <= last.get(stream, 0), f"{stream}: seq beyond the store's last_seq"
    dropped = [a for a in by.get("alarm", {}).values() if a.get("kind") == "data_dropped"]
    if not allow_dropped:
        assert not dropped, f"nothing should have been shed: {dropped[:3]}"
    events = [r for s in ("seal", "alarm") for r in by.get(s, {}).values()]
    reports = verify(events, CHAIN_KEY.strip().encode())
    assert len(reports) == 1 and reports[0].ok, [r.problems[:5] for r in reports]
    chain_seq = dict(db_query(db, "SELECT key, value FROM state WHERE key = 'chain_seq'"))
    assert reports[0].last == int(chain_seq["chain_seq"]), "every chained event up to the store's chain_seq"
    assert integrity(db) == "ok"
    return {"streams": {s: len(v) for s, v in sorted(by.items())}, "received": len(readings),
            "duplicates": len(readings) - sum(len(v) for v in by.values()), "chain_events": reports[0].events}


def status(cfg: Path) -> dict[str, Any]:
    """``lorry-agent status --json``, as a technician would run it."""
    out = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(cfg), "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.stdout, out.stderr
    return json.loads(out.stdout)


def drain_config(tmp: Path, port: int) -> Path:
    """Same store and chain key, no sources: delivers what is left and exits."""
    return agent_config(tmp, port, name="drain.toml", chain={"hmac_key_file": str(tmp / "chain.key")})


# -- 1. power cuts ----------------------------------------------------------------------------------


def test_power_cuts_at_random_moments_lose_nothing(tmp_path: Path, broker: Mosquitto, trips) -> None:
    """SIGKILL at random moments, many times in a row, on the same store: while readings arrive
    (GPS replay, seal events, reefer, geofence, health) and while it drains, the broker up in
    every other cycle. Then one run --until-drained: nothing lost, nothing altered."""
    rng = random.Random(SEED)
    capture, truth = trips["3min"]
    db = tmp_path / "state" / "buffer.db"
    backend = Backend(broker.port, client_id="backend-power-cuts")
    sections = cargo(tmp_path, seal_every_s=3, seal_events=55, swing_s=5, swings=40)
    cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": 40},
                       mqtt_extra={"max_batch": 20}, health={"interval_s": 0.5}, **sections)
    try:
        # Start-up time (process start to "running"): the main cost of a cycle.
        startups = []
        for _ in range(3):
            t0 = time.monotonic()
            with AgentProcess(cfg) as agent:
                wait_until(lambda: "running as" in agent.log(), 20, "agent running")
                startups.append(time.monotonic() - t0)
                agent.kill()
        started_before_kill = 0
        t0 = time.monotonic()
        for i in range(POWER_CUTS):
            if (i % 2 == 0) != broker.running:
                broker.start() if i % 2 == 0 else broker.stop()
            agent = AgentProcess(cfg)
            time.sleep(rng.uniform(0.1, 1.0))
            assert agent.proc.poll() is None, \
                f"cycle {i}: the agent died on its own (seed {SEED}):\n{agent.log()[-3000:]}"
            agent.kill()
            started_before_kill += "running as" in agent.log()
            agent.log_path.unlink()
        cycles_s = time.monotonic() - t0
        depth_before_drain = store_depth(db)
        if not broker.running:
            broker.start()
        t1 = time.monotonic()
        with AgentProcess(cfg, "--until-drained") as agent:
            assert agent.wait(120) == 0, agent.log()[-4000:]
        drain_s = time.monotonic() - t1
        facts = check_delivery(backend, db)
        assert store_depth(db) == 0
        assert {"position", "seal", "alarm", "temperature", "health"} <= set(facts["streams"]), facts
        kinds = {a["kind"] for a in backend.readings("alarm")}
        assert {"seal_opened", "seal_cut", "seal_battery_low", "temperature", "geofence"} <= kinds, kinds
        log_result("power cuts", seed=SEED, cycles=POWER_CUTS, cycles_s=round(cycles_s, 1),
                   per_cycle_s=round(cycles_s / POWER_CUTS, 3), startup_s=[round(s, 3) for s in startups],
                   killed_after_running=started_before_kill, killed_during_startup=POWER_CUTS - started_before_kill,
                   backlog_before_final_run=depth_before_drain, final_run_s=round(drain_s, 1), **facts)
    finally:
        backend.close()


# -- 2. a flapping broker ---------------------------------------------------------------------------


def test_broker_flapping_loses_nothing(tmp_path: Path, broker: Mosquitto, trips) -> None:
    """The broker stopped and started every ~2 s for ~20 s while the agent replays."""
    rng = random.Random(SEED + 2)
    capture, truth = trips["12min"]  # 720 fixes at 40x: 18 s
    db = tmp_path / "state" / "buffer.db"
    backend = Backend(broker.port, client_id="backend-flapping")
    sections = cargo(tmp_path, seal_every_s=20, seal_events=35, swing_s=60, swings=12, temp_interval_s=10)
    cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": 40},
                       health={"interval_s": 1}, **sections)
    try:
        t0 = time.monotonic()
        with AgentProcess(cfg, "--until-drained") as agent:
            wait_until(lambda: len(backend.readings()) > 10, 15, "first readings")
            flips = []
            while time.monotonic() - t0 < 20 or not broker.running:
                time.sleep(rng.uniform(1.5, 2.5))
                if agent.proc.poll() is not None:  # replay over and all delivered: it exits 0
                    break
                broker.stop() if broker.running else broker.start()
                flips.append(round(time.monotonic() - t0, 1))
            if not broker.running:
                broker.start()
            assert agent.wait(90) == 0, agent.log()[-4000:]
        facts = check_delivery(backend, db)
        st = status(cfg)
        connects = st["uplink"]["connects"]
        assert connects >= len(flips) // 2, f"reconnected after each outage: {st['uplink']}"
        assert len(backend.readings("seal")) >= 35 and len(backend.readings("position")) >= len(truth)
        log_result("broker flapping", seed=SEED, flips_at_s=flips, connects=connects,
                   total_s=round(time.monotonic() - t0, 1), **facts)
    finally:
        backend.close()


# -- 3. a black-holed network -----------------------------------------------------------------------


class BlackHoleProxy:
    """A TCP relay on loopback that can stop forwarding without closing anything: bytes stay
    in the kernel's buffers, as on a link that silently drops packets (a dead mobile cell)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.forwarding = threading.Event()
        self.forwarding.set()
        self.connections = 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def black_hole(self) -> None:
        self.forwarding.clear()

    def forward(self) -> None:
        self.forwarding.set()

    def close(self) -> None:
        self._stop.set()
        self.forwarding.set()
        self._listener.close()
        for t in self._threads:
            t.join(2)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pipe, args=(src, dst), daemon=True)
                t.start()
                self._threads.append(t)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                if not self.forwarding.is_set():
                    time.sleep(0.05)  # neither read nor close: the peer's bytes wait in the kernel
                    continue
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready or not self.forwarding.is_set():
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket closed meanwhile
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def test_black_holed_network_is_noticed_and_nothing_is_lost(tmp_path: Path, broker: Mosquitto, trips) -> None:
    """The link goes silent for 15 s (no FIN, no RST): keepalive (5 s) must notice, the agent
    reconnects once packets flow again, and everything arrives."""
    capture, truth = trips["10min"]  # 600 fixes at 30x: 20 s
    db = tmp_path / "state" / "buffer.db"
    proxy = BlackHoleProxy(broker.port)
    backend = Backend(broker.port, client_id="backend-black-hole")
    sections = cargo(tmp_path, seal_every_s=20, seal_events=30, swing_s=60, swings=10, temp_interval_s=10)
    cfg = agent_config(tmp_path, proxy.port, gps={"replay": str(capture), "replay_speed": 30},
                       mqtt_extra={"keepalive_s": 5}, health={"interval_s": 1}, **sections)
    try:
        with AgentProcess(cfg, "--until-drained") as agent:
            wait_until(lambda: len(backend.readings("position")) > 30, 20, "readings flowing")
            proxy.black_hole()
            t_hole = time.monotonic()
            received_at_hole = len(backend.readings())
            seen: list[tuple[float, bool, int]] = []
            while time.monotonic() - t_hole < 15:
                up = status(cfg)["uplink"]
                seen.append((round(time.monotonic() - t_hole, 1), up["connected"], up["disconnects"]))
                assert agent.proc.poll() is None, agent.log()[-4000:]
                time.sleep(0.5)
            received_in_hole = len(backend.readings()) - received_at_hole
            proxy.forward()
            t_back = time.monotonic()
            wait_until(lambda: status(cfg)["uplink"]["connected"] and status(cfg)["uplink"]["connects"] >= 2, 20,
                       "reconnected")
            reconnect_s = time.monotonic() - t_back
            assert agent.wait(60) == 0, agent.log()[-4000:]
        noticed = [t for t, connected, disconnects in seen if not connected or disconnects >= 1]
        assert noticed, f"the agent never noticed the dead link within 15 s: {seen}"
        facts = check_delivery(backend, db)
        final = status(cfg)["uplink"]
        assert final["connects"] >= 2 and final["disconnects"] >= 1, final
        log_result("black hole", noticed_after_s=noticed[0], received_during_hole=received_in_hole,
                   reconnected_after_s=round(reconnect_s, 1), connects=final["connects"],
                   proxy_connections=proxy.connections, **facts)
    finally:
        backend.close()
        proxy.close()


# -- 4. a full disk ---------------------------------------------------------------------------------


def _mount_tmpfs(where: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the store needs root (CI runs as root)")
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): no full disk to test")


def _umount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="module")
def disk_full_run(tmp_path_factory: pytest.TempPathFactory, trips) -> dict[str, Any]:
    """One run on a 2 MB tmpfs that holds the store and a filler file taking half of it: the
    broker is down (a dead zone), the agent replays 45 min of driving at 200x with a seal,
    a reefer and health, so the disk fills within a second. It stays full for 8 s (status
    sampled), then space returns (the filler deleted, the tmpfs grown) and the broker comes up."""
    tmp = tmp_path_factory.mktemp("disk-full")
    state = tmp / "state"
    _mount_tmpfs(state, "2m")
    broker = Mosquitto(tmp / "broker")
    out: dict[str, Any] = {"tmp": tmp}
    try:
        broker.start()
        Backend(broker.port, client_id="backend-disk-full").close()
        broker.stop()
        filler = state / "filler"
        filler.write_bytes(b"\0" * 1200 * 1024)
        capture, truth = trips["45min"]
        sections = cargo(tmp, seal_every_s=150, seal_events=17, seal_from_s=30, swing_s=300, swings=10,
                         temp_interval_s=30)
        cfg = agent_config(tmp, broker.port, gps={"replay": str(capture), "replay_speed": 200},
                           health={"interval_s": 1}, **sections)
        out.update(cfg=cfg, truth=truth, sections=sections, db=state / "buffer.db")
        snapshots = []
        t0 = time.monotonic()
        with AgentProcess(cfg) as agent:
            wait_until(lambda: "database or disk is full" in agent.log(), 20, "the disk to fill")
            out["full_after_s"] = round(time.monotonic() - t0, 1)
            t_full = time.monotonic()
            while time.monotonic() - t_full < 8:
                st = status(cfg)
                snapshots.append({"t": round(time.monotonic() - t_full, 1), "alive": agent.proc.poll() is None,
                                  "store": st["store_health"],
                                  "depth": {s: b["depth"] for s, b in st["buffer"].items()},
                                  "seals_on_disk": len(store_readings(state / "buffer.db", "seal")),
                                  "seals_emitted": agent.log().count("seal container_door (sim):")})
                time.sleep(1)
            out["snapshots"] = snapshots
            # Space returns.
            filler.unlink()
            subprocess.run(["mount", "-o", "remount,size=64m", str(state)], check=True)
            broker.start()
            backend = Backend(broker.port, client_id="backend-disk-full")
            try:
                seal_times = scripted_seal_times(sections, truth[-1].ts)
                wait_until(lambda: {r["ts"] for r in backend.readings("seal")} >= set(seal_times), 60,
                           "every scripted seal event at the backend")
                wait_until(lambda: not status(cfg)["drivers"]["gps"]["connected"], 60, "the replay to end")
                # Health (1 s) and acknowledgements (deleted 0.5 s later) keep a few rows coming and going.
                try:
                    wait_until(lambda: store_depth(state / "buffer.db") < 10, 60, "the backlog delivered")
                except AssertionError:
                    raise AssertionError(f"backlog not delivered: {status(cfg)['buffer']}") from None
                out["alive_after_recovery"] = agent.proc.poll() is None
                assert agent.terminate(30) == 0, agent.log()[-4000:]
                out["log"] = agent.log()
                out["final_status"] = status(cfg)  # the agent's own, saved as it stopped
                with AgentProcess(drain_config(tmp, broker.port), "--until-drained") as drain:
                    assert drain.wait(60) == 0, drain.log()[-4000:]
                out["facts"] = check_delivery(backend, state / "buffer.db", allow_dropped=True)
                out["readings"] = backend.readings()
            finally:
                backend.close()
        out["total_s"] = round(time.monotonic() - t0, 1)
        log_result("disk full", full_after_s=out["full_after_s"], total_s=out["total_s"],
                   snapshots=[(s["t"], s["store"] and {k: s["store"][k] for k in ("dropped", "disk_full_errors")},
                               s["depth"].get("position"), s["seals_on_disk"], s["seals_emitted"]) for s in snapshots],
                   final_store=out["final_status"]["store_health"], **out["facts"])
        return out
    finally:
        broker.stop()
        _umount(state)


def test_disk_full_agent_keeps_running_keeps_evidence_and_recovers(disk_full_run) -> None:
    run = disk_full_run
    assert all(s["alive"] for s in run["snapshots"]) and run["alive_after_recovery"], "the agent kept running"
    store = run["final_status"]["store_health"]
    assert store["disk_full_errors"] > 0, store
    # Every scripted seal event arrived, at its time, and with it its alarm; the chain verified
    # (check_delivery) and every seq gap is announced.
    readings = run["readings"]
    seals = sorted({r["seq"]: r for r in readings if r["stream"] == "seal"}.values(), key=lambda r: r["seq"])
    assert [s["ts"] for s in seals] == scripted_seal_times(run["sections"], run["truth"][-1].ts)
    alarms = [r for r in readings if r["stream"] == "alarm"]
    assert {a["ts"] for a in alarms if a["kind"] in ("seal_opened", "seal_cut", "seal_battery_low")} == \
        {s["ts"] for s in seals if s["event"] != "sealed"}
    # Recovered: what was read after the space returned got in too, the last fix included.
    last = run["truth"][-1].ts.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert last in {r["ts"] for r in readings if r["stream"] == "position"}


def test_disk_full_thins_positions_while_full_and_keeps_evidence_on_disk(disk_full_run) -> None:
    run = disk_full_run
    full = run["snapshots"]
    # While the disk is full: status says so, positions have been thinned to make room...
    assert any(s["store"] and s["store"]["disk_full_errors"] > 0 and s["store"]["dropped"].get("position", 0) > 0
               for s in full), full
    # ...each seal event the driver produced is on disk (power-cut safe) within a second...
    assert full[-1]["seals_on_disk"] >= full[-2]["seals_emitted"], full
    # ...and the backend later learns which positions were given up.
    dropped = [r for r in run["readings"] if r["stream"] == "alarm" and r["kind"] == "data_dropped"]
    assert any(d["dropped_stream"] == "position" and d["reason"] == "store_full" for d in dropped), dropped


# -- 5. a damaged store at start ----------------------------------------------------------------------


def _damage(tmp: Path, port: int, how: str, trips) -> None:
    db = tmp / "state" / "buffer.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    if how == "garbage":
        db.write_bytes(random.Random(SEED + 5).randbytes(256 * 1024))
        return
    # A real store with a backlog (the broker unreachable), stopped cleanly, then truncated as
    # a failing card or an interrupted copy would leave it.
    trip_long, _ = trips["45min"]
    cfg = agent_config(tmp, 1, name="before.toml", gps={"replay": str(trip_long), "replay_speed": 0})
    with AgentProcess(cfg) as agent:
        wait_until(lambda: store_depth(db) >= 2700, 30, "a backlog in the store")
        assert agent.terminate() == 0
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def _is_damaged(db: Path) -> bool:
    try:
        return integrity(db) != "ok"
    except sqlite3.DatabaseError:
        return True


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_damaged_store_is_moved_aside_and_the_agent_carries_on(tmp_path: Path, broker: Mosquitto, backend: Backend,
                                                               trips, how: str) -> None:
    db = tmp_path / "state" / "buffer.db"
    _damage(tmp_path, broker.port, how, trips)
    assert _is_damaged(db), "the test must start from a store SQLite finds damaged"
    capture, truth = trips["10min"]
    sections = cargo(tmp_path, seal_every_s=20, seal_events=10, swing_s=60, swings=10, temp_interval_s=10)
    cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": 20}, **sections)
    t0 = time.monotonic()
    with AgentProcess(cfg) as agent:
        wait_until(lambda: any(a["kind"] == "store_damaged" for a in backend.readings("alarm")), 20,
                   "the store_damaged alarm at the backend")
        alarm_s = time.monotonic() - t0
        aside = sorted(p for p in db.parent.iterdir()
                       if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm")))
        assert len(aside) == 1, aside
        damaged = [a for a in backend.readings("alarm") if a["kind"] == "store_damaged"]
        assert len(damaged) == 1 and damaged[0]["severity"] == "critical" and damaged[0]["state"] == "raised"
        assert damaged[0]["moved_to"] == str(aside[0])
        # No crash loop: still the same process, and normal readings keep flowing.
        n = len(backend.readings("position"))
        wait_until(lambda: len(backend.readings("position")) > n + 20, 10, "positions flowing")
        time.sleep(2)
        assert agent.proc.poll() is None, agent.log()[-4000:]
        st = status(cfg)
        assert st["store_health"]["damaged_files"] == [str(aside[0])]
        assert agent.terminate() == 0
    assert len([p for p in db.parent.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm"))]) == 1
    with AgentProcess(drain_config(tmp_path, broker.port), "--until-drained") as drain:  # what SIGTERM left
        assert drain.wait(60) == 0, drain.log()[-4000:]
    facts = check_delivery(backend, db, allow_dropped=how == "truncated")
    positions = sorted(r["seq"] for r in backend.readings("position"))
    gaps = {a["dropped_stream"]: a for a in backend.readings("alarm") if a["kind"] == "data_dropped"}
    if how == "garbage":  # no ledger next to it either: as on a first start
        assert positions[0] == 1 and not gaps, gaps
    else:  # numbered above everything the damaged store may have used, and the gap announced
        assert gaps["position"]["reason"] == "store_damaged" and gaps["position"]["first_seq"] == 1, gaps
        assert positions[0] == gaps["position"]["last_seq"] + 1, (positions[:3], gaps["position"])
    log_result(f"damaged store ({how})", alarm_at_backend_after_s=round(alarm_s, 2), moved_to=aside[0].name, **facts)


def test_a_fresh_store_after_damage_does_not_reuse_seq_numbers(tmp_path: Path, broker: Mosquitto, backend: Backend,
                                                               trips) -> None:
    capture, truth = trips["3min"]
    sections = cargo(tmp_path, seal_every_s=20, seal_events=5, swing_s=60, swings=4, temp_interval_s=30)
    cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": 0}, **sections)
    with AgentProcess(cfg, "--until-drained") as agent:  # everything delivered: seq 1..N at the backend
        assert agent.wait(60) == 0, agent.log()[-4000:]
    wait_until(lambda: len(backend.readings("position")) >= len(truth), 10, "the first run delivered")
    db = tmp_path / "state" / "buffer.db"
    # Events committed as the first run stopped, never sent: lost with the file, and nothing else.
    unsent = [json.loads(b) for (b,) in db_query(db, "SELECT body FROM readings WHERE stream IN ('seal', 'alarm')")]
    db.write_bytes(random.Random(SEED + 55).randbytes(64 * 1024))  # the card returns garbage
    with AgentProcess(cfg, "--until-drained") as agent:
        assert agent.wait(60) == 0, agent.log()[-4000:]
    wait_until(lambda: any(a["kind"] == "store_damaged" for a in backend.readings("alarm")), 10, "store_damaged")
    kept, conflicts = dedup(backend.readings())  # what a backend keeps: the first copy of each seq
    assert not conflicts, f"{len(conflicts)} (stream, seq) pairs reused with other content, e.g. {conflicts[:5]}"
    assert any(a["kind"] == "store_damaged" for a in kept["alarm"].values()), "the alarm survives de-duplication"
    # The chain links straight on across the damaged file (agent/store/seqledger.py keeps its head):
    # with the events only that file held, it verifies whole; every gap in seq is announced.
    events = [r for s in ("seal", "alarm") for r in kept.get(s, {}).values()]
    (report,) = verify(events + unsent, CHAIN_KEY.strip().encode())
    assert report.ok, report.problems[:5]
    gaps = {a["dropped_stream"] for a in kept["alarm"].values() if a["kind"] == "data_dropped"}
    assert {"position", "seal", "alarm"} <= gaps, gaps
