"""Builder of SAE J1939 bus traffic for tests and benchmarks: frames, candump/ASC logs, and
sending the same frames on a python-can bus.

Everything is encoded from ../shared/data/can/j1939-spn-notes.md (positions, scaling, special
values) and the J1939-21 / J1939-73 layouts, byte by byte, never with the product's own
encoders (drivers/j1939), so a test built on it checks the rules and not the code against
itself. Deterministic: no randomness, no wall clock.

A frame is ``Frame(ts, can_id, data)`` (a named tuple; two flags default to an ordinary 29-bit
data frame): ``ts`` in seconds (Unix time, microsecond resolution), ``can_id`` the 29-bit or
11-bit identifier, or for an error frame the SocketCAN error class (``CAN_ERR_BUSOFF`` …).

    frames = truck().frames
    write_log("capture.log", frames)          # (1700000000.020000) can0 0CF00400#FF7D7DE015FFF0FF
    write_asc("capture.asc", frames)          # with can.ASCWriter
    send(bus, frames)                         # on a python-can bus (e.g. interface="virtual")
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import can

T0_US = 1_700_000_000_000_000  # 2023-11-14T22:13:20Z, in microseconds

# SocketCAN can_id flags and error classes (linux/can.h, linux/can/error.h).
CAN_EFF_FLAG = 0x80000000
CAN_ERR_FLAG = 0x20000000
CAN_ERR_PROT = 0x00000008
CAN_ERR_BUSOFF = 0x00000040
CAN_ERR_BUSERROR = 0x00000080
CAN_ERR_RESTARTED = 0x00000100

# PGNs (J1939-71 / -73 / -21) and the addresses of the ECUs on our truck's bus.
EEC1, CCVS1, ET1, DD1, VD, VDHR, HOURS, LFC1, LFE1 = 61444, 65265, 65262, 65276, 65248, 65217, 65253, 65257, 65266
DM1, VIN, SOFT, REQUEST, TP_CM, TP_DT = 65226, 65260, 65242, 59904, 60416, 60160
AMB, PROP_B = 65269, 65280  # not in the built-in table: "unknown" to the agent
ENGINE, TRANSMISSION, BRAKES, CAB, BODY, TACHO = 0x00, 0x03, 0x0B, 0x17, 0x21, 0xEE
GLOBAL = 0xFF

NA = "n/a"
"""A field value: all ones, "not available"."""
ERR = "error"
"""A field value: most significant byte 0xFE (2-bit states: 10b), "error"."""
Value = float | int | str | None


class Frame(NamedTuple):
    ts: float
    can_id: int
    data: bytes
    extended: bool = True
    error: bool = False


def at(us: int) -> float:
    """Capture time ``us`` microseconds after T0, as the float a log reader makes of it."""
    return (T0_US + us) / 1e6


def ms(ts: float) -> int:
    """A frame time as the Unix milliseconds a reading carries."""
    return round(ts * 1e6) // 1000


def j1939_id(priority: int, pgn: int, sa: int, da: int = GLOBAL) -> int:
    """29-bit identifier (notes, "Identifier → PGN"): PDU1 (PF < 240) carries the destination
    in PS; PDU2 carries the group extension, which is part of the PGN."""
    pf = (pgn >> 8) & 0xFF
    ps = da if pf < 240 else pgn & 0xFF
    return (priority & 7) << 26 | ((pgn >> 16) & 3) << 24 | pf << 16 | ps << 8 | (sa & 0xFF)


# -- field encoders (notes, "The parameters") -------------------------------------------------


def _uint(v: Value, nbytes: int, scale: float = 1.0, offset: float = 0.0) -> bytes:
    """Little-endian raw field; None or NA is all 0xFF, ERR has 0xFE as its top byte."""
    if v is None or v == NA:
        return b"\xff" * nbytes
    if v == ERR:
        return b"\x00" * (nbytes - 1) + b"\xfe"
    raw = round((float(v) - offset) / scale)
    top = (1 << (8 * nbytes)) - 1 - (5 << (8 * (nbytes - 1)))  # 0xFA, 0xFAFF, 0xFAFFFFFF
    if not 0 <= raw <= top:
        raise ValueError(f"{v} is out of the valid range of a {nbytes}-byte field")
    return raw.to_bytes(nbytes, "little")


def _state(v: Value) -> int:
    """2-bit state: 0/1, NA = 11b, ERR = 10b."""
    if v is None or v == NA:
        return 0b11
    if v == ERR:
        return 0b10
    return int(v) & 1


def eec1_data(rpm: Value, demand_pct: Value = 0, actual_pct: Value = 0) -> bytes:
    """EEC1: torque mode n/a, bytes 2/3 torque (−125 %), bytes 4-5 engine speed (0.125 rpm),
    source of controlling device n/a, starter mode F0, demand torque n/a: like the notes'
    worked example ``FF 7D 7D E0 15 FF F0 FF`` (700 rpm)."""
    return (b"\xff" + _uint(demand_pct, 1, 1, -125) + _uint(actual_pct, 1, 1, -125)
            + _uint(rpm, 2, 0.125) + b"\xff\xf0\xff")


def ccvs1_data(speed_kmh: Value, parking: Value = 0, brake: Value = 0, cruise_set: Value = None) -> bytes:
    """CCVS1: parking brake 1.3 (2 bits), wheel speed bytes 2-3 (1/256 km/h), brake switch 4.5,
    cruise set speed byte 6; every other field not available."""
    b1 = 0xF3 | _state(parking) << 2
    b4 = 0xCF | _state(brake) << 4
    return bytes([b1]) + _uint(speed_kmh, 2, 1 / 256) + bytes([b4, 0xFF]) + _uint(cruise_set, 1) + b"\xff\xff"


def et1_data(coolant_c: Value, oil_c: Value = None) -> bytes:
    """ET1: coolant byte 1 (−40 °C), oil temperature bytes 3-4 (0.03125 °C, −273 °C)."""
    return _uint(coolant_c, 1, 1, -40) + b"\xff" + _uint(oil_c, 2, 0.03125, -273) + b"\xff" * 4


def dd1_data(fuel_pct: Value, fuel2_pct: Value = None) -> bytes:
    """DD1: fuel level 1 byte 2, fuel level 2 byte 7 (0.4 %)."""
    return b"\xff" + _uint(fuel_pct, 1, 0.4) + b"\xff" * 4 + _uint(fuel2_pct, 1, 0.4) + b"\xff"


def vd_data(trip_km: Value, total_km: Value) -> bytes:
    return _uint(trip_km, 4, 0.125) + _uint(total_km, 4, 0.125)


def vdhr_data(total_m: Value, trip_m: Value) -> bytes:
    return _uint(total_m, 4, 5) + _uint(trip_m, 4, 5)


def hours_data(hours: Value, revolutions: Value) -> bytes:
    return _uint(hours, 4, 0.05) + _uint(revolutions, 4, 1000)


def lfc1_data(trip_l: Value, total_l: Value) -> bytes:
    return _uint(trip_l, 4, 0.5) + _uint(total_l, 4, 0.5)


def lfe1_data(rate_lph: Value) -> bytes:
    return _uint(rate_lph, 2, 0.05) + b"\xff" * 6


# -- diagnostics (J1939-73) and transport (J1939-21) ----------------------------------------


@dataclass(frozen=True)
class Dtc:
    spn: int
    fmi: int
    oc: int = 1
    """Occurrence count; 127 = not available."""

    def encode(self) -> bytes:
        """SPN bits 1-16 in bytes 1-2, bits 17-19 in the top 3 bits of byte 3, FMI below;
        byte 4: conversion method (0) and occurrence count."""
        s = self.spn
        return bytes([s & 0xFF, s >> 8 & 0xFF, (s >> 16 & 7) << 5 | self.fmi, self.oc & 0x7F])


def dm1_payload(dtcs: Iterable[Dtc], *, amber: bool = True) -> bytes:
    """Lamp byte (MIL, red stop, amber warning, protect: 2 bits each from the top), flash byte,
    then 4 bytes a DTC. No DTC: SPN 0 / FMI 0, padded to a single 8-byte frame."""
    dtcs = list(dtcs)
    lamps = bytes([(0b01 << 2) if amber and dtcs else 0x00, 0xFF])
    if not dtcs:
        return lamps + b"\x00\x00\x00\x00\xff\xff"
    body = lamps + b"".join(d.encode() for d in dtcs)
    return body + b"\xff" * (8 - len(body)) if len(body) < 8 else body


def vin_payload(vin: str) -> bytes:
    return vin.encode("ascii") + b"*"


def _pgn3(pgn: int) -> bytes:
    return pgn.to_bytes(3, "little")


def _packets(payload: bytes) -> list[bytes]:
    n = -(-len(payload) // 7)
    return [bytes([i + 1]) + payload[7 * i: 7 * i + 7].ljust(7, b"\xff") for i in range(n)]


def bam(t_us: int, sa: int, pgn: int, payload: bytes, *, gap_us: int = 50_000, priority: int = 7) -> list[Frame]:
    """A broadcast (BAM) session: TP.CM BAM then the TP.DT packets, ``gap_us`` apart."""
    n = -(-len(payload) // 7)
    cm = bytes([32, len(payload) & 0xFF, len(payload) >> 8, n, 0xFF]) + _pgn3(pgn)
    out = [Frame(at(t_us), j1939_id(priority, TP_CM, sa), cm)]
    for i, p in enumerate(_packets(payload), 1):
        out.append(Frame(at(t_us + i * gap_us), j1939_id(priority, TP_DT, sa), p))
    return out


def cmdt(t_us: int, sa: int, da: int, pgn: int, payload: bytes, *, window: int = 2, gap_us: int = 10_000,
         priority: int = 7) -> list[Frame]:
    """A connection-mode session between two other nodes: RTS (sa → da), CTS windows (da → sa),
    TP.DT packets (sa → da), EOMA (da → sa)."""
    size, packets = len(payload), _packets(payload)
    n = len(packets)
    t = t_us
    out = [Frame(at(t), j1939_id(priority, TP_CM, sa, da), bytes([16, size & 0xFF, size >> 8, n, window]) + _pgn3(pgn))]
    nxt = 1
    while nxt <= n:
        count = min(window, n - nxt + 1)
        t += gap_us
        out.append(Frame(at(t), j1939_id(priority, TP_CM, da, sa), bytes([17, count, nxt, 0xFF, 0xFF]) + _pgn3(pgn)))
        for p in packets[nxt - 1: nxt - 1 + count]:
            t += gap_us
            out.append(Frame(at(t), j1939_id(priority, TP_DT, sa, da), p))
        nxt += count
    t += gap_us
    out.append(Frame(at(t), j1939_id(priority, TP_CM, da, sa),
                     bytes([19, size & 0xFF, size >> 8, n, 0xFF]) + _pgn3(pgn)))
    return out


def periodic(start_us: int, stop_us: int, period_us: int, can_id: int, data: Callable[[float], bytes]) -> list[Frame]:
    """A frame every ``period_us`` in [start, stop); ``data(t)`` gets seconds since T0."""
    return [Frame(at(t), can_id, data(t / 1e6)) for t in range(start_us, stop_us, period_us)]


def error_frame(t_us: int, err_class: int, data: bytes = bytes(8)) -> Frame:
    return Frame(at(t_us), err_class, data, extended=True, error=True)


def merge(*groups: Iterable[Frame]) -> list[Frame]:
    """All frames in capture order (stable: equal times keep their group order)."""
    return sorted((f for g in groups for f in g), key=lambda f: f.ts)


# -- the truck: one realistic capture with everything the driver handles ---------------------

S = 1_000_000  # one second in microseconds


def engine_rpm(t: float) -> float:
    """Idle 600 until 5 s, ramp 80 rpm/s to 1800 at 20 s, hold; idle 650 after the gap."""
    if t >= 55:
        return 650.0
    if t < 5:
        return 600.0
    return min(1800.0, 600.0 + 80.0 * (t - 5))


def wheel_speed(t: float) -> float:
    return 0.0 if t < 5 or t >= 55 else round((engine_rpm(t) - 600) / 1200 * 80, 2)


@dataclass
class Truck:
    """A capture and what it holds, for tests to check against."""

    frames: list[Frame]
    vin: str
    alarms: list[tuple[float, str, int, int, int | None, int]]
    """Expected DTC events: (frame time, state, spn, fmi, oc, source address)."""
    gap: tuple[float, float]
    """Last frame before the silent gap, first frame after it."""
    std_frames: int
    unknown_frames: int
    """Frames of PGNs the built-in table does not know (AMB, proprietary B)."""
    unknown_ids: int
    error_frames: list[Frame] = field(default_factory=list)
    rpm_na: tuple[float, float] = (30.0, 30.5)
    rpm_error: tuple[float, float] = (31.0, 31.5)

    @property
    def first(self) -> float:
        return self.frames[0].ts

    @property
    def last(self) -> float:
        return self.frames[-1].ts


VIN_TEXT = "LZZ5CLVB8JW123456"
ENGINE_DTCS = [Dtc(110, 0, 3), Dtc(100, 1, 1), Dtc(521000, 9, 5), Dtc(3226, 2, 127)]
ENGINE_DTCS_LATER = [Dtc(110, 0, 4), Dtc(521000, 9, 5), Dtc(3226, 2, 127)]  # 100/1 cleared; 110/0 counts on
BRAKE_DTC = Dtc(1045, 4, 1)


def truck(*, gap: tuple[float, float] = (40.0, 55.0), end: float = 70.0, with_errors: bool = True) -> Truck:
    """~70 s of bus: engine at 20 ms ramping 600 → 1800 rpm, CCVS1 at 100 ms from the engine
    and the tachograph, ET1/DD1/VDHR at 1 s, VD/LFE1 at 100 ms, HOURS/LFC1 every 5 s; DM1 over
    BAM every second (4 DTCs, one with SPN > 65535; from 25 s one of them cleared), a brakes
    DTC in single-frame DM1s from 10 s to 35 s, the VIN over BAM, an RTS/CTS session between
    the brakes and the cab, unknown PGNs, 11-bit frames, error frames (bus error, bus-off,
    restarted) and the bus silent from ``gap[0]`` to ``gap[1]`` (ignition off)."""
    g0, g1, e = int(gap[0] * S), int(gap[1] * S), int(end * S)
    spans = [(0, g0), (g1, e)]
    groups: list[list[Frame]] = []

    def every(period_us: int, offset_us: int, can_id: int, data: Callable[[float], bytes]) -> None:
        for a, b in spans:
            groups.append(periodic(a + offset_us, b, period_us, can_id, data))

    def rpm_field(t: float) -> Value:
        if 30.0 <= t < 30.5:
            return NA
        if 31.0 <= t < 31.5:
            return ERR
        return engine_rpm(t)

    every(20_000, 0, j1939_id(3, EEC1, ENGINE),
          lambda t: eec1_data(rpm_field(t), 0 if t < 5 else 40, 0 if t < 5 else 35))
    every(100_000, 5_000, j1939_id(6, CCVS1, ENGINE),
          lambda t: ccvs1_data(wheel_speed(t), NA if 12 <= t < 13 else ERR if 13 <= t < 14 else int(t < 5 or t >= 55)))
    every(100_000, 55_000, j1939_id(6, CCVS1, TACHO),
          lambda t: ccvs1_data(wheel_speed(t) + 0.5 if wheel_speed(t) else 0.0))
    every(1 * S, 10_000, j1939_id(6, ET1, ENGINE),
          lambda t: et1_data(min(85, 60 + int(t)), ERR if 15 <= t < 17 else 90 + t / 10))
    every(1 * S, 15_000, j1939_id(6, DD1, CAB), lambda t: dd1_data(62.4 - (int(t) // 10) * 0.4))
    every(100_000, 25_000, j1939_id(6, VD, TACHO), lambda t: vd_data(12.5 + wheel_speed(t) * t / 3600, 184_000.125))
    every(1 * S, 35_000, j1939_id(6, VDHR, TACHO), lambda t: vdhr_data(184_000_125 + int(t) * 15, 12_500 + int(t) * 15))
    every(5 * S, 45_000, j1939_id(6, HOURS, ENGINE), lambda t: hours_data(12_345.6 + t / 3600, 58_000_000))
    every(5 * S, 65_000, j1939_id(6, LFC1, ENGINE), lambda t: lfc1_data(40.5 + int(t) * 0.5, 98_000.0 + int(t) * 0.5))
    every(100_000, 75_000, j1939_id(6, LFE1, ENGINE), lambda t: lfe1_data(NA if t < 1 else 4.0 + engine_rpm(t) / 100))
    every(1 * S, 85_000, j1939_id(6, AMB, ENGINE), lambda t: bytes.fromhex("FF FF FF 60 25 FF FF FF"))
    every(1 * S, 95_000, j1939_id(6, PROP_B, BODY), lambda t: bytes([int(t) & 0xFF, 0, 0, 0, 0, 0, 0, 0]))
    every(1 * S, 505_000, j1939_id(6, DM1, TRANSMISSION), lambda t: dm1_payload([]))

    # DM1 from the engine over BAM every second; from 25 s one DTC is gone.
    alarms: list[tuple[float, str, int, int, int | None, int]] = []
    first_dm1_done = None
    for a, b in spans:
        for t in range(a + 2 * S, b - S // 2, S):
            dtcs = ENGINE_DTCS if t < 25 * S else ENGINE_DTCS_LATER
            frames = bam(t, ENGINE, DM1, dm1_payload(dtcs))
            groups.append(frames)
            if first_dm1_done is None:
                first_dm1_done = frames[-1].ts
                alarms += [(frames[-1].ts, "active", d.spn, d.fmi, None if d.oc == 127 else d.oc, ENGINE) for d in dtcs]
            if t == 25 * S:
                alarms.append((frames[-1].ts, "cleared", 100, 1, 1, ENGINE))
    # Brakes: one DTC in single-frame DM1s from 10 s, none from 35 s.
    groups.append(periodic(10 * S + 600_000, 35 * S, S, j1939_id(6, DM1, BRAKES), lambda t: dm1_payload([BRAKE_DTC])))
    groups.append(periodic(35 * S + 600_000, g0, S, j1939_id(6, DM1, BRAKES), lambda t: dm1_payload([])))
    alarms.append((at(10 * S + 600_000), "active", 1045, 4, 1, BRAKES))
    alarms.append((at(35 * S + 600_000), "cleared", 1045, 4, 1, BRAKES))
    alarms.sort(key=lambda a: a[0])

    groups.append(bam(3 * S + 500_000, ENGINE, VIN, vin_payload(VIN_TEXT)))
    groups.append(cmdt(6 * S + 300_000, BRAKES, CAB, SOFT, b"BRK*v4.2.1*2023-05-17*"))

    std = [Frame(at(t), 0x123, bytes([i & 0xFF, 0x11, 0x22, 0x33]), extended=False)
           for i, t in enumerate(range(500_000, 20 * S, 2 * S))]
    std.append(Frame(at(7 * S + 777_000), 0x7DF, bytes.fromhex("02010C0000000000"), extended=False))
    groups.append(std)
    errors: list[Frame] = []
    if with_errors:
        errors = [
            error_frame(12 * S + 345_000, CAN_ERR_PROT | CAN_ERR_BUSERROR, bytes([0, 0, 0x04, 0, 0, 0, 0, 0])),
            error_frame(12 * S + 400_000, CAN_ERR_BUSOFF),
            error_frame(12 * S + 500_000, CAN_ERR_RESTARTED),
        ]
        groups.append(errors)

    frames = merge(*groups)
    before = [f for f in frames if f.ts < at(g0)]
    after = [f for f in frames if f.ts >= at(g0)]
    unknown = [f for f in frames if f.extended and not f.error and (f.can_id >> 8) & 0xFFFF in (AMB, PROP_B)]
    return Truck(
        frames=frames, vin=VIN_TEXT, alarms=alarms,
        gap=(before[-1].ts, after[0].ts if after else float("inf")),
        std_frames=len(std), unknown_frames=len(unknown), unknown_ids=len({f.can_id for f in unknown}),
        error_frames=errors,
    )


# -- writing and sending ---------------------------------------------------------------------


def log_line(f: Frame, channel: str = "can0") -> str:
    """One candump -L line: 3 hex digits for 11-bit, 8 for 29-bit ids; error frames carry
    CAN_ERR_FLAG and their class in the id."""
    if f.error:
        ident = f"{CAN_ERR_FLAG | f.can_id:08X}"
    elif f.extended:
        ident = f"{f.can_id:08X}"
    else:
        ident = f"{f.can_id:03X}"
    return f"({f.ts:.6f}) {channel} {ident}#{f.data.hex().upper()}"


def write_log(path: str | Path, frames: Iterable[Frame], channel: str = "can0") -> Path:
    """A candump -L log (``.log``), which ``can.LogReader`` reads."""
    path = Path(path)
    path.write_text("".join(log_line(f, channel) + "\n" for f in frames))
    return path


def screen_line(f: Frame, stamp: str | None = None, channel: str = "can0") -> str:
    """One line as candump prints it on screen (``candump can0`` with ``-ta``/``-td``/``-tz``/
    ``-tA`` or without a time): `` (000.020000)  can0  0CF00400   [8]  FF 7D 7D E0 15 FF F0 FF``;
    ``stamp`` is the text between the brackets."""
    if f.error:
        ident = f"{CAN_ERR_FLAG | f.can_id:08X}"
    else:
        ident = f"{f.can_id:08X}" if f.extended else f"{f.can_id:03X}"
    body = " ".join(f"{b:02X}" for b in f.data) + ("   ERRORFRAME" if f.error else "")
    head = f" ({stamp}) " if stamp is not None else " "
    return f"{head} {channel}  {ident:>8}   [{len(f.data)}]  {body}".rstrip()


SCREEN_TIMES = ("ta", "td", "tz", "tA", "none")


def screen_stamps(frames: list[Frame], times: str) -> list[str | None]:
    """The time candump prints for each frame with ``-ta`` (absolute), ``-td`` (delta to the
    previous frame), ``-tz`` (from the first frame), ``-tA`` (date and time, here in UTC) or
    ``none``."""
    out: list[str | None] = []
    for i, f in enumerate(frames):
        us = round(f.ts * 1e6)
        if times == "ta":
            out.append(f"{us // 10**6:010d}.{us % 10**6:06d}")
        elif times in ("td", "tz"):
            ref = round(frames[max(i - 1, 0) if times == "td" else 0].ts * 1e6)
            d = us - ref
            out.append(f"{d // 10**6:03d}.{d % 10**6:06d}")
        elif times == "tA":
            out.append(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(us // 10**6)) + f".{us % 10**6:06d}")
        else:
            out.append(None)
    return out


def write_screen(path: str | Path, frames: Iterable[Frame], times: str = "ta", *, numbered: bool = False,
                 crlf: bool = False, channel: str = "can0") -> Path:
    """candump's screen output saved to a file (``candump -tz can0 > x.txt``); ``numbered``
    prefixes ``cat -n`` line numbers."""
    frames = list(frames)
    lines = [screen_line(f, s, channel) for f, s in zip(frames, screen_stamps(frames, times))]
    if numbered:
        lines = [f"{i:6d}\t{line}" for i, line in enumerate(lines, 1)]
    path = Path(path)
    path.write_bytes("".join(line + ("\r\n" if crlf else "\n") for line in lines).encode("ascii"))
    return path


def message(f: Frame, channel: str | int | None = None) -> can.Message:
    if f.error:
        return can.Message(timestamp=f.ts, arbitration_id=f.can_id, is_error_frame=True, channel=channel,
                           data=f.data, dlc=len(f.data))
    return can.Message(timestamp=f.ts, arbitration_id=f.can_id, is_extended_id=f.extended, data=f.data,
                       channel=channel)


def messages(frames: Iterable[Frame], channel: str | int | None = None) -> Iterator[can.Message]:
    return (message(f, channel) for f in frames)


def write_asc(path: str | Path, frames: Iterable[Frame]) -> Path:
    """A Vector ASC log of the same frames, written by python-can's ``can.ASCWriter`` (its
    header's ``date`` line, the time of writing, is set to the measurement's start so that the
    file is the same on every run)."""
    path = Path(path)
    writer = can.ASCWriter(str(path))
    try:
        for m in messages(frames):
            writer.on_message_received(m)
    finally:
        writer.stop()
    lines = path.read_text().splitlines(keepends=True)
    start = next((ln for ln in lines if ln.lower().startswith("begin triggerblock ")), None)
    if start is not None and lines[0].startswith("date "):
        lines[0] = "date " + start[len("begin triggerblock "):]
        path.write_text("".join(lines))
    return path


def send(bus: can.BusABC, frames: Iterable[Frame], *, pace: float = 0.0) -> int:
    """Send frames on ``bus``; ``pace`` > 0 keeps their spacing, divided by ``pace`` (1 = real
    time); 0 sends them back to back. Returns how many were sent."""
    n = 0
    start: tuple[float, float] | None = None
    for f in frames:
        if pace > 0:
            if start is None:
                start = (time.monotonic(), f.ts)
            delay = start[0] + (f.ts - start[1]) / pace - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        bus.send(message(f))
        n += 1
    return n


def virtual_bus(channel: str, **kwargs: object) -> can.BusABC:
    """A python-can virtual bus instance; every instance on ``channel`` in this process sees
    what the others send (not what it sends itself)."""
    return can.Bus(interface="virtual", channel=channel, receive_own_messages=False, **kwargs)


def send_virtual(channel: str, frames: Iterable[Frame], *, pace: float = 0.0) -> int:
    """Send frames on a fresh virtual bus instance on ``channel`` (then shut it down)."""
    bus = virtual_bus(channel)
    try:
        return send(bus, frames, pace=pace)
    finally:
        bus.shutdown()
