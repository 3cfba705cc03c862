"""Configuration of cargo security and cold chain: seals, temperature sensors, geofences,
and the tamper-evident event chain. Part of the agent's config (agent/config.py)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- seals --------------------------------------------------------------------------------------


class GpioSealConfig(Section):
    """A door contact or a wire-loop seal on a GPIO line (libgpiod)."""

    name: Annotated[str, Field(pattern=NAME)]
    driver: Literal["gpio"]
    kind: Literal["door", "wire_loop"] = "door"
    """A door that opens reports `opened`; a wire loop that breaks reports `tampered` (cut)."""
    chip: str = "pinctrl-bcm2711"
    line: int | str
    opened_when: Literal["high", "low"] = "high"
    """Line level that means open/cut: with a pull-up, a closed contact or an intact loop
    holds the line low."""
    bias: Literal["as-is", "pull-up", "pull-down", "disabled"] = "pull-up"
    debounce_ms: Annotated[int, Field(ge=0, le=10_000)] = 50


class SerialSealConfig(Section):
    """An electronic lock / e-seal reader on RS-232/RS-485."""

    name: Annotated[str, Field(pattern=NAME)]
    driver: Literal["serial"]
    port: str
    baudrate: Annotated[int, Field(gt=0)] = 9600
    protocol: str = "generic"
    """The line protocol module (drivers/eseal/); docs/seals.md describes `generic`."""
    battery_low_pct: Annotated[int, Field(ge=0, le=100)] = 20
    reopen_min_s: Annotated[float, Field(gt=0)] = 1.0
    reopen_max_s: Annotated[float, Field(gt=0)] = 30.0


class SimSealEvent(Section):
    at: dt.datetime
    """When, in the lorry's (GPS) time, e.g. 2026-11-21T16:40:00Z."""
    event: Literal["sealed", "opened", "tampered", "battery_low"]


class SimSealConfig(Section):
    """A scripted timeline, for the demo and tests."""

    name: Annotated[str, Field(pattern=NAME)]
    driver: Literal["sim"]
    seal_id: str | None = None
    events: list[SimSealEvent] = []


SealConfig = Annotated[GpioSealConfig | SerialSealConfig | SimSealConfig, Field(discriminator="driver")]


# -- temperature --------------------------------------------------------------------------------


class TemperatureLimits(Section):
    low_c: float | None = None
    high_c: float | None = None
    hysteresis_c: Annotated[float, Field(ge=0)] = 0.5
    """An excursion ends only once back inside the limits by this much."""
    min_duration_s: Annotated[float, Field(ge=0)] = 600
    """Cold-chain practice: outside the limits this long before it is an excursion (a door
    opened for loading is not one)."""
    lost_after_s: Annotated[float, Field(gt=0)] | None = None
    """No valid reading for this long: `sensor_lost` (default: 3 intervals)."""


class Ds18b20Config(TemperatureLimits):
    name: Annotated[str, Field(pattern=NAME)]
    driver: Literal["ds18b20"]
    sensor_id: Annotated[str, Field(pattern=r"^[0-9a-f]{2}-[0-9a-f]{12}$")]
    """The 1-Wire id, as in /sys/bus/w1/devices/28-0316a2795dff."""
    w1_root: Path = Path("/sys/bus/w1/devices")
    interval_s: Annotated[float, Field(gt=0)] = 60

    @model_validator(mode="after")
    def _limits(self) -> Ds18b20Config:
        _check_limits(self)
        return self


class SimTemperaturePoint(Section):
    at: dt.datetime
    c: float


class SimTemperatureConfig(TemperatureLimits):
    name: Annotated[str, Field(pattern=NAME)]
    driver: Literal["sim"]
    interval_s: Annotated[float, Field(gt=0)] = 60
    profile: list[SimTemperaturePoint] = []
    """Temperatures at given (GPS) times, interpolated linearly in between."""

    @model_validator(mode="after")
    def _limits(self) -> SimTemperatureConfig:
        _check_limits(self)
        return self


def _check_limits(t: TemperatureLimits) -> None:
    if t.low_c is not None and t.high_c is not None and t.low_c >= t.high_c:
        raise ValueError("low_c must be below high_c")


TemperatureConfig = Annotated[Ds18b20Config | SimTemperatureConfig, Field(discriminator="driver")]


# -- geofences ----------------------------------------------------------------------------------


class Circle(Section):
    lat: Annotated[float, Field(ge=-90, le=90)]
    lon: Annotated[float, Field(ge=-180, le=180)]
    radius_m: Annotated[float, Field(gt=0)]


class GeofenceConfig(Section):
    name: Annotated[str, Field(min_length=1)]
    kind: Literal["customs", "border", "depot", "port", "parking", "region", "other"] = "other"
    seal_opening: Literal["authorised", "forbidden"] = "forbidden"
    """Whether opening a seal inside is authorised (a customs yard, the consignee's depot)."""
    circle: Circle | None = None
    polygon: list[tuple[float, float]] | None = None
    """Corners as [lat, lon] pairs, in order; at least 3."""
    events: bool = True
    """Enter and exit events on the `alarm` stream."""

    @model_validator(mode="after")
    def _one_shape(self) -> GeofenceConfig:
        if (self.circle is None) == (self.polygon is None):
            raise ValueError("give exactly one of circle or polygon")
        if self.polygon is not None:
            if len(self.polygon) < 3:
                raise ValueError("a polygon needs at least 3 corners")
            for lat, lon in self.polygon:
                if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                    raise ValueError(f"corner [{lat}, {lon}] is not a [lat, lon] pair")
        return self


# -- the tamper-evident chain -------------------------------------------------------------------


class ChainConfig(Section):
    hmac_key_file: Path | None = None
    """A per-device secret (the backend holds a copy): each seal and alarm event then also
    carries an HMAC, so only this device could have written the chain (docs/chain.md)."""
