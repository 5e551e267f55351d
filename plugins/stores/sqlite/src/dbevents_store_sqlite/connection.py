"""Opening the SQLite connection with the pragmas the store relies on, and the
transaction helpers every store method goes through."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from typing import TypeVar

from dbevents.errors import SetupError

from dbevents_store_sqlite.location import Location

T = TypeVar("T")

BUSY_TIMEOUT = 10.0  # seconds a writer waits for another's transaction (CLI vs worker)
CACHE_KIB = 64 * 1024  # page cache: keeps the queue indexes of a large backlog in memory
# Checkpoint every 10,000 pages (~40 MiB) of WAL rather than SQLite's 1,000: a
# page rewritten by many transactions (the id index's) is copied back once.
WAL_AUTOCHECKPOINT = 10_000
WAL_LIMIT = 64 * 1024 * 1024  # bytes the WAL file shrinks back to after a checkpoint
MIN_SQLITE = (3, 24, 0)  # partial indexes, UPSERT


def connect(location: Location) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL journal."""
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise SetupError(
            f"the SQLite library Python uses is {sqlite3.sqlite_version}; the SQLite store "
            f"needs {'.'.join(map(str, MIN_SQLITE))} or newer")
    conn = sqlite3.connect(str(location), timeout=BUSY_TIMEOUT, isolation_level=None,
                           cached_statements=128)
    try:
        if not location.in_memory:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise SetupError(
                    f"could not put the eventing DB {location} in WAL mode (it stays in "
                    f"{mode!r} mode); keep it on a local filesystem, not a network share")
        # NORMAL in WAL mode: a commit survives the process being killed, only a
        # power loss or OS crash can roll back the last transactions. FULL also
        # fsyncs the WAL at each commit.
        conn.execute(f"PRAGMA synchronous = {location.synchronous.upper()}")
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB:d}")
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT:d}")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT:d}")
    except BaseException:
        conn.close()
        raise
    return conn


def write(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``body`` in one write transaction (the write lock taken up front, so
    it never fails half-way with "database is locked")."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = body(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return result
