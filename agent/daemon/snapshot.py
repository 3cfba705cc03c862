"""Where the running agent keeps its snapshot for ``lorry-agent status``.

The snapshot (counters, last fix, uplink state…) changes every second. Kept in the store's
``state`` table it was rewritten with every commit while driving and every 30 s while parked:
pages of SD-card wear for a value nobody may ever read. When systemd gives the service a
runtime directory (``RuntimeDirectory=``, in RAM under /run), the live snapshot goes there
instead, replaced whole each time; the store gets it only at start and stop (so ``status``
still shows the last run after a reboot). Without one (a developer's shell, the tests) the
store keeps it as before.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SNAPSHOT_KEY = "status"
"""The state-table row with the snapshot of the last run (cli/statusview.py reads it)."""
LIVE_FILE_KEY = "status_file"
"""The state-table row naming the live snapshot file of the running agent, if it has one."""
RUNTIME_ENV = "RUNTIME_DIRECTORY"
FILE_NAME = "status.json"


def runtime_file(environ: dict[str, str] | None = None) -> Path | None:
    """The live snapshot's file in the unit's runtime directory, or None without one."""
    value = (os.environ if environ is None else environ).get(RUNTIME_ENV, "")
    first = value.split(":")[0]  # systemd lists several directories separated by ':'
    return Path(first) / FILE_NAME if first else None


class LiveSnapshot:
    """Writes the snapshot to ``path`` (replaced atomically, never fsynced: it lives in RAM)."""

    def __init__(self, path: Path):
        self.path = path
        self.failed: str | None = None
        """Why the last write failed; the caller falls back to the store meanwhile."""

    def write(self, snapshot: dict[str, Any]) -> bool:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(json.dumps(snapshot, default=str), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:
            if self.failed is None:
                log.warning("status snapshot: cannot write %s (%s); keeping it in the store", self.path, e)
            self.failed = str(e)
            return False
        self.failed = None
        return True

    def remove(self) -> None:
        """At stop: the store holds the final snapshot, and a stale file must not look live."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("status snapshot: cannot remove %s (%s)", self.path, e)


def read_live(state: dict[str, str]) -> dict[str, Any] | None:
    """The running agent's live snapshot named by the store's state, if it can be read."""
    name = state.get(LIVE_FILE_KEY)
    if not name:
        return None
    try:
        value = json.loads(Path(name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not running, not ours to read, or replaced right now: the store's copy will do
    return value if isinstance(value, dict) else None
