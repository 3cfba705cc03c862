"""The stream catalogue: every stream the agent publishes, one row each, with everything the
rest of the agent decides by a stream's name. Nothing else in ``agent/`` lists stream names.

| stream        | chained | never shed | always live | newest first | shed for size (step: keep) |
|---------------|---------|------------|-------------|--------------|----------------------------|
| `alarm`       | yes     | yes        | yes         |              |                            |
| `seal`        | yes     | yes        | yes         |              |                            |
| `position`    |         |            |             | yes          | 3: one in 3, 5: none       |
| `ignition`    |         | yes        |             |              |                            |
| `temperature` |         |            |             |              | 4: one in 3                |
| `can`         |         |            |             |              | 2: none, 6: none           |
| `health`      |         |            |             |              | 1: none                    |

- **priority**: the row order is the order the uplink serves streams in when there is a backlog
  (agent/uplink/outbox.py): events customs and dispatch act on, where the lorry is, the rest.
- **chained**: linked into the tamper-evident event chain as committed (agent/model/chain.py,
  docs/chain.md).
- **never shed**: kept when the store must give readings up (agent/store/retention.py: size,
  age; agent/store/writer.py: a full disk, memory while the disk cannot be written).
- **always live**: sent at once under every uplink profile, even past a data budget; a profile
  cannot hold or throttle it (agent/config/regions.py, agent/uplink/regions.py).
- **newest first**: when a connection starts with a backlog, the stream's newest reading goes
  first, alone, then the backlog oldest first (agent/uplink/outbox.py).
- **lazy** (health only): may wait ``[store] lazy_sync_s`` for the journal's fsync instead of
  ``sync_interval_s`` (agent/store/writer.py): a parked lorry's health reading every 5 min must
  not cost an fsync each.
- **shed for size**: the steps, in step order across streams, in which the store thins the
  older half of a stream when it is over ``[store] max_mb`` (agent/store/retention.py):
  ``(step, every)``, every 1 sheds all of it, every 3 two of every three.

**A stream not in the catalogue** (a driver's new stream that nobody added here yet) is not
lost and not stuck: :func:`get` gives it a row of its own that is served after every catalogued
stream (alphabetically among themselves), not chained, shed for age but never for size, and
**live under every uplink profile** (a profile cannot name it, so none can hold it; it stops
past a data budget like any stream that is not always live). Adding a stream for good is one
row here; the profile validator, the outbox and the store then know it.
"""

from __future__ import annotations

from dataclasses import dataclass

ALARM = "alarm"
SEAL = "seal"
POSITION = "position"
IGNITION = "ignition"
TEMPERATURE = "temperature"
CAN = "can"
HEALTH = "health"


@dataclass(frozen=True, slots=True)
class Stream:
    """One row of the catalogue."""

    name: str
    chained: bool = False
    never_shed: bool = False
    always_live: bool = False
    newest_first: bool = False
    shed: tuple[tuple[int, int], ...] = ()
    """``(step, every)``: at that step of shedding for size, the older half of the stream goes,
    all of it (every 1) or all but one in ``every``."""
    lazy: bool = False
    """Made durable with the journal's next fsync, or ``[store] lazy_sync_s`` after it was
    taken: the agent's own periodic readings, which a power cut costs one of at most."""
    catalogued: bool = True
    """False for a stream the catalogue does not know (see the module's note)."""


CATALOGUE: tuple[Stream, ...] = (
    Stream(ALARM, chained=True, never_shed=True, always_live=True),
    Stream(SEAL, chained=True, never_shed=True, always_live=True),
    Stream(POSITION, newest_first=True, shed=((3, 3), (5, 1))),
    Stream(IGNITION, never_shed=True),
    Stream(TEMPERATURE, shed=((4, 3),)),
    Stream(CAN, shed=((2, 1), (6, 1))),
    Stream(HEALTH, shed=((1, 1),), lazy=True),
)
"""In priority order."""

BY_NAME: dict[str, Stream] = {s.name: s for s in CATALOGUE}
NAMES: tuple[str, ...] = tuple(BY_NAME)
"""Every catalogued stream, in priority order."""

CHAINED: frozenset[str] = frozenset(s.name for s in CATALOGUE if s.chained)
NEVER_SHED: tuple[str, ...] = tuple(s.name for s in CATALOGUE if s.never_shed)
ALWAYS_LIVE: tuple[str, ...] = tuple(s.name for s in CATALOGUE if s.always_live)
HOLDABLE: tuple[str, ...] = tuple(s.name for s in CATALOGUE if not s.always_live)
"""What a profile may name in ``live`` / ``every_s``; also the default ``live``."""
NEWEST_FIRST: frozenset[str] = frozenset(s.name for s in CATALOGUE if s.newest_first)
SHED_STEPS: tuple[tuple[str, int], ...] = tuple(
    (name, every) for _step, name, every in sorted((step, s.name, every) for s in CATALOGUE for step, every in s.shed)
)
"""``(stream, every)`` in the order the store sheds for size."""
LONGEST_NAME: str = max(NAMES, key=len)
"""The longest topic level a catalogued stream publishes on (sizes the MQTT 5 packet margin)."""


def get(name: str) -> Stream:
    """The stream's row; a stream the catalogue does not know gets the default row."""
    row = BY_NAME.get(name)
    return row if row is not None else Stream(name, catalogued=False)


def ordered(names: list[str] | tuple[str, ...] | set[str]) -> list[str]:
    """Streams in uplink priority order: the catalogue's order, then unknown ones by name."""
    known = [s for s in NAMES if s in names]
    return known + sorted(s for s in names if s not in BY_NAME)
