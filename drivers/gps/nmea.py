"""NMEA 0183 → fixes: checksum-checked sentences combined into one fix per epoch.

Pure parsing, no I/O: the GPS driver feeds it lines from a serial port or a capture. Any
talker is accepted (GP, GN, GL, GA, BD, GB, GQ…). Sentences that carry a time (RMC, GGA, GNS,
GLL, ZDA) are grouped by that time, with the timeless VTG of the same epoch; an epoch is
finished when a sentence with a new time arrives, or as soon as it holds every sentence type
the receiver sent for the previous epoch (so a receiver sending RMC then GGA yields its fix on
the GGA, not a second later). GSA (fix mode) and GSV (satellites in view per constellation)
update the receiver's state.

Nothing a line contains escapes as an exception: a line that cannot be used is counted by why.
Dates are judged by drivers/gps/gnsstime.py (week rollover, impossible dates) and values by
agent/model/ranges.py (an HDOP of -5 is published as null, not as -5).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import reduce
from math import isfinite
from operator import xor
from typing import Any

import pynmea2

from agent.model.ranges import RangeCheck
from drivers.gps.gnsstime import DAY_MS, GnssTimeJudge

# Sentence types that belong to an epoch; everything else below is receiver state.
EPOCH_TYPES = frozenset({"RMC", "GGA", "GNS", "GLL", "ZDA", "VTG"})
TIMELESS = frozenset({"VTG"})
STATE_TYPES = frozenset({"GSA", "GSV"})
# pynmea2's sentence classes are the field layout: where each field sits in each type.
_LAYOUT = {k: pynmea2.TalkerSentence.sentence_types[k] for k in EPOCH_TYPES}
_WIDTH = {k: len(cls.fields) for k, cls in _LAYOUT.items()}


def _i(kind: str, name: str) -> int:
    return _LAYOUT[kind].name_to_idx[name]


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
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()

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
    bad_date: int = 0
    """Epochs whose date was not believed (drivers/gps/gnsstime.py says why)."""
    fixes: int = 0
    internal_errors: int = 0
    """Lines that raised where nothing should: counted and skipped, never fatal."""


@dataclass
class _Epoch:
    tod_ms: int
    parts: dict[str, list[str]] = field(default_factory=dict)


class NmeaAssembler:
    """Feed lines in arrival order; completed fixes come out of ``feed`` and ``finish``.

    ``date_hint`` gives a date for receivers that never send one (GGA-only): the trusted
    system clock, or a capture's ``# Date:`` header. ``judge`` decides which epoch times to
    believe (default: a replay's judge; the serial driver passes a live one).
    """

    def __init__(
        self,
        *,
        default_date: dt.date | None = None,
        date_hint: Callable[[], dt.date | None] | None = None,
        judge: GnssTimeJudge | None = None,
        mono_ns: Callable[[], int] = time.monotonic_ns,
    ):
        self.counters = NmeaCounters()
        self.judge = judge or GnssTimeJudge(live=False)
        self.ranges = RangeCheck()
        self._mono_ns = mono_ns
        self._date_hint = date_hint
        self._epoch: _Epoch | None = None
        self._expected: frozenset[str] = frozenset()
        self._last_tod: int | None = None
        self._last_kinds: set[str] = set()
        self._date: int | None = None if default_date is None else _day(default_date)
        """The current date as days since 1970 (integers: no date can overflow)."""
        self._date_tod: int = 0
        self._date_measured = False
        """Whether ``_date`` came from the receiver (RMC/ZDA), not from a hint."""
        self._believed: tuple[int, int] | None = None
        """The last date (and its time of day) the judge believed."""
        self._orphan_vtg: list[str] | None = None
        self._tod_raw: str | None = None
        self._tod: int | None = None
        self._date_raw: str | None = None
        self._mode: int | None = None
        self._sky: dict[str, tuple[int, float]] = {}

    @property
    def satellites_in_view(self) -> dict[str, int]:
        """Satellites in view per constellation, from the latest GSV of each."""
        now = time.monotonic()
        return {k: n for k, (n, seen) in sorted(self._sky.items()) if now - seen < SKY_STALE_S}

    def feed(self, line: bytes | str) -> Iterator[Fix]:
        try:
            yield from self._feed(line)
        except Exception:  # noqa: BLE001 - no line may stop the receiver: count it, go on
            self.counters.internal_errors += 1
            self._epoch = None

    def _feed(self, line: bytes | str) -> Iterator[Fix]:
        if line[:1] in (b"#", "#"):
            self.counters.lines += 1
            self._comment(line if isinstance(line, str) else line.decode("ascii", "replace"))
            return
        self.counters.lines += 1
        got = self._sentence(line)
        if got is None:
            return
        kind, msg = got
        if kind in TIMELESS:
            self.counters.sentences += 1
            if self._epoch is not None:
                self._epoch.parts[kind] = msg
                if self._expected and self._expected.issubset(self._epoch.parts):
                    if (fix := self._finish()) is not None:
                        yield fix
            else:
                self._orphan_vtg = msg  # sent before the epoch's first timed sentence
            return
        raw_time = msg[TIME[kind]]
        if raw_time == self._tod_raw:
            tod = self._tod  # the epoch's second sentence: same time text, parsed once
        else:
            try:
                tod = _tod_ms(raw_time.strip())
            except ValueError:
                self.counters.bad_field += 1
                return
            self._tod_raw, self._tod = raw_time, tod
        self.counters.sentences += 1
        if tod is None:
            # A receiver without time has no fix either (cold start: '$GPRMC,,V,,,,,,,,,,N').
            if kind != "ZDA":
                self.counters.no_fix += 1
            return
        epoch = self._epoch
        if epoch is not None and epoch.tod_ms != tod:
            if (fix := self._finish()) is not None:
                yield fix
            epoch = None
        if kind in ("RMC", "ZDA"):
            # Only now: the date belongs to this sentence's epoch, not to the one just finished.
            self._learn_date(kind, msg, tod)
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
            if (fix := self._finish()) is not None:
                yield fix

    def finish(self) -> Iterator[Fix]:
        """End of input (or the receiver went quiet): the epoch in progress is complete."""
        if (fix := self._finish()) is not None:
            yield fix

    # -- sentences ------------------------------------------------------------------------------

    def _sentence(self, line: bytes | str) -> tuple[str, list[str]] | None:
        """A checksum-verified sentence of a type we use, or None (counted)."""
        # Noise before the '$' (0xFF at power-up, a '$$' prefix) and collisions
        # ('$GPGGA,12$GPRMC,…') leave the last sentence.
        if isinstance(line, str):
            if not line.isascii():
                line = line.encode("ascii", "replace")
            else:
                line = line.encode("ascii")
        start = line.rfind(b"$")
        if start < 0 or len(line) - start < 10:
            if line.strip():
                self.counters.garbage += 1
            return None
        line = line[start:].rstrip()
        star = line.rfind(b"*")
        if star < 1 or len(line) - star != 3:
            self.counters.garbage += 1  # truncated: no '*hh'
            return None
        body = line[1:star]
        try:
            ok = reduce(xor, body) == int(line[star + 1 :], 16)
            text = body.decode("ascii")
        except (ValueError, UnicodeDecodeError):
            self.counters.garbage += 1
            return None
        if not ok:
            self.counters.bad_checksum += 1
            return None
        fields = text.split(",")
        head = fields[0]
        kind = head[2:]
        if len(head) != 5 or head[0] == "P":  # proprietary ($PGRME…) or not a talker sentence
            self.counters.ignored += 1
        elif kind in STATE_TYPES:
            self._state(kind, fields)
        elif (width := _WIDTH.get(kind)) is not None:
            # Fields by pynmea2's layout (padded: receivers drop trailing empty fields). The
            # checksum and split above are done once, which is what keeps this path fast.
            data = fields[1:]
            if len(data) < width:
                data += [""] * (width - len(data))
            return kind, data
        else:
            self.counters.ignored += 1
        return None

    def _state(self, kind: str, fields: list[str]) -> None:
        try:
            if kind == "GSA":
                mode = int(fields[2]) if len(fields) > 2 and fields[2] else None
                self._mode = mode if mode in (1, 2, 3) else None
            else:  # GSV: total satellites in view of this talker's constellation
                n = self.ranges.keep("sats_in_view", int(fields[3]))
                if n is None:
                    raise ValueError(fields[3])
                name = CONSTELLATIONS.get(fields[0][:2], fields[0][:2])
                self._sky[name] = (int(n), time.monotonic())
            self.counters.sentences += 1
        except (ValueError, IndexError):
            self.counters.bad_field += 1

    # -- dates ----------------------------------------------------------------------------------

    def _comment(self, line: str) -> None:
        """Capture files (gpsd's format) start with '#' comments; '# Date: yyyy-mm-dd' tells
        when it was recorded: the era for its dates, and the date for time-only receivers. A
        header is as untrusted as any line: one the judge does not believe is ignored."""
        key, _, value = line[1:].partition(":")
        if key.strip().lower() != "date":
            return
        try:
            day = dt.date.fromisoformat(value.strip()[:10])
        except ValueError:
            return
        if self.judge.capture_date(day) and self._date is None:
            self._date_hint = lambda: day

    def _learn_date(self, kind: str, msg: list[str], tod: int) -> None:
        try:
            if kind == "ZDA":
                day = _day(dt.date(int(msg[ZDA_YEAR]), int(msg[ZDA_MONTH]), int(msg[ZDA_DAY])))
                self._date_raw = None  # the next RMC's date is read again, not taken as known
            else:
                raw = msg[RMC_DATE].strip()
                if raw == self._date_raw and self._date is not None:
                    self._date_tod = tod  # the same date as the last RMC: already known
                    return
                if len(raw) != 6 or not raw.isdigit():
                    return
                day = _day(dt.date(self._century(int(raw[4:6])), int(raw[2:4]), int(raw[0:2])))
                self._date_raw = raw
        except ValueError:
            return
        self._date, self._date_tod, self._date_measured = day, tod, True

    def _century(self, yy: int) -> int:
        """RMC's two-digit year in the century nearest the best evidence of the era: '99'
        is 1999 in 2026 (then a week-rollover victim, or refused), never 2099."""
        ref = dt.date.fromordinal(_EPOCH_ORDINAL + self.judge.era_reference_ms(self._mono_ns()) // DAY_MS).year
        year = ref - ref % 100 + yy
        if year - ref > 50:
            year -= 100
        elif ref - year > 50:
            year += 100
        return year

    def _date_for(self, tod: int) -> int | None:
        """The date of an epoch (days since 1970): the last RMC/ZDA date, rolled over at midnight."""
        if self._date is None:
            hint = self._date_hint() if self._date_hint else None
            if hint is None:
                return None
            self._date, self._date_tod, self._date_measured = _day(hint), tod, False
        if tod < self._date_tod - DAY_MS // 2:
            self._date += 1
        self._date_tod = tod
        return self._date

    def _refuse_date(self) -> None:
        """The epoch's date was not believed: back to the last believed one, so one bad RMC
        or ZDA does not date the epochs after it."""
        self.counters.bad_date += 1
        self._date, self._date_tod = self._believed if self._believed else (None, 0)
        self._date_measured = self._believed is not None
        self._date_raw = None

    # -- epochs ---------------------------------------------------------------------------------

    def _finish(self) -> Fix | None:
        epoch, self._epoch = self._epoch, None
        if epoch is None:
            return None
        self._last_tod = epoch.tod_ms
        kinds = epoch.parts.keys()
        if kinds != self._expected:
            self._last_kinds = set(kinds)
            self._expected = frozenset(kinds)
        try:
            fix = self._merge(epoch)
        except ValueError:
            self.counters.bad_field += 1
            return None
        if fix is not None:
            self.counters.fixes += 1
        return fix

    def _merge(self, epoch: _Epoch) -> Fix | None:
        p = epoch.parts
        rmc, gga, gns, gll, vtg = p.get("RMC"), p.get("GGA"), p.get("GNS"), p.get("GLL"), p.get("VTG")
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
        ts = self.judge.judge(day * DAY_MS + epoch.tod_ms, self._mono_ns(), measured=self._date_measured)
        if ts is None:
            self._refuse_date()
            return None
        if self._date_measured:
            self._believed = (day, self._date_tod)
        src, (la, ns, lo, ew) = next((p[k], LATLON[k]) for k in ("RMC", "GGA", "GNS", "GLL") if k in p)
        lat = _degrees(src[la], 2, src[ns], "NS", 90)
        lon = _degrees(src[lo], 3, src[ew], "EW", 180)
        if rmc is not None:
            speed = _knots_kmh(rmc[RMC_SPEED])
            course = _float(rmc[RMC_COURSE])
        elif vtg is not None:
            # Knots first, like RMC: receivers round the km/h field on its own ("0.0 N, 0.1 K").
            speed = _knots_kmh(vtg[VTG_KNOTS])
            if speed is None:
                speed = _float(vtg[VTG_KMH])
            course = _float(vtg[VTG_TRACK])
        else:
            speed = course = None
        if gga is not None:
            alt, sats, hdop = _float(gga[GGA_ALT]), _int(gga[GGA_SATS]), _float(gga[GGA_HDOP])
        elif gns is not None:
            alt, sats, hdop = _float(gns[GNS_ALT]), _int(gns[GNS_SATS]), _float(gns[GNS_HDOP])
        else:
            alt = sats = hdop = None
        keep = self.ranges.keep
        sats = keep("sats", sats)
        # GSA is timeless and many receivers send it after the epoch's RMC/GGA: a "no fix"
        # from the last one is stale once the epoch's own sentences say there is a fix.
        mode = self._mode if self._mode in (2, 3) else None
        return Fix(ts, lat, lon, keep("speed_kmh", speed), keep("course", course), keep("alt_m", alt),
                   None if sats is None else int(sats), keep("hdop", hdop), fix_kind, mode)


def _fix_kind(rmc: list[str] | None, gga: list[str] | None, gns: list[str] | None,
              gll: list[str] | None) -> str | None:
    """What kind of fix the epoch's sentences agree on; None if any says there is none."""
    kind: str | None = "gps"
    if rmc is not None:
        if rmc[RMC_STATUS].strip() != "A":
            return None
        if mode := rmc[RMC_MODE].strip():
            kind = MODE_FIX.get(mode[0])
    if gga is not None and kind is not None:
        qual = _int(gga[GGA_QUAL])
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


def _tod_ms(raw: str) -> int | None:
    """``hhmmss[.sss]`` → milliseconds since midnight."""
    if len(raw) < 6:
        return None
    h, m, s = int(raw[0:2]), int(raw[2:4]), float(raw[4:])
    if not (0 <= h < 24 and 0 <= m < 60 and 0 <= s < 61):
        raise ValueError(raw)
    return (h * 3600 + m * 60) * 1000 + round(s * 1000)


def _degrees(raw: str, deg_digits: int, hemi: str, dirs: str, limit: float) -> float:
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


def _float(raw: str) -> float | None:
    if not raw or raw.isspace():
        return None
    v = float(raw)  # ValueError on junk: the epoch's fields are untrustworthy
    if not isfinite(v):
        raise ValueError(raw)
    return v


def _int(raw: str) -> int | None:
    return int(raw) if raw and not raw.isspace() else None


def _knots_kmh(raw: str) -> float | None:
    v = _float(raw)
    return None if v is None else v * KNOT_KMH


def _day(day: dt.date) -> int:
    """Days since 1970-01-01."""
    return day.toordinal() - _EPOCH_ORDINAL
