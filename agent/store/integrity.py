"""When the store needs its full integrity check at start, and when it does not.

``PRAGMA quick_check`` reads every page: with a 1M-reading backlog that is 266 MB off the SD
card on every start, before anything is sent. Damage comes from writes cut short (a power cut,
a crash mid-write, a failing card) or from the file being changed behind the agent's back
(copied, truncated, replaced). So, like a filesystem's clean flag, a clean stop records the
closed file's identity in the seq ledger (agent/store/seqledger.py, written then anyway): its
device, inode, size, change and modification times, and the WAL's if one was left. A start
that finds exactly that file skips the full check: nothing has written to it since a clean
stop. The record is consumed at start (removed from the ledger on disk before the store is
written), so a crash or power cut during the run leaves none, whatever the filesystem made
of the file's times. Anything else (no record: a crash, a power cut, the first start after
an upgrade; a record that does not match: the file written, truncated or replaced since) gets
the full check, and what SQLite proves damaged is moved aside as before
(agent/store/schema.py).

What this gives up: bit rot at rest in a file nobody wrote to, between a clean stop and the
next start, is found when the page is read, not at start.
"""

from __future__ import annotations

import os
from pathlib import Path


def fingerprint(path: Path) -> list[int] | None:
    """The file's identity as a clean stop leaves it; None if it is not there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    out = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    try:
        wal = os.stat(f"{path}-wal")
    except FileNotFoundError:
        return out
    except OSError:
        return None
    # An empty WAL holds nothing (a read-only reader may leave one): as good as none.
    return out + [wal.st_ino, wal.st_size, wal.st_mtime_ns] if wal.st_size else out


def needs_full_check(path: Path, clean: list[int] | None) -> bool:
    """True unless the file is exactly as the last clean stop left it."""
    return clean is None or fingerprint(path) != clean
