"""bench/bench_wear.py's inputs, the same for both versions compared: GPS over a pseudo-terminal,
a CAN capture or a vcan bus, a 1-Wire sysfs tree, a simulated seal; the agent's config; a
backlog store filled by each version's own ``Store``."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import shutil
import subprocess
import threading
import time
import tty
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from _positions import REPO
from _wear_agent import DEVICE, Version

# -- inputs: GPS, CAN, 1-Wire ------------------------------------------------------------------


class GpsFeeder:
    """A GPS receiver on a pseudo-terminal: RMC + GGA once a second, at real time, stamped with
    the current UTC second (as a receiver with a fix would), positions of the demo trip on the
    expressway out of Chongqing (agent/demo/trip.py at 1 Hz, from its 10th minute: ~75 km/h)."""

    SKIP = 600

    def __init__(self) -> None:
        from agent.demo import trip

        self._trip = trip
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.sent = 0
        self._stop = threading.Event()
        self._fixes = itertools.islice(trip.drive(1.0), self.SKIP, None)
        self._thread = threading.Thread(target=self._run, name="gps-feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            if self._stop.wait(1 - now % 1):  # on the second, like a receiver's 1 PPS
                return
            ts = dt.datetime.fromtimestamp(round(time.time()), dt.UTC)
            fix = replace(next(self._fixes), ts=ts)
            try:
                os.write(self.master, (self._trip.rmc(fix) + self._trip.gga(fix)).encode("ascii"))
            except OSError:
                return
            self.sent += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(3)
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


def can_frames(seconds: int, start_wall: float) -> list[Any]:
    """``seconds`` of bench/bench_can.py's truck mix (~1,450 frames/s: built with tests/canlog.py),
    timed from ``start_wall`` (Unix time) so readings are dated like a live bus's."""
    from bench_can import bus_second

    import canlog as cl

    shift = start_wall - cl.T0_US / 1e6
    return [f._replace(ts=round(f.ts + shift, 6)) for s in range(seconds) for f in bus_second(s)]


def write_capture(path: Path, seconds: int, start_wall: float) -> int:
    import canlog as cl

    frames = can_frames(seconds, start_wall)
    cl.write_log(path, frames)
    return len(frames)


def vcan_available(name: str) -> str | None:
    """Create a vcan interface; None when done, else why not (no vcan module, no privilege)."""
    ip = shutil.which("ip") or "/sbin/ip"
    made = subprocess.run([ip, "link", "add", "dev", name, "type", "vcan"], capture_output=True, text=True)
    if made.returncode != 0:
        return (made.stderr.strip() or f"ip link add exited with {made.returncode}").splitlines()[0]
    up = subprocess.run([ip, "link", "set", "up", name], capture_output=True, text=True)
    if up.returncode != 0:
        remove_vcan(name)
        return up.stderr.strip() or "ip link set up failed"
    return None


def remove_vcan(name: str) -> None:
    ip = shutil.which("ip") or "/sbin/ip"
    subprocess.run([ip, "link", "del", "dev", name], capture_output=True)


class VcanSender:
    """Sends the truck mix on a vcan interface at its real rate, from this process (its CPU is
    not the agent's), round and round, re-timed to now."""

    def __init__(self, channel: str):
        import can

        self.bus = can.Bus(interface="socketcan", channel=channel)
        self._stop = threading.Event()
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="vcan-sender", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import canlog as cl

        frames = can_frames(10, 0.0)
        start = time.monotonic()
        t0 = frames[0].ts
        period = frames[-1].ts - t0 + 0.01
        lap = 0
        while not self._stop.is_set():
            for f in frames:
                delay = start + lap * period + (f.ts - t0) - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
                try:
                    self.bus.send(cl.message(f._replace(ts=time.time())))
                    self.sent += 1
                except Exception:  # noqa: BLE001 - a full queue drops a frame, as a bus would
                    pass
            lap += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(3)
        self.bus.shutdown()


SENSOR_ID = "28-0316a2795dff"


def w1_tree(root: Path) -> Path:
    """A 1-Wire bus folder with one DS18B20 at 4.5 °C, as the kernel's w1_therm shows it."""
    dev = root / SENSOR_ID
    dev.mkdir(parents=True, exist_ok=True)
    pad = "48 00 4b 46 7f ff 08 10 1c"
    (dev / "w1_slave").write_text(f"{pad} : crc=1c YES\n{pad} t=4500\n")
    return root


# -- configs -----------------------------------------------------------------------------------


def toml(sections: list[tuple[str, dict[str, Any]]]) -> str:
    """Tables in order (a name starting with ``[[`` is an array of tables' entry)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, dt.datetime):
            return v.strftime("%Y-%m-%dT%H:%M:%SZ")
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(str(v))

    out = []
    for name, table in sections:
        out.append(name if name.startswith("[[") else f"[{name}]")
        out += [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(out) + "\n"


@dataclass
class Inputs:
    """The typical load's sources for one run; closed afterwards."""

    gps: GpsFeeder | None = None
    vcan: VcanSender | None = None
    sections: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    can_kind: str = ""

    def close(self) -> None:
        if self.gps is not None:
            self.gps.close()
        if self.vcan is not None:
            self.vcan.close()


def typical_inputs(workdir: Path, seconds: int, vcan: str | None) -> Inputs:
    """1 Hz GPS on a pty, the truck's CAN bus (vcan, else a capture replayed at real time), a
    DS18B20 in a sysfs tree, a simulated seal (sealed once, at start): default settings."""
    inputs = Inputs()
    inputs.gps = GpsFeeder()
    inputs.sections.append(("gps", {"port": inputs.gps.path, "baudrate": 9600}))
    if vcan:
        inputs.vcan = VcanSender(vcan)
        inputs.sections.append(("can", {"interface": "socketcan", "channel": vcan}))
        inputs.can_kind = f"socketcan {vcan} (vcan), mix sent at real time"
    else:
        capture = workdir / "truck.log"
        n = write_capture(capture, seconds, time.time() + 1.0)
        inputs.sections.append(("can", {"interface": "replay", "replay": str(capture), "replay_speed": 1}))
        inputs.can_kind = f"replay of a {n:,}-frame candump -L capture at replay_speed = 1"
    sealed_at = dt.datetime.fromtimestamp(int(time.time()) - 60, dt.UTC)
    inputs.sections.append(("[[seals]]", {"name": "container_door", "driver": "sim", "seal_id": "ES-0042-01",
                                          "events": [{"at": sealed_at, "event": "sealed"}]}))
    inputs.sections.append(("[[temperature]]", {"name": "reefer_front", "driver": "ds18b20",
                                                "sensor_id": SENSOR_ID, "w1_root": str(w1_tree(workdir / "w1"))}))
    return inputs


def agent_config(path: Path, *, port: int, store: Path, trust_system_clock: str,
                 sources: list[tuple[str, dict[str, Any]]] = (), mqtt_extra: dict[str, Any] | None = None,
                 store_extra: dict[str, Any] | None = None) -> Path:
    sections = [
        ("device", {"id": DEVICE}),
        ("mqtt", {"host": "127.0.0.1", "port": port, **(mqtt_extra or {})}),
        ("store", {"path": str(store), **(store_extra or {})}),
        ("time", {"trust_system_clock": trust_system_clock}),
        *sources,
    ]
    path.write_text(toml(sections))
    return path


# -- the backlog -------------------------------------------------------------------------------

FILLER = """
import sys, time
tree, bench, db, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
try:                                   # this version's store, from its tree (cwd)
    from agent.store.buffer import Store
except ImportError:                    # a baseline from before the restructuring (issue 13)
    from agent.store import Store
import agent
assert agent.__file__.startswith(tree), agent.__file__
sys.path.append(bench)
from _positions import DEVICE, positions
store = Store(db, device=DEVICE)
store.start()
for k, r in enumerate(positions(n)):
    store.append(r)
    if k % 50_000 == 49_999:
        store.flush(600)               # bounded memory: the writer keeps up
if not store.flush(600):
    raise SystemExit("flush timed out")
store.close()
"""


def fill_backlog(version: Version, python: str, state: Path, n: int) -> float:
    """A store of ``n`` positions (bench/_positions.py, ~200 B each) written by this version's
    own ``Store`` (so its schema is the one it expects); seconds taken."""
    state.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    subprocess.run([python, "-c", FILLER, str(version.tree.resolve()), str(REPO / "bench"), str(state / "buffer.db"),
                    str(n)], cwd=version.tree, env=version.env(), check=True)
    return time.monotonic() - t0

