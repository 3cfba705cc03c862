"""``[gps]``: a NMEA receiver on a serial port, a replayed NMEA capture, or a gpsd."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from agent.model.settings import Baudrate, HostPort, ReplaySpeed, Retry, Role, Section, Speed


class GpsConfig(Section):
    port: Annotated[str, Field(min_length=1), Role("serial", "the GPS receiver's serial device")] | None = None
    """Serial device or pyserial URL (``loop://``); a glob such as
    ``/dev/serial/by-id/usb-u-blox*`` picks whichever matching device is plugged in."""
    baudrate: Baudrate = 9600
    replay: Annotated[Path | None, Role("input", "a NMEA capture")] = None
    """A capture file (optionally .gz) replayed instead of a serial port."""
    replay_speed: ReplaySpeed = 1.0
    """1 = real time (by the fixes' own timestamps), 0 = as fast as possible."""
    gpsd: HostPort | None = None
    """``host:port`` of a gpsd to read TPV reports from, instead of a serial port."""
    reopen_min_s: Retry = 1.0
    reopen_max_s: Retry = 30.0
    min_sats: Annotated[int, Field(ge=0, le=64)] = 4
    """Fixes from fewer satellites are not positions (0: no check; unknown counts passes)."""
    max_hdop: Annotated[float, Field(ge=0, le=100)] = 10.0
    """Fixes with a worse HDOP are not positions (0: no check)."""
    min_mode: Literal["2d", "3d"] = "2d"
    """Weakest fix mode reported (from GSA, or gpsd's TPV mode)."""
    max_speed_kmh: Speed = 200.0
    """Jump filter: a fix that implies a faster move from the last good one is rejected
    (0: no check). No lorry does 200 km/h; multipath jumps of kilometres in a second do."""

    @model_validator(mode="after")
    def _one_source(self) -> GpsConfig:
        given = [k for k in ("port", "replay", "gpsd") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of port (a serial device), replay (a file) or gpsd (host:port)"
                + (f"; got {', '.join(given)}" if given else "")
            )
        return self

    @property
    def driver(self) -> str:
        """The registry name of the driver this section selects (drivers/__init__.py)."""
        return "gpsd" if self.gpsd else "nmea"
