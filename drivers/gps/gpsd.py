"""GPS from a gpsd: TPV and SKY reports over its JSON protocol on TCP (stdlib only).

For lorries where gpsd already owns the receiver (shared with chrony/NTP, or a receiver gpsd
drives natively). gpsd may send several TPVs per epoch (one per sentence, each more complete),
so TPVs are merged per ``time`` and an epoch is emitted once: when a TPV with another time
arrives, or when gpsd has been quiet for QUIET_S (gpsd sends an epoch as one burst, so a lull
means it is complete). A TPV of an epoch already flushed (a straggler after the lull) is
dropped and counted in ``late``: never two positions for one time. ``mono_ns`` is when the
epoch's first TPV arrived, not when it was emitted: the trusted clock pairs it with GPS time.
"""

from __future__ import annotations

import calendar
import json
import logging
import math
import socket
import threading
import time
from collections import deque
from typing import Any

from agent.model.backoff import backoff_delay
from agent.model.ranges import RangeCheck
from agent.model.reading import Reading, iso_ms
from drivers.base import Emit, ReconnectingDriver
from drivers.gps import fix as gps_fix
from drivers.gps.config import GpsConfig
from drivers.gps.fix import SKY_STALE_S, Fix
from drivers.gps.gnsstime import GnssTimeJudge

log = logging.getLogger(__name__)

WATCH = b'?WATCH={"enable":true,"json":true}\n'
QUIET_S = 0.3
POLL_S = 0.1
CONNECT_TIMEOUT_S = 2.0
# gpsd's longest reports (SKY with every satellite) are a few KiB; far longer is a lost newline.
MAX_LINE = 65536
# Epoch times already flushed, remembered to drop stragglers (a few minutes at 10 Hz).
RECENT = 4096
# TPV status → the payload's `fix` (gpsd_json(5)); 7 (time only, surveyed) and 8 (simulated)
# are not positions. 5 is what gpsd makes of NMEA's "E"/quality 6 (estimated, dead reckoning).
STATUS_FIX = {2: "dgps", 3: "rtk", 4: "rtk_float", 5: "estimated", 6: "estimated", 9: "pps"}
NOT_POSITION = frozenset({7, 8})
# SKY satellite gnssid → the same names as drivers.gps.fields.CONSTELLATIONS.
GNSS = dict(enumerate(("GPS", "SBAS", "Galileo", "BeiDou", "IMES", "QZSS", "GLONASS", "NavIC")))


class GpsdGps(ReconnectingDriver):
    kind = "gps"
    finite = False
    open_errors = (OSError,)
    lost_errors = (OSError,)

    def __init__(self, config: GpsConfig, emit: Emit):
        super().__init__(config, emit)
        host, _, port = (config.gpsd or "").rpartition(":")
        self.address = (host, int(port))
        self.lines = self.tpv = self.fixes = self.garbage = self.no_fix = self.late = 0
        self.last_fix: Fix | None = None
        self._recent: deque[int] = deque(maxlen=RECENT)  # kept across reconnections
        self.judge = GnssTimeJudge(live=True, system_now_ms=self._ntp_now_ms)
        self.ranges = RangeCheck()
        self._reset()

    def _reset(self) -> None:
        """A new connection is a new gpsd session: forget the epoch and sky of the last."""
        self._pending: dict[str, Any] | None = None
        self._pending_ts = self._pending_mono = 0
        self._pending_sky: tuple[int | None, float | None] = (None, None)
        self._sats: int | None = None
        self._hdop: float | None = None
        self._in_view: dict[str, int] = {}
        self._sky_at = -math.inf

    def snapshot(self) -> dict[str, Any]:
        fresh = time.monotonic() - self._sky_at < SKY_STALE_S
        return {
            "source": f"gpsd://{self.config.gpsd}",
            "connected": self.connected,
            "opens": self.opens,
            "open_failures": self.open_failures,
            "last_error": self.last_error,
            "last_fix_ts": iso_ms(self.last_fix.ts_ms) if self.last_fix else None,
            "lines": self.lines,
            "tpv": self.tpv,
            "fixes": self.fixes,
            "garbage": self.garbage,
            "no_fix": self.no_fix,
            "late": self.late,
            "bad_date": sum(self.judge.refused.values()),
            "dates": self.judge.snapshot(),
            "out_of_range": dict(self.ranges.counts),
            "satellites_in_view": dict(self._in_view) if fresh else {},
        }

    def _ntp_now_ms(self) -> int | None:
        return self.clock.ntp_now_ms() if self.clock is not None else None

    def health(self, status: dict[str, Any]) -> dict[str, Any]:
        return gps_fix.health(status)

    # -- the connection (the loop: drivers/base.py ReconnectingDriver) ---------------------------

    def _open(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=CONNECT_TIMEOUT_S)

    def _opened(self, sock: socket.socket) -> None:
        self._reset()
        log.info("gpsd %s connected", self.config.gpsd)

    def _closed(self, sock: socket.socket) -> None:
        self._flush()

    def _open_failed(self, error: BaseException) -> str:
        return f"cannot connect to gpsd {self.config.gpsd}: {error}"

    def _lost(self, error: BaseException) -> str:
        return f"gpsd {self.config.gpsd} lost: {error}"

    def _reopen_delay(self) -> float:
        return backoff_delay(1, self.reopen_min_s, self.reopen_max_s)

    def _log_problem(self, message: str, error: BaseException | None, loud: bool) -> None:
        (log.warning if loud else log.debug)("GPS: %s", message)

    def _read(self, sock: socket.socket, stop: threading.Event) -> None:
        sock.sendall(WATCH)
        sock.settimeout(POLL_S)
        buf = b""
        heard = time.monotonic()
        while not stop.is_set():
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    self._problem(f"gpsd {self.config.gpsd} closed the connection")
                    return
                heard = time.monotonic()
                *lines, buf = (buf + chunk).split(b"\n")
                for line in lines:
                    self._line(line)
                if len(buf) > MAX_LINE:
                    self.garbage += 1
                    buf = b""
            except TimeoutError:
                if self._pending is not None and time.monotonic() - heard >= QUIET_S:
                    self._flush()

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        self.lines += 1
        try:
            report = json.loads(line)
            if not isinstance(report, dict):
                raise ValueError("not a JSON object")
            if report.get("class") == "TPV":
                self._tpv(report)
            elif report.get("class") == "SKY":
                self._sky(report)
        except (ValueError, TypeError, AttributeError, OverflowError, RecursionError):
            self.garbage += 1  # UnicodeDecodeError is a ValueError; RecursionError: 64k of '['s

    def _tpv(self, tpv: dict[str, Any]) -> None:
        self.tpv += 1
        if "time" not in tpv:
            self.no_fix += 1
            return
        ts = _parse_time(tpv["time"])
        if ts in self._recent:
            self.late += 1
            return
        if self._pending is not None and self._pending_ts != ts:
            self._flush()
        if self._pending is None:
            self._pending, self._pending_ts = {}, ts
            self._pending_mono = time.monotonic_ns()
        self._pending.update(tpv)
        fresh = time.monotonic() - self._sky_at < SKY_STALE_S
        self._pending_sky = (self._sats, self._hdop) if fresh else (None, None)

    def _sky(self, sky: dict[str, Any]) -> None:
        sats = sky.get("satellites")
        if isinstance(sats, list):
            # gpsd lists a satellite once per signal (L1, L2…): count satellites, not signals.
            seen = {(s.get("gnssid"), s.get("svid", s.get("PRN"))) for s in sats}
            view: dict[str, int] = {}
            for gnssid, _ in seen:
                name = GNSS.get(gnssid, "GNSS") if isinstance(gnssid, int) else "GNSS"
                view[name] = view.get(name, 0) + 1
            self._in_view = dict(sorted(view.items()))
        used = sky.get("uSat")
        if isinstance(used, int) and not isinstance(used, bool):
            kept = self.ranges.keep("sats", used)
            self._sats = None if kept is None else int(kept)
        elif isinstance(sats, list):
            self._sats = sum(1 for s in sats if isinstance(s, dict) and s.get("used") is True)
        hdop = self.ranges.keep("hdop", _num(sky.get("hdop")))
        self._hdop = self._hdop if hdop is None else hdop
        self._sky_at = time.monotonic()

    def _flush(self) -> None:
        """Emit the pending epoch, if it is a position."""
        tpv, self._pending = self._pending, None
        if tpv is None:
            return
        ts = self._pending_ts
        self._recent.append(ts)
        mode, status = tpv.get("mode"), tpv.get("status", 1)
        status = status if isinstance(status, int) else 1
        lat, lon = _num(tpv.get("lat")), _num(tpv.get("lon"))
        if not isinstance(mode, int) or mode < 2 or status in NOT_POSITION or lat is None or lon is None:
            self.no_fix += 1
            return
        keep = self.ranges.keep
        if keep("lat", lat) is None or keep("lon", lon) is None:
            return  # counted: a position without a possible latitude is not a position
        judged = self.judge.judge(ts, self._pending_mono)
        if judged is None:
            return  # counted by the judge: a date no receiver can mean
        ts = judged
        speed = _num(tpv.get("speed"))
        alt = _num(tpv.get("altMSL"))
        sats, hdop = self._pending_sky
        fix = Fix(
            ts, lat, lon, keep("speed_kmh", None if speed is None else speed * 3.6),
            keep("course", _num(tpv.get("track"))),
            keep("alt_m", _num(tpv.get("alt")) if alt is None else alt), sats, hdop,
            STATUS_FIX.get(status, "gps"), mode,
        )
        self.last_fix = fix
        self.fixes += 1
        meta = {"mono_ns": self._pending_mono, "mode": mode, "replay": False}
        self.emit(Reading("position", ts, fix.as_data(), meta=meta))


def _num(v: Any) -> float | None:
    """A finite JSON number, else None (gpsd omits what it does not know)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return v
    return None


def _parse_time(s: Any) -> int:
    """gpsd's ISO 8601 UTC (``2026-11-24T03:00:00.123Z``, 0-9 fraction digits) → Unix ms."""
    if not isinstance(s, str) or not s.endswith("Z"):
        raise ValueError(f"bad TPV time {s!r}")
    whole, _, frac = s[:-1].partition(".")
    if frac and not frac.isdigit():
        raise ValueError(f"bad TPV time {s!r}")
    secs = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
    return secs * 1000 + int((frac + "000")[:3])
