"""Drivers by name. A technician's config selects them; adding one is a module and a line here.

The registry names modules as strings so that a driver's dependencies (serial, gpiod, can)
are imported only when a config uses it.
"""

from __future__ import annotations

import importlib

from drivers.base import Driver

REGISTRY: dict[str, dict[str, str]] = {
    "gps": {
        "nmea": "drivers.gps.receiver:NmeaGps",
        "gpsd": "drivers.gps.gpsd:GpsdGps",
    },
    "can": {
        "socketcan": "drivers.can.bus:CanBus",
        "virtual": "drivers.can.bus:CanBus",
        "replay": "drivers.can.bus:CanBus",
    },
    "seal": {
        "gpio": "drivers.seal.gpio:GpioSeal",
        "serial": "drivers.seal.serial:SerialSeal",
        "sim": "drivers.seal.sim:SimSeal",
    },
    "temperature": {
        "ds18b20": "drivers.temperature.ds18b20:Ds18b20",
        "sim": "drivers.temperature.sim:SimTemperature",
    },
    "ignition": {
        "gpio": "drivers.ignition.gpio:GpioIgnition",
    },
}


class UnknownDriver(LookupError):
    pass


def driver_class(kind: str, name: str) -> type[Driver]:
    """The class registered as ``kind``/``name``; unknown names list the known ones."""
    known = REGISTRY.get(kind)
    if known is None:
        raise UnknownDriver(f"unknown driver kind {kind!r}; known: {', '.join(sorted(REGISTRY))}")
    target = known.get(name)
    if target is None:
        raise UnknownDriver(f"unknown {kind} driver {name!r}; known: {', '.join(sorted(known))}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)
