"""Startup checks: each failure is a SetupError that names the fix.

They run in order of what an operator fixes first (server settings, then the
role, then the tables), and they create the publication and the slot when
missing: the publication first, because pgoutput looks it up as of each change's
position in the WAL, so a slot older than its publication cannot be read.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Collection
from typing import Any

import attrs
import psycopg
import structlog
from dbevents.errors import SetupError
from dbevents.hints import command
from dbevents.masking import mask_dsn
from psycopg import errors as pgerrors
from psycopg import sql

from dbevents_source_postgres import catalog
from dbevents_source_postgres.catalog import Conn, TableInfo
from dbevents_source_postgres.replication import replication_conninfo

log = structlog.get_logger("dbevents.source.postgres")

PUBLISHED_OPERATIONS = ("insert", "update", "delete", "truncate")


@attrs.frozen
class Plan:
    """What the checks need to know about one source."""

    database: str  # the [databases.NAME] key, for messages
    url: str
    slot: str
    publication: str
    tables: frozenset[str] | None  # None: every table
    publish_all: bool
    operations: frozenset[str]
    connect_timeout: float = 10.0
    slot_release_wait: float = 2.0  # a previous session's walsender may still be exiting
    # Capture is coordinated by a lease: the slot may still be read by the previous
    # holder's walsender (paused, or its connection not yet timed out). Opening
    # the stream ends it while the lease is held (SourceSettings.lease_held), or
    # waits for it (ObjectInUse is retried up to reconnect_for).
    leased: bool = False


async def run(conn: Conn, plan: Plan) -> tuple[list[TableInfo], bool]:
    """Check everything and create what is missing; return the watched tables and
    whether the slot had to be created."""
    await check_server(conn)
    role = await check_role(conn)
    await check_replication_connection(plan)
    tables = await watched_tables(conn, plan)
    check_privileges(tables, role)
    warn_without_primary_key(tables, plan.database)
    await ensure_publication(conn, plan, tables, role)
    if plan.tables is None or plan.publish_all:
        tables = await catalog.publication_tables(conn, plan.publication)
        check_privileges(tables, role)
        warn_without_primary_key(tables, plan.database)
    created = await ensure_slot(conn, plan)
    return tables, created


async def preflight(conn: Conn, plan: Plan) -> list[str]:
    """What run() checks, reading only: every problem found, each with its fix.
    Nothing is created; a missing publication or slot is fine when the role may
    create it at start."""
    problems: list[str] = []

    async def collect(check: Awaitable[Any]) -> Any:
        try:
            return await check
        except SetupError as exc:
            problems.append(str(exc))
            return None

    for setting in ("wal_level", "max_replication_slots", "max_wal_senders"):
        await collect(check_server(conn, only=setting))
    role = await collect(check_role(conn))
    if role is None:
        cur = await conn.execute("SELECT current_user")
        row = await cur.fetchone()
        role = str(row[0]) if row else "?"
    await collect(check_replication_connection(plan))
    tables = await watched_tables(conn, plan)
    try:
        check_privileges(tables, role)
    except SetupError as exc:
        problems.append(str(exc))
    all_tables = plan.tables is None or plan.publish_all
    info = await catalog.publication_info(conn, plan.publication)
    name = sql_ident(plan.publication)
    if info is None:
        cur = await conn.execute(
            "SELECT rolsuper, has_database_privilege(current_database(), 'CREATE')"
            " FROM pg_roles WHERE rolname = current_user")
        superuser, may_create = await cur.fetchone() or (False, False)
        if not all_tables and not tables:
            problems.append(
                f"none of the tables the triggers watch in {plan.database!r} exists "
                f"({', '.join(sorted(plan.tables or ()))}); create them, or set "
                "publish_all = true to publish every table.")
        elif all_tables and not superuser:
            problems.append(
                f"the publication {plan.publication!r} does not exist and the role {role!r} "
                f"may not create it FOR ALL TABLES (that needs a superuser): run CREATE "
                f"PUBLICATION {name} FOR ALL TABLES WITH (publish_via_partition_root = "
                "true) as a superuser, or name the tables in the triggers.")
        elif not all_tables and not superuser and not may_create:
            problems.append(
                f"the publication {plan.publication!r} does not exist and the role {role!r} "
                f"may not create it: GRANT CREATE ON DATABASE ... TO {sql_ident(role)} (it "
                "must also own the tables), or create the publication as a role that may.")
    else:
        if all_tables and not info.all_tables:
            problems.append(
                f"the publication {plan.publication!r} lists tables, but in "
                f"{plan.database!r} every table is watched (a trigger names no tables, or "
                f"publish_all = true). Run DROP PUBLICATION {name} to let dbevents create "
                "it FOR ALL TABLES, or name another publication with publication = ...")
        unpublished = [op for op in PUBLISHED_OPERATIONS
                       if op in plan.operations and not info.publishes(op)]
        if unpublished:
            problems.append(
                f"the publication {plan.publication!r} does not publish "
                f"{', '.join(unpublished)}, which triggers on {plan.database!r} need. Run "
                f"ALTER PUBLICATION {name} SET (publish = '{', '.join(PUBLISHED_OPERATIONS)}').")
    slot = await catalog.slot_info(conn, plan.slot)
    if slot is None:
        cur = await conn.execute(
            "SELECT count(*) >= current_setting('max_replication_slots')::int"
            " FROM pg_replication_slots")
        full = await cur.fetchone()
        if full and full[0]:
            problems.append(
                "every replication slot is taken (max_replication_slots): raise "
                "max_replication_slots and restart PostgreSQL, or drop a slot nobody reads "
                "(SELECT pg_drop_replication_slot(name))")
    elif slot.slot_type != "logical" or slot.plugin != "pgoutput":
        problems.append(
            f"the replication slot {plan.slot!r} is not a pgoutput logical slot; drop it "
            f"(`{command(f'postgres drop-slot {plan.database}')}`) if nothing else uses it, "
            "or give this database its own slot with slot = ...")
    elif slot.wal_status == "lost":
        problems.append(
            f"the replication slot {plan.slot!r} was invalidated: PostgreSQL removed WAL it "
            "still needed (max_slot_wal_keep_size). Drop it "
            f"(`{command(f'postgres drop-slot {plan.database}')}`), then restart from now "
            f"with `{command(f'postgres reset-position {plan.database}')}`.")
    return problems


async def _show(conn: Conn, name: str) -> str:
    cur = await conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name)))
    row = await cur.fetchone()
    return str(row[0]) if row else ""


async def check_server(conn: Conn, only: str | None = None) -> None:
    """wal_level, max_replication_slots and max_wal_senders (or ``only`` one)."""
    wal_level = await _show(conn, "wal_level") if only in (None, "wal_level") else "logical"
    if wal_level != "logical":
        raise SetupError(
            f"PostgreSQL runs with wal_level = {wal_level}; capturing changes needs "
            "wal_level = logical. Run ALTER SYSTEM SET wal_level = logical (as a superuser), "
            "then restart PostgreSQL.")
    for setting in ("max_replication_slots", "max_wal_senders"):
        if only not in (None, setting):
            continue
        if int(await _show(conn, setting)) < 1:
            raise SetupError(
                f"PostgreSQL runs with {setting} = 0; dbevents needs at least one. Run "
                f"ALTER SYSTEM SET {setting} = 10 (as a superuser), then restart PostgreSQL.")


async def check_role(conn: Conn) -> str:
    cur = await conn.execute(
        "SELECT current_user, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user")
    row = await cur.fetchone()
    assert row is not None
    role, replication, superuser = row
    if not (replication or superuser):
        raise SetupError(
            f"the role {role!r} may not use logical replication: it lacks the REPLICATION "
            f"attribute. Run ALTER ROLE {sql_ident(role)} WITH REPLICATION (as a superuser), "
            "or connect as a role that has it.")
    return str(role)


async def check_replication_connection(plan: Plan) -> None:
    """Replication connections are authorised separately (pg_hba.conf, max_wal_senders)."""
    try:
        conn = await psycopg.AsyncConnection.connect(
            replication_conninfo(plan.url), autocommit=True,
            connect_timeout=max(1, int(plan.connect_timeout)))
    except psycopg.Error as exc:
        raise SetupError(
            f"cannot open a logical replication connection to {mask_dsn(plan.url)}: "
            f"{_first_line(exc)}. Logical replication connections are matched in pg_hba.conf "
            "like ordinary connections to the database (the 'replication' keyword there is "
            "for physical replication only), and each takes one of max_wal_senders.") from None
    try:
        await conn.execute("IDENTIFY_SYSTEM")
    finally:
        await conn.close()


async def watched_tables(conn: Conn, plan: Plan) -> list[TableInfo]:
    if plan.tables is None:
        return []
    found, missing = await catalog.find_tables(conn, plan.tables)
    for name in missing:
        # A trigger may list tables of several databases: not an error here.
        log.warning("a trigger names a table that does not exist in this database; "
                    "it is not watched here", database=plan.database, table=name)
    return found


def check_privileges(tables: Collection[TableInfo], role: str) -> None:
    denied = [t for t in tables if not t.can_select]
    if denied:
        names = ", ".join(sql_qualified(t) for t in denied)
        raise SetupError(
            f"the role {role!r} may not read {names}: run GRANT SELECT ON {names} TO "
            f"{sql_ident(role)}.")


def warn_without_primary_key(tables: Collection[TableInfo], database: str) -> None:
    for t in tables:
        if t.has_primary_key:
            continue
        name = sql_qualified(t)
        if t.replica_identity in ("f", "i"):
            fallback = ("the replica identity index's columns" if t.replica_identity == "i"
                        else "null")
            log.warning(
                f"a watched table has no primary key; its events carry docId = {fallback}, "
                "and per-row ordering cannot tell its rows apart",
                database=database, table=t.display, fix=f"ALTER TABLE {name} ADD PRIMARY KEY (...)")
            continue
        # No key and no REPLICA IDENTITY FULL: once a publication that publishes
        # updates and deletes covers the table, PostgreSQL itself rejects them.
        log.warning(
            "a watched table has no primary key and no replica identity: while the "
            "publication covers it, PostgreSQL refuses every UPDATE and DELETE on it, "
            "your application's included (\"cannot update table ... because it does not "
            "have a replica identity and publishes updates\"); its events carry docId = null",
            database=database, table=t.display,
            fix=f"ALTER TABLE {name} REPLICA IDENTITY FULL (or add a primary key); or, if no "
                "trigger needs this table, list the wanted tables in the triggers' `tables` "
                "(and leave publish_all off) so the publication leaves it out")


async def ensure_publication(conn: Conn, plan: Plan, tables: list[TableInfo], role: str) -> None:
    all_tables = plan.tables is None or plan.publish_all
    info = await catalog.publication_info(conn, plan.publication)
    name = sql_ident(plan.publication)
    if info is None:
        if not all_tables and not tables:
            raise SetupError(
                f"none of the tables the triggers watch in {plan.database!r} exists "
                f"({', '.join(sorted(plan.tables or ()))}); create them, or set "
                "publish_all = true to publish every table.")
        if all_tables:
            statement = f"CREATE PUBLICATION {name} FOR ALL TABLES"
        else:
            statement = (f"CREATE PUBLICATION {name} FOR TABLE "
                         + ", ".join(sql_qualified(t) for t in tables))
        # A partitioned table's changes then come under its own name, the one
        # triggers use, rather than each partition's.
        statement += " WITH (publish_via_partition_root = true)"
        slot_exists = await catalog.slot_info(conn, plan.slot) is not None
        await _ddl(conn, statement, role,
                   "FOR ALL TABLES needs a superuser" if all_tables else
                   "a publication FOR TABLE needs the CREATE privilege on the database and "
                   "ownership of the tables")
        log.info("publication created", database=plan.database, publication=plan.publication,
                 tables="all" if all_tables else [t.display for t in tables])
        if slot_exists:
            log.warning(
                "the slot is older than the publication just created; if reading it fails "
                "with 'publication does not exist', drop the slot "
                f"(dbevents postgres drop-slot {plan.database}) and start again",
                database=plan.database, slot=plan.slot)
        return
    if all_tables and not info.all_tables:
        raise SetupError(
            f"the publication {plan.publication!r} lists tables, but in {plan.database!r} "
            "every table is watched (a trigger names no tables, or publish_all = true). "
            f"Run DROP PUBLICATION {name} to let dbevents create it FOR ALL TABLES, "
            "or name another publication with publication = ...")
    if not info.all_tables:
        published = {t.oid for t in await catalog.publication_tables(conn, plan.publication)}
        missing = [t for t in tables if t.oid not in published]
        if missing:
            await _ddl(conn, f"ALTER PUBLICATION {name} ADD TABLE "
                       + ", ".join(sql_qualified(t) for t in missing), role,
                       "adding tables to a publication needs its ownership and the tables'")
            log.info("tables added to the publication", database=plan.database,
                     publication=plan.publication, tables=[t.display for t in missing])
    needed = [op for op in PUBLISHED_OPERATIONS if op in plan.operations]
    unpublished = [op for op in needed if not info.publishes(op)]
    if unpublished:
        raise SetupError(
            f"the publication {plan.publication!r} does not publish {', '.join(unpublished)}, "
            f"which triggers on {plan.database!r} need. Run ALTER PUBLICATION {name} SET "
            f"(publish = '{', '.join(PUBLISHED_OPERATIONS)}').")


async def _ddl(conn: Conn, statement: str, role: str, why: str) -> None:
    try:
        await conn.execute(statement.encode())
    except pgerrors.InsufficientPrivilege as exc:
        raise SetupError(
            f"the role {role!r} may not run {statement}: {_first_line(exc)} ({why}). "
            "Run it as a role that may, then start dbevents again.") from None


async def ensure_slot(conn: Conn, plan: Plan) -> bool:
    """The slot, created when missing; True if it was created now."""
    info = await catalog.slot_info(conn, plan.slot)
    if info is None:
        try:
            await conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
                               (plan.slot,))
        except pgerrors.ConfigurationLimitExceeded:
            raise SetupError(
                "every replication slot is taken (max_replication_slots): raise "
                "max_replication_slots and restart PostgreSQL, or drop a slot nobody reads "
                "(SELECT pg_drop_replication_slot(name))") from None
        except pgerrors.DuplicateObject:
            pass  # another process created it a moment ago: checked below
        else:
            log.info("replication slot created", database=plan.database, slot=plan.slot)
            return True
        info = await catalog.slot_info(conn, plan.slot)
        assert info is not None
    if info.slot_type != "logical" or info.plugin != "pgoutput":
        kind = (f"with the output plugin {info.plugin!r}" if info.slot_type == "logical"
                else "as a physical slot")
        raise SetupError(
            f"the replication slot {plan.slot!r} was created {kind}; dbevents reads pgoutput. "
            f"Drop it (dbevents postgres drop-slot {plan.database}) if nothing else uses it, "
            "or give this database its own slot with slot = ...")
    cur = await conn.execute("SELECT current_database()")
    row = await cur.fetchone()
    if row and info.database != row[0]:
        raise SetupError(
            f"the replication slot {plan.slot!r} belongs to the database {info.database!r}, "
            f"not {row[0]!r}; give this database its own slot with slot = ...")
    if info.wal_status == "lost":
        raise SetupError(
            f"the replication slot {plan.slot!r} was invalidated: PostgreSQL removed WAL it "
            "still needed (max_slot_wal_keep_size), so changes were lost. Drop it "
            f"(`{command(f'postgres drop-slot {plan.database}')}`), then restart from now "
            f"with `{command(f'postgres reset-position {plan.database}')}`.")
    # Leased, the stream deals with a reader still attached: no wait here.
    deadline = time.monotonic() + (0.0 if plan.leased else plan.slot_release_wait)
    while info.active and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        info = await catalog.slot_info(conn, plan.slot) or info
    if info.active and plan.leased:
        log.info("replication slot still in use by the previous capture holder; the stream "
                 "ends or waits for it", slot=plan.slot, backend_pid=info.active_pid)
        return False
    if info.active:
        raise SetupError(
            f"the replication slot {plan.slot!r} is in use by another process "
            f"(PostgreSQL backend pid {info.active_pid}). Stop the other reader (another "
            "dbevents running the same config?), or give this database its own slot with "
            "slot = ...")
    return False


# Words PostgreSQL reserves (fully, or except as function and type names): an
# identifier spelled like one needs quotes.
_RESERVED = frozenset({
    "all", "analyse", "analyze", "and", "any", "array", "as", "asc", "asymmetric",
    "authorization", "binary", "both", "case", "cast", "check", "collate", "collation",
    "column", "concurrently", "constraint", "create", "cross", "current_catalog",
    "current_date", "current_role", "current_schema", "current_time", "current_timestamp",
    "current_user", "default", "deferrable", "desc", "distinct", "do", "else", "end",
    "except", "false", "fetch", "for", "foreign", "freeze", "from", "full", "grant",
    "group", "having", "ilike", "in", "initially", "inner", "intersect", "into", "is",
    "isnull", "join", "lateral", "leading", "left", "like", "limit", "localtime",
    "localtimestamp", "natural", "not", "notnull", "null", "offset", "on", "only", "or",
    "order", "outer", "overlaps", "placing", "primary", "references", "returning", "right",
    "select", "session_user", "similar", "some", "symmetric", "table", "tablesample",
    "then", "to", "trailing", "true", "union", "unique", "user", "using", "variadic",
    "verbose", "when", "where", "window", "with",
})
_PLAIN = re.compile(r"^[a-z_][a-z0-9_$]*$")


def sql_ident(name: str) -> str:
    """An identifier as a user would type it: bare when it can be, else quoted."""
    if _PLAIN.match(name) and name not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


def sql_qualified(table: TableInfo) -> str:
    return f"{sql_ident(table.schema)}.{sql_ident(table.name)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
