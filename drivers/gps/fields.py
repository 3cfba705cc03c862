"""NMEA 0183 fields: where each field sits in each sentence type, and how a field's text
becomes a value (drivers/gps/nmea.py assembles them into fixes).

A helper raises ValueError for a field it cannot read: the epoch's fields are then
untrustworthy, and the assembler counts the epoch under ``bad_field``.
"""

from __future__ import annotations

import datetime as dt
from math import isfinite

import pynmea2

# Sentence types that belong to an epoch; everything else below is receiver state.
EPOCH_TYPES = frozenset({"RMC", "GGA", "GNS", "GLL", "ZDA", "VTG"})
TIMELESS = frozenset({"VTG"})
STATE_TYPES = frozenset({"GSA", "GSV"})
# pynmea2's sentence classes are the field layout: where each field sits in each type.
LAYOUT = {k: pynmea2.TalkerSentence.sentence_types[k] for k in EPOCH_TYPES}
WIDTH = {k: len(cls.fields) for k, cls in LAYOUT.items()}


def _i(kind: str, name: str) -> int:
    idx: int = LAYOUT[kind].name_to_idx[name]  # pynmea2 is untyped
    return idx


TIME = {k: _i(k, "timestamp") for k in EPOCH_TYPES if k != "VTG"}
RMC_STATUS, RMC_SPEED, RMC_COURSE, RMC_DATE, RMC_MODE = (
    _i("RMC", n) for n in ("status", "spd_over_grnd", "true_course", "datestamp", "mode_indicator"))
GGA_QUAL, GGA_SATS, GGA_HDOP, GGA_ALT = (_i("GGA", n) for n in ("gps_qual", "num_sats", "horizontal_dil", "altitude"))
GNS_MODE, GNS_SATS, GNS_HDOP, GNS_ALT = (_i("GNS", n) for n in ("mode_indicator", "num_sats", "hdop", "altitude"))
GLL_STATUS = _i("GLL", "status")
VTG_TRACK, VTG_KNOTS, VTG_KMH = (_i("VTG", n) for n in ("true_track", "spd_over_grnd_kts", "spd_over_grnd_kmph"))
ZDA_DAY, ZDA_MONTH, ZDA_YEAR = (_i("ZDA", n) for n in ("day", "month", "year"))
LATLON = {k: tuple(_i(k, n) for n in ("lat", "lat_dir", "lon", "lon_dir")) for k in ("RMC", "GGA", "GNS", "GLL")}

KNOT_KMH = 1.852
EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()

# GGA quality indicator → the payload's `fix`; None = not a position.
GGA_FIX = {1: "gps", 2: "dgps", 3: "pps", 4: "rtk", 5: "rtk_float", 6: "estimated"}
# RMC/GNS/GLL/VTG mode indicator (NMEA 2.3+) → `fix`; N, M (manual), S (simulator) are not.
MODE_FIX = {"A": "gps", "D": "dgps", "P": "pps", "R": "rtk", "F": "rtk_float", "E": "estimated"}

# GSV talker → constellation. GN (NMEA 4.11 mixed GSV) is counted under its own name.
CONSTELLATIONS = {
    "GP": "GPS", "GL": "GLONASS", "GA": "Galileo", "BD": "BeiDou", "GB": "BeiDou",
    "GQ": "QZSS", "QZ": "QZSS", "PQ": "QZSS", "GI": "NavIC", "IN": "NavIC", "GN": "GNSS",
}


def fix_kind_of(rmc: list[str] | None, gga: list[str] | None, gns: list[str] | None,
                gll: list[str] | None) -> str | None:
    """What kind of fix the epoch's sentences agree on; None if any says there is none."""
    kind: str | None = "gps"
    if rmc is not None:
        if rmc[RMC_STATUS].strip() != "A":
            return None
        if mode := rmc[RMC_MODE].strip():
            kind = MODE_FIX.get(mode[0])
    if gga is not None and kind is not None:
        qual = whole(gga[GGA_QUAL])
        kind = GGA_FIX.get(qual) if qual is not None else None
    if gns is not None and kind is not None:
        gns_kind = next((m for c in gns[GNS_MODE].strip() if (m := MODE_FIX.get(c))), None)
        if gns_kind is None:
            return None
        if rmc is None and gga is None:
            kind = gns_kind
    if gll is not None and kind is not None and gll[GLL_STATUS].strip() != "A":
        return None
    return kind


def tod_ms(raw: str) -> int | None:
    """``hhmmss[.sss]`` → milliseconds since midnight."""
    if len(raw) < 6:
        return None
    h, m, s = int(raw[0:2]), int(raw[2:4]), float(raw[4:])
    if not (0 <= h < 24 and 0 <= m < 60 and 0 <= s < 61):
        raise ValueError(raw)
    return (h * 3600 + m * 60) * 1000 + round(s * 1000)


def degrees(raw: str, deg_digits: int, hemi: str, dirs: str, limit: float) -> float:
    """``ddmm.mmmm`` (or ``dddmm.mmmm``) and a hemisphere letter → signed decimal degrees."""
    n = deg_digits + 2
    if hemi not in _HEMISPHERES[dirs] or raw[n:n + 1] not in _DOT_OR_END or not raw[:n].isdigit():
        raw, hemi = raw.strip(), hemi.strip()  # padded fields are rare: check again, slowly
        if hemi not in _HEMISPHERES[dirs] or raw[n:n + 1] not in _DOT_OR_END or not raw[:n].isdigit():
            raise ValueError(raw)
    frac = raw[n + 1:]
    if frac and not frac.isdigit():
        raise ValueError(raw)
    minutes = float(raw[deg_digits:])
    value = int(raw[:deg_digits]) + minutes / 60
    if minutes >= 60 or value > limit:
        raise ValueError(raw)
    return -value if hemi == dirs[1] else value


_HEMISPHERES = {"NS": ("N", "S"), "EW": ("E", "W")}
_DOT_OR_END = (".", "")


def real(raw: str) -> float | None:
    if not raw or raw.isspace():
        return None
    v = float(raw)  # ValueError on junk: the epoch's fields are untrustworthy
    if not isfinite(v):
        raise ValueError(raw)
    return v


def whole(raw: str) -> int | None:
    return int(raw) if raw and not raw.isspace() else None


def knots_kmh(raw: str) -> float | None:
    v = real(raw)
    return None if v is None else v * KNOT_KMH


def day_number(day: dt.date) -> int:
    """Days since 1970-01-01."""
    return day.toordinal() - EPOCH_ORDINAL
