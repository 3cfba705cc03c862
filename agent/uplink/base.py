"""The uplink role: hand batches from the outbox to the backend, each to an explicit outcome.

Every transport (agent/uplink/mqtt.py, agent/uplink/console.py) runs in its own thread,
implements ``_serve``, and ends each batch it took from the outbox with ``_end`` (accepted,
kept or rejected: agent/uplink/outcome.py). Rows leave the store only when accepted or
rejected.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from agent.config import Config
from agent.model import streams
from agent.model.backoff import backoff_delay
from agent.store.buffer import Store
from agent.uplink.commands import CommandHandler
from agent.uplink.outbox import Batch, Outbox
from agent.uplink.outcome import Outcome, Verdict
from agent.uplink.regions import UplinkPlan

log = logging.getLogger(__name__)


class Uplink:
    """Common bookkeeping; subclasses implement ``_serve``."""

    commands: CommandHandler | None = None
    """The remote command channel: only a transport that receives commands (MQTT) has one."""

    def __init__(self, config: Config, store: Store, plan: UplinkPlan | None = None):
        self.config = config
        self.store = store
        self.plan = plan
        compact = config.mqtt.encoding == "compact"
        # Compact messages are ~15x smaller than their JSON: the outbox's limit is in JSON bytes,
        # the wire limit is checked on the encoded message.
        json_limit = config.mqtt.max_message_bytes * (64 if compact else 1)
        self.outbox = Outbox(store, max_batch=config.mqtt.max_batch, max_bytes=json_limit, plan=plan)
        self.connected = False
        self.messages_acked = 0
        self.readings_acked = 0
        self.last_ack_wall: float | None = None
        self.last_error: str | None = None
        self.readings_set_aside = 0
        """Readings rejected for good (``too_large``, ``undeliverable``)."""
        self._refusals: dict[str, int] = {}
        """Per stream, batches kept for later in a row (the retry's backoff); reset on accept."""
        self._kept_why: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._guarded, name=type(self).__name__, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "connected": self.connected,
            "messages_acked": self.messages_acked,
            "readings_acked": self.readings_acked,
            "last_publish": self.last_ack_wall,
            "last_error": self.last_error,
        }
        waiting = self.outbox.waiting
        if waiting:  # streams whose batch the broker refused, waiting to retry
            out["kept"] = {s: {"reason": self._kept_why.get(s), "retry_in_s": round(t, 1)}
                           for s, t in sorted(waiting.items())}
        return out

    # -- outcomes --------------------------------------------------------------------------

    def _end(self, batch: Batch, verdict: Verdict) -> None:
        """The batch's outcome: accepted (deleted), kept (due again) or rejected (set aside)."""
        if verdict.outcome is Outcome.ACCEPTED:
            self._acked(batch)
        elif verdict.outcome is Outcome.KEPT:
            self._keep(batch, verdict)
        elif not self._give_up(batch, verdict.dropped_as, verdict.why):
            # Not set aside (its announcement is not durable yet): kept, to try again later.
            self._keep(batch, Verdict(Outcome.KEPT, verdict.why, later=True))

    def _acked(self, batch: Batch) -> None:
        self.store.ack(batch.ids)
        self.messages_acked += 1
        self.readings_acked += batch.count
        self.last_ack_wall = time.time()
        if self._refusals:
            self._refusals.pop(batch.stream, None)
            self._kept_why.pop(batch.stream, None)

    def _keep(self, batch: Batch, verdict: Verdict) -> None:
        delay = 0.0
        if verdict.later:
            attempt = self._refusals[batch.stream] = self._refusals.get(batch.stream, 0) + 1
            m = self.config.mqtt
            delay = backoff_delay(attempt, m.reconnect_min_s, m.reconnect_max_s)
            self._kept_why[batch.stream] = verdict.why
        self._error(f"{batch.stream} readings kept ({verdict.why}): "
                    + ("retried later" if verdict.later else "sent again in smaller messages"))
        self.outbox.keep(batch, delay, split=verdict.split)

    def _give_up(self, batch: Batch, reason: str, why: str) -> bool:
        """Set readings aside for good: deleted and announced (a data_dropped alarm), unless
        they are themselves such alarms, which would only be followed by another as
        undeliverable. False when the announcement could not be made durable (rows kept)."""
        announce = not (batch.stream == streams.ALARM and all(_is_drop_alarm(b) for b in batch.bodies))
        log.error("MQTT: %s %s reading(s) (row %d) set aside as %s: %s", batch.count, batch.stream,
                  batch.ids[0], reason, why)
        self.last_error = f"set aside {batch.count} {batch.stream} reading(s) as {reason}: {why}"
        if not self.store.set_aside(batch.stream, batch.ids, reason, announce=announce):
            return False
        self.readings_set_aside += batch.count
        return True

    def _error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("MQTT: %s", message)
        self.last_error = message

    # -- the thread --------------------------------------------------------------------------

    def _guarded(self) -> None:
        # The uplink must outlive any bug in one connection: log it, back off, carry on.
        attempt = 0
        while not self._stop.is_set():
            try:
                self._serve()
                return
            except Exception as e:  # noqa: BLE001 - last line of defence for a daemon thread
                attempt += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("uplink failed; restarting it")
                self._stop.wait(backoff_delay(attempt, 1, 60))

    def _serve(self) -> None:
        raise NotImplementedError


def _is_drop_alarm(body: str) -> bool:
    try:
        dropped: bool = json.loads(body).get("kind") == "data_dropped"
        return dropped
    except (ValueError, AttributeError):
        return False
