"""Configuration of cargo security and cold chain: seals, temperature sensors, geofences,
and the tamper-evident event chain. Part of the agent's config (agent/config/__init__.py).

It also holds what every section of the config shares (agent/config/__init__.py and
agent/config/regions.py build on it): the `Section` base, the bounds of each kind of number,
and the roles of the keys that name files and devices.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"

# -- what every section shares -----------------------------------------------------------------

MAX_TEXT = 4096
"""Longest text any key takes (PATH_MAX: a path is the longest thing a key names)."""


class Section(BaseModel):
    """A config section. Unknown keys are errors; numbers must be finite (TOML allows ``inf``
    and ``nan``); text may not hold control characters (a NUL in a path, a newline in a host
    name) nor run past MAX_TEXT."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_as_number(cls, data: Any) -> Any:
        # pydantic reads `true` as 1 where a number is expected; a technician never means that.
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if isinstance(value, bool) and field is not None and not _admits_bool(field.annotation):
                    raise ValueError(f"{key} must not be {str(value).lower()} (a boolean) here")
        return data

    @field_validator("*", mode="after")
    @classmethod
    def _plain_text(cls, value: Any) -> Any:
        _check_text(value)
        return value


def _admits_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_admits_bool(arg) for arg in get_args(annotation) if not isinstance(arg, (str, int, float)))


def _check_text(value: Any) -> None:
    if isinstance(value, (str, Path)):
        text = str(value)
        if len(text) > MAX_TEXT:
            raise ValueError(f"longer than {MAX_TEXT} characters")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            raise ValueError("must not contain control characters (NUL, tab, newline…)")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k)
            _check_text(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_text(v)


# Bounds, declared once per kind of number. Every number a key takes has both a lower and an
# upper bound (tests/test_check_config.py checks it for every key): a value past them is a
# typo or an attack, never a setting, and left through it overflows a timer (Event.wait takes
# at most ~292 years), an int, or a disk much later, in a thread nobody watches.
DAY_S = 86_400
WEEK_S = 7 * DAY_S
MIN_DELAY_S = 0.001
EARTH_HALF_M = 20_037_509
"""Half the equator: no two places on Earth are farther apart."""
MAX_SPEED_KMH = 500
"""No land vehicle, nor a lorry carried on anything, goes faster."""
CELSIUS = (-80, 150)
"""Beyond any reefer or cargo sensor (a DS18B20 reads -55..125 °C)."""

Period = Annotated[float, Field(ge=0, le=WEEK_S)]
"""A period or a duration in seconds, 0 (usually: off) to a week."""
Delay = Annotated[float, Field(ge=MIN_DELAY_S, le=WEEK_S)]
"""A period that must be positive: 1 ms to a week."""
Retry = Annotated[float, Field(ge=MIN_DELAY_S, le=DAY_S)]
"""A wait between two attempts (reopening a device, reconnecting): 1 ms to a day."""
Speed = Annotated[float, Field(ge=0, le=MAX_SPEED_KMH)]
Distance = Annotated[float, Field(ge=0, le=EARTH_HALF_M)]
Celsius = Annotated[float, Field(ge=CELSIUS[0], le=CELSIUS[1])]
Latitude = Annotated[float, Field(ge=-90, le=90)]
Longitude = Annotated[float, Field(ge=-180, le=180)]
Baudrate = Annotated[int, Field(ge=50, le=12_000_000)]
"""50 baud (a teleprinter) to 12 Mbaud (the fastest USB-serial bridges)."""
LineOffset = Annotated[int, Field(ge=0, le=65_535)]
"""A GPIO line offset on its chip."""


def _zero_or_at_least(low: float) -> Any:
    def check(v: float) -> float:
        if 0 < v < low:
            raise ValueError(f"must be 0 or at least {low:g}")
        return v

    return AfterValidator(check)


ReplaySpeed = Annotated[float, Field(ge=0, le=1_000_000), _zero_or_at_least(0.001)]
"""1 = real time, 0 = as fast as possible; a crawl below 1/1000 would wait for years."""


def _script_time(at: dt.datetime) -> dt.datetime:
    if not dt.datetime(2000, 1, 1) <= at.replace(tzinfo=None) < dt.datetime(2100, 1, 1):
        raise ValueError("must be a time between 2000-01-01 and 2099-12-31")
    return at


ScriptTime = Annotated[dt.datetime, AfterValidator(_script_time)]
"""When a scripted event happens, in the lorry's (GPS) time."""


@dataclass(frozen=True, slots=True)
class Role:
    """What a key that names a file or a device is for. agent/config/__init__.py `path_problems`
    checks every such key in one place, by its role, before `run` starts:

    - ``input``: a file read at run time (a capture, a CA certificate, a DBC file): must
      exist and be a readable regular file.
    - ``secret``: the same, and not readable by everyone (a key, a password).
    - ``store``: the database file: never a folder or a device; its folder must exist or be
      creatable, and be writable.
    - ``serial``: a serial device, a glob, or a pyserial URL. A device may be absent (a USB
      receiver is plugged in later); one that exists must be a device, a URL's scheme known.
    - ``gpiochip``: a GPIO chip's label, or its path (absent is fine, as for ``serial``).
    - ``device_folder``: a folder the kernel makes (``/sys/bus/w1/devices``): absent is fine,
      anything else than a folder is not.
    """

    role: Literal["input", "secret", "store", "serial", "gpiochip", "device_folder"]
    what: str
    """What the key names, for messages: "a NMEA capture", "the broker's CA certificate"."""


# -- seals --------------------------------------------------------------------------------------


class GpioSealConfig(Section):
    """A door contact or a wire-loop seal on a GPIO line (libgpiod)."""

    name: Annotated[str, Field(pattern=NAME, max_length=64)]
    driver: Literal["gpio"]
    kind: Literal["door", "wire_loop"] = "door"
    """A door that opens reports `opened`; a wire loop that breaks reports `tampered` (cut)."""
    chip: Annotated[str, Field(min_length=1), Role("gpiochip", "a GPIO chip")] = "pinctrl-bcm2711"
    line: LineOffset | Annotated[str, Field(min_length=1)]
    opened_when: Literal["high", "low"] = "high"
    """Line level that means open/cut: with a pull-up, a closed contact or an intact loop
    holds the line low."""
    bias: Literal["as-is", "pull-up", "pull-down", "disabled"] = "pull-up"
    debounce_ms: Annotated[int, Field(ge=0, le=10_000)] = 50


class SerialSealConfig(Section):
    """An electronic lock / e-seal reader on RS-232/RS-485."""

    name: Annotated[str, Field(pattern=NAME, max_length=64)]
    driver: Literal["serial"]
    port: Annotated[str, Field(min_length=1), Role("serial", "a serial device")]
    baudrate: Baudrate = 9600
    protocol: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+$", max_length=64)] = "generic"
    """The line protocol module (drivers/seal/eseal/); docs/seals.md describes `generic`."""
    battery_low_pct: Annotated[int, Field(ge=0, le=100)] = 20
    reopen_min_s: Retry = 1.0
    reopen_max_s: Retry = 30.0


class SimSealEvent(Section):
    at: ScriptTime
    """When, in the lorry's (GPS) time, e.g. 2026-11-21T16:40:00Z."""
    event: Literal["sealed", "opened", "tampered", "battery_low"]


class SimSealConfig(Section):
    """A scripted timeline, for the demo and tests."""

    name: Annotated[str, Field(pattern=NAME, max_length=64)]
    driver: Literal["sim"]
    seal_id: Annotated[str, Field(max_length=64)] | None = None
    events: Annotated[list[SimSealEvent], Field(max_length=10_000)] = []


SealConfig = Annotated[GpioSealConfig | SerialSealConfig | SimSealConfig, Field(discriminator="driver")]


# -- temperature --------------------------------------------------------------------------------


class TemperatureLimits(Section):
    low_c: Celsius | None = None
    high_c: Celsius | None = None
    hysteresis_c: Annotated[float, Field(ge=0, le=50)] = 0.5
    """An excursion ends only once back inside the limits by this much."""
    min_duration_s: Period = 600
    """Cold-chain practice: outside the limits this long before it is an excursion (a door
    opened for loading is not one)."""
    lost_after_s: Delay | None = None
    """No valid reading for this long: `sensor_lost` (default: 3 intervals)."""


class Ds18b20Config(TemperatureLimits):
    name: Annotated[str, Field(pattern=NAME, max_length=64)]
    driver: Literal["ds18b20"]
    sensor_id: Annotated[str, Field(pattern=r"^[0-9a-f]{2}-[0-9a-f]{12}$")]
    """The 1-Wire id, as in /sys/bus/w1/devices/28-0316a2795dff."""
    w1_root: Annotated[Path, Role("device_folder", "the 1-Wire bus's folder")] = Path("/sys/bus/w1/devices")
    interval_s: Delay = 60

    @model_validator(mode="after")
    def _limits(self) -> Ds18b20Config:
        _check_limits(self)
        return self


class SimTemperaturePoint(Section):
    at: ScriptTime
    c: Celsius


class SimTemperatureConfig(TemperatureLimits):
    name: Annotated[str, Field(pattern=NAME, max_length=64)]
    driver: Literal["sim"]
    interval_s: Delay = 60
    profile: Annotated[list[SimTemperaturePoint], Field(max_length=100_000)] = []
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
    lat: Latitude
    lon: Longitude
    radius_m: Annotated[float, Field(gt=0, le=EARTH_HALF_M)]


class GeofenceConfig(Section):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    kind: Literal["customs", "border", "depot", "port", "parking", "region", "other"] = "other"
    seal_opening: Literal["authorised", "forbidden"] = "forbidden"
    """Whether opening a seal inside is authorised (a customs yard, the consignee's depot)."""
    circle: Circle | None = None
    polygon: Annotated[list[tuple[Latitude, Longitude]], Field(max_length=10_000)] | None = None
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
            # What the runtime refuses (3 distinct corners, not across the antimeridian) is
            # refused here, by the runtime's own rules, so check-config sees it too.
            from agent.pipeline.geofence import Zone

            Zone(self)
        return self


# -- the tamper-evident chain -------------------------------------------------------------------


class ChainConfig(Section):
    hmac_key_file: Annotated[Path | None, Role("secret", "the chain's HMAC key")] = None
    """A per-device secret (the backend holds a copy): each seal and alarm event then also
    carries an HMAC, so only this device could have written the chain (docs/chain.md)."""
