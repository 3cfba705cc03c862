"""``[can]`` and ``[can.signals.NAME]``: the truck's J1939 bus (docs/can.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from agent.model.settings import Delay, Period, ReplaySpeed, Retry, Role, Section


class SignalConfig(Section):
    """Sampling of one CAN signal: the backend wants a few values a minute, not 100 a second."""

    min_interval_s: Period | None = None
    """Never more often than this (default: [can] min_interval_s)."""
    deadband: Annotated[float, Field(ge=0, le=1e12)] | None = None
    """Sent when it changed by at least this since the last value sent (default: the signal's own)."""
    max_interval_s: Period | None = None
    """Sent at least this often even without change (default: [can] max_interval_s; 0: only on change)."""
    enabled: bool = True


class CanConfig(Section):
    interface: Literal["socketcan", "virtual", "replay"] = "socketcan"
    channel: Annotated[str, Field(min_length=1, max_length=64)] = "can0"
    replay: Annotated[Path | None, Role("input", "a CAN capture")] = None
    """With interface = "replay": a capture (candump .log, .asc, .blf, .csv… anything
    can.LogReader reads); readings keep the capture's times."""
    replay_speed: ReplaySpeed = 0.0
    """1 = real time, 0 = as fast as possible."""
    dbc: Annotated[list[Path], Field(max_length=64), Role("input", "a DBC file")] = []
    """The fleet's own DBC files (decoded with cantools); their messages take precedence over
    the built-in J1939 table for the same PGN."""
    min_interval_s: Period = 30.0
    max_interval_s: Period = 300.0
    signals: dict[str, SignalConfig] = {}
    """Per signal name (built-in: docs/can.md, or a DBC signal name)."""
    requests: list[Literal["vin", "hours", "fuel"]] = []
    """PGNs to request (PGN 59904) every request_interval_s. Empty: the agent never transmits."""
    request_interval_s: Delay = 3600.0
    source_address: Annotated[int, Field(ge=0, le=253)] = 249
    """Our address for requests (0xF9: off-board diagnostic tool #1), only used with requests."""
    ignition: bool = False
    """Derive the ignition from the bus: frames arriving = on, silent for ignition_silence_s = off."""
    ignition_silence_s: Delay = 10.0
    reopen_min_s: Retry = 1.0
    reopen_max_s: Retry = 30.0

    @model_validator(mode="after")
    def _replay_needs_file(self) -> CanConfig:
        if (self.interface == "replay") != (self.replay is not None):
            raise ValueError('interface = "replay" and replay = "file" go together')
        return self

    @property
    def driver(self) -> str:
        """The registry name of the driver this section selects (drivers/__init__.py)."""
        return self.interface
