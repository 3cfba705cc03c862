"""The periodic `health` reading: what a fleet technician needs to see remotely."""

from __future__ import annotations

import time
from typing import Any

from agent.model.clock import TimeKeeper
from agent.model.reading import Reading
from drivers.base import Driver


def driver_status(driver: Driver) -> dict[str, Any]:
    """The driver's ``snapshot()``; a driver whose status fails says so instead of taking the
    agent's status (or the health reading) down with it."""
    try:
        return dict(driver.snapshot())
    except Exception as e:  # noqa: BLE001 - a driver bug is reported, not propagated
        return {"status_error": f"{type(e).__name__}: {e}"}


def driver_health(driver: Driver, status: dict[str, Any]) -> dict[str, Any]:
    """The driver's fields of the health reading (``Driver.health``: the GPS its ``gps``, the
    CAN bus ``vehicle``); a driver whose hook fails adds none rather than losing the reading."""
    try:
        return dict(driver.health(status))
    except Exception:  # noqa: BLE001 - a driver bug is not the health reading's
        return {}


def health_reading(*, started_mono: float, clock: TimeKeeper, drivers: list[Driver], pipeline_status: dict[str, Any],
                   pending: int, time_pending: int, sources: dict[str, dict[str, Any]] | None = None) -> Reading:
    """Sources' state, satellites per constellation, buffer and clock; stamped like any
    reading without a time of its own (see agent/pipeline/pipeline.py).

    ``sources``: per source, how its driver thread fared (agent/daemon/runner.py SourceHealth). The
    reading then says which sources' drivers were restarted, how often (``restarts``), and
    which replays died (``dead_sources``); both are absent while every driver runs well."""
    data: dict[str, Any] = {"uptime_s": int(time.monotonic() - started_mono)}
    for d in drivers:
        data.update(driver_health(d, driver_status(d)))
    fix = pipeline_status.get("last_fix")
    if fix:
        data.setdefault("gps", {})["sats_used"] = fix.get("sats")
        data["gps"]["hdop"] = fix.get("hdop")
    data["reporting"] = pipeline_status["reporting"]["state"]
    if pipeline_status.get("zones"):
        data["zones"] = list(pipeline_status["zones"])
    if pipeline_status.get("seals"):
        data["seals"] = pipeline_status["seals"]
    if pipeline_status.get("sensors"):
        data["sensors"] = pipeline_status["sensors"]
    data["buffer"] = {"pending": pending, "time_pending": time_pending}
    err = clock.system_clock_error_s()
    data["clock"] = {
        "source": "gps" if clock.has_gps_time else ("system" if clock.system_trusted() else "none"),
        "system_error_s": None if err is None else round(err, 1),
    }
    rejected = pipeline_status.get("fix_filter") or {}
    if rejected:
        data["fixes_rejected"] = rejected
    sources = sources or {}
    if restarts := {s: h["restarts"] for s, h in sources.items() if h.get("restarts") or h.get("crashes")}:
        data["restarts"] = restarts
    if dead := [s for s, h in sources.items() if h.get("dead")]:
        data["dead_sources"] = dead
    return Reading("health", None, data, meta={"mono_ns": time.monotonic_ns()})
