"""Catalog queries on an ordinary (non-replication) connection."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
import psycopg

from dbevents_source_postgres.types import TypeInfo

Conn = psycopg.AsyncConnection[Any]


async def connect(url: str, connect_timeout: float) -> Conn:
    return await psycopg.AsyncConnection.connect(
        url, autocommit=True, connect_timeout=max(1, int(connect_timeout)),
        application_name="dbevents")


@attrs.frozen
class SlotInfo:
    name: str
    plugin: str | None
    slot_type: str
    database: str | None
    active: bool
    active_pid: int | None
    confirmed_flush: str | None
    wal_status: str | None
    lag_bytes: int | None


async def slot_info(conn: Conn, slot: str) -> SlotInfo | None:
    cur = await conn.execute(
        "SELECT slot_name, plugin, slot_type, database, active, active_pid,"
        " confirmed_flush_lsn::text, wal_status,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
        " FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    row = await cur.fetchone()
    return SlotInfo(*row) if row else None


async def sender_caught_up(conn: Conn, slot: str) -> bool | None:
    """Whether the slot's reader has confirmed all the WAL its walsender sent:
    then nothing decoded waits in the reader. None when no walsender holds the
    slot or its positions are hidden from this user."""
    cur = await conn.execute(
        "SELECT s.confirmed_flush_lsn >= r.sent_lsn FROM pg_replication_slots s"
        " JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = %s",
        (slot,))
    row = await cur.fetchone()
    return None if row is None or row[0] is None else bool(row[0])


async def lookup_types(conn: Conn, oids: Iterable[int]) -> list[TypeInfo]:
    cur = await conn.execute(
        "SELECT oid::int, typtype, typcategory, typelem::int, typbasetype::int, typdelim"
        " FROM pg_type WHERE oid = ANY(%s)", (list(oids),))
    return [TypeInfo(*row) for row in await cur.fetchall()]


async def primary_key(conn: Conn, relid: int) -> tuple[str, ...]:
    """The primary key's columns in key order; () when there is none."""
    cur = await conn.execute(
        "SELECT a.attname FROM pg_index i"
        " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
        " WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.n", (relid,))
    return tuple(r[0] for r in await cur.fetchall())


@attrs.frozen
class TableInfo:
    oid: int
    schema: str
    name: str
    replica_identity: str  # pg_class.relreplident: d, n, f, i
    has_primary_key: bool
    can_select: bool

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def display(self) -> str:
        """As triggers name it: "users" in public, "schema.table" elsewhere."""
        return self.name if self.schema == "public" else self.qualified


_TABLE_COLUMNS = (
    "c.oid::int, n.nspname, c.relname, c.relreplident::text,"
    " EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),"
    " has_table_privilege(c.oid, 'SELECT')"
)


def split_table(name: str) -> tuple[str, str]:
    """A trigger's table name: "users" is public.users, "a.b" is table b in schema a."""
    schema, dot, table = name.partition(".")
    return (schema, table) if dot else ("public", name)


async def find_tables(conn: Conn, names: Iterable[str]) -> tuple[list[TableInfo], list[str]]:
    """The tables triggers name, and the names with no such table here."""
    wanted = {split_table(n): n for n in names}
    if not wanted:
        return [], []
    cur = await conn.execute(
        f"SELECT {_TABLE_COLUMNS} FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('r', 'p')"
        " AND (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
        ([s for s, _ in wanted], [t for _, t in wanted]))
    found = [TableInfo(*row) for row in await cur.fetchall()]
    seen = {(t.schema, t.name) for t in found}
    missing = sorted(n for key, n in wanted.items() if key not in seen)
    return found, missing


async def publication_tables(conn: Conn, publication: str) -> list[TableInfo]:
    cur = await conn.execute(
        f"SELECT {_TABLE_COLUMNS} FROM pg_publication_tables p"
        " JOIN pg_namespace n ON n.nspname = p.schemaname"
        " JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename"
        " WHERE p.pubname = %s ORDER BY 2, 3", (publication,))
    return [TableInfo(*row) for row in await cur.fetchall()]


@attrs.frozen
class PublicationInfo:
    all_tables: bool
    insert: bool
    update: bool
    delete: bool
    truncate: bool

    def publishes(self, operation: str) -> bool:
        return bool(getattr(self, operation))


async def publication_info(conn: Conn, publication: str) -> PublicationInfo | None:
    cur = await conn.execute(
        "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate"
        " FROM pg_publication WHERE pubname = %s", (publication,))
    row = await cur.fetchone()
    return PublicationInfo(*row) if row else None
