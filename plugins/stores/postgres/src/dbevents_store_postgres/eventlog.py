"""The log side of the store, for the CLI and retention: queries, redeliver,
purge, stats, checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from dbevents.protocols import EventFilter, TriggerStats
from dbevents.values import Attempt, Event, Position, Status
from psycopg import sql

from dbevents_store_postgres.eventqueue import Conn, Statements, fix_heads, lock_queue
from dbevents_store_postgres.rows import (
    ACTIVE_SQL,
    ATTEMPT_COLUMNS,
    EVENT_COLUMNS,
    FINISHED,
    attempt_from_row,
    event_from_row,
)
from dbevents_store_postgres.schema import render

PURGE = """
WITH gone AS (
    DELETE FROM {schema}.events e
    WHERE e.seq = ANY(ARRAY(
            SELECT seq FROM {schema}.events
            WHERE status IN ('delivered', 'failed') AND status = ANY(%(status)b)
              AND updated_at < %(before)b
              AND (%(trigger)b::text IS NULL OR trigger_name = %(trigger)b)
            LIMIT %(limit)b FOR UPDATE SKIP LOCKED))
      AND e.status IN ('delivered', 'failed') AND e.updated_at < %(before)b
    RETURNING e.seq
), gone_attempts AS (
    DELETE FROM {schema}.attempts a WHERE a.event_seq = ANY(ARRAY(SELECT seq FROM gone))
)
SELECT count(*) FROM gone
"""


async def list_events(conn: Conn, q: Statements, flt: EventFilter) -> list[Event]:
    if flt.request_id is not None:
        # The events one batch request carried, in their order in it.
        rows = await (await conn.execute(render(
            f"SELECT {EVENT_COLUMNS} FROM {{schema}}.events JOIN ("
            "SELECT event_seq, min(batch_index) AS place FROM {schema}.attempts "
            "WHERE request_id = %s GROUP BY event_seq) r ON r.event_seq = seq "
            "ORDER BY place LIMIT %s", q.loc.schema),
            (flt.request_id, max(0, flt.limit)))).fetchall()
        return [event_from_row(r) for r in rows]
    where: list[sql.Composable] = []
    params: list[Any] = []
    for column, op, value in (("status", "=", flt.status.value if flt.status else None),
                              ("trigger_name", "=", flt.trigger),
                              ("database_name", "=", flt.database),
                              ("table_name", "=", flt.table), ("doc_id", "=", flt.doc_id),
                              ("created_at", ">=", flt.since), ("created_at", "<", flt.until),
                              ("seq", "<", flt.before_seq)):
        if value is not None:
            where.append(sql.SQL("{} " + op + " %s").format(sql.Identifier(column)))
            params.append(value)
    query = sql.SQL("SELECT {columns} FROM {schema}.events {where} ORDER BY seq DESC LIMIT %s"
                    ).format(columns=sql.SQL(EVENT_COLUMNS), schema=sql.Identifier(q.loc.schema),
                             where=sql.SQL("WHERE ") + sql.SQL(" AND ").join(where)
                             if where else sql.SQL(""))
    rows = await (await conn.execute(query, (*params, max(0, flt.limit)))).fetchall()
    return [event_from_row(r) for r in rows]


async def get_event(conn: Conn, q: Statements, event_id: str) -> Event | None:
    row = await (await conn.execute(
        render(f"SELECT {EVENT_COLUMNS} FROM {{schema}}.events WHERE id = %s", q.loc.schema),
        (event_id,))).fetchone()
    return None if row is None else event_from_row(row)


async def find_event_ids(conn: Conn, q: Statements, prefix: str, limit: int) -> list[str]:
    # starts_with, not a range: a range follows the column's collation, which
    # need not order strings by their characters.
    rows = await (await conn.execute(
        render("SELECT id FROM {schema}.events WHERE starts_with(id, %s) "
               'ORDER BY id COLLATE "C" LIMIT %s', q.loc.schema),
        (prefix, limit))).fetchall()
    return [str(r[0]) for r in rows]


async def attempts(conn: Conn, q: Statements, event_id: str) -> list[Attempt]:
    rows = await (await conn.execute(render(
        f"SELECT {ATTEMPT_COLUMNS} FROM {{schema}}.attempts a "
        "JOIN {schema}.events e ON e.seq = a.event_seq WHERE e.id = %s ORDER BY a.id",
        q.loc.schema), (event_id,))).fetchall()
    return [attempt_from_row(event_id, r) for r in rows]


async def redeliver(conn: Conn, q: Statements, ids: Sequence[str] | None,
                    status: Status | None, trigger: str | None, now: datetime) -> int:
    """Back to pending, attempts reset, due now; the attempt history is kept.
    Events in flight are left alone."""
    where = [sql.SQL("status <> 'delivering'")]
    params: dict[str, Any] = {"now": now, "channel": q.loc.channel}
    if ids is not None:
        where.append(sql.SQL("id = ANY(%(id)b)"))
        params["id"] = list(ids)
    if status is not None:
        where.append(sql.SQL("status = %(status)b"))
        params["status"] = status.value
    if trigger is not None:
        where.append(sql.SQL("trigger_name = %(trigger)b"))
        params["trigger"] = trigger
    update = sql.SQL(
        "UPDATE {schema}.events SET status = 'pending', attempts = 0, next_attempt_at = %(now)b,"
        " lease_until = NULL, worker = NULL, updated_at = %(now)b WHERE {where}"
        " RETURNING trigger_name, row_key"
    ).format(schema=sql.Identifier(q.loc.schema), where=sql.SQL(" AND ").join(where))
    async with conn.transaction():
        # Exclusive: a finish moving a row's head must not run beside this.
        await lock_queue(conn, q, exclusive=True)
        rows = await (await conn.execute(update, params)).fetchall()
        # An event coming back may be older than its row's head: it goes first.
        await fix_heads(conn, q, list({(t, k) for t, k in rows}))
        if rows:
            await conn.execute("SELECT pg_notify(%s, '')", (q.loc.channel,))
    return len(rows)


async def purge_batch(conn: Conn, q: Statements, before: datetime, statuses: Sequence[Status],
                      limit: int, trigger: str | None = None) -> int:
    """Delete up to ``limit`` finished events last updated before ``before``,
    with their attempts; returns how many. Active events are never purged: they
    are the queue."""
    wanted = [s.value for s in statuses if s in FINISHED]
    if not wanted:
        return 0
    row = await (await conn.execute(render(PURGE, q.loc.schema), {
        "status": wanted, "before": before, "limit": limit, "trigger": trigger})).fetchone()
    return int(row[0]) if row else 0


async def stats(conn: Conn, q: Statements) -> list[TriggerStats]:
    counts: dict[str, dict[str, int]] = {}
    for trigger, status, n in await (await conn.execute(render(
            "SELECT trigger_name, status, count(*) FROM {schema}.events "
            "GROUP BY trigger_name, status", q.loc.schema))).fetchall():
        counts.setdefault(trigger, {})[status] = n
    return [TriggerStats(trigger=t, **c) for t, c in sorted(counts.items())]


async def in_flight(conn: Conn, q: Statements) -> dict[str, int]:
    """Per worker: its delivering events whose lease has not run out by the
    server's clock (one that ran out is anybody's to claim). Written to walk
    the active events only (events_active), not the finished log."""
    rows = await (await conn.execute(render(
        f"SELECT worker, count(*) FROM {{schema}}.events "
        f"WHERE {ACTIVE_SQL} AND status = 'delivering' AND lease_until > now() "
        "AND worker IS NOT NULL GROUP BY worker ORDER BY worker", q.loc.schema))).fetchall()
    return {worker: int(n) for worker, n in rows}


async def checkpoint(conn: Conn, q: Statements, source: str) -> Position | None:
    row = await (await conn.execute(render(
        "SELECT position FROM {schema}.checkpoints WHERE source = %s", q.loc.schema),
        (source,))).fetchone()
    return None if row is None else Position(row[0])


async def checkpoints(conn: Conn, q: Statements) -> dict[str, Position]:
    rows = await (await conn.execute(render(
        "SELECT source, position FROM {schema}.checkpoints ORDER BY source", q.loc.schema)
    )).fetchall()
    return {s: Position(p) for s, p in rows}


# A paused trigger (its receiver down) is a meta row, so `dbevents status` in
# another process can show it: key "paused:<trigger>", value an ISO time.
_PAUSED = "paused:"


async def set_trigger_paused(conn: Conn, q: Statements, trigger: str,
                             since: datetime | None) -> None:
    if since is None:
        await conn.execute(render("DELETE FROM {schema}.meta WHERE key = %s", q.loc.schema),
                           (_PAUSED + trigger,))
    else:
        await conn.execute(render(
            "INSERT INTO {schema}.meta (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", q.loc.schema),
            (_PAUSED + trigger, since.isoformat()))


async def paused_triggers(conn: Conn, q: Statements) -> dict[str, datetime]:
    rows = await (await conn.execute(render(
        "SELECT key, value FROM {schema}.meta WHERE starts_with(key, %s)", q.loc.schema),
        (_PAUSED,))).fetchall()
    return {key[len(_PAUSED):]: datetime.fromisoformat(value) for key, value in rows}
