"""``[[temperature]]``: cargo temperature sensors, one entry per sensor.

Every sensor's model is a `TemperatureLimits` (the cold-chain watch, agent/pipeline/alarms.py,
reads its limits) with a ``name``, a ``driver`` that selects it (drivers/__init__.py) and an
``interval_s``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from agent.model.settings import NAME, Celsius, Delay, Period, Role, ScriptTime, Section


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

    @model_validator(mode="after")
    def _limits(self) -> TemperatureLimits:
        if self.low_c is not None and self.high_c is not None and self.low_c >= self.high_c:
            raise ValueError("low_c must be below high_c")
        return self


class Ds18b20Config(TemperatureLimits):
    name: Annotated[str, Field(pattern=NAME, max_length=64)]
    driver: Literal["ds18b20"]
    sensor_id: Annotated[str, Field(pattern=r"^[0-9a-f]{2}-[0-9a-f]{12}$")]
    """The 1-Wire id, as in /sys/bus/w1/devices/28-0316a2795dff."""
    w1_root: Annotated[Path, Role("device_folder", "the 1-Wire bus's folder")] = Path("/sys/bus/w1/devices")
    interval_s: Delay = 60


class SimTemperaturePoint(Section):
    at: ScriptTime
    c: Celsius


class SimTemperatureConfig(TemperatureLimits):
    name: Annotated[str, Field(pattern=NAME, max_length=64)]
    driver: Literal["sim"]
    interval_s: Delay = 60
    profile: Annotated[list[SimTemperaturePoint], Field(max_length=100_000)] = []
    """Temperatures at given (GPS) times, interpolated linearly in between."""
