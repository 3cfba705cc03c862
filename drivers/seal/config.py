"""``[[seals]]``: door contacts, wire-loop seals and e-seal readers, one entry per seal or reader.

Each entry's ``driver`` selects its model here and its driver (drivers/__init__.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from agent.model.settings import NAME, Baudrate, LineOffset, Retry, Role, ScriptTime, Section


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
