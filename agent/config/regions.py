"""``[[profiles]]``: what the uplink sends where (agent/uplink/regions.py, docs/uplink.md).

Kept apart from agent/config/__init__.py like the cargo sections; ``Config`` checks that the zones
name configured geofences. The streams a profile may name, and which are always live, are the
stream catalogue's (agent/model/streams.py); a stream the catalogue does not know cannot be
named, and is sent live under every profile.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from agent.config.cargo import Delay, Section
from agent.model import streams

MAX_BUDGET_MB = 100 * 1024 * 1024
"""100 TiB a month: more than any SIM plan, and still an exact count of bytes."""


class UplinkProfileConfig(Section):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    zones: Annotated[list[str], Field(max_length=1000)] = []
    """Geofence names (e.g. kind "region" around a country, "depot" around a yard with Wi-Fi).
    The first profile, in file order, with a zone the lorry is in is active; the profile
    without zones is the default (without one: everything live, no budget)."""
    live: list[str] = list(streams.HOLDABLE)
    """Streams sent as soon as they are stored (default: every catalogued stream). `alarm` and
    `seal` always are; so is any stream the catalogue does not know."""
    every_s: dict[str, Delay] = {}
    """Streams sent in bulk at this interval: fewer, fuller messages (e.g. temperature = 900)."""
    monthly_budget_mb: Annotated[float, Field(ge=0, le=MAX_BUDGET_MB)] = 0
    """Bytes on the wire (both directions, counted at the socket) per calendar month (UTC)
    while this profile is active. Past it only `alarm` and `seal` are sent until the month
    ends or another profile applies. 0: no budget. Streams in neither `live` nor `every_s`
    wait for a profile that sends them."""

    @field_validator("live")
    @classmethod
    def _known_live(cls, v: list[str]) -> list[str]:
        _check_streams(v)
        return v

    @field_validator("every_s")
    @classmethod
    def _known_every(cls, v: dict[str, float]) -> dict[str, float]:
        _check_streams(list(v))
        if always := [s for s in v if s in streams.ALWAYS_LIVE]:
            raise ValueError(f"{', '.join(always)} are always sent at once; they cannot wait for every_s")
        return v


def _check_streams(names: list[str]) -> None:
    if unknown := [s for s in names if s not in streams.BY_NAME]:
        raise ValueError(f"unknown stream(s) {', '.join(unknown)}; allowed: {', '.join(streams.NAMES)}")
