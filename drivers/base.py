"""The driver interface: a source of readings that knows nothing of the store or the uplink.

`Driver` is what the agent runs; `ReconnectingDriver` is the base of every driver on a device
that can vanish (a serial port, a socket, a CAN interface, a GPIO line). Like python-can's
``BusABC.recv`` / ``_recv_internal``, the loop is written once here (open, read until lost,
back off, reopen, with the counters ``lorry-agent status`` shows) and a driver implements
only how to open its device and how to read it.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from agent.model.backoff import backoff_delay
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

    @classmethod
    def devices(cls, config: Any) -> list[str]:
        """The device nodes or classes this config opens, as systemd ``DeviceAllow=`` values
        (``/dev/ttyAMA2 rw``, ``char-gpiochip rw``) for ``lorry-agent unit-dropin``."""
        return []

    @abstractmethod
    def snapshot(self) -> dict[str, Any]:
        """Counters and state for ``lorry-agent status`` and the health reading."""

    def health(self, status: dict[str, Any]) -> dict[str, Any]:
        """This driver's fields of the `health` reading (docs/asyncapi.yaml), such as
        ``{"gps": {...}}``, made from ``status`` (what ``snapshot()`` gave, or
        ``{"status_error": ...}`` when it failed). Most drivers add none."""
        return {}


class ReconnectingDriver(Driver):
    """A driver on a device that may be missing or vanish: ``run`` opens it with ``_open``,
    reads it with ``_read`` until it is lost or ``stop`` is set, closes it, and reopens it.

    A device that cannot be opened is retried after a capped, jittered backoff
    (``reopen_min_s`` doubling up to ``reopen_max_s``); the first failure of a series is a
    warning in the log, the rest are debug lines. A device lost while reading is reopened after
    ``_reopen_delay()``. ``opens``, ``open_failures``, ``connected`` and ``last_error`` count
    and say it for ``status``.
    """

    open_errors: ClassVar[tuple[type[BaseException], ...]] = (OSError, ValueError)
    """What ``_open`` raises for a device that cannot be opened now: retried, never fatal."""
    lost_errors: ClassVar[tuple[type[BaseException], ...]] = (OSError,)
    """What ``_read`` raises when the device is lost: reopened, never fatal."""
    reopen_min_s: float = 1.0
    reopen_max_s: float = 30.0
    """Backoff bounds; taken from the config's keys of the same names when it has them."""

    def __init__(self, config: Any, emit: Emit):
        super().__init__(config, emit)
        self.reopen_min_s = getattr(config, "reopen_min_s", self.reopen_min_s)
        self.reopen_max_s = getattr(config, "reopen_max_s", self.reopen_max_s)
        self.opens = 0
        self.open_failures = 0
        self.connected = False
        self.last_error: str | None = None
        self.log = logging.getLogger(type(self).__module__)

    # -- what a driver implements ---------------------------------------------------------------

    @abstractmethod
    def _open(self) -> Any:
        """Open the device and return its handle; raise one of ``open_errors`` if it cannot
        be opened now."""

    @abstractmethod
    def _read(self, handle: Any, stop: threading.Event) -> None:
        """Read until ``stop`` is set (or the device closes its end); raise one of
        ``lost_errors`` when the device is lost."""

    def _close(self, handle: Any) -> None:
        handle.close()

    def _opened(self, handle: Any) -> None:
        """Just opened (``opens`` counted, ``connected`` set): log it, start a new session."""

    def _closed(self, handle: Any) -> None:
        """The session ended (``connected`` cleared), before the handle is closed: flush what
        the session left pending."""

    def _open_failed(self, error: BaseException) -> str:
        """The ``last_error`` of a failed open."""
        return f"cannot open: {error}"

    def _lost(self, error: BaseException) -> str:
        """The ``last_error`` of a device lost while reading."""
        return f"lost: {error}"

    def _reopen_delay(self) -> float:
        """The wait between losing the device and opening it again."""
        return self.reopen_min_s

    def _log_problem(self, message: str, error: BaseException | None, loud: bool) -> None:
        """Say a problem in the driver module's log: a warning when ``loud``, else debug."""
        (self.log.warning if loud else self.log.debug)("%s: %s", self.kind, message)

    # -- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                handle = self._open()
            except self.open_errors as e:
                self.open_failures += 1
                failures += 1
                self._problem(self._open_failed(e), e, loud=failures == 1)
                stop.wait(backoff_delay(failures, self.reopen_min_s, self.reopen_max_s))
                continue
            failures = 0
            self.opens += 1
            self.connected = True
            self._opened(handle)
            try:
                self._read(handle, stop)
            except self.lost_errors as e:
                self._problem(self._lost(e), e, loud=True)
            finally:
                self.connected = False
                self._closed(handle)
                try:
                    self._close(handle)
                except Exception:  # noqa: BLE001 - closing a vanished device may fail; it is gone
                    pass
            if not stop.is_set():
                stop.wait(self._reopen_delay())

    def _problem(self, message: str, error: BaseException | None = None, loud: bool = True) -> None:
        self.last_error = message
        self._log_problem(message, error, loud)
