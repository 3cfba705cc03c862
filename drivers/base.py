"""The driver interface: a source of readings that knows nothing of the store or the uplink."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from agent.model.reading import Reading

Emit = Callable[[Reading], None]


class Driver(ABC):
    """Runs in its own thread and hands each reading to ``emit``.

    ``run`` returns when ``stop`` is set, or, for a finite source such as a replayed capture,
    when the source is exhausted. It must not raise for bad input or a vanished device: count
    it, report it in ``status`` and carry on.
    """

    kind: ClassVar[str]
    """The config section it serves: "gps", "seal", "temperature", "can"."""
    finite: bool = False
    """True for replays: the source ends, and ``--until-drained`` waits for it."""

    def __init__(self, config: Any, emit: Emit):
        self.config = config
        self.emit = emit
        self.clock: Any = None
        """The agent's trusted clock (agent/model/clock.py TimeKeeper), set before run()."""

    @abstractmethod
    def run(self, stop: threading.Event) -> None: ...

    @classmethod
    def check(cls, config: Any) -> list[str]:
        """Problems with this driver's config section that the schema cannot see (a DBC file
        that does not parse, an unknown signal name), as ``[section] key: problem`` lines."""
        return []

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """Counters and state for ``lorry-agent status`` and the health reading."""
