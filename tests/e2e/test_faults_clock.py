"""Fault injection, continued: a wall clock that jumps by days, and memory over an accelerated soak.

Real agent processes against a real mosquitto, on loopback, checked the way tests/e2e/test_faults.py
checks them (its ``check_delivery``: every seq of every stream at the backend, re-sends
identical, the seal/alarm chain verified, the store sound).

1. The wall clock jumps by days, forwards and backwards, several times while the agent replays
   a trip with a scripted seal, a reefer, a geofence and health: the agent runs under
   libfaketime with only the wall clock faked (``FAKETIME_DONT_FAKE_MONOTONIC``), its offset
   rewritten in ``FAKETIME_TIMESTAMP_FILE`` as the test goes. Readings are stamped from the
   monotonic clock tied to GPS time (agent/model/clock.py, docs/reporting.md), so no reading time may
   move: positions keep their GPS times, seal events their scripted times, everything else stays
   on the GPS timeline. Once with the broker up, once with it down during the jumps (the backlog
   is delivered later, under yet another jumped clock). That the jumps really reach the agent is
   checked, not assumed: each health reading reports the system clock's error against GPS time,
   and those errors must step by exactly the jumps.
2. Six hours of 1 Hz driving replayed at 720x with a CAN capture, seals, a reefer and health at
   short intervals; the broker goes down for 4 s of every 8 (a backlog builds in the store) and
   comes back (it drains). The agent's RSS is sampled every second and must level off: a cycle
   late in the run may not use more memory than one in the middle.

Figures are printed with ``log_result`` (visible with ``pytest -s``).
"""

from __future__ import annotations

import datetime as dt
import glob
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from test_faults import START, cargo, check_delivery, dedup, last_seqs, log_result, scripted_seal_times, status

import canlog as cl
from agent.demo import trip
from agent.demo.broker import Mosquitto
from support import AgentProcess, Backend, agent_config, store_depth, wait_until

pytestmark = pytest.mark.slow

DAY_S = 86_400
FAKETIME_LIBS = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
# The wall clock's offsets from the real time, in the order the test sets them (libfaketime's
# relative syntax); the agent starts at "+0".
JUMPS = ("+3d", "-5d", "+2d", "-9d", "+6d")
JUMP_EVERY_S = 2.5
AFTER_TRIP_JUMP = "-3d"  # with the broker down: set just before it comes back, while the backlog drains
CLOCK_TRIP_S = 720  # 12 min of 1 Hz fixes…
CLOCK_SPEED = 40  # …replayed in 18 s: "+0" and every jump get 2.5 s of it
SOAK_TRIP_S = 6 * 3600
SOAK_SPEED = 720  # 6 h in 30 s
# Broker cycles: up for the first half of each, down for the second; cycle 0 is the warm-up,
# cycles 1-3 are the thirds compared; after them the broker stays up for the final drain.
SOAK_CYCLE_S, SOAK_CYCLES = 8.0, 4
SOAK_MAX_GROWTH_MB, SOAK_MAX_GROWTH_PCT, SOAK_MAX_PEAK_MB = 5.0, 10.0, 80.0


def iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def parse_iso(s: str) -> dt.datetime:
    return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)


def offset_s(spec: str) -> int:
    """libfaketime's relative offset ("+3d", "-5d", "+0") in seconds."""
    m = re.fullmatch(r"([+-]\d+)([smhdy]?)", spec)
    assert m, spec
    return int(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": DAY_S, "y": 365 * DAY_S}[m[2]]


@pytest.fixture(scope="module")
def clock_trip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[trip.TruthFix]]:
    path = tmp_path_factory.mktemp("trips") / "trip-12min.nmea"
    return path, trip.write(path, interval_s=1, max_hours=CLOCK_TRIP_S / 3600)


# -- the wall clock, under libfaketime ---------------------------------------------------------------

# libfaketime 0.9.10 (Debian's) with FAKETIME_DONT_FAKE_MONOTONIC hands the kernel a wrong
# absolute time in clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME), which Python >= 3.11's
# time.sleep uses: EINVAL, so every time.sleep raises (wolfcw/libfaketime#426). paho's reconnect
# wait and the store's retry call time.sleep: the agent would die of the test tool's bug. Where
# the bug is present, the agent process gets this sitecustomize, which sleeps the same relative
# time with select(), which libfaketime leaves alone. Nothing else about the agent changes.
SLEEP_SHIM = '''\
"""Test-only (tests/e2e/test_faults_clock.py): time.sleep without clock_nanosleep, see there."""
import select
import time


def _sleep(seconds):
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    select.select([], [], [], seconds)


time.sleep = _sleep
'''


class FakeWallClock:
    """The wall clock of the processes started with ``env``: real time plus an offset that the
    test changes at any moment (FAKETIME_NO_CACHE: read again at every call). The monotonic
    clock is left alone, as a real clock step leaves it."""

    def __init__(self, folder: Path):
        if not FAKETIME_LIBS:
            pytest.skip("libfaketime not found (/usr/lib/*/faketime/libfaketime.so.1): apt-get install faketime")
        folder.mkdir(parents=True, exist_ok=True)
        self.file = folder / "faketime.rc"
        self.spec = ""
        self.set("+0")
        self.env = {
            "LD_PRELOAD": FAKETIME_LIBS[0],
            "FAKETIME_TIMESTAMP_FILE": str(self.file),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }
        self.sleep_shim = self._sleep_is_broken()
        if self.sleep_shim:
            shim = folder / "faketime-shim"
            shim.mkdir(exist_ok=True)
            (shim / "sitecustomize.py").write_text(SLEEP_SHIM)
            self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)

    def set(self, spec: str) -> None:
        """Jump: replace the file in one step, so that no reader ever sees it half written."""
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(spec + "\n")
        os.replace(tmp, self.file)
        self.spec = spec

    def _run(self, code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=30)

    def _sleep_is_broken(self) -> bool:
        r = self._run("import time; time.sleep(0.001)", self.env)
        if r.returncode != 0 and "Invalid argument" not in r.stderr:
            pytest.fail(f"python under libfaketime fails: {r.stderr[-2000:]}")
        return r.returncode != 0

    def probe(self) -> tuple[float, float]:
        """(wall, monotonic) of a process started with ``env``, minus this process's own."""
        r = self._run("import time; time.sleep(0.01); print(time.time(), time.monotonic())", self.env)
        assert r.returncode == 0, r.stderr[-2000:]
        wall, mono = map(float, r.stdout.split())
        return wall - time.time(), mono - time.monotonic()

    def check_it_works(self) -> None:
        """Precondition: the offset reaches a process, follows the file at once, and the
        monotonic clock is not moved; otherwise the test below could pass without a jump."""
        for spec in ("+3d", "-5d", "+0"):
            self.set(spec)
            wall, mono = self.probe()
            assert abs(wall - offset_s(spec)) < 30, f"faketime {spec!r} not in effect: wall clock off by {wall:.0f} s"
            assert abs(mono) < 30, f"faketime moved the monotonic clock by {mono:.0f} s"


def numbered(db: Path, stream: str = "position") -> int:
    """The store's last seq of a stream (0 before the store has its tables)."""
    try:
        return last_seqs(db).get(stream, 0) if db.exists() else 0
    except sqlite3.OperationalError:
        return 0


def agent_clock_errors(health: list[dict[str, Any]]) -> list[float]:
    """What each health reading says of the system clock against GPS time, in seq order."""
    return [h["clock"]["system_error_s"] for h in health if h.get("clock", {}).get("system_error_s") is not None]


# -- 1. a wall clock that jumps by days -----------------------------------------------------------------


@pytest.mark.parametrize("outage", [False, True], ids=["broker-up", "broker-down-during-jumps"])
def test_wall_clock_jumping_by_days_moves_no_reading_time(tmp_path: Path, broker: Mosquitto, clock_trip,
                                                          outage: bool) -> None:
    """Jumps of +3, -5, +2, -9 and +6 days (and -3 with the backlog) while a trip replays:
    nothing the agent stamps moves, nothing is lost, the chain verifies."""
    capture, truth = clock_trip
    start, end = truth[0].ts, truth[-1].ts
    clock = FakeWallClock(tmp_path / "faketime")
    clock.check_it_works()
    db = tmp_path / "state" / "buffer.db"
    backend = Backend(broker.port, client_id=f"backend-clock-{'outage' if outage else 'up'}")
    # Seal events every 20 s of trip time up to 11 min in, the reefer every 5 s swinging across
    # its 8 °C limit every 30 s, a depot geofence at the start, health every second (the
    # agent's tick: as often as it goes).
    sections = cargo(tmp_path, seal_every_s=20, seal_events=34, swing_s=30, swings=25, temp_interval_s=5)
    # "never": no reading time may come from the system clock; without GPS time a reading
    # waits for it (a Pi without RTC or NTP, the case this guards against).
    cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": CLOCK_SPEED},
                       health={"interval_s": 1}, time={"trust_system_clock": "never"}, **sections)
    jumps: list[tuple[float, str]] = []
    backlog = None
    try:
        if outage:
            broker.stop()
        t0 = time.monotonic()
        with AgentProcess(cfg, "--until-drained", env=clock.env) as agent:
            wait_until(lambda: numbered(db) > 10, 20, "first positions")
            time.sleep(JUMP_EVERY_S)  # health readings under the true clock first: the reference
            for spec in JUMPS:
                assert agent.proc.poll() is None, f"the agent died before the jump to {spec}:\n{agent.log()[-4000:]}"
                clock.set(spec)
                jumps.append((round(time.monotonic() - t0, 1), spec))
                t_jump = time.monotonic()
                # The agent carries on at once: positions keep being numbered, and delivered.
                before, delivered = numbered(db), len(backend.readings("position"))
                wait_until(lambda before=before: numbered(db) >= before + 10, 5,
                           f"positions numbered after the jump to {spec}")
                if not outage:
                    wait_until(lambda delivered=delivered: len(backend.readings("position")) >= delivered + 10, 5,
                               f"positions delivered after the jump to {spec}")
                while time.monotonic() - t_jump < JUMP_EVERY_S:
                    assert agent.proc.poll() is None, f"the agent died after the jump to {spec}:\n{agent.log()[-4000:]}"
                    time.sleep(0.1)
            wait_until(lambda: numbered(db) >= len(truth), 30, "the end of the trip")
            assert agent.proc.poll() is None, agent.log()[-4000:]
            if outage:
                assert not backend.readings(), "nothing can arrive while the broker is down"
                clock.set(AFTER_TRIP_JUMP)
                jumps.append((round(time.monotonic() - t0, 1), AFTER_TRIP_JUMP))
                backlog = store_depth(db)
                broker.start()
            assert agent.wait(60) == 0, agent.log()[-4000:]
            log = agent.log()
        total_s = round(time.monotonic() - t0, 1)
        assert "Traceback" not in log and "crashed" not in log, log[-4000:]
        left = store_depth(db)
        assert left == 0, f"the agent exited as drained with {left} readings unsent"
        facts = check_delivery(backend, db)
        by, _ = dedup(backend.readings())

        def in_seq(stream: str) -> list[dict[str, Any]]:
            return [r for _s, r in sorted(by.get(stream, {}).items())]

        # Positions: exactly the trip's GPS times, in seq order.
        positions = in_seq("position")
        assert [p["ts"] for p in positions] == [iso(f.ts) for f in truth], "positions carry the GPS times, in order"
        # Seal events at their scripted times (and each opening, cut or low battery its alarm).
        seals = in_seq("seal")
        assert [s["ts"] for s in seals] == scripted_seal_times(sections, end)
        alarms = in_seq("alarm")
        assert {a["ts"] for a in alarms if a["kind"].startswith("seal_")} == \
            {s["ts"] for s in seals if s["event"] != "sealed"}
        # Everything else on the GPS timeline: not a day off, never flagged untrusted, and in
        # time order where one source stamps them.
        lo, hi = start - dt.timedelta(seconds=5), end + dt.timedelta(seconds=10)
        off = [(st, r["seq"], r["ts"]) for st, rs in by.items() for r in rs.values()
               if not lo <= parse_iso(r["ts"]) <= hi or "ts_trusted" in r]
        assert not off, f"readings stamped off the GPS timeline [{iso(lo)}, {iso(hi)}]: {off[:10]}"
        health, temperature = in_seq("health"), in_seq("temperature")
        assert len(health) >= 15 and len(temperature) >= 100 and len(alarms) >= 20, facts
        # A health reading taken with GPS time carries the time of the last fix it reports, give
        # or take the fixes read or observed while it was taken and stamped (10 s of trip time is
        # 0.25 s of the agent's at 40x), whatever the wall clock said then.
        lag = [(h["seq"], h["ts"], h["gps"]["last_fix_ts"]) for h in health
               if h["clock"]["source"] == "gps" and h.get("gps", {}).get("last_fix_ts")]
        assert len(lag) >= 12, health[:3]
        lag_s = [(parse_iso(ts) - parse_iso(fix)).total_seconds() for _seq, ts, fix in lag]
        far = [x for x, d in zip(lag, lag_s) if not -10 <= d <= 10]
        assert not far, f"health readings (seq, ts, last fix) not within seconds of GPS time: {far[:10]}"
        for stream, rs in (("health", health), ("temperature", temperature)):
            times = [r["ts"] for r in rs]
            assert times == sorted(times), f"{stream}: times go back with seq"
        # The jumps did reach the agent: the system clock's error against GPS time, as health
        # reports it, steps by exactly the jumps (the replay at 40x adds under 0.01 d).
        errors = agent_clock_errors(health)
        steps = sorted({round((e - errors[0]) / DAY_S) for e in errors})
        assert steps == sorted({0, *(offset_s(s) // DAY_S for s in JUMPS)}), \
            f"the agent did not see every jump of its wall clock: error steps {steps} (days)"
        # And so did its status: the final one was written under the last offset.
        final = status(cfg)
        stopped_off_d = (parse_iso(final["status_updated"]).timestamp() - time.time()) / DAY_S
        assert round(stopped_off_d) == offset_s(clock.spec) // DAY_S, final["status_updated"]
        if outage:
            assert backlog >= len(truth), f"the backlog was built while the broker was down: {backlog}"
            assert final["uplink"]["connects"] >= 1
        else:
            # Live delivery was never interrupted by a jump: one connection from start to end (the
            # one disconnect counted is the clean one at the stop).
            assert final["uplink"]["connects"] == 1 and final["uplink"]["disconnects"] <= 1, final["uplink"]
        log_result(f"wall clock jumps ({'broker down during the jumps' if outage else 'broker up'})",
                   jumps_at_s=jumps, total_s=total_s, sleep_shim=clock.sleep_shim,
                   clock_error_steps_d=steps, health_minus_last_fix_s=(min(lag_s), max(lag_s)),
                   backlog_at_broker_start=backlog,
                   status_updated=final["status_updated"], connects=final["uplink"]["connects"], **facts)
    finally:
        clock.set("+0")
        backend.close()


# -- 2. memory over an accelerated soak -----------------------------------------------------------------


@pytest.fixture(scope="module")
def soak_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[trip.TruthFix], Path]:
    """Six hours of 1 Hz driving, and a J1939 capture of the same six hours on the trip's own
    times (engine speed and wheel speed every second, coolant and fuel every 10 s, DM1 from the
    brakes every second with a DTC active in the second hour)."""
    folder = tmp_path_factory.mktemp("soak")
    capture = folder / "trip-6h.nmea"
    truth = trip.write(capture, interval_s=1, max_hours=SOAK_TRIP_S / 3600)
    base = START.timestamp()
    eec1, ccvs1 = cl.j1939_id(3, cl.EEC1, cl.ENGINE), cl.j1939_id(6, cl.CCVS1, cl.ENGINE)
    et1, dd1 = cl.j1939_id(6, cl.ET1, cl.ENGINE), cl.j1939_id(6, cl.DD1, cl.BODY)
    dm1 = cl.j1939_id(6, cl.DM1, cl.BRAKES)
    frames = []
    for s, fix in enumerate(truth):
        t, speed = base + s, fix.speed_kmh
        frames.append(cl.Frame(round(t + 0.010, 6), eec1, cl.eec1_data(min(1800.0, 600 + 14 * speed), 30, 25)))
        frames.append(cl.Frame(round(t + 0.020, 6), ccvs1, cl.ccvs1_data(round(speed, 2))))
        frames.append(cl.Frame(round(t + 0.030, 6), dm1, cl.dm1_payload([cl.BRAKE_DTC] if 3600 <= s < 7200 else [])))
        if s % 10 == 0:
            frames.append(cl.Frame(round(t + 0.040, 6), et1, cl.et1_data(80 + (s // 900) % 8)))
            frames.append(cl.Frame(round(t + 0.050, 6), dd1, cl.dd1_data(round(90 - 50 * s / SOAK_TRIP_S, 1))))
    can_log = cl.write_log(folder / "truck-6h.log", frames)
    return capture, truth, can_log


def test_memory_stays_flat_over_an_accelerated_soak(tmp_path: Path, broker: Mosquitto, soak_inputs) -> None:
    """Six hours of driving in half a minute, the broker down for 4 s of every 8: every
    reading delivered, and the agent's RSS levels off instead of climbing."""
    capture, truth, can_log = soak_inputs
    db = tmp_path / "state" / "buffer.db"
    backend = Backend(broker.port, client_id="backend-soak")
    # A seal event every minute (every 5th a low battery, openings and cuts in between), the reefer
    # every 10 s swinging across its limit every 10 min, health every second (the agent's tick).
    # Reading times from GPS only, as in test 1: a health reading stamped with today's date
    # would make the whole 2026 trip "older than max_age_days" once the calendar is past it.
    sections = cargo(tmp_path, seal_every_s=60, seal_events=350, seal_from_s=30, swing_s=600, swings=37,
                     temp_interval_s=10)
    cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": SOAK_SPEED},
                       can={"interface": "replay", "replay": str(can_log), "replay_speed": SOAK_SPEED,
                            "min_interval_s": 2, "max_interval_s": 10},
                       health={"interval_s": 1}, time={"trust_system_clock": "never"}, **sections)
    samples: list[tuple[float, float, str, int]] = []  # (s since start, RSS MB, broker, store depth)

    def broker_up(t: float) -> bool:
        return t >= SOAK_CYCLES * SOAK_CYCLE_S or t % SOAK_CYCLE_S < SOAK_CYCLE_S / 2

    try:
        t0 = time.monotonic()
        with AgentProcess(cfg, "--until-drained") as agent:
            proc = psutil.Process(agent.proc.pid)
            n = 0
            while agent.proc.poll() is None:
                t = time.monotonic() - t0
                assert t < 150, f"the soak did not finish within 150 s:\n{agent.log()[-4000:]}"
                if broker_up(t) != broker.running:
                    broker.start() if broker_up(t) else broker.stop()
                try:
                    rss = proc.memory_info().rss / 2**20
                except psutil.NoSuchProcess:
                    break
                samples.append((round(t, 1), round(rss, 1), "up" if broker.running else "down", store_depth(db)))
                n += 1
                time.sleep(max(0.0, t0 + n - time.monotonic()))
            assert agent.wait(30) == 0, agent.log()[-4000:]
            log = agent.log()
        total_s = round(time.monotonic() - t0, 1)
        assert "Traceback" not in log and "crashed" not in log, log[-4000:]
        left = store_depth(db)
        assert left == 0, f"the agent exited as drained with {left} readings unsent"
        facts = check_delivery(backend, db, timeout=30)
        assert facts["streams"].get("position") == len(truth), facts
        assert {"position", "seal", "alarm", "temperature", "health", "can"} <= set(facts["streams"]), facts
        kinds = {a["kind"] for a in backend.readings("alarm")}
        assert {"seal_opened", "seal_cut", "seal_battery_low", "temperature", "geofence", "dtc"} <= kinds, kinds
        # The outages were real: each built a backlog (the last is cut short by the trip's end),
        # drained when the broker came back.
        cycles = [[x for x in samples if k * SOAK_CYCLE_S <= x[0] < (k + 1) * SOAK_CYCLE_S] for k in range(SOAK_CYCLES)]
        backlogs = [max((d for _t, _r, b, d in c if b == "down"), default=0) for c in cycles]
        assert min(backlogs) >= 1000, f"a backlog of a thousand readings or more in every outage: {backlogs}"
        # RSS levels off. Each cycle after the warm-up holds the same work (a drain, live
        # readings, an outage), so the bounded working set of a drain is in every one of them;
        # what one keeps for good adds up. The last third of the run (cycle 3) may sit at most
        # 5 MB (or 10 %) above the middle third (cycle 2): keeping 1 KB per reading makes it +9 MB.
        assert all(len(c) >= SOAK_CYCLE_S - 1 for c in cycles), f"missing RSS samples: {samples}"
        medians = [statistics.median(r for _t, r, _b, _d in c) for c in cycles]
        middle, last = medians[2], medians[3]
        growth_mb, growth_pct = last - middle, 100 * (last - middle) / middle
        peak = max(r for _t, r, _b, _d in samples)
        log_result("soak memory", trip_h=SOAK_TRIP_S / 3600, replay_speed=SOAK_SPEED, total_s=total_s,
                   samples=len(samples), rss_mb_cycle_medians=[round(m, 1) for m in medians],
                   growth_mb=round(growth_mb, 1), growth_pct=round(growth_pct, 1), peak_mb=peak, backlogs=backlogs,
                   rss_series=[r for _t, r, _b, _d in samples], **facts)
        assert growth_mb < SOAK_MAX_GROWTH_MB or growth_pct < SOAK_MAX_GROWTH_PCT, \
            f"RSS keeps growing: {middle:.1f} MB → {last:.1f} MB; samples (s, MB, broker, depth): {samples}"
        assert peak < SOAK_MAX_PEAK_MB, f"peak RSS {peak:.1f} MB; samples: {samples}"
    finally:
        if not broker.running:
            broker.start()
        backend.close()
