"""Parameters (SPNs) and their decoding: the built-in table of common telematics SPNs.

Positions, scaling and special values from ../shared/data/can/j1939-spn-notes.md (J1939DA
extract). Little-endian; the most significant byte 0xFB..0xFF (not available, error,
parameter-specific) is never a number; 2-bit states 11 (n/a) and 10 (error) neither.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Signal:
    name: str
    spn: int | None
    pgn: int
    byte: int
    """First byte, 0-based (the notes' byte 1 is 0 here)."""
    bits: int
    bit: int = 0
    """First bit within the byte, 0-based from the least significant (notes' 1.3 → 2)."""
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    deadband: float = 0.0
    """Default change that is worth sending."""

    def decode(self, data: bytes) -> float | None:
        """Physical value, or None when not available, in error, or the frame is short."""
        if self.bits >= 8:
            n = self.bits // 8
            end = self.byte + n
            if len(data) < end or data[end - 1] >= 0xFB:
                return None
            raw = int.from_bytes(data[self.byte:end], "little")
        else:
            if len(data) <= self.byte:
                return None
            mask = (1 << self.bits) - 1
            raw = (data[self.byte] >> self.bit) & mask
            if raw >= mask - 1:  # all ones: n/a; all ones minus one: error
                return None
        value = raw * self.scale + self.offset
        return round(value, 6) if self.scale != 1 else value


EEC1, CCVS1, DD1, ET1, VD, VDHR, HOURS, LFC1, LFE1 = (
    61444, 65265, 65276, 65262, 65248, 65217, 65253, 65257, 65266)

BUILTIN: tuple[Signal, ...] = (
    Signal("engine_speed", 190, EEC1, 3, 16, scale=0.125, unit="rpm", deadband=100),
    Signal("driver_demand_torque", 512, EEC1, 1, 8, offset=-125, unit="%", deadband=10),
    Signal("actual_engine_torque", 513, EEC1, 2, 8, offset=-125, unit="%", deadband=10),
    Signal("wheel_speed", 84, CCVS1, 1, 16, scale=1 / 256, unit="km/h", deadband=5),
    Signal("parking_brake", 70, CCVS1, 0, 2, bit=2, deadband=1),
    Signal("brake_switch", 597, CCVS1, 3, 2, bit=4, deadband=1),
    Signal("cruise_set_speed", 86, CCVS1, 5, 8, unit="km/h", deadband=1),
    Signal("fuel_level", 96, DD1, 1, 8, scale=0.4, unit="%", deadband=2),
    Signal("fuel_level_2", 38, DD1, 6, 8, scale=0.4, unit="%", deadband=2),
    Signal("coolant_temp", 110, ET1, 0, 8, offset=-40, unit="°C", deadband=2),
    Signal("oil_temp", 175, ET1, 2, 16, scale=0.03125, offset=-273, unit="°C", deadband=2),
    Signal("trip_distance", 244, VD, 0, 32, scale=0.125, unit="km", deadband=1),
    Signal("total_distance", 245, VD, 4, 32, scale=0.125, unit="km", deadband=1),
    Signal("total_distance_hr", 917, VDHR, 0, 32, scale=5, unit="m", deadband=1000),
    Signal("trip_distance_hr", 918, VDHR, 4, 32, scale=5, unit="m", deadband=1000),
    Signal("engine_hours", 247, HOURS, 0, 32, scale=0.05, unit="h", deadband=0.1),
    Signal("engine_revolutions", 249, HOURS, 4, 32, scale=1000, unit="r", deadband=10_000),
    Signal("trip_fuel", 182, LFC1, 0, 32, scale=0.5, unit="L", deadband=1),
    Signal("total_fuel_used", 250, LFC1, 4, 32, scale=0.5, unit="L", deadband=1),
    Signal("fuel_rate", 183, LFE1, 0, 16, scale=0.05, unit="L/h", deadband=2),
)

BY_PGN: dict[int, tuple[Signal, ...]] = {}
for _s in BUILTIN:
    BY_PGN[_s.pgn] = BY_PGN.get(_s.pgn, ()) + (_s,)
BY_NAME = {s.name: s for s in BUILTIN}
