"""``run --dry-run``: print what would be published instead of publishing it."""

from __future__ import annotations

import json
import sys
from typing import IO

from agent.config import Config
from agent.store.buffer import Store
from agent.uplink.base import Uplink
from agent.uplink.outcome import ACCEPTED


class ConsoleUplink(Uplink):
    """Prints each message as ``{"topic": ..., "payload": ...}`` on one line; every batch is
    accepted at once."""

    def __init__(self, config: Config, store: Store, out: IO[str] = sys.stdout):
        super().__init__(config, store)
        self.out = out

    def _serve(self) -> None:
        self.connected = True
        seen = -1
        while not self._stop.is_set():
            batch = self.outbox.next_batch()
            if batch is None:
                seen = self.store.wait_for_change(max(seen, self.store.durable_id), 0.2)
                continue
            topic = json.dumps(self.config.topic(batch.stream))
            self.out.write(f'{{"topic":{topic},"payload":{batch.json().decode()}}}\n')
            self.out.flush()
            self._end(batch, ACCEPTED)
