"""The store's journal: the newest readings, appended to a small file and fsynced in groups.

SQLite's cheapest commit writes several 4 KiB pages (the table's and each index's last leaf,
the counters, the pointer map), twice (WAL, then checkpoint): one a second is 350 MB a day
on an SD card for 3 MB of readings. So new readings go here first: each group commit (every
``sync_interval_s``) is one ``write()`` of CRC-framed records and one ``fdatasync``. Each
write dirties a page that ext4 writes back within seconds (measured: ~0.6 page per write at
one write per 6 s), so a write per reading would cost ~35 MB a day by itself: the writer
groups first (agent/store/timing.py). Readings the broker acknowledges before the next fold never reach SQLite; the rest
are folded into it in large transactions (agent/store/fold.py) and the journal starts again.

A frame: ``MAGIC`` (4 bytes), payload length and CRC-32 (4 bytes each, little endian), the
payload (compact JSON). A torn frame at the end (a power cut in the middle of a write) ends
the journal; a damaged frame in the middle is skipped up to the next ``MAGIC`` and counted,
and the seq numbers it held show as a gap the store announces.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"LJ\x01\n"
_HEAD = struct.Struct("<4sII")
MAX_RECORD = 4 << 20
"""A frame claiming more than this is damage, not a record (a reading is at most ~256 KB)."""


@dataclass(slots=True)
class Replayed:
    """What a journal held: records in order, and how much of it was damaged."""

    records: list[list[Any]]
    damaged_bytes: int = 0
    torn_bytes: int = 0


def frame(record: list[Any]) -> bytes:
    payload = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def parse(data: bytes) -> Replayed:
    """Every whole, intact record of ``data``; never raises."""
    out = Replayed([])
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < _HEAD.size:
            out.torn_bytes += end - pos
            break
        magic, size, crc = _HEAD.unpack_from(data, pos)
        start = pos + _HEAD.size
        if magic == MAGIC and size <= MAX_RECORD and start + size > end:
            out.torn_bytes += end - pos  # the last write, cut short
            break
        record = _decode(data[start:start + size], crc) if magic == MAGIC and size <= MAX_RECORD else None
        if record is None:
            nxt = data.find(MAGIC, pos + 1)
            nxt = end if nxt < 0 else nxt
            out.damaged_bytes += nxt - pos
            pos = nxt
            continue
        out.records.append(record)
        pos = start + size
    return out


def _decode(payload: bytes, crc: int) -> list[Any] | None:
    if zlib.crc32(payload) != crc:
        return None
    try:
        record = json.loads(payload)
    except ValueError:
        return None
    return record if isinstance(record, list) and record else None


def path_for(store: Path) -> Path:
    """The journal beside the store file ``store``."""
    return store.with_name(store.name + ".journal")


def read(path: Path) -> Replayed:
    """The records of the journal at ``path`` (none if there is no file); read only."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Replayed([])
    return parse(data)


class Journal:
    """The open journal file; used by the store's writer thread only."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self.size = os.fstat(self._fd).st_size
        self.syncs = 0
        self.write_errors = 0
        self.last_error: str | None = None

    def append(self, records: list[list[Any]]) -> bool:
        """One ``write()`` of these records (not yet durable). On failure (a full disk, a
        failing card) the file is cut back to where it was and False returned."""
        data = b"".join(frame(r) for r in records)
        if not data:
            return True
        try:
            done = os.write(self._fd, data)
            if done != len(data):
                raise OSError(f"short write ({done} of {len(data)} bytes)")
        except OSError as e:
            self._failed(e)
            try:
                os.ftruncate(self._fd, self.size)  # no half frame before the next one
            except OSError:
                pass
            return False
        self.size += len(data)
        return True

    def sync(self) -> bool:
        """Make everything appended durable (one fdatasync)."""
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            self._failed(e)
            return False
        self.syncs += 1
        return True

    def reset(self) -> bool:
        """Empty the journal once everything in it is in SQLite (durably) or acknowledged.
        Not synced: if a power cut undoes it, the records come back and are skipped or sent
        again by seq (agent/store/fold.py)."""
        try:
            os.ftruncate(self._fd, 0)
        except OSError as e:
            self._failed(e)
            return False
        self.size = 0
        return True

    def close(self) -> None:
        os.close(self._fd)

    def _failed(self, e: OSError) -> None:
        self.write_errors += 1
        self.last_error = f"{type(e).__name__}: {e}"
        log.error("store journal %s: %s", self.path, e)
