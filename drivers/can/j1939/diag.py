"""Diagnostics from whole parameter groups: active trouble codes (DM1) and the VIN.

Payloads come from a single frame or from the transport protocol (drivers/can/j1939/tp.py). A DM1
is an ECU's full list of active DTCs, re-sent every second, so the news is the difference
between two of them: ``DtcTracker`` turns the lists into "active"/"cleared" events. Bus input
never raises here: anything malformed decodes to None or is skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

DM1_PGN = 65226  # 0xFECA, active diagnostic trouble codes
VIN_PGN = 65260  # 0xFEEC, vehicle identification
SPN_NA = 0x7FFFF  # 19 bits all ones: not available
OC_NA = 0x7F
_LAMP = ("off", "on", "error", "n/a")  # 2-bit states 00, 01, 10, 11


@dataclass(frozen=True, slots=True)
class Lamps:
    mil: str
    red_stop: str
    amber_warning: str
    protect: str


@dataclass(frozen=True, slots=True)
class Dtc:
    spn: int
    fmi: int
    oc: int | None
    """Occurrence count, None when not available (127)."""
    cm: int
    """SPN conversion method: 0 in J1939-73 version 4. 1 means the ECU may use an older SPN
    layout; we decode the version 4 layout regardless and keep the bit so it can be told."""


@dataclass(slots=True)
class DtcEvent:
    state: str  # "active" or "cleared"
    spn: int
    fmi: int
    oc: int | None
    source_address: int
    lamps: dict[str, str]


def parse_dm1(payload: bytes) -> tuple[Lamps, list[Dtc]] | None:
    """Lamps (byte 1; byte 2 is their flash, not kept) and 4-byte DTCs from byte 3 on.

    SPN 0 / FMI 0 means "no active DTC" and SPN 0x7FFFF "not available": both are skipped, as
    are trailing bytes that do not make a whole DTC (the 0xFF 0xFF of a single-frame DM1).
    None when too short for one DTC, or all 0xFF: an ECU that says nothing must not clear its
    codes.
    """
    if len(payload) < 6 or all(b == 0xFF for b in payload):
        return None
    b = payload[0]
    lamps = Lamps(_LAMP[b >> 6 & 3], _LAMP[b >> 4 & 3], _LAMP[b >> 2 & 3], _LAMP[b & 3])
    dtcs = []
    for i in range(2, len(payload) - 3, 4):
        b1, b2, b3, b4 = payload[i : i + 4]
        spn = b1 | b2 << 8 | (b3 & 0xE0) << 11  # top 3 bits of byte 3 are SPN bits 17-19
        fmi = b3 & 0x1F
        if spn == SPN_NA or (spn == 0 and fmi == 0):
            continue
        oc = b4 & 0x7F
        dtcs.append(Dtc(spn, fmi, None if oc == OC_NA else oc, b4 >> 7))
    return lamps, dtcs


class DtcTracker:
    """Active DTCs per source address, keyed by (SPN, FMI). An occurrence count that moves on
    an already active DTC is not news: only appearing and clearing are events."""

    def __init__(self) -> None:
        self._active: dict[int, dict[tuple[int, int], Dtc]] = {}

    def update(self, sa: int, lamps: Lamps, dtcs: list[Dtc]) -> list[DtcEvent]:
        """Apply one DM1 from ``sa``: events for DTCs that appeared, then those that cleared."""
        now = {(d.spn, d.fmi): d for d in dtcs}
        before = self._active.get(sa, {})
        events = [DtcEvent("active", d.spn, d.fmi, d.oc, sa, asdict(lamps))
                  for k, d in now.items() if k not in before]
        events += [DtcEvent("cleared", d.spn, d.fmi, d.oc, sa, asdict(lamps))
                   for k, d in before.items() if k not in now]
        if now:
            self._active[sa] = now
        else:
            self._active.pop(sa, None)
        return events

    def active(self, sa: int | None = None) -> list[Dtc]:
        """Active DTCs of one source address, or of all."""
        if sa is not None:
            return list(self._active.get(sa, {}).values())
        return [d for _, d in self.active_with_sa()]

    def active_with_sa(self) -> list[tuple[int, Dtc]]:
        """(source address, DTC) for every active DTC, by source address."""
        return [(sa, d) for sa in sorted(self._active) for d in self._active[sa].values()]


def parse_vin(payload: bytes) -> str | None:
    """VIN (SPN 237): ASCII up to the '*' delimiter, NUL or 0xFF padding. Usually 17
    alphanumerics, but some vehicles send a shorter id: any printable text is returned as sent
    (without surrounding spaces); None if empty or not printable ASCII."""
    text = bytes(payload).split(b"*", 1)[0].split(b"\0", 1)[0].rstrip(b"\xff").strip(b" ")
    if not text or any(c < 0x20 or c > 0x7E for c in text):
        return None
    return text.decode("ascii")
