"""Trusted time for readings on a computer without a real-time clock.

A Raspberry Pi boots with whatever time it saved at shutdown, days off until NTP (which needs
the network we often lack) or the GPS sets it. So readings are stamped from a monotonic
reference: GPS time observed at a known monotonic instant gives ``utc = mono + offset``,
immune to the system clock being wrong or jumping. Without GPS time the system clock is used
only when the kernel says it is synchronised (NTP); otherwise the reading's time is *pending*:
the store holds it, and it is corrected once GPS time is known (same boot), or goes out
flagged as untrusted after ``max_hold_s``.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

TrustMode = Literal["auto", "always", "never"]
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
TIMESYNCD_DIR = Path("/run/systemd/timesync")
"""systemd-timesyncd's runtime folder: it exists while timesyncd runs, and timesyncd touches
``synchronized`` in it at its first NTP synchronisation of the boot (systemd >= 239)."""
SYSTEM_BUS_ADDRESS = "unix:path=/run/dbus/system_bus_socket"
"""The D-Bus system bus (``$DBUS_SYSTEM_BUS_ADDRESS`` overrides it, as for every D-Bus client)."""
BUS_TIMEOUT_S = 2.0
"""At most this long for systemd-timedated's answer (it is started on demand)."""
_MAX_MESSAGE = 1 << 16

log = logging.getLogger(__name__)
_bus_failure_logged = False


def kernel_clock_synchronised() -> bool:
    """Whether NTP has synchronised the system clock, learnt through what the unit's sandbox allows.

    Never adjtimex(2): even its read-only form is a clock system call, which ``ProtectClock=yes``
    and ``SystemCallFilter=~@privileged`` kill the agent for. Instead:

    - systemd-timesyncd running (Debian, Raspberry Pi OS): its flag file
      ``/run/systemd/timesync/synchronized`` — one stat(2), no other process involved;
    - otherwise (chrony, ntpd): systemd-timedated's ``NTPSynchronized`` property, asked over the
      D-Bus system bus (timedated makes the adjtimex(2) call itself, outside our sandbox).

    Anything that cannot answer (no bus, no timedated, a timeout) means not synchronised.
    """
    if TIMESYNCD_DIR.is_dir():
        return (TIMESYNCD_DIR / "synchronized").exists()
    return timedated_ntp_synchronised()


def timedated_ntp_synchronised(address: str | None = None, timeout_s: float = BUS_TIMEOUT_S) -> bool:
    """``org.freedesktop.timedate1`` ``NTPSynchronized`` over the system bus; False if unknown.

    A minimal D-Bus client (EXTERNAL authentication, Hello, Properties.Get) on an AF_UNIX socket:
    no subprocess (timedatectl or busctl every minute costs a fork and exec on a Pi) and no
    dependency."""
    global _bus_failure_logged
    try:
        answer = _dbus_get_property(
            address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS_ADDRESS,
            "org.freedesktop.timedate1", "/org/freedesktop/timedate1", "org.freedesktop.timedate1",
            "NTPSynchronized", timeout_s)
    except (OSError, ValueError, IndexError, struct.error) as e:
        level = logging.DEBUG if _bus_failure_logged else logging.WARNING
        _bus_failure_logged = True
        log.log(level, "cannot ask systemd-timedated whether NTP has synchronised the clock (%s); "
                "the system clock is not trusted until it can (docs/install.md)", e)
        return False
    return answer is True


def _bus_socket_address(address: str) -> str:
    """The first ``unix:path=`` or ``unix:abstract=`` of a D-Bus address list, as connect() wants it."""
    for entry in address.split(";"):
        kind, _, params = entry.partition(":")
        if kind != "unix":
            continue
        keys = dict(p.split("=", 1) for p in params.split(",") if "=" in p)
        if "path" in keys:
            return unquote(keys["path"])
        if "abstract" in keys:
            return "\0" + unquote(keys["abstract"])
    raise ValueError(f"no unix socket in D-Bus address {address!r}")


class _Marshal:
    """D-Bus wire format, little-endian; alignment is relative to the start of the buffer."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def pad(self, n: int) -> None:
        self.buf += b"\0" * (-len(self.buf) % n)

    def u32(self, v: int) -> None:
        self.pad(4)
        self.buf += struct.pack("<I", v)

    def string(self, s: str) -> None:  # also an object path ("o")
        b = s.encode()
        self.u32(len(b))
        self.buf += b + b"\0"

    def signature(self, s: str) -> None:
        b = s.encode()
        self.buf += bytes([len(b)]) + b + b"\0"


def _method_call(serial: int, destination: str, path: str, interface: str, member: str,
                 signature: str = "", args: tuple[str, ...] = ()) -> bytes:
    body = _Marshal()
    for a in args:  # strings only: all we send
        body.string(a)
    m = _Marshal()
    m.buf += b"l\x01\x00\x01" + struct.pack("<III", len(body.buf), serial, 0)  # method call, version 1
    fields = [(1, "o", path), (2, "s", interface), (3, "s", member), (6, "s", destination)]
    if signature:
        fields.append((8, "g", signature))
    for code, kind, value in fields:
        m.pad(8)
        m.buf.append(code)
        m.signature(kind)
        if kind == "g":
            m.signature(value)
        else:
            m.string(value)
    struct.pack_into("<I", m.buf, 12, len(m.buf) - 16)
    m.pad(8)
    return bytes(m.buf + body.buf)


class _Reader:
    """Just enough D-Bus unmarshalling for header fields and a variant of basic type."""

    def __init__(self, data: bytes, endian: str, pos: int = 0) -> None:
        self.data, self.e, self.pos = data, endian, pos

    def align(self, n: int) -> None:
        self.pos += -self.pos % n

    def u32(self) -> int:
        self.align(4)
        (v,) = struct.unpack_from(self.e + "I", self.data, self.pos)
        self.pos += 4
        return v

    def string(self) -> str:
        n = self.u32()
        s = self.data[self.pos:self.pos + n].decode()
        self.pos += n + 1
        return s

    def signature(self) -> str:
        n = self.data[self.pos]
        s = self.data[self.pos + 1:self.pos + 1 + n].decode()
        self.pos += n + 2
        return s

    def value(self, kind: str) -> object:
        if kind in ("s", "o"):
            return self.string()
        if kind == "g":
            return self.signature()
        if kind in ("u", "h"):
            return self.u32()
        if kind == "b":
            return self.u32() != 0
        if kind == "y":
            self.pos += 1
            return self.data[self.pos - 1]
        raise ValueError(f"unexpected D-Bus type {kind!r}")


def _dbus_get_property(address: str, destination: str, path: str, interface: str, name: str,
                       timeout_s: float) -> object:
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:

        def recv_some() -> bytes:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("the bus closed the connection")
            return chunk

        s.settimeout(timeout_s)
        where = _bus_socket_address(address)
        try:
            s.connect(where)
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror}: {where.lstrip(chr(0))}") from None
        s.sendall(b"\0AUTH EXTERNAL " + str(os.geteuid()).encode().hex().encode() + b"\r\n")
        line = b""
        while not line.endswith(b"\r\n"):
            line += recv_some()
            if len(line) > 512:
                raise ValueError("not a D-Bus server")
        if not line.startswith(b"OK "):
            raise ConnectionError(f"the bus refused us: {line.strip().decode(errors='replace')}")
        s.sendall(b"BEGIN\r\n"
                  + _method_call(1, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello")
                  + _method_call(2, destination, path, "org.freedesktop.DBus.Properties", "Get", "ss",
                                 (interface, name)))
        buf = b""
        while True:
            while len(buf) < 16:
                buf += recv_some()
            endian = {ord("l"): "<", ord("B"): ">"}.get(buf[0])
            if endian is None:
                raise ValueError("not a D-Bus message")
            body_len, _serial, fields_len = struct.unpack_from(endian + "III", buf, 4)
            header_len = 16 + fields_len + (-(16 + fields_len) % 8)
            if header_len + body_len > _MAX_MESSAGE:
                raise ValueError("D-Bus message too large")
            while len(buf) < header_len + body_len:
                buf += recv_some()
            message, buf = buf[:header_len + body_len], buf[header_len + body_len:]
            fields: dict[int, object] = {}
            r = _Reader(message, endian, 16)
            while r.pos < 16 + fields_len:
                r.align(8)
                code = message[r.pos]
                r.pos += 1
                fields[code] = r.value(r.signature())
            if fields.get(5) != 2:  # REPLY_SERIAL: not the answer to our Get (Hello's, a signal)
                continue
            if message[1] == 3:  # ERROR
                raise ConnectionError(f"{fields.get(4)}")
            if message[1] != 2 or fields.get(8) != "v":
                raise ValueError("unexpected reply to Properties.Get")
            body = _Reader(message[header_len:], endian)
            return body.value(body.signature())


def boot_id() -> str:
    """Monotonic times are comparable only within one boot."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class Stamp:
    ts_ms: int | None
    """UTC milliseconds, or None while the time is not known."""
    source: Literal["gps", "system", "pending"]


class TimeKeeper:
    """Turns a monotonic instant into UTC; thread-safe."""

    def __init__(
        self,
        *,
        trust_system_clock: TrustMode = "auto",
        wall_ns: Callable[[], int] = time.time_ns,
        mono_ns: Callable[[], int] = time.monotonic_ns,
        synchronised: Callable[[], bool] = kernel_clock_synchronised,
        recheck_s: float = 60.0,
    ):
        self.trust = trust_system_clock
        self._wall_ns = wall_ns
        self._mono_ns = mono_ns
        self._synchronised = synchronised
        self._recheck_ns = int(recheck_s * 1e9)
        self._lock = threading.Lock()
        self._gps_offset_ns: int | None = None
        self._sync_checked_at: int | None = None
        self._sync = False
        self.gps_fixes = 0

    def mono_now(self) -> int:
        return self._mono_ns()

    def observe_gps(self, utc_ms: int, mono_ns: int) -> None:
        """A fix with GPS time ``utc_ms`` was received at ``mono_ns``."""
        with self._lock:
            self._gps_offset_ns = utc_ms * 1_000_000 - mono_ns
            self.gps_fixes += 1

    @property
    def has_gps_time(self) -> bool:
        return self._gps_offset_ns is not None

    def system_trusted(self) -> bool:
        if self.trust != "auto":
            return self.trust == "always"
        now = self._mono_ns()
        if self._sync_checked_at is None or now - self._sync_checked_at >= self._recheck_ns:
            self._sync = self._synchronised()
            self._sync_checked_at = now
        return self._sync

    def stamp(self, mono_ns: int | None = None) -> Stamp:
        """The UTC time of monotonic instant ``mono_ns`` (default: now)."""
        mono = self._mono_ns() if mono_ns is None else mono_ns
        offset = self._gps_offset_ns
        if offset is not None:
            return Stamp((mono + offset) // 1_000_000, "gps")
        if self.system_trusted():
            return Stamp((self._wall_ns() - (self._mono_ns() - mono)) // 1_000_000, "system")
        return Stamp(None, "pending")

    def system_clock_error_s(self) -> float | None:
        """How far the system clock is from GPS time (positive: system ahead)."""
        offset = self._gps_offset_ns
        if offset is None:
            return None
        return (self._wall_ns() - (self._mono_ns() + offset)) / 1e9

    def wall_ms(self, mono_ns: int) -> int:
        """The (untrusted) system clock's idea of ``mono_ns``: the last resort."""
        return (self._wall_ns() - (self._mono_ns() - mono_ns)) // 1_000_000
