"""What must outlive the buffer itself: the seq numbers handed out and the chain's last link.

When ``buffer.db`` is found damaged (or has vanished), a fresh store must not number readings
1, 2, 3 again: the backend de-duplicates on (device, stream, seq) and would throw the new
readings away as copies of old ones, the ``store_damaged`` alarm included. So the store
reserves seq numbers in blocks in this small side file (``buffer.db.ledger``, written
atomically and fsynced, a few times a day) and records the chain's head after every commit
that extended it (seal and alarm events: rare). A fresh store continues above every reserved
number and from the chain's last link.

The numbers between what the damaged file had used and what was reserved are never used; with
whatever was only in the damaged file they are announced as ``data_dropped`` alarms (reason
``store_damaged``) covering ``floor..reserved``, where ``floor`` is the lowest seq that was
still unacknowledged when the ledger was last written: every reading below it was
acknowledged by the broker.

It also carries the clean-stop record (``clean``, agent/store/integrity.py): the store file's
identity as the last clean stop left it, so a start can skip the full integrity check.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from agent.model.durablefile import replace_durably

log = logging.getLogger(__name__)

BLOCK = 10_000
"""Seq numbers reserved at a time: one small fsynced write per 10,000 readings of a stream."""


class Ledger:
    def __init__(self, path: Path):
        self.path = path
        self.reserved: dict[str, int] = {}
        """Per stream, the highest seq the store may use before writing the ledger again."""
        self.floor: dict[str, int] = {}
        """Per stream, the lowest seq not known to be acknowledged when last written."""
        self.chain: tuple[int, str] | None = None
        self.clean: list[int] | None = None
        """The store file as a clean stop left it (agent/store/integrity.py), or None."""
        self.write_errors = 0
        self._load()

    @property
    def empty(self) -> bool:
        return not self.reserved and self.chain is None

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.reserved = {str(k): int(v) for k, v in data["reserved"].items()}
            self.floor = {str(k): int(v) for k, v in data.get("floor", {}).items()}
            chain = data.get("chain")
            self.chain = (int(chain[0]), str(chain[1])) if chain else None
            clean = data.get("clean")
            self.clean = [int(v) for v in clean] if clean else None
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            # A damaged ledger only matters if the store is damaged too; say so and go on.
            log.error("seq ledger %s unreadable (%s); ignored", self.path, e)
            self.reserved, self.floor, self.chain, self.clean = {}, {}, None, None

    def needs_reserve(self, seq: dict[str, int]) -> bool:
        reserved = self.reserved
        return any(n > reserved.get(s, 0) for s, n in seq.items())

    def reserve(self, seq: dict[str, int], floor: dict[str, int]) -> bool:
        """Reserve the next block above ``seq`` for every stream, before those seqs are used."""
        before = dict(self.reserved), dict(self.floor)
        self.reserved.update({s: n + BLOCK for s, n in seq.items()})
        self.floor.update(floor)
        if self.save():
            return True
        self.reserved, self.floor = before  # not on disk: try again with the next commit
        return False

    def save(self) -> bool:
        """Write atomically (a power cut leaves the old or the new file, never half of one)."""
        data = {"reserved": self.reserved, "floor": self.floor, "chain": list(self.chain) if self.chain else None,
                "clean": self.clean}
        try:
            replace_durably(self.path, json.dumps(data, separators=(",", ":")).encode())
            return True
        except OSError as e:
            self.write_errors += 1
            log.error("seq ledger %s not written (%s)", self.path, e)
            return False
