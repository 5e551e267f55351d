"""The versioned schema, created on first start and migrated in place.

Every table lives in one PostgreSQL schema (``dbevents`` unless the URL says
``?schema=``). The version is the ``schema_version`` row of ``meta``, written in
the same transaction as the DDL it describes (DDL is transactional in
PostgreSQL), so a migration that fails half-way leaves the old version with the
old tables. Processes starting at once serialize on a transaction-scoped
advisory lock and re-read the version under it: the first one migrates, the
others find nothing left to do.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from dbevents.errors import SetupError
from psycopg import sql

from dbevents_store_postgres.url import Location

# MIGRATIONS[n] takes a store from version n to n + 1. Append, never edit: a
# released step has already run on somebody's database. "{schema}" is the
# quoted schema name.
Step = Sequence[str]
MIGRATIONS: tuple[Step, ...] = (
    (  # 1: event log, invocation log, checkpoints, meta
        "CREATE SCHEMA IF NOT EXISTS {schema}",
        """CREATE TABLE {schema}.meta (
            key   text PRIMARY KEY,
            value text NOT NULL
        )""",
        """CREATE TABLE {schema}.checkpoints (
            source     text PRIMARY KEY,
            position   text NOT NULL,
            updated_at timestamptz NOT NULL
        )""",
        # seq is the enqueue order (enqueues commit in seq order, see eventqueue).
        # row_key is doc_id made comparable with "=" (None and every string are
        # distinct), so the per-row indexes below can serve it.
        # head marks the oldest active (pending/delivering) event of its
        # (trigger, doc_id) row; only heads are claimed, which keeps a claim cheap
        # however long the queue behind a slow row grows. head_seq is seq on heads
        # only: ordering by it, a claim can only walk events_heads (ordering by
        # seq, the planner may walk the primary key and every event behind a
        # slow row). due_at is when an active event may be claimed: its next
        # attempt when pending, its lease expiry when delivering.
        """CREATE TABLE {schema}.events (
            seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id              text NOT NULL UNIQUE,
            trigger_name    text NOT NULL,
            database_name   text NOT NULL,
            db_type         text NOT NULL,
            table_name      text NOT NULL,
            doc_id          text,
            row_key         text GENERATED ALWAYS AS (coalesce('=' || doc_id, '')) STORED,
            event_type      text NOT NULL,
            status          text NOT NULL
                CHECK (status IN ('pending', 'delivering', 'delivered', 'failed')),
            attempts        integer NOT NULL DEFAULT 0,
            head            boolean NOT NULL DEFAULT false,
            head_seq        bigint GENERATED ALWAYS AS (CASE WHEN head THEN seq END) STORED,
            next_attempt_at timestamptz,
            lease_until     timestamptz,
            worker          text,
            due_at          timestamptz GENERATED ALWAYS AS (
                CASE status WHEN 'pending' THEN next_attempt_at
                            WHEN 'delivering' THEN lease_until END) STORED,
            created_at      timestamptz NOT NULL,
            updated_at      timestamptz NOT NULL,
            last_error      text,
            payload         bytea NOT NULL
        )""",
        # The queue of each row: is the row busy, which event comes next.
        """CREATE INDEX events_active ON {schema}.events (trigger_name, row_key, seq)
            WHERE status IN ('pending', 'delivering')""",
        # Claim: the heads of a trigger, oldest first, due_at read from the index.
        """CREATE INDEX events_heads ON {schema}.events (trigger_name, head_seq)
            INCLUDE (due_at) WHERE head""",
        # next_due: the earliest due_at over the heads.
        "CREATE INDEX events_heads_due ON {schema}.events (due_at) WHERE head",
        # Retention and `events purge`.
        """CREATE INDEX events_finished ON {schema}.events (status, updated_at)
            WHERE status IN ('delivered', 'failed')""",
        # One index serves both "the attempts of an event" and their order.
        """CREATE TABLE {schema}.attempts (
            event_seq       bigint NOT NULL,
            id              bigint GENERATED ALWAYS AS IDENTITY,
            number          integer NOT NULL,
            started_at      timestamptz NOT NULL,
            duration_ms     double precision NOT NULL,
            ok              boolean NOT NULL,
            status_code     integer,
            error           text,
            request_headers jsonb NOT NULL,
            batch_size      integer NOT NULL,
            response_body   text,
            PRIMARY KEY (event_seq, id)
        )""",
    ),
    (  # 2: which batch request an attempt went out in, and where in it
        "ALTER TABLE {schema}.attempts ADD COLUMN request_id text",
        "ALTER TABLE {schema}.attempts ADD COLUMN batch_index integer NOT NULL DEFAULT 0",
        """CREATE INDEX attempts_request ON {schema}.attempts (request_id)
            WHERE request_id IS NOT NULL""",
    ),
    (  # 3: capture leases: which process captures each source, with a fencing token
        """CREATE TABLE {schema}.capture_leases (
            source      text PRIMARY KEY,
            holder      text NOT NULL,
            token       bigint NOT NULL,
            expires_at  timestamptz NOT NULL,
            acquired_at timestamptz NOT NULL
        )""",
    ),
)
VERSION = len(MIGRATIONS)
TABLES = ("attempts", "capture_leases", "checkpoints", "events", "meta")
# What a role running dbevents needs on each table (the CLI too: it redelivers
# and purges).
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")


def render(statement: str, schema: str) -> sql.Composed:
    return sql.SQL(statement).format(schema=sql.Identifier(schema))


async def read_version(conn: psycopg.AsyncConnection[Any], loc: Location) -> int:
    """The store's schema version as it stands: 0 when there is none yet.

    Refuses a schema of the same name that holds some other application's tables.
    """
    rows = await (await conn.execute(
        "SELECT c.relname FROM pg_namespace n JOIN pg_class c ON c.relnamespace = n.oid "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f') ORDER BY 1",
        (loc.schema,))).fetchall()
    tables = [r[0] for r in rows]
    if not tables:
        return 0
    found = None
    if "meta" in tables:
        row = await (await conn.execute(
            render("SELECT value FROM {schema}.meta WHERE key = 'schema_version'", loc.schema)
        )).fetchone()
        found = None if row is None else row[0]
    if found is None or not str(found).isdigit():
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise SetupError(
            f"the schema {loc.schema!r} in database {loc.dbname!r} holds tables that are not "
            f"a dbevents eventing DB ({shown}); choose another schema with ?schema=NAME in "
            f"[eventing] store ({loc.display})")
    return int(found)


def check_version(version: int, loc: Location, steps: Sequence[Step] = MIGRATIONS) -> None:
    if version > len(steps):
        raise SetupError(
            f"the eventing DB {loc.display} (schema {loc.schema!r}) has schema version "
            f"{version}, newer than this dbevents-store-postgres understands (version "
            f"{len(steps)}); it was written by a newer dbevents: upgrade "
            "dbevents-store-postgres on this machine, or use another ?schema=")


async def migrate(conn: psycopg.AsyncConnection[Any], loc: Location,
                  steps: Sequence[Step] = MIGRATIONS) -> int | None:
    """Create or upgrade the schema; returns the version migrated from, or None
    when it was current. ``conn`` is in autocommit mode."""
    version = await read_version(conn, loc)
    check_version(version, loc, steps)
    if version == len(steps):
        return None
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", loc.lock_key("migrate"))
        # Another process may have migrated while this one waited for the lock.
        version = await read_version(conn, loc)
        check_version(version, loc, steps)
        if version == len(steps):
            return None
        for step in steps[version:]:
            for statement in step:
                await conn.execute(render(statement, loc.schema))
        await conn.execute(
            render("INSERT INTO {schema}.meta (key, value) VALUES ('schema_version', %s) "
                   "ON CONFLICT (key) DO UPDATE SET value = excluded.value", loc.schema),
            (str(len(steps)),))
        # The CloudEvents `source` of this installation: made once, kept for ever.
        await conn.execute(
            render("INSERT INTO {schema}.meta (key, value) VALUES ('instance_id', %s) "
                   "ON CONFLICT (key) DO NOTHING", loc.schema), (str(uuid.uuid4()),))
    return version


async def instance_id(conn: psycopg.AsyncConnection[Any], loc: Location) -> str:
    row = await (await conn.execute(
        render("SELECT value FROM {schema}.meta WHERE key = 'instance_id'", loc.schema)
    )).fetchone()
    if row is None:
        raise SetupError(f"the eventing DB {loc.display} (schema {loc.schema!r}) has no "
                         "instance id; its meta table was edited by hand")
    return str(row[0])


async def missing_privileges(conn: psycopg.AsyncConnection[Any], loc: Location) -> list[str]:
    """GRANT statements this role still needs, when someone else owns the schema."""
    grants: list[str] = []
    schema_q = sql.Identifier(loc.schema).as_string()
    row = await (await conn.execute("SELECT has_schema_privilege(%s, 'USAGE')",
                                    (loc.schema,))).fetchone()
    if row is None or not row[0]:
        return [f"GRANT USAGE ON SCHEMA {schema_q} TO {sql.Identifier(loc.user).as_string()}"]
    # The tables this schema version has (an older one is migrated by its owner).
    rows = await (await conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename = ANY(%s)",
        (loc.schema, list(TABLES)))).fetchall()
    present = {r[0] for r in rows}
    for table in (t for t in TABLES if t in present):
        qualified = f"{schema_q}.{sql.Identifier(table).as_string()}"
        lacking = []
        for privilege in TABLE_PRIVILEGES:
            row = await (await conn.execute("SELECT has_table_privilege(%s, %s)",
                                            (qualified, privilege))).fetchone()
            if row is None or not row[0]:
                lacking.append(privilege)
        if lacking:
            grants.append(f"GRANT {', '.join(lacking)} ON {qualified} TO "
                          f"{sql.Identifier(loc.user).as_string()}")
    return grants
