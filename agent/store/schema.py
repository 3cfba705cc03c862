"""Opening the store's SQLite file and its schema.

A file SQLite proves damaged is moved aside and a new one started (a damaged SD card must never
put the agent in a crash loop); a path that cannot be a database is refused with the reason,
and nothing is moved or deleted on a guess.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import cast

import sqlite_utils

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4


class StoreUnusable(OSError):
    """The store path cannot be a database (a folder, a device, no permission): nothing is
    moved aside or deleted, the agent refuses to start and says why."""


def create_schema(db: sqlite_utils.Database) -> None:
    # AUTOINCREMENT: ids never go back, even when the newest row has been deleted, so the
    # uplink can page through a stream by id.
    db.execute(
        "CREATE TABLE IF NOT EXISTS readings ("
        " id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " stream TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL,"
        " body TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX IF NOT EXISTS readings_stream ON readings(stream)")
    # db[name] is a View only if a view has that name; these are our tables.
    readings = cast(sqlite_utils.db.Table, db["readings"])
    # v2: readings taken before the time was known are held until it is (agent/model/clock.py).
    have = readings.columns_dict
    # v3: ``stored_ms``, the device's trusted time when the row was stored (NULL: none was
    # known, or a v2 row): what max_age_days is judged by, never the reading's own time.
    for name, kind in (("held", int), ("mono_ns", int), ("boot_id", str), ("wall_ms", int), ("stored_ms", int)):
        if name not in have:
            readings.add_column(name, kind, not_null_default=0 if name == "held" else None)
    db.execute("CREATE INDEX IF NOT EXISTS readings_stored ON readings(stored_ms)")
    # v4: held rows are almost never there, so a partial index finds them (start-up count,
    # release, status) without reading the backlog, and costs an insert nothing otherwise.
    db.execute("CREATE INDEX IF NOT EXISTS readings_held ON readings(held) WHERE held = 1")
    cast(sqlite_utils.db.Table, db["streams"]).create({"stream": str, "last_seq": int}, pk="stream", if_not_exists=True)
    cast(sqlite_utils.db.Table, db["state"]).create({"key": str, "value": str}, pk="key", if_not_exists=True)
    if "depth" not in cast(sqlite_utils.db.Table, db["streams"]).columns_dict:
        _add_depth(db.conn)
    if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:  # no write at every start
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _add_depth(conn: sqlite3.Connection) -> None:
    """v4: ``streams.depth``, the rows each stream has in ``readings``, kept by triggers in the
    same transaction as every insert and delete: what status, ``pending()`` and shedding need
    without counting a backlog of a million rows (an index would only make the count cheaper,
    never constant). Triggers, not the writer's own arithmetic, so no delete path (acks,
    shedding, an older agent's code) can leave it wrong; they touch only the one small
    ``streams`` page, which a commit with new rows writes anyway. Counted once here, on the
    first start after an upgrade; all in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("ALTER TABLE streams ADD COLUMN depth INTEGER NOT NULL DEFAULT 0")
        conn.execute("UPDATE streams SET depth = (SELECT COUNT(*) FROM readings r WHERE r.stream = streams.stream)")
        conn.execute(
            "CREATE TRIGGER readings_added AFTER INSERT ON readings BEGIN"
            " INSERT INTO streams (stream, last_seq, depth) VALUES (NEW.stream, NEW.seq, 1)"
            " ON CONFLICT(stream) DO UPDATE SET depth = depth + 1; END")
        conn.execute(
            "CREATE TRIGGER readings_removed AFTER DELETE ON readings BEGIN"
            " UPDATE streams SET depth = depth - 1 WHERE stream = OLD.stream; END")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE), so SQLite never
    # starts one behind our back and commit points are exactly where the code says.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def _new_file_settings(db: sqlite_utils.Database) -> None:
    """Settings a database file takes only before its first table (and before WAL mode)."""
    if not db.table_names():
        # Lets a full disk get space back: pages freed by shedding can be returned to the
        # filesystem (PRAGMA incremental_vacuum), not only reused inside the file.
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")


def check_path(path: Path) -> None:
    """The store path must be a regular file or not exist yet; anything else is refused, never
    moved aside: a folder given by mistake may hold everything else on the device."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise StoreUnusable(f"store {path}: cannot look at it: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise StoreUnusable(f"store {path} is {kind}; [store] path must name a database file "
                            f"(e.g. {path / 'buffer.db' if stat.S_ISDIR(st.st_mode) else path.with_suffix('.db')})")


# SQLite's own verdicts that a file is not a sound database (anything else, such as "unable to
# open database file" for a permission problem, proves nothing about the file).
_DAMAGED = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}


def _proves_damage(e: sqlite3.DatabaseError) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return code is None or code & 0xFF in _DAMAGED


def open_db(path: Path, full_check: bool = True) -> tuple[sqlite_utils.Database, Path | None]:
    """Open the buffer. A file that SQLite proves damaged is moved aside (kept for forensics)
    and a new one started: a damaged card must never put the agent in a crash loop. Any other
    failure (permissions, a vanished folder) is raised: nothing is renamed on a guess.
    ``full_check`` False skips ``PRAGMA quick_check`` (which reads every page) for a file
    untouched since a clean stop (agent/store/integrity.py); SQLite still refuses one that is
    not a database at all. Returns the database and where a damaged file went, if one did."""
    conn = None
    try:
        conn = connect(path)
        db = sqlite_utils.Database(conn)
        _new_file_settings(db)
        db.enable_wal()
        if full_check:
            ok = db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {ok}")  # no error code: proven damage
        else:
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # reads the header and schema
        aside = None
    except sqlite3.DatabaseError as e:
        if conn is not None:
            conn.close()
        if not _proves_damage(e) or not path.is_file():
            raise StoreUnusable(f"store {path}: cannot open it: {e}") from None
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        log.error("store %s is damaged (%s); moved aside to %s, starting a new one", path, e, aside)
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{path}{suffix}")
            if src.exists():
                os.replace(src, Path(f"{aside}{suffix}"))
        db = sqlite_utils.Database(connect(path))
        _new_file_settings(db)
        db.enable_wal()
    db.execute("PRAGMA synchronous = NORMAL")
    return db, aside
