"""One agent per store: an exclusive lock held for as long as the store is open for writing.

Two agents on one buffer would each number readings from the same counters and publish the
same ``seq`` with different content: a backend de-duplicating on seq silently loses readings.
The lock is ``flock(2)`` on ``<store>.lock`` (not on the database file, whose POSIX locks are
SQLite's own), so the kernel drops it when the holder dies, a power cut leaves nothing stale,
and read-only users (``status``, ``verify-chain``) never need it. The file holds the holder's
PID, to name it in the refusal.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class StoreLocked(RuntimeError):
    """Another process has this store open for writing."""

    def __init__(self, store: Path, holder: str):
        self.store = store
        self.holder = holder
        super().__init__(
            f"store {store} is in use by another lorry-agent (pid {holder}); "
            "only one agent may write a store: stop the other one, or give this one its own [store] path")


class StoreLock:
    def __init__(self, store: Path):
        self.store = store
        self.path = store.with_name(store.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise StoreLocked naming the holder's PID."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreLocked(self.store, holder) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (unlinking would race)
            self._fd = None
