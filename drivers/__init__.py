"""Drivers by name. A technician's config selects them; adding one is a package and a line here.

Each entry names, as ``"module:Class"`` strings, the config model of the driver's section and
the driver class. A config module is light (pydantic and agent/model/settings.py only):
agent/config imports every registered one to build its schema, so ``[[seals]] driver`` and
``[[temperature]] driver`` accept exactly the names below. A driver module, with what it needs
(serial, gpiod, can), is imported only when a config uses it.

A config model says which entry it selects with its ``driver`` (a key, as in ``[[seals]]``,
or a property, as ``[gps]`` has: "gpsd" when ``gpsd`` is given, else "nmea").
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

from drivers.base import Driver


class Entry(NamedTuple):
    config: str
    """The section's model, ``"module:Class"``."""
    driver: str
    """The driver class, ``"module:Class"``."""


REGISTRY: dict[str, dict[str, Entry]] = {
    "gps": {
        "nmea": Entry("drivers.gps.config:GpsConfig", "drivers.gps.receiver:NmeaGps"),
        "gpsd": Entry("drivers.gps.config:GpsConfig", "drivers.gps.gpsd:GpsdGps"),
    },
    "can": {
        "socketcan": Entry("drivers.can.config:CanConfig", "drivers.can.bus:CanBus"),
        "virtual": Entry("drivers.can.config:CanConfig", "drivers.can.bus:CanBus"),
        "replay": Entry("drivers.can.config:CanConfig", "drivers.can.bus:CanBus"),
    },
    "ignition": {
        "gpio": Entry("drivers.ignition.config:IgnitionConfig", "drivers.ignition.gpio:GpioIgnition"),
    },
    "seal": {
        "gpio": Entry("drivers.seal.config:GpioSealConfig", "drivers.seal.gpio:GpioSeal"),
        "serial": Entry("drivers.seal.config:SerialSealConfig", "drivers.seal.serial:SerialSeal"),
        "sim": Entry("drivers.seal.config:SimSealConfig", "drivers.seal.sim:SimSeal"),
    },
    "temperature": {
        "ds18b20": Entry("drivers.temperature.config:Ds18b20Config", "drivers.temperature.ds18b20:Ds18b20"),
        "sim": Entry("drivers.temperature.config:SimTemperatureConfig", "drivers.temperature.sim:SimTemperature"),
    },
}


class UnknownDriver(LookupError):
    pass


def register(kind: str, name: str, *, config: str, driver: str) -> None:
    """Add (or replace) ``kind``/``name`` at run time, as a line in REGISTRY would: a driver
    kept outside this package, or a test's. A config parsed after this accepts the name."""
    REGISTRY.setdefault(kind, {})[name] = Entry(config, driver)


def unregister(kind: str, name: str) -> None:
    """Remove what `register` added."""
    REGISTRY.get(kind, {}).pop(name, None)


def driver_class(kind: str, name: str) -> type[Driver]:
    """The class registered as ``kind``/``name``; unknown names list the known ones."""
    cls: type[Driver] = _load(_entry(kind, name).driver)
    return cls


def config_class(kind: str, name: str) -> type[Any]:
    """The config model of ``kind``/``name``'s section."""
    return _load(_entry(kind, name).config)  # type: ignore[no-any-return]


def config_classes(kind: str) -> list[type[Any]]:
    """Every config model registered for ``kind``, each once, in the order of REGISTRY."""
    out: list[type[Any]] = []
    for entry in REGISTRY.get(kind, {}).values():
        model = _load(entry.config)
        if model not in out:
            out.append(model)
    return out


def _entry(kind: str, name: str) -> Entry:
    known = REGISTRY.get(kind)
    if known is None:
        raise UnknownDriver(f"unknown driver kind {kind!r}; known: {', '.join(sorted(REGISTRY))}")
    entry = known.get(name)
    if entry is None:
        raise UnknownDriver(f"unknown {kind} driver {name!r}; known: {', '.join(sorted(known))}")
    return entry


def _load(target: str) -> Any:
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)
