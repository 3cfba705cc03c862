"""Space held in reserve for the day the disk fills.

In WAL mode even a DELETE needs free space (the WAL grows before anything is freed), so on a
really full filesystem the store could not shed a single reading to make room. A small
preallocated file next to the store is given back at that moment: enough for the shedding
transactions and a checkpoint that folds the WAL into the database (whose freed pages new
readings then reuse). It is taken again once the filesystem has room.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

MAX_BYTES = 4 * 1024 * 1024
SHARE = 0.10
"""Never more than this share of the filesystem (a small card, a test's tmpfs)."""


class Ballast:
    def __init__(self, path: Path):
        self.path = path
        self.releases = 0

    def size(self) -> int:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return 0
        return min(MAX_BYTES, int(st.f_blocks * st.f_frsize * SHARE)) // 4096 * 4096

    def held(self) -> bool:
        return self.path.exists()

    def ensure(self, headroom: int) -> None:
        """Take the reserve if it is missing and the filesystem has it plus ``headroom`` free."""
        if self.held():
            return
        size = self.size()
        try:
            st = os.statvfs(self.path.parent)
            if size <= 0 or st.f_bavail * st.f_frsize < size + headroom:
                return
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("store reserve %s not taken (%s)", self.path, e)
            self.path.unlink(missing_ok=True)

    def release(self) -> bool:
        """Give the reserve back to the filesystem; True if there was one."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            log.error("store reserve %s could not be released (%s)", self.path, e)
            return False
        self.releases += 1
        log.warning("disk full: released the store's %s reserve", self.path.name)
        return True
