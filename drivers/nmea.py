"""NMEA 0183 → fixes: checksum-checked sentences combined into one fix per epoch.

Pure parsing, no I/O: the GPS driver feeds it lines from a serial port or a capture. Any
talker is accepted (GP, GN, GL, GA, BD, GB…). Sentences that carry a time (RMC, GGA, GNS,
GLL) are grouped by that time; an epoch is finished when a sentence with a new time arrives,
or as soon as it holds every sentence type the receiver sent for the previous epoch (so a
receiver sending RMC then GGA yields its fix on the GGA, not a second later).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pynmea2

# Sentence types that make fixes; everything else is counted and skipped without parsing.
FIX_TYPES = frozenset({"RMC", "GGA", "GNS", "GLL"})

KNOT_KMH = 1.852
DAY_MS = 86_400_000

# GGA quality indicator → the payload's `fix`; None = not a position.
GGA_FIX = {1: "gps", 2: "dgps", 3: "pps", 4: "rtk", 5: "rtk_float", 6: "estimated"}
# RMC/GNS/GLL mode indicator (NMEA 2.3+) → `fix`; N, M (manual), S (simulator) are not positions.
MODE_FIX = {"A": "gps", "D": "dgps", "P": "pps", "R": "rtk", "F": "rtk_float", "E": "estimated"}


@dataclass(slots=True)
class Fix:
    ts_ms: int
    lat: float
    lon: float
    speed_kmh: float | None
    course: float | None
    alt_m: float | None
    sats: int | None
    hdop: float | None
    fix: str

    def as_data(self) -> dict[str, Any]:
        return {
            "lat": round(self.lat, 7),
            "lon": round(self.lon, 7),
            "speed_kmh": None if self.speed_kmh is None else round(self.speed_kmh, 2),
            "course": self.course,
            "alt_m": self.alt_m,
            "sats": self.sats,
            "hdop": self.hdop,
            "fix": self.fix,
        }


@dataclass
class NmeaCounters:
    lines: int = 0
    sentences: int = 0
    """Lines with a valid checksum that we used."""
    ignored: int = 0
    """Well-formed sentence types that carry nothing for a fix (GSV, GSA, proprietary…)."""
    bad_checksum: int = 0
    garbage: int = 0
    """Not NMEA at all: noise, binary, truncated or unparseable lines."""
    bad_field: int = 0
    """Checksum right but a field unusable (e.g. latitude 'abc')."""
    no_fix: int = 0
    """Epochs where the receiver said it has no valid position (status V, quality 0)."""
    no_date: int = 0
    """Epochs dropped because no date was known yet (time-only sentences, no RMC)."""
    fixes: int = 0


@dataclass
class _Epoch:
    tod_ms: int
    parts: dict[str, pynmea2.NMEASentence] = field(default_factory=dict)


class NmeaAssembler:
    """Feed lines in arrival order; completed fixes come out of ``feed`` and ``finish``."""

    def __init__(self, *, default_date: dt.date | None = None):
        self.counters = NmeaCounters()
        self._epoch: _Epoch | None = None
        self._expected: frozenset[str] = frozenset()
        self._last_tod: int | None = None
        self._last_kinds: set[str] = set()
        self._date: dt.date | None = default_date
        self._date_tod: int = 0

    def feed(self, line: bytes | str) -> Iterator[Fix]:
        self.counters.lines += 1
        msg = self._sentence(line)
        if msg is None:
            return
        kind = msg.sentence_type
        try:
            tod = _tod_ms(_raw(msg, "timestamp"))
        except ValueError:
            self.counters.bad_field += 1
            return
        self.counters.sentences += 1
        if tod is None:
            # A receiver without time has no fix either (cold start: '$GPRMC,,V,,,,,,,,,,N').
            self.counters.no_fix += 1
            return
        epoch = self._epoch
        if epoch is not None and epoch.tod_ms != tod:
            yield from self._finish()
            epoch = None
        if kind == "RMC":
            # Only now: the date belongs to this sentence's epoch, not to the one just finished.
            self._learn_date(msg, tod)
        if epoch is None:
            if tod == self._last_tod:
                # A straggler for an epoch already reported: remember the receiver sends it.
                self._last_kinds.add(kind)
                self._expected = frozenset(self._last_kinds)
                return
            epoch = self._epoch = _Epoch(tod)
        epoch.parts[kind] = msg
        if self._expected and self._expected.issubset(epoch.parts):
            yield from self._finish()

    def finish(self) -> Iterator[Fix]:
        """End of input: the epoch in progress is complete."""
        yield from self._finish()

    # -- internals ------------------------------------------------------------------------------

    def _sentence(self, line: bytes | str) -> pynmea2.NMEASentence | None:
        # Noise before the '$' (0xFF at power-up, a '$$' prefix) and collisions
        # ('$GPGGA,12$GPRMC,…') leave the last sentence.
        if isinstance(line, bytes):
            at = line.rfind(b"$")
            try:
                line = line[max(at, 0):].decode("ascii")
            except UnicodeDecodeError:
                self.counters.garbage += 1
                return None
        start = line.rfind("$")
        if start < 0 or len(line) - start < 10:
            if line.strip():
                self.counters.garbage += 1
            return None
        line = line[start:].strip()
        kind = line[3:6] if line[1] != "P" else ""
        if kind not in FIX_TYPES:
            if _looks_like_nmea(line):
                self.counters.ignored += 1
            else:
                self.counters.garbage += 1
            return None
        try:
            return pynmea2.parse(line, check=True)
        except pynmea2.ChecksumError as e:
            if "missing" in str(e):
                self.counters.garbage += 1
            else:
                self.counters.bad_checksum += 1
        except (pynmea2.ParseError, ValueError):
            self.counters.garbage += 1
        return None

    def _learn_date(self, rmc: pynmea2.NMEASentence, tod: int) -> None:
        raw = _raw(rmc, "datestamp")
        if len(raw) != 6 or not raw.isdigit():
            return
        try:
            day = dt.date(2000 + int(raw[4:6]), int(raw[2:4]), int(raw[0:2]))
        except ValueError:
            return
        self._date, self._date_tod = day, tod

    def _date_for(self, tod: int) -> dt.date | None:
        """The date of an epoch: the last RMC date, rolled over at midnight."""
        if self._date is None:
            return None
        if tod < self._date_tod - DAY_MS // 2:
            self._date += dt.timedelta(days=1)
            self._date_tod = tod
        return self._date

    def _finish(self) -> Iterator[Fix]:
        epoch, self._epoch = self._epoch, None
        if epoch is None:
            return
        self._last_tod = epoch.tod_ms
        self._last_kinds = set(epoch.parts)
        self._expected = frozenset(epoch.parts)
        try:
            fix = self._merge(epoch)
        except ValueError:
            self.counters.bad_field += 1
            return
        if fix is not None:
            self.counters.fixes += 1
            yield fix

    def _merge(self, epoch: _Epoch) -> Fix | None:
        p = epoch.parts
        rmc, gga, gns, gll = p.get("RMC"), p.get("GGA"), p.get("GNS"), p.get("GLL")
        fix_kind: str | None = "gps"
        if rmc is not None:
            if _raw(rmc, "status") != "A":
                fix_kind = None
            elif (mode := _raw(rmc, "mode_indicator")):
                fix_kind = MODE_FIX.get(mode[0]) if fix_kind else None
        if gga is not None and fix_kind is not None:
            qual = _int(_raw(gga, "gps_qual"))
            fix_kind = GGA_FIX.get(qual) if qual is not None else None
        if gns is not None and fix_kind is not None and rmc is None and gga is None:
            modes = [MODE_FIX.get(c) for c in _raw(gns, "mode_indicator")]
            fix_kind = next((m for m in modes if m), None)
        if gll is not None and fix_kind is not None and _raw(gll, "status") != "A":
            fix_kind = None
        if fix_kind is None:
            self.counters.no_fix += 1
            return None
        day = self._date_for(epoch.tod_ms)
        if day is None:
            self.counters.no_date += 1
            return None
        src = next(s for s in (rmc, gga, gns, gll) if s is not None)
        lat, lon = _latlon(src)
        alt_src = gga if gga is not None else gns
        ts = _day_ms(day) + epoch.tod_ms
        return Fix(
            ts_ms=ts,
            lat=lat,
            lon=lon,
            speed_kmh=None if rmc is None else _mul(_float(_raw(rmc, "spd_over_grnd")), KNOT_KMH),
            course=None if rmc is None else _float(_raw(rmc, "true_course")),
            alt_m=None if alt_src is None else _float(_raw(alt_src, "altitude")),
            sats=None if alt_src is None else _int(_raw(alt_src, "num_sats")),
            hdop=None if alt_src is None else _float(
                _raw(alt_src, "horizontal_dil" if alt_src is gga else "hdop")
            ),
            fix=fix_kind,
        )


def _looks_like_nmea(line: str) -> bool:
    star = line.rfind("*")
    return star > 0 and len(line) - star == 3 and line[1:6].isalnum()


def _raw(msg: pynmea2.NMEASentence, name: str) -> str:
    """A field's text as sent; pynmea2's converted attributes return junk text on bad input."""
    i = type(msg).name_to_idx[name]
    return msg.data[i].strip() if i < len(msg.data) else ""


def _tod_ms(raw: str) -> int | None:
    """``hhmmss[.sss]`` → milliseconds since midnight."""
    if len(raw) < 6:
        return None
    h, m, s = int(raw[0:2]), int(raw[2:4]), float(raw[4:])
    if not (0 <= h < 24 and 0 <= m < 60 and 0 <= s < 61):
        raise ValueError(raw)
    return (h * 3600 + m * 60) * 1000 + round(s * 1000)


def _latlon(msg: pynmea2.NMEASentence) -> tuple[float, float]:
    lat = _degrees(_raw(msg, "lat"), 2, _raw(msg, "lat_dir"), "NS", 90)
    lon = _degrees(_raw(msg, "lon"), 3, _raw(msg, "lon_dir"), "EW", 180)
    return lat, lon


def _degrees(raw: str, deg_digits: int, hemi: str, dirs: str, limit: float) -> float:
    """``ddmm.mmmm`` (or ``dddmm.mmmm``) and a hemisphere letter → signed decimal degrees."""
    whole, dot, frac = raw.partition(".")
    if (len(hemi) != 1 or hemi not in dirs or len(whole) != deg_digits + 2
            or not whole.isdigit() or not (frac.isdigit() or (not dot and not frac))):
        raise ValueError(raw)
    deg = int(whole[:deg_digits])
    minutes = float(raw[deg_digits:])
    if minutes >= 60:
        raise ValueError(raw)
    value = deg + minutes / 60
    if value > limit:
        raise ValueError(raw)
    return -value if hemi == dirs[1] else value


def _float(raw: str) -> float | None:
    if not raw:
        return None
    v = float(raw)  # ValueError on junk: the epoch's fields are untrustworthy
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(raw)
    return v


def _int(raw: str) -> int | None:
    return int(raw) if raw else None


def _mul(v: float | None, k: float) -> float | None:
    return None if v is None else v * k


_EPOCH_DAY = dt.date(1970, 1, 1)


def _day_ms(day: dt.date) -> int:
    return (day - _EPOCH_DAY).days * DAY_MS
