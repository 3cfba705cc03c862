"""The shipped unit's sandbox against what the agent really does.

systemd kills a service (status=31/SYS) at its first system call outside ``SystemCallFilter=``,
and refuses others quietly (ProtectClock=, RestrictAddressFamilies=, MemoryDenyWriteExecute=…).
``systemd-analyze security`` only reads the unit; it never runs the program. So here the real
agent runs under strace, started with the unit's own ExecStartPre=/ExecStart= lines — a dry
run of the demo trip with its simulated seals and reefer, and check-config then a real run
against a real mosquitto (mutual TLS, a serial GPS, a command, a broker restart, the watchdog,
SIGTERM) — and every system call its process tree makes is checked against the
sandbox computed from systemd/lorry-agent.service itself, with systemd-analyze expanding the
groups. Any system call used but not allowed fails the test, by name.

And the trusted-time check that no longer needs adjtimex(2) (agent/model/clock.py): systemd-timesyncd's
flag file, or systemd-timedated's ``NTPSynchronized`` asked over a real D-Bus.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import certs
from agent.demo import trip
from agent.demo.broker import BrokerTls, Mosquitto, mosquitto_binary
from agent.model import ntpsync as clock
from agent.model.reading import iso_ms
from agent.uplink.commands import sign_command
from support import Backend, wait_until, write_config

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "lorry-agent.service"
DEMO = REPO / "agent" / "demo" / "data" / "demo.toml"
DEVICE = "CQ-HN-0042"
UNPRIVILEGED = 65534  # the unit runs as User=lorry-agent; as root, the agent is traced as nobody


# -- the sandbox, computed from the unit file ----------------------------------------------------------

TRUE = {"yes", "true", "on", "1"}

# Settings that add a system-call deny filter of their own (systemd.exec(5), systemd 252).
IMPLIED_DENIES = {
    "ProtectClock": ["@clock"],  # "installs a system call filter to block calls that can set the clock"
    "ProtectKernelModules": ["@module"],
    "ProtectKernelLogs": ["syslog"],
    "ProtectHostname": ["sethostname", "setdomainname"],
    "PrivateDevices": ["@raw-io"],
    # Only with namespace flags, or setns(); the agent has no business with either.
    "RestrictNamespaces": ["unshare", "setns"],
}


def tool(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if found is None:
        pytest.skip(f"LOUD SKIP: {name} is not installed, so the unit's system-call filter cannot be checked "
                    f"against the agent: run .ci/setup --tests (apt-get install -y strace systemd)")
    return found


def unit_settings(text: str, section: str = "Service") -> dict[str, list[str]]:
    """Every assignment of ``section``, in order (a key may repeat)."""
    out: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        if current == section and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def syscall_groups() -> dict[str, list[str]]:
    """``systemd-analyze syscall-filter``: each @group and its entries (system calls and @groups)."""
    r = subprocess.run([tool("systemd-analyze"), "syscall-filter", "--no-pager"],
                       capture_output=True, text=True, check=True)
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in r.stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif not line.startswith("    "):
            current = None  # the "# Ungrouped…" trailer
        elif current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
    assert {"@default", "@system-service", "@privileged", "@clock"} <= set(groups), r.stdout[:500]
    return groups


def expand(entry: str, groups: dict[str, list[str]]) -> set[str]:
    if not entry.startswith("@"):
        return {entry}
    if entry not in groups:
        raise AssertionError(f"the unit names {entry}, which this systemd does not know")
    out: set[str] = set()
    for e in groups[entry]:
        out |= expand(e, groups)
    return out


@dataclass
class Sandbox:
    allow_list: bool
    filtered: set[str]
    """The allow list (allow_list) or the deny list of SystemCallFilter=."""
    removed_by: dict[str, str]
    """A system call taken out of the allow list → the assignment that did it."""
    implied: dict[str, str]
    """A system call denied by another setting → that setting."""
    families: set[str] | None
    families_deny: bool
    settings: dict[str, list[str]]

    def why_denied(self, name: str) -> str | None:
        reasons = []
        if self.allow_list and name not in self.filtered:
            reasons.append(f"SystemCallFilter={self.removed_by[name]}" if name in self.removed_by
                           else "not in the SystemCallFilter= allow list")
        if not self.allow_list and name in self.filtered:
            reasons.append("SystemCallFilter= deny list")
        if name in self.implied:
            reasons.append(self.implied[name])
        return " and ".join(reasons) or None

    def enabled(self, key: str) -> bool:
        return bool(self.settings.get(key)) and self.settings[key][-1].lower() in TRUE


def sandbox(text: str, groups: dict[str, list[str]]) -> Sandbox:
    """What systemd 252 makes of the unit: SystemCallFilter= (the first assignment decides allow
    or deny list; an allow list implicitly has @default; later ``~`` lines take out, later plain
    lines add; empty resets), the deny filters other settings imply, RestrictAddressFamilies=."""
    settings = unit_settings(text)
    allow_list: bool | None = None
    filtered: set[str] = set()
    removed_by: dict[str, str] = {}
    for value in settings.get("SystemCallFilter", []):
        if not value:
            allow_list, filtered, removed_by = None, set(), {}
            continue
        invert = value.startswith("~")
        if allow_list is None:
            allow_list = not invert
            if allow_list:
                filtered |= expand("@default", groups)
        for word in value.lstrip("~").split():
            names = expand(word.split(":", 1)[0], groups)  # "name:EPERM": refused all the same
            if allow_list == (not invert):
                filtered |= names
                for n in names:
                    removed_by.pop(n, None)
            else:
                filtered -= names
                for n in names:
                    removed_by.setdefault(n, f"~{word}")
    implied: dict[str, str] = {}
    for key, entries in IMPLIED_DENIES.items():
        values = settings.get(key, [])
        if values and values[-1].lower() not in ("no", "false", "off", "0", ""):
            for e in entries:
                for n in expand(e, groups):
                    implied.setdefault(n, f"{key}={values[-1]}")
    families = None
    families_deny = False
    if settings.get("RestrictAddressFamilies"):
        value = settings["RestrictAddressFamilies"][-1]
        families_deny = value.startswith("~")
        families = set(value.lstrip("~").split())
    return Sandbox(bool(allow_list), filtered if allow_list is not None else set(), removed_by, implied,
                   families, families_deny, settings)


@pytest.fixture(scope="module")
def unit_sandbox() -> Sandbox:
    return sandbox(UNIT.read_text(), syscall_groups())


# -- tracing -----------------------------------------------------------------------------------------

CALL = re.compile(r"^(\d+) +([a-z_][a-z0-9_]*)\((.*)$")
ARCH_SWITCH = re.compile(r"runs in (32 bit|x32) mode")
MODE = re.compile(r"\b(0[0-7]{3,6})\)? *(?:=|<unfinished)")


@dataclass
class Trace:
    calls: Counter = field(default_factory=Counter)
    example: dict[str, str] = field(default_factory=dict)
    argument_faults: dict[str, str] = field(default_factory=dict)
    """A call refused for its arguments (socket family, W+X memory…) → an example line."""
    foreign_arch: list[str] = field(default_factory=list)
    text: str = ""


def read_trace(path: Path, box: Sandbox) -> Trace:
    t = Trace(text=path.read_text(errors="replace"))
    for line in t.text.splitlines():
        if ARCH_SWITCH.search(line):
            t.foreign_arch.append(line)
            continue
        m = CALL.match(line)
        if not m:
            continue  # "<... resumed>", "+++ exited", "--- SIG…"
        name, args = m.group(2), m.group(3)
        t.calls[name] += 1
        t.example.setdefault(name, line[:200])

        def fault(what: str, line: str = line) -> None:
            t.argument_faults.setdefault(what, line[:200])

        if name in ("socket", "socketpair") and box.families is not None:
            family = args.split(",", 1)[0].strip()
            if (family in box.families) == box.families_deny:
                fault(f"{name}({family}): RestrictAddressFamilies={' '.join(sorted(box.families))}")
        if box.enabled("MemoryDenyWriteExecute"):
            prot = re.search(r"PROT_[A-Z_|]+", args)
            if name == "mmap" and prot and "PROT_WRITE" in prot.group() and "PROT_EXEC" in prot.group():
                fault("mmap(PROT_WRITE|PROT_EXEC): MemoryDenyWriteExecute=yes")
            if name in ("mprotect", "pkey_mprotect") and prot and "PROT_EXEC" in prot.group():
                fault(f"{name}(PROT_EXEC): MemoryDenyWriteExecute=yes")
            if name == "shmat" and "SHM_EXEC" in args:
                fault("shmat(SHM_EXEC): MemoryDenyWriteExecute=yes")
        if (box.enabled("RestrictNamespaces") and name in ("clone", "clone3", "unshare", "setns")
                and "CLONE_NEW" in args):
            fault(f"{name}(CLONE_NEW…): RestrictNamespaces=yes")
        if (box.enabled("LockPersonality") and name == "personality"
                and not args.startswith(("0xffffffff", "PER_LINUX)"))):
            fault("personality(change): LockPersonality=yes")
        if box.enabled("RestrictRealtime") and name in ("sched_setscheduler", "sched_setattr") and re.search(
                r"SCHED_(FIFO|RR|DEADLINE)", args):
            fault(f"{name}(realtime): RestrictRealtime=yes")
        if box.enabled("RestrictSUIDSGID") and name in (
                "chmod", "fchmod", "fchmodat", "mkdir", "mkdirat", "mknod", "mknodat", "open", "openat", "creat"):
            mode = MODE.search(line)
            if "S_ISUID" in args or "S_ISGID" in args or (mode and int(mode.group(1), 8) & 0o6000):
                fault(f"{name}(S_ISUID/S_ISGID): RestrictSUIDSGID=yes")
    return t


def violations(t: Trace, box: Sandbox) -> list[str]:
    out = []
    for name in sorted(t.calls):
        why = box.why_denied(name)
        if why:
            out.append(f"{name} ({t.calls[name]} call(s)) is refused by {why}; e.g. {t.example[name]}")
    for what, line in sorted(t.argument_faults.items()):
        out.append(f"{what}; e.g. {line}")
    if t.foreign_arch and box.settings.get("SystemCallArchitectures", [""])[-1] == "native":
        out.append(f"a non-native system call ABI (SystemCallArchitectures=native): {t.foreign_arch[0]}")
    return out


def assert_allowed(t: Trace, box: Sandbox, what: str) -> None:
    found = violations(t, box)
    assert not found, (f"{what} makes system calls that systemd/lorry-agent.service forbids (under systemd "
                       f"it would be killed with status=31/SYS or see the call fail):\n  " + "\n  ".join(found))


def demote() -> list[str]:
    """As root, run like the unit's User=: an unprivileged uid (root-only code paths, such as
    SQLite's fchown(2) of new journal files, do not run under the unit). DAC_READ_SEARCH only so
    the interpreter (perhaps under /root) stays readable."""
    if os.geteuid() != 0:
        return []
    return [tool("setpriv"), f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--"]


def give_away(*paths: Path) -> None:
    if os.geteuid() == 0:
        for p in paths:
            os.chown(p, UNPRIVILEGED, UNPRIVILEGED)


def strace_command(out: Path, argv: list[str]) -> list[str]:
    return [*demote(), tool("strace"), "-f", "-qq", "-e", "trace=all", "-e", "signal=none", "-s", "0",
            "-o", str(out), "--", *argv]


INSTALLED = "/opt/lorry-agent/venv/bin/lorry-agent"
INSTALLED_CONFIG = "/etc/lorry-agent/agent.toml"


def unit_command(key: str, config: Path) -> list[str]:
    """The unit's ExecStartPre= / ExecStart= command line, run from this checkout with ``config``."""
    line = unit_settings(UNIT.read_text())[key][-1]
    assert not line.startswith("+"), f"{key} runs outside the sandbox: nothing to check"
    argv = line.lstrip("-@:!").split()
    assert argv[0] == INSTALLED, argv
    return [sys.executable, "-m", "agent", *(str(config) if a == INSTALLED_CONFIG else a for a in argv[1:])]


def agent_env(**extra: str) -> dict[str, str]:
    """The environment systemd gives the service (no user's session), and this checkout's code."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(REPO), **extra}


def trace_dir(tmp: Path) -> Path:
    """Where strace (as the unit's user) writes its trace."""
    d = tmp / "traces"
    d.mkdir(exist_ok=True)
    give_away(d)
    return d


def check_strace_works(tmp: Path) -> None:
    out = trace_dir(tmp) / "probe.strace"
    r = subprocess.run(strace_command(out, [sys.executable, "-c", "pass"]), capture_output=True, text=True)
    if r.returncode != 0 or not out.exists() or "execve(" not in out.read_text():
        pytest.skip(f"LOUD SKIP: strace cannot trace here (ptrace not permitted in this container?), so the "
                    f"unit's system-call filter is NOT checked against the agent: {r.stderr.strip()[-300:]}")


# -- a private D-Bus system bus with the real systemd-timedated ---------------------------------------


@dataclass
class SystemBus:
    address: str
    daemon: subprocess.Popen
    log: Path

    def stop(self) -> None:
        # timedated, started by this bus (activation), would linger until its idle exit: end the
        # ones whose environment names this bus, and no other.
        mark = f"DBUS_SYSTEM_BUS_ADDRESS={self.address}".encode()
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and mark in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), signal.SIGTERM)
            except OSError:
                pass
        self.daemon.terminate()
        try:
            self.daemon.wait(5)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()


def timedated_binary() -> str | None:
    for p in ("/lib/systemd/systemd-timedated", "/usr/lib/systemd/systemd-timedated"):
        if os.access(p, os.X_OK):
            return p
    return None


def start_system_bus(folder: Path) -> SystemBus | None:
    """dbus-daemon with Debian's system-bus policy (so an unprivileged client is treated as on a
    real system bus) and systemd-timedated started on demand, as on the lorry."""
    daemon, timedated, conf = shutil.which("dbus-daemon"), timedated_binary(), Path("/usr/share/dbus-1/system.conf")
    if daemon is None or timedated is None or shutil.which("busctl") is None or not conf.exists():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    give_away(folder)
    sock = folder / "system_bus_socket"
    address = f"unix:path={sock}"
    services = folder / "services"
    services.mkdir()
    (services / "org.freedesktop.timedate1.service").write_text(
        "[D-BUS Service]\nName=org.freedesktop.timedate1\n"
        f"Exec=/usr/bin/env DBUS_SYSTEM_BUS_ADDRESS={address} {timedated}\nUser=root\n")
    text = conf.read_text()
    for pattern in (r"<user>.*?</user>", r"<fork/>", r"<standard_system_servicedirs/>",
                    r"<servicehelper>.*?</servicehelper>", r"<pidfile>.*?</pidfile>", r"<syslog/>",
                    r"<include[^>]*>[^<]*</include>"):
        text = re.sub(pattern, "", text, flags=re.S)
    text = re.sub(r"<listen>.*?</listen>", f"<listen>{address}</listen><servicedir>{services}</servicedir>", text)
    text = text.replace("<includedir>system.d</includedir>", f"<includedir>{conf.parent / 'system.d'}</includedir>")
    if os.geteuid() != 0:  # timedated runs as us, not root: let it own its name as root would
        import pwd

        text = text.replace("</busconfig>", f'<policy user="{pwd.getpwuid(os.geteuid()).pw_name}">'
                                            '<allow own="org.freedesktop.timedate1"/></policy></busconfig>')
    (folder / "bus.conf").write_text(text)
    log = folder / "dbus.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([daemon, f"--config-file={folder / 'bus.conf'}", "--nofork"], stdout=f, stderr=f)
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None, 10, "dbus-daemon's socket")
    except AssertionError:
        proc.kill()
        raise
    if proc.poll() is not None:
        raise AssertionError(f"dbus-daemon exited: {log.read_text()[-1000:]}")
    return SystemBus(address, proc, log)


@pytest.fixture(scope="module")
def system_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemBus | None]:
    bus = start_system_bus(tmp_path_factory.mktemp("bus") / "bus")
    yield bus
    if bus is not None:
        bus.stop()


def busctl_ntp_synchronised(address: str) -> bool:
    r = subprocess.run(["busctl", f"--address={address}", "get-property", "org.freedesktop.timedate1",
                        "/org/freedesktop/timedate1", "org.freedesktop.timedate1", "NTPSynchronized"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.split() == ["b", "true"]


# -- 1. learning NTP sync without adjtimex ------------------------------------------------------------


def test_timesyncd_flag_file_decides_when_timesyncd_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[bool] = []
    monkeypatch.setattr(clock, "timedated_ntp_synchronised", lambda *a, **k: asked.append(True) or True)
    monkeypatch.setattr(clock, "TIMESYNCD_DIR", tmp_path / "timesync")
    (tmp_path / "timesync").mkdir()
    assert clock.kernel_clock_synchronised() is False, "timesyncd runs and has not synchronised yet"
    (tmp_path / "timesync" / "synchronized").touch()
    assert clock.kernel_clock_synchronised() is True
    assert asked == [], "timesyncd's own flag is the answer: no D-Bus round trip every minute"
    monkeypatch.setattr(clock, "TIMESYNCD_DIR", tmp_path / "absent")
    assert clock.kernel_clock_synchronised() is True and asked == [True], "no timesyncd: timedated is asked"


def test_no_bus_means_not_synchronised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock, "TIMESYNCD_DIR", tmp_path / "absent")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path / 'no-such-socket'}")
    started = time.monotonic()
    assert clock.kernel_clock_synchronised() is False
    assert time.monotonic() - started < 1


def test_timedated_answer_over_a_real_system_bus(system_bus: SystemBus | None) -> None:
    if system_bus is None:
        pytest.skip("LOUD SKIP: dbus-daemon or systemd-timedated is missing: the D-Bus client is not checked "
                    "against real ones (apt-get install -y dbus systemd)")
    ours = clock.timedated_ntp_synchronised(system_bus.address, timeout_s=10)
    assert ours is busctl_ntp_synchronised(system_bus.address), "the same answer as busctl, from the same timedated"
    assert "timedate1" in system_bus.log.read_text(), "timedated was started on demand, as on the lorry"


class FakeBus:
    """A socket speaking just enough D-Bus to give the answers a real bus never gives on demand:
    true, an error, garbage, silence."""

    def __init__(self, folder: Path, reply: bytes | None) -> None:
        self.path = folder / "fake_bus"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        self.server.listen(1)
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            data = b""
            while b"\r\n" not in data:
                data += conn.recv(1024)
            conn.sendall(b"OK 0123456789abcdef0123456789abcdef\r\n")
            if self.reply is None:
                time.sleep(1.5)  # never answers
                return
            time.sleep(0.05)
            conn.sendall(self.reply)
            time.sleep(0.5)

    def close(self) -> None:
        self.server.close()
        self.thread.join(5)


def dbus_reply(reply_serial: int, body_sig: str, body: bytes, msg_type: int = 2, error: str = "") -> bytes:
    import struct

    def field(code: int, sig: str, value: bytes, buf: bytearray) -> None:
        buf += b"\0" * (-len(buf) % 8)
        buf += bytes([code, 1]) + sig.encode() + b"\0"
        buf += b"\0" * (-len(buf) % 4) if sig in "us" else b""
        buf += value

    m = bytearray(b"l" + bytes([msg_type, 1, 1]) + struct.pack("<III", len(body), 7, 0))
    field(5, "u", struct.pack("<I", reply_serial), m)
    field(8, "g", bytes([len(body_sig)]) + body_sig.encode() + b"\0", m)
    if error:
        field(4, "s", struct.pack("<I", len(error)) + error.encode() + b"\0", m)
    struct.pack_into("<I", m, 12, len(m) - 16)
    m += b"\0" * (-len(m) % 8)
    return bytes(m + body)


VARIANT_TRUE = b"\x01b\x00\x00\x01\x00\x00\x00"


@pytest.mark.parametrize(("reply", "expected"), [
    (dbus_reply(1, "s", b"\x04\x00\x00\x00:1.9\x00") + dbus_reply(2, "v", VARIANT_TRUE), True),
    (dbus_reply(2, "v", b"\x01b\x00\x00\x00\x00\x00\x00"), False),
    (dbus_reply(2, "s", b"\x05\x00\x00\x00nope!\x00", msg_type=3, error="org.freedesktop.DBus.Error.AccessDenied"),
     False),
    (b"\xff" * 64, False),
    (None, False),  # silence: bounded by the timeout
], ids=["true", "false", "error", "garbage", "silence"])
def test_bus_answers_true_false_error_garbage_silence(tmp_path: Path, reply: bytes | None, expected: bool) -> None:
    fake = FakeBus(tmp_path, reply)
    try:
        started = time.monotonic()
        timeout = 0.5 if reply is None else 10.0
        assert clock.timedated_ntp_synchronised(f"unix:path={fake.path}", timeout_s=timeout) is expected
        if reply is None:
            assert time.monotonic() - started < 1.5, "silence costs the timeout, no more"
    finally:
        fake.close()


# -- 2. the sandbox computed from the unit -----------------------------------------------------------


def test_sandbox_is_computed_from_the_unit(unit_sandbox: Sandbox) -> None:
    box = unit_sandbox
    assert box.allow_list and {"read", "openat", "futex", "connect", "clock_gettime", "execve"} <= box.filtered
    assert "clock_adjtime" not in box.filtered and "adjtimex" not in box.filtered
    assert "ProtectClock=yes" in box.why_denied("clock_adjtime") and "~@privileged" in box.why_denied("adjtimex")
    assert "~@privileged" in box.why_denied("fchown"), "@chown is in @privileged"
    assert box.why_denied("setrlimit") and box.why_denied("init_module") and box.why_denied("syslog")
    assert box.why_denied("mount"), "not in @system-service"
    assert box.families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_CAN"}


def test_the_check_catches_a_forbidden_call(tmp_path: Path, unit_sandbox: Sandbox) -> None:
    """The class of fault: the old NTP check (a read-only adjtimex) is reported by name."""
    check_strace_works(tmp_path)
    out = trace_dir(tmp_path) / "old.strace"
    old = ("import ctypes; libc = ctypes.CDLL(None); libc.adjtimex(ctypes.create_string_buffer(512)); "
           "import socket; socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)")
    subprocess.run(strace_command(out, [sys.executable, "-c", old]), check=True, capture_output=True)
    found = "\n".join(violations(read_trace(out, unit_sandbox), unit_sandbox))
    assert re.search(r"^(clock_adjtime|adjtimex) .*ProtectClock=yes", found, re.M), found
    assert "socket(AF_NETLINK): RestrictAddressFamilies" in found, found


# -- 3. the real agent under strace ------------------------------------------------------------------


def traced_calls(t: Trace) -> set[str]:
    # A Python program makes dozens of different system calls: fewer means strace's output was not understood.
    assert t.calls["execve"] >= 1 and len(t.calls) >= 25, f"the trace looks empty: {dict(t.calls)}"
    return set(t.calls)


def assert_ntp_checked(t: Trace, bus: SystemBus | None) -> None:
    """trust_system_clock = "auto": the agent asked whether NTP has synchronised the clock."""
    assert f'"{clock.TIMESYNCD_DIR}"' in t.text, "the NTP check did not run: no look for systemd-timesyncd"
    if bus is not None and not clock.TIMESYNCD_DIR.is_dir():  # with timesyncd here, its flag answered
        assert re.search(r'connect\(\d+, \{sa_family=AF_UNIX, sun_path="' + re.escape(bus.address.split("=", 1)[1]),
                         t.text), "the agent did not ask timedated over the system bus"


def test_dry_run_of_the_demo_stays_inside_the_unit_filter(tmp_path: Path, unit_sandbox: Sandbox,
                                                         system_bus: SystemBus | None) -> None:
    """The demo trip (15,827 fixes), its scripted seal and reefer, geofences, the event chain, a
    replayed J1939 capture; trust_system_clock = "auto", so the NTP check runs before any fix."""
    check_strace_works(tmp_path)
    import tomllib

    import canlog

    work = tmp_path / "work"
    work.mkdir()
    chain_key = work / "chain.key"
    chain_key.write_text(secrets.token_hex(16))
    chain_key.chmod(0o600)
    capture = work / "truck.log"
    canlog.write_log(capture, canlog.truck().frames)
    cfg = tomllib.loads(DEMO.read_text())
    cfg["gps"]["replay"] = str(DEMO.parent / cfg["gps"]["replay"])
    cfg["store"]["path"] = str(work / "state" / "buffer.db")
    cfg["time"] = {"trust_system_clock": "auto"}
    cfg["health"] = {"interval_s": 1}
    cfg["chain"] = {"hmac_key_file": str(chain_key)}
    cfg["can"] = {"interface": "replay", "replay": str(capture)}
    config = write_config(work / "agent.toml", cfg)
    give_away(work, chain_key, capture, config)
    out = trace_dir(tmp_path) / "dry-run.strace"
    env = agent_env(**({"DBUS_SYSTEM_BUS_ADDRESS": system_bus.address} if system_bus else {}))
    started = time.monotonic()
    proc = subprocess.Popen(strace_command(out, [*unit_command("ExecStart", config), "--dry-run"]),
                            env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        end_session(proc)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, stderr[-3000:]
    published = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(published) > 10, stdout[-2000:]
    t = read_trace(out, unit_sandbox)
    traced_calls(t)
    assert_allowed(t, unit_sandbox, f"lorry-agent run --dry-run (traced {elapsed:.1f} s)")
    assert_ntp_checked(t, system_bus)


class NotifySocket:
    """$NOTIFY_SOCKET: what systemd's end of sd_notify receives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        path.chmod(0o777)
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return self.messages

    def close(self) -> None:
        self.sock.close()


def end_session(proc: subprocess.Popen) -> None:
    """strace and the agent it traces (its own session): none outlives the test."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def agent_pid(strace: subprocess.Popen) -> int:
    """The traced agent: strace's child (through setpriv's exec when demoted, the same PID) that
    runs Python (the agent); strace forks short-lived children of its own at start to probe ptrace
    features, and under load one of those can be the only child seen."""
    def child() -> int | None:
        try:
            kids = Path(f"/proc/{strace.pid}/task/{strace.pid}/children").read_text().split()
        except OSError:
            return None
        for kid in kids:
            try:
                exe = os.readlink(f"/proc/{kid}/exe")  # strace's own forks are still strace
            except OSError:
                continue
            if exe == python:
                return int(kid)
        return None

    python = os.path.realpath(sys.executable)

    wait_until(lambda: child() is not None, 10, "the traced agent")
    return child()  # type: ignore[return-value]


def test_real_run_against_a_broker_stays_inside_the_unit_filter(tmp_path: Path, unit_sandbox: Sandbox,
                                                                system_bus: SystemBus | None) -> None:
    """A short real run as the unit starts it (its ExecStartPre=, then its ExecStart=): mutual TLS
    to a real mosquitto, a GPS on a serial port, the command channel, the event chain, a CAN bus,
    the watchdog; the broker restarts once; SIGTERM ends it (final commit, offline status)."""
    check_strace_works(tmp_path)
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: run .ci/setup (apt-get install -y mosquitto)")
    work = tmp_path / "work"
    work.mkdir()
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = certs.authority(pki, "ca")
    server, client, backend_pair = ca.server(pki), ca.client(pki), ca.client(pki, "backend", common_name="backend")
    broker = Mosquitto(tmp_path / "broker", tls=BrokerTls(ca.cert, server.cert, server.key, require_certificate=True))
    broker.start()
    tls = {"ca": str(ca.cert), "cert": str(backend_pair.cert), "key": str(backend_pair.key)}
    backend = Backend(broker.port, tls=tls)
    command_key = b"command-key-for-" + secrets.token_hex(12).encode()
    master, slave = os.openpty()
    tty.setraw(slave)  # no echo until the GPS driver opens it
    notify = NotifySocket(work / "notify")
    strace = None
    try:
        keys = {}
        for name, value in (("chain.key", secrets.token_hex(16).encode()), ("command.key", command_key)):
            keys[name] = work / name
            keys[name].write_bytes(value)
            keys[name].chmod(0o600)
        gps_port = os.ttyname(slave)
        config = write_config(work / "agent.toml", {
            "device": {"id": DEVICE},
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": "lorry", "reconnect_min_s": 0.2,
                     "reconnect_max_s": 1.0, "keepalive_s": 5,
                     "tls": {"ca_file": str(ca.cert), "cert_file": str(client.cert), "key_file": str(client.key)}},
            "store": {"path": str(work / "state" / "buffer.db"), "sync_interval_s": 0.2},
            "gps": {"port": gps_port, "reopen_min_s": 0.2, "reopen_max_s": 1.0},
            "can": {"interface": "socketcan", "channel": "can0", "reopen_min_s": 0.5, "reopen_max_s": 1.0},
            "reporting": {"min_period_s": 0, "min_distance_m": 0, "min_heading_deg": 0},
            "time": {"trust_system_clock": "auto"},
            "health": {"interval_s": 1},
            "chain": {"hmac_key_file": str(keys["chain.key"])},
            "commands": {"key_file": str(keys["command.key"])},
        })
        give_away(work, config, *keys.values(), client.key, Path(gps_port))
        env = agent_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000", JOURNAL_STREAM="8:12345",
                        **({"DBUS_SYSTEM_BUS_ADDRESS": system_bus.address} if system_bus else {}))
        # ExecStartPre= runs in the same sandbox.
        pre = trace_dir(tmp_path) / "check-config.strace"
        r = subprocess.run(strace_command(pre, unit_command("ExecStartPre", config)), env=env, cwd=work,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        t = read_trace(pre, unit_sandbox)
        traced_calls(t)
        assert_allowed(t, unit_sandbox, "ExecStartPre= lorry-agent check-config")

        out = trace_dir(tmp_path) / "run.strace"
        started = time.monotonic()
        with open(tmp_path / "agent.log", "wb") as log:
            strace = subprocess.Popen(strace_command(out, unit_command("ExecStart", config)),
                                      env=env, cwd=work, stdout=log, stderr=log, start_new_session=True)
        pid = agent_pid(strace)
        wait_until(lambda: "READY=1" in notify.drain(), 60, "READY=1 from the agent")

        fixes = list(trip.drive(interval_s=1, max_hours=0.01))
        for f in fixes[:6]:
            os.write(master, (trip.rmc(f) + trip.gga(f)).encode())
            time.sleep(0.1)
        wait_until(lambda: len(backend.readings("position")) >= 3, 60, "positions at the backend")

        # A signed command, at the lorry's (GPS) time: the reply comes back on cmd/reply.
        now = int(fixes[5].ts.timestamp() * 1000)
        body = {"id": "ping-1", "cmd": "ping", "args": {}, "ts": iso_ms(now), "nonce": secrets.token_hex(8)}
        backend.client.publish(f"lorry/{DEVICE}/cmd", json.dumps(sign_command(command_key, body)), qos=1)
        wait_until(lambda: any(t.endswith("/cmd/reply") for t, _p, _r in list(backend.messages)), 30,
                   "the reply to a signed command")

        broker.restart()  # the link drops and returns: reconnect, TLS handshake again
        for f in fixes[6:10]:
            os.write(master, (trip.rmc(f) + trip.gga(f)).encode())
            time.sleep(0.1)
        wait_until(lambda: len({r["seq"] for r in backend.readings("position")}) >= 8, 60,
                   "positions after the broker restart")
        assert any(m.startswith("WATCHDOG=1") for m in notify.drain()), "the watchdog was fed"

        os.kill(pid, signal.SIGTERM)
        assert strace.wait(60) == 0, (tmp_path / "agent.log").read_text()[-3000:]
        elapsed = time.monotonic() - started
    finally:
        if strace is not None:
            end_session(strace)
        notify.close()
        os.close(master)
        os.close(slave)
        backend.close()
        broker.stop()
    agent_log = (tmp_path / "agent.log").read_text(errors="replace")
    assert "Traceback" not in agent_log, agent_log[-3000:]
    t = read_trace(out, unit_sandbox)
    assert {"connect", "sendto", "recvfrom"} & traced_calls(t), "the trace saw the network"
    assert_allowed(t, unit_sandbox, f"lorry-agent run (traced {elapsed:.1f} s)")
    assert_ntp_checked(t, system_bus)
