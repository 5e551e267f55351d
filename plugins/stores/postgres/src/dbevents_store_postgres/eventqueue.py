"""The queue side of the store: enqueue, claim, finish, release, next_due, and
the bookkeeping that keeps per-row order cheap.

Several processes may share one store, so the rules below are what keep an
event from being handed to two workers and a row's events in order.

Claiming. A claim locks the rows it hands out with ``FOR NO KEY UPDATE SKIP
LOCKED``: a row another claimer holds is skipped, not waited for; a row another
claimer already committed is re-read (PostgreSQL re-checks the WHERE clause
against the row's newest version), and as it is now ``delivering`` with a lease
in the future it no longer qualifies. So no event is handed out twice while its
lease runs; when the lease has run out, ``due_at`` (the lease expiry) is past
and any worker takes the event over.

Per-row order. An event is handed out only when it is the oldest pending or
delivering event of its (trigger, doc_id) row, checked in the claim's own
snapshot. That check can only err on the safe side:

- an earlier event the snapshot shows as finished really is finished (only a
  commit finishes it, and nothing but an operator's redeliver revives it);
- an earlier event the snapshot does not show at all cannot exist: enqueues
  take the queue lock exclusively, so they commit one after the other in seq
  order, and a snapshot that sees an event sees every event with a lower seq;
- an earlier event the snapshot shows as active blocks the later one, even if
  it finished a moment ago: the next claim sees that.

The ``head`` flag only narrows the search: it marks the oldest active event of
each row, so a claim looks at one event per row instead of at every event
queued behind a slow one. It is maintained by the three kinds of transaction
that change which events are active: enqueue (exclusive queue lock), finish
(shared queue lock) and redeliver (exclusive). An enqueue therefore never runs
beside a finish: each sees the other's work committed, and the head a finish
moves on to is never an event it cannot see yet. Claims and releases only move
events between pending and delivering, both active, and take no queue lock.
Mistakes in ``head`` could only ever cost liveness, never order, because the
check above decides: a stray extra head costs a claim one index probe, a row
left without a head would stall, so finish re-checks the rows it touched.

Held events. ``enqueue_held`` stores new events already delivering, leased to
this worker, for its dispatcher to send from memory (no claim, no read-back): a
new event is held only when every active event of its row is delivering and
this worker's, decided in the enqueue's snapshot under the exclusive queue
lock, so no finish or other enqueue changes the row meanwhile. A row another
worker holds, or with a pending event (a retry), keeps the new event pending
behind it, for claims. Held events are active like claimed ones, so the head
rules above are unchanged. ``renew`` moves their leases on while they wait in
memory; one that ran out anyway is taken over by a claim as usual, and renew
reports it lost.

Lock order. Statements that wait for row locks (finish, release, renew) take
them in seq order, so two of them cannot deadlock on each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import psycopg
import structlog
from dbevents.errors import CaptureLost
from dbevents.values import Event, Finish, Position, Status
from psycopg import sql

from dbevents_store_postgres.leases import LeaseStatements
from dbevents_store_postgres.rows import (
    ACTIVE,
    ACTIVE_SQL,
    EVENT_COLUMNS,
    clean_headers,
    clean_text,
    event_from_row,
    truncate_body,
    utc,
)
from dbevents_store_postgres.schema import render
from dbevents_store_postgres.url import Location

log = structlog.get_logger("dbevents.store.postgres")

Conn = psycopg.AsyncConnection[Any]
Row = tuple[str, str]  # (trigger_name, row_key)

_E_COLUMNS = ", ".join(f"e.{c.strip()}" for c in EVENT_COLUMNS.split(","))

# Queue tables swing between empty and huge faster than statistics follow, so
# the statements are written to have one plan whatever the planner believes:
# per-row checks are scalar subqueries (run per row, as an index lookup; never
# turned into a join that scans a whole index), joins back to the events table
# go through ``seq = ANY(array)`` (an index scan of the primary key), and
# ordered walks order by what only the intended index holds (head_seq, due_at).
# The store's connections also turn bitmap scans off (see store.py): with
# them the planner may fetch every head and sort, where a walk in index order
# stops after the first few.

# "Is ``x`` the oldest active event of its row": one step into events_active.
def _oldest_active(x: str) -> str:
    return (f"{x}.seq = (SELECT min(a.seq) FROM {{schema}}.events a "
            f"WHERE a.trigger_name = {x}.trigger_name AND a.row_key = {x}.row_key "
            f"AND a.{ACTIVE_SQL})")


# The batch of events as rows, numbered in their order (both enqueues start so).
_INPUT = """WITH input AS (
    SELECT * FROM unnest(%(id)b::text[], %(trigger)b::text[], %(database)b::text[],
                         %(db_type)b::text[], %(table)b::text[], %(doc_id)b::text[],
                         %(type)b::text[], %(payload)b::bytea[])
        WITH ORDINALITY AS i(id, trigger_name, database_name, db_type, table_name, doc_id,
                             event_type, payload, ord)
)"""

ENQUEUE = f"""
{_INPUT}, fresh AS (
    SELECT i.*, row_number() OVER (PARTITION BY i.trigger_name, i.doc_id ORDER BY i.ord) AS nth
    FROM input i
    WHERE (SELECT x.seq FROM {{schema}}.events x WHERE x.id = i.id) IS NULL
), inserted AS (
    -- A new event heads its row when the row has no active event. The queue lock
    -- is held exclusively: no finish can be moving the row's head meanwhile.
    INSERT INTO {{schema}}.events (id, trigger_name, database_name, db_type, table_name,
        doc_id, event_type, status, attempts, head, next_attempt_at, created_at, updated_at,
        payload)
    SELECT f.id, f.trigger_name, f.database_name, f.db_type, f.table_name, f.doc_id,
        f.event_type, 'pending', 0,
        f.nth = 1 AND (
            SELECT a.seq FROM {{schema}}.events a
            WHERE a.trigger_name = f.trigger_name AND a.row_key = coalesce('=' || f.doc_id, '')
              AND a.{ACTIVE_SQL} LIMIT 1) IS NULL,
        %(now)b, %(now)b, %(now)b, f.payload
    FROM fresh f
    ORDER BY f.ord  -- seq follows the order of the batch
    ON CONFLICT (id) DO NOTHING
    RETURNING 1
)
SELECT n, CASE WHEN n > 0 THEN pg_notify(%(channel)b, '') END
FROM (SELECT count(*) AS n FROM inserted) c
"""

# ENQUEUE, the new events held for this worker (delivering, leased) unless an
# active event of their row is pending or another worker's: then they wait
# behind it. Decided on the snapshot before the insert, so the events of one
# row in the batch are all held or none (if held, the earlier ones are ours).
# Other workers are notified only of events left pending.
ENQUEUE_HELD = f"""
{_INPUT}, keys AS (
    SELECT DISTINCT i.trigger_name, coalesce('=' || i.doc_id, '') AS row_key FROM input i
), rows AS (
    -- Once per row, not per event: the second walk is as long as the row's
    -- active events (a hot row's held ones).
    SELECT k.trigger_name, k.row_key,
        (SELECT a.seq FROM {{schema}}.events a
         WHERE a.trigger_name = k.trigger_name AND a.row_key = k.row_key
           AND a.{ACTIVE_SQL} LIMIT 1) IS NULL AS empty_row,
        (SELECT a.seq FROM {{schema}}.events a
         WHERE a.trigger_name = k.trigger_name AND a.row_key = k.row_key AND a.{ACTIVE_SQL}
           AND (a.status = 'pending' OR a.worker IS DISTINCT FROM %(worker)b) LIMIT 1)
            IS NULL AS ours
    FROM keys k
), fresh AS (
    SELECT i.*, row_number() OVER (PARTITION BY i.trigger_name, i.doc_id ORDER BY i.ord) AS nth,
        r.empty_row, r.ours
    FROM input i
    JOIN rows r ON r.trigger_name = i.trigger_name
               AND r.row_key = coalesce('=' || i.doc_id, '')
    WHERE (SELECT x.seq FROM {{schema}}.events x WHERE x.id = i.id) IS NULL
), inserted AS (
    INSERT INTO {{schema}}.events (id, trigger_name, database_name, db_type, table_name,
        doc_id, event_type, status, attempts, head, next_attempt_at, created_at, updated_at,
        lease_until, worker, payload)
    SELECT f.id, f.trigger_name, f.database_name, f.db_type, f.table_name, f.doc_id,
        f.event_type, CASE WHEN f.ours THEN 'delivering' ELSE 'pending' END, 0,
        f.nth = 1 AND f.empty_row, %(now)b, %(now)b, %(now)b,
        CASE WHEN f.ours THEN %(lease_until)b END, CASE WHEN f.ours THEN %(worker)b END,
        f.payload
    FROM fresh f
    ORDER BY f.ord  -- seq follows the order of the batch
    ON CONFLICT (id) DO NOTHING
    RETURNING id, seq, status = 'delivering' AS held
)
SELECT array_agg(id ORDER BY seq) FILTER (WHERE held),
       array_agg(seq ORDER BY seq) FILTER (WHERE held),
       CASE WHEN bool_or(NOT held) THEN pg_notify(%(channel)b, '') END
FROM inserted
"""

RENEW = """
UPDATE {schema}.events e SET lease_until = %(lease_until)b
WHERE e.seq = ANY(ARRAY(
        SELECT seq FROM {schema}.events
        WHERE id = ANY(%(id)b) AND status = 'delivering' AND worker = %(worker)b
        ORDER BY seq FOR NO KEY UPDATE))
  AND e.status = 'delivering' AND e.worker = %(worker)b
RETURNING e.id
"""

UPSERT_CHECKPOINTS = """
INSERT INTO {schema}.checkpoints (source, position, updated_at)
SELECT s, p, %(now)b FROM unnest(%(source)b::text[], %(position)b::text[]) AS c(s, p)
ON CONFLICT (source) DO UPDATE SET position = excluded.position,
                                   updated_at = excluded.updated_at
"""

# Per trigger: its heads, oldest first, that are due and still the oldest
# active event of their row, locked; then marked delivering with a lease.
CLAIM = f"""
WITH picked AS (
    SELECT c.seq FROM unnest(%(trigger)b::text[], %(limit)b::int[]) AS l(trigger_name, n)
    CROSS JOIN LATERAL (
        SELECT e.seq FROM {{schema}}.events e
        WHERE e.head AND e.trigger_name = l.trigger_name AND e.due_at <= %(now)b
          AND {_oldest_active("e")}
        ORDER BY e.head_seq
        LIMIT l.n
        FOR NO KEY UPDATE OF e SKIP LOCKED
    ) c
)
UPDATE {{schema}}.events e
SET status = 'delivering', lease_until = %(lease_until)b, worker = %(worker)b,
    updated_at = %(now)b
WHERE e.seq = ANY(ARRAY(SELECT seq FROM picked))
RETURNING {_E_COLUMNS}
"""

LOCK_FOR_FINISH = """
SELECT seq, id, trigger_name, row_key, status, worker FROM {schema}.events
WHERE id = ANY(%(id)b) ORDER BY seq FOR NO KEY UPDATE
"""

# The invocation log is append-only: COPY, the fastest way in.
COPY_ATTEMPTS = """
COPY {schema}.attempts (event_seq, number, started_at, duration_ms, ok, status_code, error,
                        request_headers, batch_size, response_body, request_id, batch_index)
FROM STDIN (FORMAT BINARY)
"""
ATTEMPT_TYPES = ("int8", "int4", "timestamptz", "float8", "bool", "int4", "text", "jsonb",
                 "int4", "text", "text", "int4")

UPDATE_FINISHED = f"""
UPDATE {{schema}}.events e
SET status = u.status, attempts = u.attempts, next_attempt_at = u.next_attempt_at,
    lease_until = NULL, worker = NULL, updated_at = %(now)b, last_error = u.last_error,
    head = e.head AND u.{ACTIVE_SQL}
FROM unnest(%(seq)b::bigint[], %(status)b::text[], %(attempts)b::int[],
            %(next_attempt_at)b::timestamptz[], %(last_error)b::text[])
    AS u(seq, status, attempts, next_attempt_at, last_error)
WHERE e.seq = ANY(%(seq)b) AND e.seq = u.seq
"""

# The oldest active event of each row heads it. ``e.status`` is re-checked on
# the row as it is when locked: an event finished meanwhile does not become head.
PROMOTE = f"""
UPDATE {{schema}}.events e SET head = true
WHERE e.seq = ANY(ARRAY(
        SELECT (SELECT min(a.seq) FROM {{schema}}.events a
                WHERE a.trigger_name = r.t AND a.row_key = r.k AND a.{ACTIVE_SQL})
        FROM unnest(%(trigger)b::text[], %(row_key)b::text[]) AS r(t, k)))
  AND NOT e.head AND e.{ACTIVE_SQL}
"""

HEADLESS = f"""
SELECT r.t, r.k FROM unnest(%(trigger)b::text[], %(row_key)b::text[]) AS r(t, k)
JOIN LATERAL (SELECT a.head FROM {{schema}}.events a
              WHERE a.trigger_name = r.t AND a.row_key = r.k AND a.{ACTIVE_SQL}
              ORDER BY a.seq LIMIT 1) o ON NOT o.head
"""

RELEASE = """
WITH released AS (
    UPDATE {schema}.events e
    SET status = 'pending', next_attempt_at = %(now)b, lease_until = NULL, worker = NULL,
        updated_at = %(now)b
    WHERE e.seq = ANY(ARRAY(
            SELECT seq FROM {schema}.events
            WHERE id = ANY(%(id)b) AND status = 'delivering' AND worker = %(worker)b
            ORDER BY seq FOR NO KEY UPDATE))
      AND e.status = 'delivering' AND e.worker = %(worker)b
    RETURNING 1
)
SELECT n, CASE WHEN n > 0 THEN pg_notify(%(channel)b, '') END
FROM (SELECT count(*) AS n FROM released) c
"""

# Heads only: later events of a row wait for their head, not for the clock. A
# delivering head's due_at is its lease expiry.
NEXT_DUE = f"""
SELECT e.due_at FROM {{schema}}.events e
WHERE e.head AND e.due_at IS NOT NULL AND {_oldest_active("e")}
ORDER BY e.due_at LIMIT 1
"""


# The holders of the queue lock whose client has been frozen in the middle of a
# transaction (a paused or stopped process), seen by the server as waiting to
# read from or write to it. In the middle of a pipeline the session is "active"
# (idle_in_transaction_session_timeout does not cover it) and keeps the lock for
# ever, stopping every enqueue; sessions left "idle in transaction" by a paused
# worker were also seen holding it well past that timeout. Their sessions are
# ended; their transactions roll back whole.
END_FROZEN_QUEUE_HOLDERS = """
SELECT a.pid, pg_terminate_backend(a.pid) FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.classid = %(k1)s::bigint::oid AND l.objid = %(k2)s::bigint::oid
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND a.state IN ('active', 'idle in transaction', 'idle in transaction (aborted)')
  AND a.wait_event IN ('ClientRead', 'ClientWrite')
  AND a.state_change < now() - make_interval(secs => %(frozen)s)
  AND a.pid <> pg_backend_pid()
"""
# An enqueue waits this long for the queue lock (others hold it for
# milliseconds) before it looks for a frozen holder and is tried again; a
# holder silent this long in the middle of a pipeline is taken for frozen.
ENQUEUE_LOCK_TIMEOUT = "1s"
FROZEN_AFTER = 2.0


class Statements:
    """The statements above for one schema, rendered once."""

    def __init__(self, loc: Location) -> None:
        self.loc = loc
        self.queue_key = loc.lock_key("queue")
        self.enqueue = render(ENQUEUE, loc.schema)
        self.enqueue_held = render(ENQUEUE_HELD, loc.schema)
        self.renew = render(RENEW, loc.schema)
        self.upsert_checkpoints = render(UPSERT_CHECKPOINTS, loc.schema)
        self.claim = render(CLAIM, loc.schema)
        self.lock_for_finish = render(LOCK_FOR_FINISH, loc.schema)
        self.copy_attempts = render(COPY_ATTEMPTS, loc.schema)
        self.update_finished = render(UPDATE_FINISHED, loc.schema)
        self.promote = render(PROMOTE, loc.schema)
        self.headless = render(HEADLESS, loc.schema)
        self.release = render(RELEASE, loc.schema)
        self.next_due = render(NEXT_DUE, loc.schema)
        self.leases = LeaseStatements(loc)


# source -> (holder, token): the capture leases an enqueue must still hold.
Fences = Mapping[str, tuple[str, int]]


def fences_for(fences: Fences, events: Sequence[Event],
               checkpoints: Mapping[str, Position]) -> dict[str, tuple[str, int]]:
    """The fences of the sources this write stores events of or moves."""
    if not fences:
        return {}
    touched = set(checkpoints) | {e.database for e in events}
    return {s: f for s, f in fences.items() if s in touched}


async def check_fences(conn: Conn, q: Statements, fences: Fences) -> Any:
    """Queue the fence read (in the caller's transaction); ``fenced`` judges it."""
    if not fences:
        return None
    return await conn.execute(q.leases.fence, {"source": sorted(fences)})


async def fenced(cur: Any, fences: Fences) -> None:
    """Raise CaptureLost, before the caller's transaction commits (so it rolls
    back), when a lease this write needs is no longer this holder's token."""
    if cur is None:
        return
    found = {r[0]: (r[1], int(r[2])) for r in await cur.fetchall()}
    for source, mine in fences.items():
        if found.get(source) != mine:
            now = found.get(source)
            holder = f"held by {now[0]} with token {now[1]}" if now else "gone"
            raise CaptureLost(
                f"the capture lease of {source!r} is no longer this process's "
                f"(token {mine[1]}; now {holder}): another process took over its "
                "capture; nothing was stored")


async def lock_queue(conn: Conn, q: Statements, exclusive: bool) -> None:
    fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    await conn.execute(f"SELECT {fn}(%s, %s)", q.queue_key)


def _event_params(q: Statements, events: Sequence[Event], now: datetime) -> dict[str, Any]:
    """The events as column arrays: one statement inserts them all."""
    return {
        "id": [e.id for e in events],
        "trigger": [e.trigger for e in events],
        "database": [clean_text(e.database) for e in events],
        "db_type": [e.db_type for e in events],
        "table": [clean_text(e.table) for e in events],
        "doc_id": [clean_text(e.doc_id) for e in events],
        "type": [e.type for e in events],
        "payload": [e.payload for e in events],
        "now": now,
        "channel": q.loc.channel,
    }


async def _insert(conn: Conn, q: Statements, statement: sql.Composed,
                  params: dict[str, Any], events: Sequence[Event],
                  checkpoints: Mapping[str, Position], now: datetime,
                  fences: Fences | None) -> psycopg.AsyncCursor[Any] | None:
    """The insert and the checkpoints in one transaction and one round trip (lock,
    insert, checkpoints and commit go out together), fenced by the capture
    leases of the sources they come from; the insert's cursor."""
    cur = None
    fences = fences_for(fences or {}, events, checkpoints)
    try:
        async with conn.pipeline(), conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{ENQUEUE_LOCK_TIMEOUT}'")
            fence = await check_fences(conn, q, fences)
            if events:
                await lock_queue(conn, q, exclusive=True)
                cur = await conn.execute(statement, params)
            if checkpoints:
                await conn.execute(q.upsert_checkpoints, {
                    "source": list(checkpoints), "now": now,
                    "position": [p.value for p in checkpoints.values()]})
            await fenced(fence, fences)
    except psycopg.errors.LockNotAvailable:
        # Rolled back; the caller tries again (StoreUnavailable), past a
        # frozen holder if that was what it waited for.
        await end_frozen_queue_holders(conn, q)
        raise
    return cur


async def end_frozen_queue_holders(conn: Conn, q: Statements) -> list[int]:
    k1, k2 = q.queue_key
    rows = await (await conn.execute(END_FROZEN_QUEUE_HOLDERS, {
        "k1": k1, "k2": k2 & 0xFFFFFFFF, "frozen": FROZEN_AFTER})).fetchall()
    ended = [int(r[0]) for r in rows if r[1]]
    if ended:
        log.warning("ended sessions frozen in the middle of a transaction, holding the "
                    "queue lock", backend_pids=ended)
    return ended


async def enqueue(conn: Conn, q: Statements, events: Sequence[Event],
                  checkpoints: Mapping[str, Position], now: datetime,
                  fences: Fences | None = None) -> int:
    cur = await _insert(conn, q, q.enqueue, _event_params(q, events, now), events,
                        checkpoints, now, fences)
    if cur is None:
        return 0
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def enqueue_held(conn: Conn, q: Statements, events: Sequence[Event],
                       checkpoints: Mapping[str, Position], lease_seconds: float,
                       now: datetime, worker: str, fences: Fences | None = None) -> list[Event]:
    """``enqueue``, the new events held for ``worker`` where their rows allow
    (see ENQUEUE_HELD); they come back from the insert's RETURNING, not read."""
    params = _event_params(q, events, now)
    params.update(lease_until=now + timedelta(seconds=lease_seconds), worker=worker)
    cur = await _insert(conn, q, q.enqueue_held, params, events, checkpoints, now, fences)
    if cur is None:
        return []
    row = await cur.fetchone()
    if row is None or not row[0]:
        return []
    by_id = {e.id: e for e in events}
    out = []
    for id_, seq in zip(row[0], row[1], strict=True):
        e = by_id[id_]
        out.append(Event(id_, e.trigger, e.database, e.db_type, e.table, e.doc_id, e.type,
                         e.payload, Status.DELIVERING, 0, seq, now, now, now, None))
    return out


async def renew(conn: Conn, q: Statements, event_ids: Sequence[str], lease_seconds: float,
                now: datetime, worker: str) -> list[str]:
    rows = await (await conn.execute(q.renew, {
        "id": list(event_ids), "lease_until": now + timedelta(seconds=lease_seconds),
        "worker": worker,
    })).fetchall()
    kept = {r[0] for r in rows}
    return [eid for eid in event_ids if eid not in kept]


async def claim(conn: Conn, q: Statements, limits: Mapping[str, int], lease_seconds: float,
                now: datetime, worker: str) -> list[Event]:
    rows = await (await conn.execute(q.claim, {
        "trigger": list(limits), "limit": list(limits.values()), "now": now,
        "lease_until": now + timedelta(seconds=lease_seconds), "worker": worker,
    })).fetchall()
    rows.sort(key=lambda r: r[0])  # oldest first across triggers too
    return [event_from_row(r) for r in rows]


async def finish(conn: Conn, q: Statements, results: Sequence[Finish], now: datetime,
                 worker: str) -> None:
    """Record every attempt; apply a verdict only to an event this worker still
    holds. An attempt that outlived its lease is real and is logged, but the
    event is another worker's by then (or finished, or redelivered by an
    operator): its verdict must not change the status under the new holder."""
    ids = list(dict.fromkeys(f.event_id for f in results))
    async with conn.transaction():
        async with conn.pipeline():
            await lock_queue(conn, q, exclusive=False)
            cur = await conn.execute(q.lock_for_finish, {"id": ids})
        # id -> [seq, trigger, row_key, status], kept current through the batch
        # (one event may be finished twice in a batch: the last verdict wins).
        rows = await cur.fetchall()
        state = {r[1]: [r[0], r[2], r[3], Status(r[4])] for r in rows}
        before = {eid: s[3] for eid, s in state.items()}
        held = {r[1] for r in rows if r[4] == Status.DELIVERING.value and r[5] == worker}
        attempts: list[tuple[Any, ...]] = []
        final: dict[int, tuple[Any, ...]] = {}
        for f in results:
            ev = state.get(f.event_id)
            if ev is None:
                continue  # purged meanwhile: nothing to record against
            seq = ev[0]
            a = f.attempt
            attempts.append((seq, a.number, a.started_at, float(a.duration_ms), a.ok,
                             a.status_code, clean_text(a.error), clean_headers(a.request_headers),
                             a.batch_size, truncate_body(a.response_body),
                             clean_text(a.request_id), a.batch_index))
            if f.event_id not in held:
                continue  # logged above; the status is not ours to change
            next_at = f.next_attempt_at
            if f.status is Status.PENDING and next_at is None:
                next_at = now  # a retry without a time is due at once
            final[seq] = (f.status.value, a.number, next_at,
                          None if a.ok else clean_text(a.error))
            ev[3] = f.status
        if not attempts:
            return
        # Rows whose set of active events changed need their head looked at.
        touched = list({(s[1], s[2]) for eid, s in state.items()
                        if (before[eid] in ACTIVE) != (s[3] in ACTIVE)})
        updates = [(seq, *values) for seq, values in final.items()]
        await conn.execute(q.update_finished, {
            **_columns(updates, ("seq", "status", "attempts", "next_attempt_at", "last_error")),
            "now": now})
        async with conn.cursor() as cur, cur.copy(q.copy_attempts) as copy:
            copy.set_types(ATTEMPT_TYPES)
            for row in attempts:
                await copy.write_row(row)
        await fix_heads(conn, q, touched)


async def fix_heads(conn: Conn, q: Statements, rows: Sequence[Row]) -> None:
    """Make the oldest active event of each row its head, in the caller's
    transaction, after the caller changed which events of the rows are active.

    A finish running beside this one on the same row (a lease that ran out, an
    operator's redeliver) can make the event picked here inactive before it is
    marked; the re-check in a fresh snapshot then finds the row headless and
    tries again."""
    for _ in range(100):
        if not rows:
            return
        params = {"trigger": [r[0] for r in rows], "row_key": [r[1] for r in rows]}
        await conn.execute(q.promote, params)
        rows = [(t, k) for t, k in await (await conn.execute(q.headless, params)).fetchall()]
    raise RuntimeError(f"rows {rows[:3]} keep losing their head; try again")


async def release(conn: Conn, q: Statements, event_ids: Sequence[str], now: datetime,
                  worker: str) -> int:
    row = await (await conn.execute(q.release, {
        "id": list(event_ids), "now": now, "worker": worker, "channel": q.loc.channel,
    })).fetchone()
    return int(row[0]) if row else 0


async def next_due(conn: Conn, q: Statements) -> datetime | None:
    row = await (await conn.execute(q.next_due)).fetchone()
    return None if row is None else utc(row[0])


def _columns(rows: Sequence[tuple[Any, ...]], names: Sequence[str]) -> dict[str, list[Any]]:
    """Row tuples to one list per column: the arrays ``unnest`` takes apart."""
    if not rows:
        return {n: [] for n in names}
    return {n: list(col) for n, col in zip(names, zip(*rows, strict=True), strict=True)}
