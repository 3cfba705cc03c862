"""What the CAN driver does with each parameter group: the handlers its frame loop looks up by
identifier (drivers/can/bus.py), built once per PGN, source and destination from the config,
the fleet's DBC files and the built-in J1939 table.

A `Decoded` handler samples parameters (each through its own drivers/can/j1939/sampler.py);
a `Special` one takes every frame (transport protocol, DM1, VIN); IGNORED counts the frame.
What a handler is depends on the PGN alone, so :func:`used_pgns` (the PGNs that get anything
but IGNORED) is also what the kernel is asked to let through (drivers/can/live.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from drivers.can.config import CanConfig
from drivers.can.j1939 import spn
from drivers.can.j1939.diag import DM1_PGN, VIN_PGN
from drivers.can.j1939.ids import GLOBAL, TP_CM_PGN, TP_DT_PGN
from drivers.can.j1939.sampler import Sampled


@dataclass(slots=True)
class Param:
    name: str
    spn: int | None
    unit: str
    sampled: Sampled


class Decoded:
    """Frames of one identifier that carry parameters we sample."""

    __slots__ = ("sa", "decode", "params", "due")

    def __init__(self, sa: int, decode: Any, params: list[Param]):
        self.sa = sa
        self.decode = decode
        self.params = params
        self.due = float("-inf")


class Special:
    """Frames handled every time (transport protocol, DM1, VIN, requests)."""

    __slots__ = ("kind", "pgn", "sa", "da", "due")

    def __init__(self, kind: str, pgn: int, sa: int, da: int):
        self.kind, self.pgn, self.sa, self.da = kind, pgn, sa, da
        self.due = float("-inf")


class Ignored:
    """Frames of PGNs nobody asked for: counted, nothing else."""

    __slots__ = ()


IGNORED = Ignored()
ALWAYS = frozenset((TP_CM_PGN, TP_DT_PGN, DM1_PGN, VIN_PGN))
"""Handled whatever the config says: the transport protocol, DM1 (DTCs) and the VIN."""


def used_pgns(config: CanConfig, dbc: dict[int, Any]) -> frozenset[int]:
    """Every PGN whose frames :func:`handler` does not ignore under this config: the transport
    protocol, DM1 and the VIN always, and each DBC message or built-in PGN with a signal
    enabled (a DBC message wins over the built-in table for its PGN, also when all its signals
    are disabled)."""
    candidates = ALWAYS | set(dbc) | set(spn.BY_PGN)
    return frozenset(p for p in candidates if handler(config, dbc, p, 0, GLOBAL) is not IGNORED)


def handler(config: CanConfig, dbc: dict[int, Any], pgn: int, sa: int, da: int) -> Any:
    """The handler for a parameter group from source ``sa`` to ``da``: the DBC's message for
    the PGN first, else the built-in table's signals; IGNORED when none is enabled."""
    if pgn in ALWAYS:
        return Special("tp" if pgn in (TP_CM_PGN, TP_DT_PGN) else "msg", pgn, sa, da)
    if (m := dbc.get(pgn)) is not None:
        wanted = [i for i, s in enumerate(m.signals) if _enabled(config, s.name)]
        if not wanted:
            return IGNORED
        decode = m.decode if len(wanted) == len(m.signals) else (
            lambda data, idx=tuple(wanted): [v for i, v in enumerate(m.decode(data)) if i in idx])
        params = [_param(config, m.signals[i].name, m.signals[i].spn, m.signals[i].unit, m.signals[i].deadband)
                  for i in wanted]
        return Decoded(sa, decode, params)
    signals = [s for s in spn.BY_PGN.get(pgn, ()) if _enabled(config, s.name)]
    if not signals:
        return IGNORED
    return Decoded(sa, lambda data, ss=tuple(signals): [s.decode(data) for s in ss],
                   [_param(config, s.name, s.spn, s.unit, s.deadband) for s in signals])


def _enabled(config: CanConfig, name: str) -> bool:
    c = config.signals.get(name)
    return c is None or c.enabled


def _pick(v: float | None, d: float) -> float:
    return d if v is None else v


def _param(config: CanConfig, name: str, spn_: int | None, unit: str, deadband: float) -> Param:
    c = config.signals.get(name)
    return Param(name, spn_, unit, Sampled(
        min_interval_s=_pick(None if c is None else c.min_interval_s, config.min_interval_s),
        max_interval_s=_pick(None if c is None else c.max_interval_s, config.max_interval_s),
        deadband=_pick(None if c is None else c.deadband, deadband),
    ))
