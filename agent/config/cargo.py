"""``[[geofences]]`` and ``[chain]``: the zones the pipeline watches (customs yards, borders,
depots) and the key of the tamper-evident event chain. Part of the agent's config
(agent/config/schema.py).

The seal and temperature sections are their drivers' (drivers/seal/config.py,
drivers/temperature/config.py), and what every section shares is agent/model/settings.py;
both are named here too for the modules that import them from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from agent.model.settings import EARTH_HALF_M, Delay, Latitude, Longitude, Role, Section
from drivers.temperature.config import TemperatureLimits

__all__ = ["ChainConfig", "Circle", "Delay", "GeofenceConfig", "Section", "TemperatureLimits"]


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
