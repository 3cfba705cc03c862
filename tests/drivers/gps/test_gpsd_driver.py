"""The gpsd driver against the real gpsd, fed real captures by gpsfake and checked against
gpsd's own reference output (.chk); and against a tiny fake gpsd for damage, non-positions,
dropped connections and a gpsd that is not there."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.model.reading import Reading
from drivers.gps.config import GpsConfig
from drivers.gps.gnsstime import GnssTimeJudge
from drivers.gps.gpsd import GpsdGps
from support import Running, wait_until

WAIT_S = 5.0
SYSTEM_PYTHON = "/usr/bin/python3"  # gpsfake needs Debian's `gps` module, not in our venv
GPSFAKE = shutil.which("gpsfake") or "/usr/bin/gpsfake"
GPSD = shutil.which("gpsd") or "/usr/sbin/gpsd"
ROLLOVER_MS = 1024 * 7 * 86_400_000
DATA_KEYS = {"lat", "lon", "speed_kmh", "course", "alt_m", "sats", "hdop", "fix"}


def wait_for(cond: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition") -> None:
    wait_until(cond, timeout, what, poll_s=0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Collector:
    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.mono_ns: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, reading: Reading) -> None:
        with self._lock:
            self.readings.append(reading)
            self.mono_ns.append(time.monotonic_ns())

    def ts(self) -> list[int]:
        with self._lock:
            return [r.ts_ms for r in self.readings]




def driver_for(port: int, out: Collector) -> GpsdGps:
    return GpsdGps(GpsConfig(gpsd=f"127.0.0.1:{port}", reopen_min_s=0.05, reopen_max_s=0.2), out)


# -- the real gpsd ---------------------------------------------------------------------------


def require_gpsfake() -> None:
    missing = [p for p in (GPSD, GPSFAKE, SYSTEM_PYTHON) if not os.access(p, os.X_OK)]
    if not missing:
        probe = subprocess.run([SYSTEM_PYTHON, "-c", "import gps"], capture_output=True)
        if probe.returncode != 0:
            missing.append(f"{SYSTEM_PYTHON}'s gps module")
    if missing:
        pytest.fail(
            f"gpsd/gpsfake not installed ({', '.join(missing)} missing): run .ci/setup --tests "
            "(apt-get install -y gpsd gpsd-clients)"
        )


def reference(chk: Path) -> dict[int, dict[str, Any]]:
    """gpsd's expected TPVs per epoch time, each epoch's reports merged (the latest wins)."""
    epochs: dict[int, dict[str, Any]] = {}
    for line in chk.read_text().splitlines():
        if line.startswith('{"class":"TPV"'):
            tpv = json.loads(line)
            if "time" in tpv and tpv.get("mode", 0) >= 2:
                t = dt.datetime.fromisoformat(tpv["time"].replace("Z", "+00:00"))
                epochs.setdefault(round(t.timestamp() * 1000), {}).update(tpv)
    return epochs


def stop_gpsfake(proc: subprocess.Popen[bytes], port: int) -> None:
    """End gpsfake and its gpsd (they share the session we gave them).

    gpsd gets SIGTERM first; gpsfake sees its daemon die and exits. Not SIGTERM to gpsfake:
    once its log is used up it polls gpsd in a busy loop, and its SIGTERM handler's own poll
    of gpsd then never sees it exit (it sends SIGTERM every 10 ms, forever)."""
    gpsd = children(proc.pid)
    for pid in gpsd:
        os.kill(pid, signal.SIGTERM)
    for sig in ([] if gpsd else [signal.SIGTERM]) + [signal.SIGKILL]:
        if gone(proc, 3):
            break
        os.killpg(proc.pid, sig)
    gone(proc, 3)
    # gpsd leaves its SysV shared-memory export behind; gpsfake keys it by port.
    if shutil.which("ipcrm"):
        subprocess.run(["ipcrm", "-M", f"0x4770{port:04X}"], capture_output=True)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def gone(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether the whole process group has ended (reaping gpsfake, whose zombie would stay)."""
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


@pytest.mark.parametrize(
    "capture, cycle, in_view",
    [
        # MT3339: GPS only, DGPS fixes (status 2), one SBAS satellite.
        ("mt3339.log", "0.02", {"GPS": 11, "SBAS": 1}),
        # u-blox ZED-F9P: four constellations, each satellite listed once per signal (L1, L2).
        ("ublox-zed-f9p-nmea.log", "0.005", {"GPS": 12, "GLONASS": 10, "BeiDou": 10}),
    ],
)
def test_real_gpsd_matches_reference(
    gpsd_captures: Path, tmp_path: Path, capture: str, cycle: str, in_view: dict[str, int]
) -> None:
    require_gpsfake()
    ref = reference(gpsd_captures / f"{capture}.chk")
    port = free_port()
    gpsfake_log = tmp_path / "gpsfake.log"
    # -1: one pass; -q: quiet; -c: seconds between sentences (fast, but not faster than gpsd
    # reads a pty); -P: our port. No -n: gpsd opens the fake device when our driver watches.
    # -W: gpsfake's own give-up time (we end it sooner). GPSD_HOME: the gpsd checked above.
    # TMPDIR keeps gpsd's control socket (gpsfake-PID.sock) in tmp_path, cleaned by pytest.
    env = {**os.environ, "TMPDIR": str(tmp_path), "GPSD_HOME": os.path.dirname(GPSD)}
    out = Collector()
    driver = driver_for(port, out)
    # gpsfake replays a capture recorded years ago: its dates are judged as a capture's,
    # not as a live receiver's today (a live 2019 date would rightly be refused).
    driver.judge = GnssTimeJudge(live=False)
    with open(gpsfake_log, "wb") as log:
        proc = subprocess.Popen(
            [SYSTEM_PYTHON, GPSFAKE, "-1", "-q", "-c", cycle, "-P", str(port), "-W", "30",
             str(gpsd_captures / capture)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        with Running(driver):
            try:
                wait_for(lambda: driver.fixes > 0, 10, "a first position from gpsd")
            except AssertionError as e:
                raise AssertionError(f"{e}; gpsfake said: {gpsfake_log.read_text()!r}") from None
            # Fed until the capture's last epoch arrives, or gpsd has been quiet for 2 s.
            last = max(ref)
            seen, since = 0, time.monotonic()
            deadline = since + 20
            while time.monotonic() < deadline and time.monotonic() - since < 2:
                ts = out.ts()
                if last in ts or last + ROLLOVER_MS in ts:
                    break
                if len(ts) != seen:
                    seen, since = len(ts), time.monotonic()
                time.sleep(0.05)
            status = driver.snapshot()
    finally:
        stop_gpsfake(proc, port)

    times = out.ts()
    assert len(times) == len(set(times)), "a time was emitted twice"
    assert times == sorted(times)
    # gpsd 3.22 moves dates it takes for GPS week-rollover victims (2015's) 1024 weeks on.
    offsets = {0 if t in ref else ROLLOVER_MS if t - ROLLOVER_MS in ref else None for t in times}
    assert None not in offsets and len(offsets) == 1, f"times not in the reference: {times}"
    offset = offsets.pop()
    assert len(times) >= 0.5 * len(ref), f"only {len(times)} of {len(ref)} epochs arrived"
    for r in out.readings:
        want = ref[r.ts_ms - offset]
        d = r.data
        assert set(d) == DATA_KEYS
        assert abs(d["lat"] - want["lat"]) <= 1e-6 and abs(d["lon"] - want["lon"]) <= 1e-6
        assert (d["speed_kmh"] is None) == ("speed" not in want)
        if d["speed_kmh"] is not None:
            assert abs(d["speed_kmh"] / 3.6 - want["speed"]) <= 0.01
        assert (d["course"] is None) == ("track" not in want)
        if d["course"] is not None:
            assert abs(d["course"] - want["track"]) <= 0.01
        if d["alt_m"] is not None and "altMSL" in want:
            assert abs(d["alt_m"] - want["altMSL"]) <= 0.01
        assert d["fix"] == ("dgps" if want.get("status") == 2 else "gps")
        assert r.meta["mode"] in (2, 3) and r.meta["replay"] is False
    assert any(r.data["sats"] and r.data["hdop"] for r in out.readings), "no sats/hdop from SKY"
    view = status["satellites_in_view"]
    assert in_view.items() <= view.items(), view
    assert status["connected"] and status["opens"] == 1 and status["garbage"] == 0
    assert status["fixes"] == len(times) and status["tpv"] >= len(times)


# -- a fake gpsd -----------------------------------------------------------------------------

T0 = 1_795_000_000_000  # 2026-11-18T…Z, whole seconds


def iso(ts_ms: int) -> str:
    return dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%f"
    )[:-3] + "Z"


def tpv(ts_ms: int, mode: int = 3, **fields: Any) -> bytes:
    report = {"class": "TPV", "device": "/dev/fake", "mode": mode, "time": iso(ts_ms),
              "lat": 52.1234567891, "lon": 4.9876543219, **fields}
    return json.dumps(report).encode() + b"\r\n"


VERSION = b'{"class":"VERSION","release":"3.22","proto_major":3,"proto_minor":14}\r\n'


class FakeGpsd:
    """Serves one script per connection: bytes are sent, floats are pauses; the connection is
    closed after the script if more scripts follow, else held open until close()."""

    def __init__(self, scripts: list[list[bytes | float]], port: int = 0) -> None:
        self.scripts = scripts
        self.commands: list[bytes] = []
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", port))
        self.server.listen()
        self.port = self.server.getsockname()[1]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="fake-gpsd", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.server.settimeout(0.05)
        for i, script in enumerate(self.scripts):
            while not self.done.is_set():
                try:
                    conn, _ = self.server.accept()
                    break
                except TimeoutError:
                    continue
            else:
                return
            try:
                with conn:
                    conn.settimeout(WAIT_S)
                    conn.sendall(VERSION)
                    self.commands.append(conn.recv(1024))
                    for step in script:
                        if isinstance(step, float):
                            if self.done.wait(step):
                                return
                        else:
                            conn.sendall(step)
                    if i == len(self.scripts) - 1:
                        self.done.wait()
            except OSError:  # the driver went away: the test's assertions will tell
                return

    def close(self) -> None:
        self.done.set()
        self.server.close()
        self.thread.join(WAIT_S)


SKY = json.dumps({"class": "SKY", "hdop": 0.9, "uSat": 7, "satellites": [
    {"PRN": 5, "gnssid": 0, "svid": 5, "used": True},
    {"PRN": 5, "gnssid": 0, "svid": 5, "used": True},  # the same satellite's L2 signal
    {"PRN": 12, "gnssid": 0, "svid": 12, "used": False},
    {"PRN": 65, "gnssid": 6, "svid": 1, "used": True},
    {"PRN": 302, "gnssid": 2, "svid": 2, "used": True},
]}).encode() + b"\n"


def test_fake_gpsd_damage_non_positions_and_epochs() -> None:
    script: list[bytes | float] = [
        b"not json at all\n", b'{"class":"TPV","mode":3,\n', b"[1, 2]\n", b"\xff\xfe\n",
        tpv(T0, mode=1),                              # no fix
        tpv(T0 + 1000, status=8, speed=1.0),          # simulated
        tpv(T0 + 2000, status=7),                     # surveyed time only
        tpv(T0 + 3000, mode=3, time="yesterday"),     # unparseable time: garbage
        tpv(T0 + 3500, lat="north", status=[2]),      # not a number: no position, no crash
        SKY,
        tpv(T0 + 4000, mode=2, status=2, speed=10.0, track=90.5),
        tpv(T0 + 4000, mode=3, status=2, speed=10.0, track=90.5, altMSL=12.3, alt=99.0),
        tpv(T0 + 5000, status=5, alt=7.0),            # dead reckoning; alt without altMSL
        0.8,                                          # quiet: epoch T0+5000 is complete
        tpv(T0 + 5000, status=5, alt=7.0, speed=3.0),  # a straggler after the lull
        tpv(T0 + 6000),
    ]
    server = FakeGpsd([script])
    out = Collector()
    driver = driver_for(server.port, out)
    try:
        with Running(driver):
            wait_for(lambda: len(out.ts()) == 3, what="three positions")
            time.sleep(0.5)
            status = driver.snapshot()
    finally:
        server.close()
    assert server.commands[0].startswith(b'?WATCH={"enable":true,"json":true}')
    assert out.ts() == [T0 + 4000, T0 + 5000, T0 + 6000]
    first, second, third = out.readings
    assert first.data == {
        "lat": 52.1234568, "lon": 4.9876543, "speed_kmh": 36.0, "course": 90.5, "alt_m": 12.3,
        "sats": 7, "hdop": 0.9, "fix": "dgps",
    }
    assert first.meta["mode"] == 3 and first.meta["replay"] is False
    # Taken when the epoch arrived, not when the lull ended it.
    assert out.mono_ns[1] - second.meta["mono_ns"] >= 0.25e9
    assert second.data["fix"] == "estimated" and second.data["alt_m"] == 7.0
    assert second.data["speed_kmh"] is None and second.data["course"] is None
    assert third.data["fix"] == "gps"
    assert status["garbage"] == 5 and status["no_fix"] == 4 and status["late"] == 1
    assert status["tpv"] == 10 and status["fixes"] == 3
    assert status["satellites_in_view"] == {"GLONASS": 1, "GPS": 2, "Galileo": 1}
    assert status["last_fix_ts"] == iso(T0 + 6000)
    assert status["connected"] and status["opens"] == 1 and status["open_failures"] == 0


def test_fake_gpsd_closing_is_reconnected() -> None:
    server = FakeGpsd([
        [tpv(T0), tpv(T0 + 1000), 0.1],
        [tpv(T0 + 1000), tpv(T0 + 2000), tpv(T0 + 3000)],  # gpsd repeats its last epoch
    ])
    out = Collector()
    driver = driver_for(server.port, out)
    try:
        with Running(driver):
            wait_for(lambda: len(out.ts()) == 4, what="positions after the reconnection")
            time.sleep(0.5)
            status = driver.snapshot()
    finally:
        server.close()
    assert out.ts() == [T0, T0 + 1000, T0 + 2000, T0 + 3000]
    assert status["opens"] == 2 and status["connected"] and status["late"] == 1
    assert "closed" in status["last_error"]


def test_nothing_listening_is_retried_and_reported() -> None:
    port = free_port()
    out = Collector()
    driver = driver_for(port, out)
    server = None
    try:
        with Running(driver):
            wait_for(lambda: driver.open_failures >= 3, what="retries")
            status = driver.snapshot()
            assert not status["connected"] and status["opens"] == 0
            assert status["source"] == f"gpsd://127.0.0.1:{port}"
            assert "cannot connect" in status["last_error"]
            server = FakeGpsd([[tpv(T0)]], port=port)  # gpsd comes up
            wait_for(lambda: out.ts() == [T0], what="a position once gpsd is up")
            assert driver.snapshot()["connected"] and driver.opens == 1
    finally:
        if server is not None:
            server.close()
