"""What every config section shares, the agent's and the drivers' alike: the `Section` base,
the bounds of each kind of number, the checks on text and host names, and the roles of the keys
that name files and devices.

The agent's own sections (agent/config/schema.py) and each driver's (drivers/*/config.py) build
on it; agent/config/paths.py checks every key with a `Role` before `run` starts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
"""A name a technician gives ([[seals]] name, [[temperature]] name): it goes into payloads."""
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
        check_text(value)
        return value


def _admits_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_admits_bool(arg) for arg in get_args(annotation) if not isinstance(arg, (str, int, float)))


def check_text(value: Any) -> None:
    """ValueError for text (or text inside lists and tables) that is too long or holds
    control characters."""
    if isinstance(value, (str, Path)):
        text = str(value)
        if len(text) > MAX_TEXT:
            raise ValueError(f"longer than {MAX_TEXT} characters")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            raise ValueError("must not contain control characters (NUL, tab, newline…)")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k)
            check_text(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_text(v)


# Bounds, declared once per kind of number. Every number a key takes has both a lower and an
# upper bound (tests/agent/config/test_check_config.py checks it for every key): a value past them is a
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

_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def check_host(value: str) -> str:
    """A host name (RFC 1123 labels; '_' allowed, as container names have it) or an IP address."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if len(value) > 253 or not all(_LABEL.fullmatch(label) for label in value.removesuffix(".").split(".")):
        raise ValueError("must be a host name (letters, digits, '-', '.') or an IP address")
    return value


def check_host_port(value: str) -> str:
    host, _, port = value.rpartition(":")
    check_host(host)
    if not 1 <= int(port) <= 65535:
        raise ValueError("the port must be 1..65535")
    return value


Host = Annotated[str, AfterValidator(check_host)]
HostPort = Annotated[str, Field(pattern=r"^[^\s:]+:\d{1,5}$"), AfterValidator(check_host_port)]
"""``host:port``."""


@dataclass(frozen=True, slots=True)
class Role:
    """What a key that names a file or a device is for. agent/config/paths.py `path_problems`
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
