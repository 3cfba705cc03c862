"""NMEA 0183 → fixes: checksum-checked sentences combined into one fix per epoch.

Pure parsing, no I/O: the GPS driver feeds it lines from a serial port or a capture. Any
talker is accepted (GP, GN, GL, GA, BD, GB, GQ…). Sentences that carry a time (RMC, GGA, GNS,
GLL, ZDA) are grouped by that time, with the timeless VTG of the same epoch; an epoch is
finished when a sentence with a new time arrives, or as soon as it holds every sentence type
the receiver sent for the previous epoch (so a receiver sending RMC then GGA yields its fix on
the GGA, not a second later). GSA (fix mode) and GSV (satellites in view per constellation)
update the receiver's state.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pynmea2

# Sentence types that belong to an epoch; everything else below is receiver state.
EPOCH_TYPES = frozenset({"RMC", "GGA", "GNS", "GLL", "ZDA", "VTG"})
TIMELESS = frozenset({"VTG"})
STATE_TYPES = frozenset({"GSA", "GSV"})

KNOT_KMH = 1.852
DAY_MS = 86_400_000
ROLLOVER = dt.timedelta(weeks=1024)
# Receivers with the GPS week-number bug report dates 1024 weeks (19.6 years) late.
# No correct receiver reports a date before this software existed.
DEFAULT_DATE_FLOOR = dt.date(2025, 1, 1)

# GGA quality indicator → the payload's `fix`; None = not a position.
GGA_FIX = {1: "gps", 2: "dgps", 3: "pps", 4: "rtk", 5: "rtk_float", 6: "estimated"}
# RMC/GNS/GLL/VTG mode indicator (NMEA 2.3+) → `fix`; N, M (manual), S (simulator) are not.
MODE_FIX = {"A": "gps", "D": "dgps", "P": "pps", "R": "rtk", "F": "rtk_float", "E": "estimated"}

# GSV talker → constellation. GN (NMEA 4.11 mixed GSV) is counted under its own name.
CONSTELLATIONS = {
    "GP": "GPS", "GL": "GLONASS", "GA": "Galileo", "BD": "BeiDou", "GB": "BeiDou",
    "GQ": "QZSS", "QZ": "QZSS", "PQ": "QZSS", "GI": "NavIC", "IN": "NavIC", "GN": "GNSS",
}
# A constellation not heard of for this long is no longer in view.
SKY_STALE_S = 10.0


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
    mode: int | None = None
    """GSA fix mode: 2 = 2D, 3 = 3D; None when the receiver sends no GSA."""

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
    """Well-formed sentences that carry nothing for a fix (proprietary, TXT…)."""
    bad_checksum: int = 0
    garbage: int = 0
    """Not NMEA at all: noise, binary, truncated or unparseable lines."""
    bad_field: int = 0
    """Checksum right but a field unusable (e.g. latitude 'abc')."""
    no_fix: int = 0
    """Epochs where the receiver said it has no valid position (status V, quality 0)."""
    no_date: int = 0
    """Epochs dropped because no date was known yet (time-only sentences, no RMC/ZDA)."""
    fixes: int = 0
    rollover: int = 0
    """Dates corrected for the GPS week-number rollover."""


@dataclass
class _Epoch:
    tod_ms: int
    parts: dict[str, pynmea2.NMEASentence] = field(default_factory=dict)


class NmeaAssembler:
    """Feed lines in arrival order; completed fixes come out of ``feed`` and ``finish``.

    ``date_hint`` gives a date for receivers that never send one (GGA-only): the trusted
    system clock, or a capture's ``# Date:`` header. ``date_floor``: dates before it are
    taken as week-rollover victims and moved forward by 1024 weeks.
    """

    def __init__(
        self,
        *,
        default_date: dt.date | None = None,
        date_hint: Callable[[], dt.date | None] | None = None,
        date_floor: dt.date = DEFAULT_DATE_FLOOR,
    ):
        self.counters = NmeaCounters()
        self.date_floor = date_floor
        self._date_hint = date_hint
        self._epoch: _Epoch | None = None
        self._expected: frozenset[str] = frozenset()
        self._last_tod: int | None = None
        self._last_kinds: set[str] = set()
        self._date: dt.date | None = default_date
        self._date_tod: int = 0
        self._orphan_vtg: pynmea2.NMEASentence | None = None
        self._mode: int | None = None
        self._sky: dict[str, tuple[int, float]] = {}

    @property
    def satellites_in_view(self) -> dict[str, int]:
        """Satellites in view per constellation, from the latest GSV of each."""
        now = time.monotonic()
        return {k: n for k, (n, seen) in sorted(self._sky.items()) if now - seen < SKY_STALE_S}

    def feed(self, line: bytes | str) -> Iterator[Fix]:
        if line[:1] in (b"#", "#"):
            self.counters.lines += 1
            self._comment(line if isinstance(line, str) else line.decode("ascii", "replace"))
            return
        self.counters.lines += 1
        msg = self._sentence(line)
        if msg is None:
            return
        kind = msg.sentence_type
        if kind in STATE_TYPES:
            return
        if kind in TIMELESS:
            self.counters.sentences += 1
            if self._epoch is not None:
                self._epoch.parts[kind] = msg
                if self._expected and self._expected.issubset(self._epoch.parts):
                    yield from self._finish()
            else:
                self._orphan_vtg = msg  # sent before the epoch's first timed sentence
            return
        try:
            tod = _tod_ms(_raw(msg, "timestamp"))
        except ValueError:
            self.counters.bad_field += 1
            return
        self.counters.sentences += 1
        if tod is None:
            # A receiver without time has no fix either (cold start: '$GPRMC,,V,,,,,,,,,,N').
            if kind != "ZDA":
                self.counters.no_fix += 1
            return
        epoch = self._epoch
        if epoch is not None and epoch.tod_ms != tod:
            yield from self._finish()
            epoch = None
        if kind in ("RMC", "ZDA"):
            # Only now: the date belongs to this sentence's epoch, not to the one just finished.
            self._learn_date(msg, tod)
        if epoch is None:
            if tod == self._last_tod:
                # A straggler for an epoch already reported: remember the receiver sends it.
                self._last_kinds.add(kind)
                self._expected = frozenset(self._last_kinds)
                return
            epoch = self._epoch = _Epoch(tod)
            if self._orphan_vtg is not None:
                epoch.parts["VTG"], self._orphan_vtg = self._orphan_vtg, None
        epoch.parts[kind] = msg
        if self._expected and self._expected.issubset(epoch.parts):
            yield from self._finish()

    def finish(self) -> Iterator[Fix]:
        """End of input (or the receiver went quiet): the epoch in progress is complete."""
        yield from self._finish()

    # -- sentences ------------------------------------------------------------------------------

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
        line = line[start:].rstrip()
        if not line.isascii():
            self.counters.garbage += 1
            return None
        ok = _checksum_ok(line)
        if ok is None:
            self.counters.garbage += 1  # truncated: no '*hh'
            return None
        if not ok:
            self.counters.bad_checksum += 1
            return None
        kind = line[3:6] if line[1] != "P" else ""
        if kind in STATE_TYPES:
            self._state(kind, line)
            return None
        if kind not in EPOCH_TYPES:
            self.counters.ignored += 1
            return None
        try:
            return pynmea2.parse(line)  # checksum already verified
        except (pynmea2.ParseError, ValueError):
            self.counters.garbage += 1
            return None

    def _state(self, kind: str, line: str) -> None:
        fields = line[1 : line.rfind("*")].split(",")
        try:
            if kind == "GSA":
                mode = int(fields[2]) if len(fields) > 2 and fields[2] else None
                self._mode = mode if mode in (1, 2, 3) else None
            else:  # GSV: total satellites in view of this talker's constellation
                n = int(fields[3])
                name = CONSTELLATIONS.get(fields[0][:2], fields[0][:2])
                self._sky[name] = (n, time.monotonic())
            self.counters.sentences += 1
        except (ValueError, IndexError):
            self.counters.bad_field += 1

    # -- dates ----------------------------------------------------------------------------------

    def _comment(self, line: str) -> None:
        """Capture files (gpsd's format) start with '#' comments; '# Date: yyyy-mm-dd' tells
        when it was recorded: the date for time-only receivers, and the rollover floor."""
        key, _, value = line[1:].partition(":")
        if key.strip().lower() != "date":
            return
        try:
            day = dt.date.fromisoformat(value.strip()[:10])
        except ValueError:
            return
        self.date_floor = day - ROLLOVER / 2
        if self._date is None:
            self._date_hint = lambda: day

    def _learn_date(self, msg: pynmea2.NMEASentence, tod: int) -> None:
        try:
            if msg.sentence_type == "ZDA":
                day = dt.date(int(_raw(msg, "year")), int(_raw(msg, "month")), int(_raw(msg, "day")))
            else:
                raw = _raw(msg, "datestamp")
                if len(raw) != 6 or not raw.isdigit():
                    return
                day = dt.date(2000 + int(raw[4:6]), int(raw[2:4]), int(raw[0:2]))
        except ValueError:
            return
        if day < self.date_floor:
            while day < self.date_floor:
                day += ROLLOVER
            self.counters.rollover += 1
        self._date, self._date_tod = day, tod

    def _date_for(self, tod: int) -> dt.date | None:
        """The date of an epoch: the last RMC/ZDA date, rolled over at midnight."""
        if self._date is None:
            hint = self._date_hint() if self._date_hint else None
            if hint is None:
                return None
            self._date, self._date_tod = hint, tod
        if tod < self._date_tod - DAY_MS // 2:
            self._date += dt.timedelta(days=1)
        self._date_tod = tod
        return self._date

    # -- epochs ---------------------------------------------------------------------------------

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
        rmc, gga, gns, gll, vtg = (p.get(k) for k in ("RMC", "GGA", "GNS", "GLL", "VTG"))
        if rmc is None and gga is None and gns is None and gll is None:
            return None  # ZDA or VTG alone: a time, not a position
        fix_kind = _fix_kind(rmc, gga, gns, gll)
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
        if rmc is not None:
            speed = _mul(_float(_raw(rmc, "spd_over_grnd")), KNOT_KMH)
            course = _float(_raw(rmc, "true_course"))
        elif vtg is not None:
            # Knots first, like RMC: receivers round the km/h field on its own ("0.0 N, 0.1 K").
            speed = _mul(_float(_raw(vtg, "spd_over_grnd_kts")), KNOT_KMH)
            if speed is None:
                speed = _float(_raw(vtg, "spd_over_grnd_kmph"))
            course = _float(_raw(vtg, "true_track"))
        else:
            speed = course = None
        return Fix(
            ts_ms=_day_ms(day) + epoch.tod_ms,
            lat=lat,
            lon=lon,
            speed_kmh=speed,
            course=course,
            alt_m=None if alt_src is None else _float(_raw(alt_src, "altitude")),
            sats=None if alt_src is None else _int(_raw(alt_src, "num_sats")),
            hdop=None if alt_src is None else _float(
                _raw(alt_src, "horizontal_dil" if alt_src is gga else "hdop")
            ),
            fix=fix_kind,
            # GSA is timeless and many receivers send it after the epoch's RMC/GGA: a "no fix"
            # from the last one is stale once the epoch's own sentences say there is a fix.
            mode=self._mode if self._mode in (2, 3) else None,
        )


def _fix_kind(rmc: Any, gga: Any, gns: Any, gll: Any) -> str | None:
    """What kind of fix the epoch's sentences agree on; None if any says there is none."""
    kind: str | None = "gps"
    if rmc is not None:
        if _raw(rmc, "status") != "A":
            return None
        if mode := _raw(rmc, "mode_indicator"):
            kind = MODE_FIX.get(mode[0])
    if gga is not None and kind is not None:
        qual = _int(_raw(gga, "gps_qual"))
        kind = GGA_FIX.get(qual) if qual is not None else None
    if gns is not None and kind is not None:
        modes = [MODE_FIX.get(c) for c in _raw(gns, "mode_indicator")]
        gns_kind = next((m for m in modes if m), None)
        if gns_kind is None:
            return None
        if rmc is None and gga is None:
            kind = gns_kind
    if gll is not None and kind is not None and _raw(gll, "status") != "A":
        return None
    return kind


def _checksum_ok(line: str) -> bool | None:
    """The '*hh' checksum of ``$…*hh``; None when missing. XOR of all bytes by folding the
    line as one big integer: a few big-int operations instead of a Python loop per byte."""
    star = line.rfind("*")
    if star < 1 or len(line) - star != 3:
        return None
    try:
        want = int(line[star + 1 :], 16)
    except ValueError:
        return None
    body = line[1:star].encode("ascii")
    n = len(body)
    x = int.from_bytes(body, "big")
    while n > 1:
        half = n // 2
        x = (x >> (8 * half)) ^ (x & ((1 << (8 * half)) - 1))
        n -= half
    return x == want


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
