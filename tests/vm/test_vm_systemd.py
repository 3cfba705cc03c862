"""The unit as shipped, under the real systemd (issue 12, item 2): the .deb installed with apt in
a fresh Debian 12 image (tests/vm/vmimage.py), booted with Debian's own kernel and systemd 252 as
PID 1, auditing on (``audit=1``), so a system call the unit's filter forbids shows as a
``type=1326`` (SECCOMP) audit record and the agent dying ``status=31/SYS``, as it once did on
``clock_adjtime``.

One boot does everything, driven from inside by :func:`guest_driver` (a oneshot-like service
started at boot, written into the image): it waits for lorry-agent.service to be active,
watches it for 60 s (``systemctl show``: state, ``NRestarts``, the main PID, the watchdog's
last ping), stops the agent with SIGSTOP as a hung agent would be and waits for systemd's
watchdog to restart it, watches the new one past ``WatchdogSec`` too, then ``systemctl stop``
and powers off. Its record, the journal and the kernel log come out of the image with debugfs
after QEMU exits. On the host: the broker the agent publishes to (as ``10.0.2.2``) and a backend
subscriber. The tests below assert on what was recorded.

The agent's config: a replayed GPS trip (the package does not ship the demo trip; a generated
one is copied in), a simulated seal and reefer, a depot geofence, the chain key, plain MQTT to
the host, and ``[time] trust_system_clock = "auto"``: with no systemd-timesyncd in the image the
agent asks systemd-timedated over the D-Bus system bus, from inside its sandbox.

``LORRY_VM_DEB=/path/to.deb`` runs the tests against another build (e.g. a throwaway one with a
forbidden system call, to see them fail). Run with ``-s`` to see the timings.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import re
import sqlite3
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).parent))

import vmimage  # noqa: E402
from agent.demo import trip  # noqa: E402
from agent.demo.broker import Mosquitto  # noqa: E402
from support import Backend, last_seqs, write_config  # noqa: E402

pytestmark = pytest.mark.vm

DEVICE = "CQ-HN-0042"
CHAIN_KEY = "vm-systemd-chain-key-CQ-HN-0042\n"
WATCHDOG_S = 30
OBSERVE_S = 65
"""How long the agent is watched after it became active (more than 60 s, two watchdog periods)."""
VM_TIMEOUT_S = 1200
"""The whole boot, hard: QEMU is killed past it."""
OUT = "/var/log/lorry-vmtest"


def log(line: str) -> None:
    print(f"[vm-systemd] {line}", flush=True)


# =================================================================================================
# Inside the guest: Debian's /usr/bin/python3 (3.11), standard library only
# =================================================================================================


def guest_driver() -> None:
    """Started by systemd at boot (lorry-vmtest.service). Prints ``@@<mark> {json}`` lines on
    the console, keeps everything in /var/log/lorry-vmtest, and powers the machine off."""
    import json
    import os
    import signal
    import subprocess
    import time
    import traceback

    out = "/var/log/lorry-vmtest"
    unit = "lorry-agent.service"
    props = ["ActiveState", "SubState", "Result", "NRestarts", "MainPID", "ExecMainCode", "ExecMainStatus",
             "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic", "WatchdogUSec",
             "WatchdogTimestamp", "WatchdogTimestampMonotonic", "StatusText"]
    record: dict = {"marks": [], "samples": []}

    def mark(name: str, **facts: object) -> None:
        facts = {"t": round(time.monotonic(), 3), **facts}
        record["marks"].append({"name": name, **facts})
        print(f"@@{name} {json.dumps(facts)}", flush=True)

    def run(*cmd: str, timeout: float = 120) -> str:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return r.stdout + r.stderr

    def show(tag: str) -> dict:
        text = run("systemctl", "show", unit, *[f"--property={p}" for p in props])
        s = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        s.update(t=round(time.monotonic(), 3), tag=tag)
        record["samples"].append(s)
        return s

    def until(tag: str, done, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            s = show(tag)
            if done(s):
                return s
            if time.monotonic() > deadline:
                raise TimeoutError(f"{tag}: not within {timeout} s; last: {s}")
            time.sleep(1)

    def observe(tag: str, until_t: float) -> dict:
        s = show(tag)
        while time.monotonic() < until_t:
            time.sleep(2)
            s = show(tag)
        return s

    print(f"@@vm-up {open('/proc/uptime').read().split()[0]}", flush=True)
    try:
        os.makedirs(out, exist_ok=True)
        record.update(systemd=run("systemctl", "--version").splitlines()[0], kernel=os.uname().release,
                      cmdline=open("/proc/cmdline").read().strip())
        state = run("systemctl", "is-system-running", "--wait", timeout=600).strip()
        record["boot"] = {"state": state, "analyze": run("systemd-analyze", "time").strip(),
                          "failed": run("systemctl", "--failed", "--no-legend", "--plain").strip()}
        mark("booted", state=state)
        s = until("start", lambda s: s["ActiveState"] == "active", 300)
        pid = int(s["MainPID"])
        mark("active", pid=pid)
        observe("running", int(s["ActiveEnterTimestampMonotonic"]) / 1e6 + 65)
        s = show("before-stop-signal")
        pid = int(s["MainPID"])
        os.kill(pid, signal.SIGSTOP)  # hung: alive, but nothing runs, the watchdog is not fed
        mark("sigstop", pid=pid)
        s = until("hung", lambda s: s["NRestarts"] != "0" and s["ActiveState"] == "active"
                  and s["MainPID"] not in ("0", str(pid)), 300)
        mark("restarted", pid=int(s["MainPID"]))
        observe("restarted", int(s["ActiveEnterTimestampMonotonic"]) / 1e6 + 35)
        mark("stopping", pid=int(s["MainPID"]))
        started = time.monotonic()
        r = subprocess.run(["systemctl", "stop", unit], capture_output=True, text=True, timeout=300)
        stop_s = time.monotonic() - started
        show("stopped")
        mark("stopped", seconds=round(stop_s, 2), rc=r.returncode, output=r.stdout + r.stderr)
    except Exception:  # noqa: BLE001 - recorded, and the machine still powers off
        record["error"] = traceback.format_exc()
        mark("error", error=record["error"][-2000:])
    finally:
        for name, cmd in (("journal.txt", ["journalctl", "-b", "-o", "short-monotonic", "--no-pager"]),
                          ("agent-journal.txt",
                           ["journalctl", "-b", "-u", unit, "-o", "short-monotonic", "--no-pager"]),
                          ("audit.txt",
                           ["journalctl", "-b", "_TRANSPORT=audit", "-o", "short-monotonic", "--no-pager"]),
                          ("dmesg.txt", ["dmesg"]),
                          ("status.txt", ["systemctl", "status", "--no-pager", "-l", unit])):
            with open(f"{out}/{name}", "w") as f:
                f.write(run(*cmd))
        with open(f"{out}/record.json", "w") as f:
            json.dump(record, f, indent=1)
        os.sync()
        mark("done")
        subprocess.run(["systemctl", "poweroff", "--no-block"])


DRIVER_UNIT = """[Unit]
Description=lorry-agent VM test driver (tests/vm/test_vm_systemd.py)

[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/lorry-vm/driver.py
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""


def driver_script() -> str:
    return textwrap.dedent(inspect.getsource(guest_driver)) + "\n\nguest_driver()\n"


# =================================================================================================
# On the host
# =================================================================================================


class TimedBackend(Backend):
    """The backend subscriber, with the host time each message arrived."""

    def __init__(self, port: int, **kw: Any) -> None:
        self.arrivals: list[tuple[float, str, bytes]] = []
        super().__init__(port, **kw)
        original = self.client.on_message

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            self.arrivals.append((time.monotonic(), msg.topic, msg.payload))
            original(c, u, msg)

        self.client.on_message = on_message


def retained_status(port: int) -> tuple[bytes, bool] | None:
    """What a subscriber arriving now is told on the status topic (the retained message)."""
    got: list[tuple[bytes, bool]] = []
    done = threading.Event()
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="vm-retained-check")
    c.on_connect = lambda c, u, f, rc, p: c.subscribe(f"lorry/{DEVICE}/status", qos=1)
    c.on_message = lambda c, u, m: (got.append((m.payload, m.retain)), done.set())
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(5)
    c.loop_stop()
    c.disconnect()
    return got[0] if got else None


def at(seconds: float) -> dt.datetime:
    """A moment of the replayed trip."""
    return trip.START + dt.timedelta(seconds=seconds)


def agent_toml(tmp: Path, port: int) -> str:
    """The technician's config for this test: everything but real hardware."""
    kinds = ["opened", "sealed", "tampered", "sealed", "battery_low"]
    sections: dict[str, Any] = {
        "device": {"id": DEVICE},
        "mqtt": {"host": "10.0.2.2", "port": port, "topic_prefix": "lorry", "keepalive_s": 10,
                 "reconnect_min_s": 0.5, "reconnect_max_s": 5},
        "store": {"path": "/var/lib/lorry-agent/buffer.db"},
        "gps": {"replay": "/etc/lorry-agent/trip.nmea.gz", "replay_speed": 2},
        "reporting": {"min_period_s": 0, "min_distance_m": 0, "min_heading_deg": 0},
        "time": {"trust_system_clock": "auto"},
        "health": {"interval_s": 10},
        "chain": {"hmac_key_file": "/etc/lorry-agent/chain.key"},
        "seals": [{"name": "container_door", "driver": "sim", "seal_id": "ES-0042-01",
                   "events": [{"at": at(20 + 30 * k), "event": kinds[k % len(kinds)]} for k in range(60)]}],
        "temperature": [{"name": "reefer_front", "driver": "sim", "interval_s": 10, "high_c": 8, "min_duration_s": 0,
                         "hysteresis_c": 0.5,
                         "profile": [{"at": at(60 * k), "c": 4.0 if k % 2 == 0 else 12.0} for k in range(30)]}],
        "geofences": [{"name": "Chongqing depot", "kind": "depot", "seal_opening": "authorised",
                       "circle": {"lat": 29.4838, "lon": 106.4460, "radius_m": 300}}],
    }
    return write_config(tmp / "agent.toml", sections).read_text()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One boot of a fresh image with the package installed; everything it recorded."""
    vmimage.require_qemu()
    tmp = tmp_path_factory.mktemp("vm-systemd")
    started = time.monotonic()
    base = vmimage.base_image()
    deb = vmimage.package(tmp_path_factory.mktemp("deb"))
    trip_file = tmp / "trip.nmea.gz"
    trip.write(trip_file, interval_s=1, max_hours=0.25)
    broker = Mosquitto(tmp / "broker", extra_conf=["log_type notice", "log_type information"])
    broker.start()
    backend = TimedBackend(broker.port, client_id="backend-vm-systemd")
    config = agent_toml(tmp, broker.port)
    owner = "root:lorry-agent"  # as docs/install.md has the technician install secrets
    image = vmimage.build_image(base, deb, tmp / "root.img", files={
        "/etc/lorry-agent/agent.toml": vmimage.File(config, 0o640, owner),
        "/etc/lorry-agent/chain.key": vmimage.File(CHAIN_KEY, 0o640, owner),
        "/etc/lorry-agent/trip.nmea.gz": vmimage.File(trip_file.read_bytes(), 0o640, owner),
        "/usr/local/lib/lorry-vm/driver.py": vmimage.File(driver_script(), 0o755),
        "/etc/systemd/system/lorry-vmtest.service": DRIVER_UNIT,
    }, enable=["lorry-agent.service", "lorry-vmtest.service"])
    vm = vmimage.Vm(base, [vmimage.Disk(image.path)], name="systemd", log_dir=tmp,
                    append="audit=1 loglevel=4")
    marks: dict[str, float] = {}
    try:
        vm.start()
        deadline = time.monotonic() + VM_TIMEOUT_S
        for name in ("vm-up", "booted", "active", "sigstop", "restarted", "stopping", "stopped", "done"):
            try:
                line = vm.wait_for(f"@@{name}", max(1.0, deadline - time.monotonic()))
            except vmimage.VmExited:
                break
            marks[name] = line.t
            log(f"{name} at {line.t - vm.started:.1f} s: {line.after('@@' + name)[:300]}")
            if vm.find("@@error"):
                break
        vm.wait_exit(max(1.0, deadline - time.monotonic()))
        time.sleep(1)  # the last messages the broker has for the backend
        retained = retained_status(broker.port)
    finally:
        vm.close()
        backend.close()
        broker.stop()
    out = tmp / "out"
    fs = vmimage.read_files(image.path, [OUT, "/var/lib/lorry-agent"], out)
    image.path.unlink()  # 1 GB; what the tests need is in out/
    record_file = out / "lorry-vmtest" / "record.json"
    assert record_file.exists(), f"the driver left no record; console:\n{vm.tail(100)}"
    record = json.loads(record_file.read_text())
    files = {p.name: p.read_text(errors="replace") for p in (out / "lorry-vmtest").iterdir() if p.suffix == ".txt"}
    result = {"vm": vm, "record": record, "files": files, "marks": marks, "backend": backend, "fs": fs,
              "store": out / "lorry-agent" / "buffer.db", "retained": retained,
              "broker_log": (tmp / "broker" / "mosquitto.log").read_text(errors="replace")}
    active = [m for m in record["marks"] if m["name"] == "active"]
    log(f"timings: image build + boot + test {time.monotonic() - started:.0f} s; {vm.timings()}; "
        f"{record.get('boot', {}).get('analyze', '').splitlines()[0] if record.get('boot') else 'no boot record'}"
        + (f"; unit active at guest {active[0]['t']:.1f} s" if active else ""))
    return result


def samples(run: dict[str, Any], tag: str) -> list[dict[str, str]]:
    return [s for s in run["record"]["samples"] if s["tag"] == tag]


def mark(run: dict[str, Any], name: str) -> dict[str, Any]:
    found = [m for m in run["record"]["marks"] if m["name"] == name]
    assert found, f"the guest never got to {name!r}: {run['record'].get('error') or run['vm'].tail(60)}"
    return found[0]


def no_error(run: dict[str, Any]) -> None:
    assert "error" not in run["record"], run["record"]["error"]


SECCOMP = re.compile(r"type=1326|type=SECCOMP|status=31/SYS|code=killed, status=31", re.I)


def test_real_systemd_and_kernel(run: dict[str, Any]) -> None:
    rec = run["record"]
    assert rec["systemd"].startswith("systemd 252"), rec["systemd"]
    assert "audit=1" in rec["cmdline"] and rec["kernel"].endswith("-amd64"), rec
    # Auditing works: the kernel logged its own records, so a missing 1326 means none happened
    assert "audit: type=2000" in run["files"]["dmesg.txt"] and "audit_enabled=1" in run["files"]["dmesg.txt"]
    assert run["fs"].ok, run["fs"].fsck_output + run["fs"].clean_after_output


def test_unit_starts_with_full_hardening_and_stays_active_60_s(run: dict[str, Any]) -> None:
    seccomp = [line for name in ("dmesg.txt", "audit.txt", "journal.txt")
               for line in run["files"][name].splitlines() if SECCOMP.search(line)]
    assert not seccomp, "the system-call filter killed something:\n" + "\n".join(seccomp[:20])
    no_error(run)
    active = mark(run, "active")
    watched = samples(run, "running")
    assert watched, "no samples while running"
    first_active = float(samples(run, "start")[-1]["ActiveEnterTimestampMonotonic"]) / 1e6
    assert watched[-1]["t"] - first_active >= 60, (first_active, watched[-1]["t"])
    bad = [s for s in watched if (s["ActiveState"], s["SubState"], s["NRestarts"], s["MainPID"])
           != ("active", "running", "0", str(active["pid"]))]
    assert not bad, bad[:3]
    # The unit as shipped: the package's file, not an override
    status = run["files"]["status.txt"]
    assert "/lib/systemd/system/lorry-agent.service; enabled" in status and "Drop-In" not in status, status
    journal = run["files"]["agent-journal.txt"]
    assert "OK (device CQ-HN-0042, broker 10.0.2.2:" in journal  # ExecStartPre check-config
    assert "lorry-agent running as CQ-HN-0042" in journal
    assert "Traceback" not in journal, journal[-4000:]


def test_watchdog_is_fed(run: dict[str, Any]) -> None:
    no_error(run)
    watched = samples(run, "running") + samples(run, "restarted")
    assert watched and all(s["WatchdogUSec"] == f"{WATCHDOG_S}s" for s in watched), watched[:2]
    pings = {s["WatchdogTimestampMonotonic"] for s in samples(run, "running")}
    assert len(pings) >= 10, f"systemd saw too few watchdog pings: {sorted(pings)}"
    # Every look: the last ping is recent (the agent pings every second)
    ages = [s["t"] - int(s["WatchdogTimestampMonotonic"]) / 1e6 for s in watched]
    assert max(ages) < 10, ages
    log(f"watchdog: {len(pings)} distinct pings seen in {len(samples(run, 'running'))} looks, "
        f"last ping at most {max(ages):.1f} s old; e.g. WatchdogTimestamp={watched[-1]['WatchdogTimestamp']}")


def test_ntp_question_answered_inside_the_sandbox(run: dict[str, Any]) -> None:
    """No timesyncd here: the agent asked systemd-timedated over D-Bus, from its sandbox."""
    journal = run["files"]["journal.txt"]
    assert "cannot ask systemd-timedated" not in journal, [
        line for line in journal.splitlines() if "timedated" in line]
    assert re.search(r"systemd\[1\]: Start(ing|ed) systemd-timedated\.service", journal), \
        "timedated was never started: the agent did not ask it"


def test_watchdog_restarts_a_hung_agent(run: dict[str, Any]) -> None:
    no_error(run)
    stopped = mark(run, "sigstop")
    restarted = mark(run, "restarted")
    journal = run["files"]["agent-journal.txt"]
    timeout = [line for line in journal.splitlines() if "Watchdog timeout" in line]
    assert len(timeout) == 1, journal[-3000:]
    fired_at = float(re.match(r"\[\s*([\d.]+)\]", timeout[0]).group(1))
    # The last ping came within a second before SIGSTOP: systemd fires WatchdogSec after it
    assert WATCHDOG_S - 5 <= fired_at - stopped["t"] <= WATCHDOG_S + 10, (fired_at, stopped["t"])
    assert re.search(r"Killing process \d+ \(lorry-agent\) with signal SIGABRT", journal), journal[-3000:]
    assert "restart counter is at 1" in journal, journal[-3000:]
    after = samples(run, "restarted")
    assert after and all((s["ActiveState"], s["NRestarts"], s["MainPID"]) == ("active", "1", str(restarted["pid"]))
                         for s in after), after[:3]
    # The new agent lived past WatchdogSec too, feeding it
    assert after[-1]["t"] - int(after[0]["ActiveEnterTimestampMonotonic"]) / 1e6 > WATCHDOG_S
    assert journal.count("lorry-agent running as CQ-HN-0042") == 2
    log(f"watchdog: SIGSTOP at {stopped['t']:.1f} s, timeout at {fired_at:.1f} s "
        f"(+{fired_at - stopped['t']:.1f} s), active again at {restarted['t']:.1f} s")


def test_stops_cleanly(run: dict[str, Any]) -> None:
    no_error(run)
    stopped = mark(run, "stopped")
    final = samples(run, "stopped")[-1]
    assert stopped["rc"] == 0 and stopped["seconds"] < 30, stopped
    # Exited by itself with status 0 (ExecMainCode 1 = CLD_EXITED), not killed
    assert (final["ActiveState"], final["Result"], final["ExecMainCode"], final["ExecMainStatus"]) == \
        ("inactive", "success", "1", "0"), final
    journal = run["files"]["agent-journal.txt"]
    tail = journal[journal.rindex("Stopping lorry-agent.service"):]
    assert "lorry-agent stopped" in tail and "SIGKILL" not in tail and "timed out" not in tail, tail
    # The retained status a backend sees is "offline", published after the stop began
    assert run["retained"] == (b"offline", True), run["retained"]
    statuses = [(t, p) for t, topic, p in run["backend"].arrivals if topic.endswith("/status")]
    assert statuses and statuses[-1][1] == b"offline" and statuses[-1][0] > run["marks"]["stopping"], statuses
    # ...said by the agent itself as it disconnected, not its will after a dropped connection
    ends = re.findall(rf"Client {DEVICE} (disconnected\.|closed its connection\.|has exceeded timeout.*)",
                      run["broker_log"])
    assert ends and ends[-1] == "disconnected.", ends
    log(f"stop: {stopped['seconds']:.1f} s, {final['Result']}, exit status {final['ExecMainStatus']}")


def test_final_commit_and_nothing_lost(run: dict[str, Any]) -> None:
    """The store after the poweroff: sound, the agent's final status saved, and every seq of
    every stream either at the backend or still in the store (across the watchdog's kill)."""
    db = run["store"]
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        saved = conn.execute("SELECT value FROM state WHERE key = 'status'").fetchone()
        assert saved is not None, "the agent's status was never saved in the store"
        status = json.loads(saved[0])
        kept = {(s, q) for s, q in conn.execute("SELECT stream, seq FROM readings")}
    finally:
        conn.close()
    assert status["stopped"] is not None, "the final status (saved with the final commit) is missing"
    received = {(r["stream"], r["seq"]) for r in run["backend"].readings()}
    missing = {s: [q for q in range(1, last + 1) if (s, q) not in received and (s, q) not in kept]
               for s, last in last_seqs(db).items()}
    assert not any(missing.values()), {s: v[:10] for s, v in missing.items() if v}
    streams = {s for s, _ in received}
    assert {"position", "seal", "temperature", "alarm", "health"} <= streams, streams
    log(f"backend: {len(received)} readings ({', '.join(f'{s} {n}' for s, n in sorted(last_seqs(db).items()))}); "
        f"{len(kept)} still in the store")
