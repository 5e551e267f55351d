"""The versioned schema and its in-place migrations.

The version lives in the file header (``PRAGMA user_version``), so it changes in
the same transaction as the DDL it describes: a migration that fails half-way
leaves the file at the old version with the old tables. ``application_id`` marks
the file as a dbevents eventing DB so a typo in the store URL cannot turn some
other application's SQLite file into one.

Times are integer microseconds since the Unix epoch (UTC): they sort and compare
in SQL and round-trip datetimes exactly.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Sequence

from dbevents.errors import SetupError

from dbevents_store_sqlite.connection import write

APPLICATION_ID = 0x64626576  # "dbev"

# MIGRATIONS[n] takes a file from version n to n + 1. Append, never edit: a
# released step has already run on somebody's file.
Step = Sequence[str]
MIGRATIONS: tuple[Step, ...] = (
    (  # 1: event log, invocation log, checkpoints, meta
        """CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE checkpoints (
            source     TEXT PRIMARY KEY,
            position   TEXT NOT NULL,
            updated_at INTEGER NOT NULL
        ) WITHOUT ROWID""",
        # seq is the enqueue order; AUTOINCREMENT so a purged seq is never reused.
        # head = 1 marks the first active (pending/delivering) event of its
        # (trigger, doc_id) row: only heads are claimed, which keeps per-row order
        # without scanning the rows queued behind them. due_at is when an active
        # event may be claimed: its next attempt when pending, its lease expiry
        # when delivering.
        """CREATE TABLE events (
            seq             INTEGER PRIMARY KEY AUTOINCREMENT,
            id              TEXT NOT NULL UNIQUE,
            trigger_name    TEXT NOT NULL,
            database_name   TEXT NOT NULL,
            db_type         TEXT NOT NULL,
            table_name      TEXT NOT NULL,
            doc_id          TEXT,
            event_type      TEXT NOT NULL,
            status          TEXT NOT NULL,
            attempts        INTEGER NOT NULL DEFAULT 0,
            head            INTEGER NOT NULL DEFAULT 0,
            due_at          INTEGER,
            next_attempt_at INTEGER,
            created_at      INTEGER NOT NULL,
            updated_at      INTEGER NOT NULL,
            last_error      TEXT,
            payload         BLOB NOT NULL
        )""",
        # The queue behind each row: is a row busy, and which event comes next.
        """CREATE INDEX events_active ON events (trigger_name, doc_id, seq)
            WHERE status IN ('pending', 'delivering')""",
        # Claim: heads of a trigger, oldest first, due_at read from the index.
        "CREATE INDEX events_heads ON events (trigger_name, seq, due_at) WHERE head = 1",
        # next_due: the earliest due_at over every head.
        "CREATE INDEX events_heads_due ON events (due_at) WHERE head = 1",
        # In-flight claims, handed back when a worker starts.
        "CREATE INDEX events_delivering ON events (seq) WHERE status = 'delivering'",
        # Retention and `events purge`.
        """CREATE INDEX events_finished ON events (status, updated_at)
            WHERE status IN ('delivered', 'failed')""",
        """CREATE TABLE attempts (
            id              INTEGER PRIMARY KEY,
            event_seq       INTEGER NOT NULL,
            number          INTEGER NOT NULL,
            started_at      INTEGER NOT NULL,
            duration_ms     REAL NOT NULL,
            ok              INTEGER NOT NULL,
            status_code     INTEGER,
            error           TEXT,
            request_headers TEXT NOT NULL,
            batch_size      INTEGER NOT NULL,
            response_body   TEXT
        )""",
        "CREATE INDEX attempts_event ON attempts (event_seq)",
    ),
    (  # 2: which batch request an attempt went out in, and where in it
        "ALTER TABLE attempts ADD COLUMN request_id TEXT",
        "ALTER TABLE attempts ADD COLUMN batch_index INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX attempts_request ON attempts (request_id) WHERE request_id IS NOT NULL",
    ),
)


def latest() -> int:
    """The version this code writes."""
    return len(MIGRATIONS)


def read_version(conn: sqlite3.Connection) -> tuple[int, int, list[str]]:
    """(user_version, application_id, table names) as the file stands."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY name")]
    return version, app_id, tables


def check(name: str, version: int, app_id: int, tables: list[str]) -> None:
    """Refuse a file this code must not touch."""
    ours = app_id == APPLICATION_ID
    if not ours and (app_id != 0 or version != 0 or tables):
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise SetupError(
            f"{name} is a SQLite file but not a dbevents eventing DB (application_id "
            f"{app_id:#x}, user_version {version}, tables: {shown or 'none'}); point "
            "[eventing] store at a new file rather than at another application's database")
    if version > latest():
        raise SetupError(
            f"the eventing DB {name} has schema version {version}, newer than this "
            f"dbevents-store-sqlite understands (versions 1 to {latest()}); it was written "
            "by a newer dbevents: upgrade dbevents-store-sqlite, or point [eventing] store "
            "at another file")


def migrate(conn: sqlite3.Connection, name: str) -> tuple[int, int]:
    """Create or upgrade the schema in one transaction; returns (from, to)."""
    steps = MIGRATIONS

    def run(conn: sqlite3.Connection) -> tuple[int, int]:
        # Re-read under the write lock: another process may have migrated meanwhile.
        version, app_id, tables = read_version(conn)
        check(name, version, app_id, tables)
        for step in steps[version:]:
            for statement in step:
                conn.execute(statement)
        if version < len(steps):
            conn.execute(f"PRAGMA user_version = {len(steps):d}")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")
        # The CloudEvents `source` of this installation: made once, kept for ever.
        conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('instance_id', ?)",
                     (str(uuid.uuid4()),))
        return version, len(steps)

    return write(conn, run)


def instance_id(conn: sqlite3.Connection) -> str:
    row = conn.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
    return str(row[0])
