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
agent/model/ranges.py (an HDOP of -5 is published as null, not as -5); fields are read by
drivers/gps/fields.py.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import reduce
from operator import xor

from agent.model.ranges import RangeCheck
from drivers.gps.fields import (
    CONSTELLATIONS,
    EPOCH_ORDINAL,
    GGA_ALT,
    GGA_HDOP,
    GGA_SATS,
    GNS_ALT,
    GNS_HDOP,
    GNS_SATS,
    LATLON,
    RMC_COURSE,
    RMC_DATE,
    RMC_SPEED,
    STATE_TYPES,
    TIME,
    TIMELESS,
    VTG_KMH,
    VTG_KNOTS,
    VTG_TRACK,
    WIDTH,
    ZDA_DAY,
    ZDA_MONTH,
    ZDA_YEAR,
    day_number,
    degrees,
    fix_kind_of,
    knots_kmh,
    real,
    tod_ms,
    whole,
)
from drivers.gps.fix import SKY_STALE_S, Fix
from drivers.gps.gnsstime import DAY_MS, GnssTimeJudge


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
        self._date: int | None = None if default_date is None else day_number(default_date)
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
                tod = tod_ms(raw_time.strip())
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
        elif (width := WIDTH.get(kind)) is not None:
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
                day = day_number(dt.date(int(msg[ZDA_YEAR]), int(msg[ZDA_MONTH]), int(msg[ZDA_DAY])))
                self._date_raw = None  # the next RMC's date is read again, not taken as known
            else:
                raw = msg[RMC_DATE].strip()
                if raw == self._date_raw and self._date is not None:
                    self._date_tod = tod  # the same date as the last RMC: already known
                    return
                if len(raw) != 6 or not raw.isdigit():
                    return
                day = day_number(dt.date(self._century(int(raw[4:6])), int(raw[2:4]), int(raw[0:2])))
                self._date_raw = raw
        except ValueError:
            return
        self._date, self._date_tod, self._date_measured = day, tod, True

    def _century(self, yy: int) -> int:
        """RMC's two-digit year in the century nearest the best evidence of the era: '99'
        is 1999 in 2026 (then a week-rollover victim, or refused), never 2099."""
        ref = dt.date.fromordinal(EPOCH_ORDINAL + self.judge.era_reference_ms(self._mono_ns()) // DAY_MS).year
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
            self._date, self._date_tod, self._date_measured = day_number(hint), tod, False
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
        fix_kind = fix_kind_of(rmc, gga, gns, gll)
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
        lat = degrees(src[la], 2, src[ns], "NS", 90)
        lon = degrees(src[lo], 3, src[ew], "EW", 180)
        if rmc is not None:
            speed = knots_kmh(rmc[RMC_SPEED])
            course = real(rmc[RMC_COURSE])
        elif vtg is not None:
            # Knots first, like RMC: receivers round the km/h field on its own ("0.0 N, 0.1 K").
            speed = knots_kmh(vtg[VTG_KNOTS])
            if speed is None:
                speed = real(vtg[VTG_KMH])
            course = real(vtg[VTG_TRACK])
        else:
            speed = course = None
        if gga is not None:
            alt, sats, hdop = real(gga[GGA_ALT]), whole(gga[GGA_SATS]), real(gga[GGA_HDOP])
        elif gns is not None:
            alt, sats, hdop = real(gns[GNS_ALT]), whole(gns[GNS_SATS]), real(gns[GNS_HDOP])
        else:
            alt = sats = hdop = None
        keep = self.ranges.keep
        sats = keep("sats", sats)
        # GSA is timeless and many receivers send it after the epoch's RMC/GGA: a "no fix"
        # from the last one is stale once the epoch's own sentences say there is a fix.
        mode = self._mode if self._mode in (2, 3) else None
        return Fix(ts, lat, lon, keep("speed_kmh", speed), keep("course", course), keep("alt_m", alt),
                   None if sats is None else int(sats), keep("hdop", hdop), fix_kind, mode)
