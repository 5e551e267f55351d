"""The log side of the store, for the CLI and retention: queries, redeliver,
purge, stats, checkpoints. Each function runs one transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from dbevents.protocols import EventFilter, TriggerStats
from dbevents.values import Attempt, Event, Position, Status

from dbevents_store_sqlite.connection import write
from dbevents_store_sqlite.eventqueue import Row, fix_heads, row_head, select_by_ids
from dbevents_store_sqlite.rows import (
    ACTIVE,
    ATTEMPT_COLUMNS,
    EVENT_COLUMNS,
    attempt_from_row,
    event_from_row,
    now_us,
    to_us,
)

FINISHED = (Status.DELIVERED, Status.FAILED)


def list_events(conn: sqlite3.Connection, flt: EventFilter) -> list[Event]:
    if flt.request_id is not None:
        # The events one batch request carried, in their order in it.
        sql = (f"SELECT {EVENT_COLUMNS} FROM events JOIN ("
               "SELECT event_seq, min(batch_index) AS place FROM attempts "
               "INDEXED BY attempts_request WHERE request_id = ? GROUP BY event_seq"
               ") ON event_seq = seq ORDER BY place LIMIT ?")
        return [event_from_row(r)
                for r in conn.execute(sql, (flt.request_id, max(0, flt.limit)))]
    where: list[str] = []
    params: list[object] = []
    for term, value in (("status = ?", flt.status.value if flt.status else None),
                        ("trigger_name = ?", flt.trigger), ("database_name = ?", flt.database),
                        ("table_name = ?", flt.table), ("doc_id = ?", flt.doc_id),
                        ("created_at >= ?", to_us(flt.since) if flt.since else None),
                        ("created_at < ?", to_us(flt.until) if flt.until else None),
                        ("seq < ?", flt.before_seq)):
        if value is not None:
            where.append(term)
            params.append(value)
    sql = (f"SELECT {EVENT_COLUMNS} FROM events"
           + (f" WHERE {' AND '.join(where)}" if where else "")
           + " ORDER BY seq DESC LIMIT ?")
    return [event_from_row(r) for r in conn.execute(sql, (*params, max(0, flt.limit)))]


def get_event(conn: sqlite3.Connection, event_id: str) -> Event | None:
    row = conn.execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE id = ?",
                       (event_id,)).fetchone()
    return None if row is None else event_from_row(row)


def find_event_ids(conn: sqlite3.Connection, prefix: str, limit: int) -> list[str]:
    # A range rather than LIKE, so the unique index on id is used (and "_" or
    # "%" in a prefix mean themselves).
    rows = conn.execute("SELECT id FROM events WHERE id >= ? AND id < ? ORDER BY id LIMIT ?",
                        (prefix, prefix + "\U0010ffff", limit)).fetchall()
    return [str(r[0]) for r in rows]


def attempts(conn: sqlite3.Connection, event_id: str) -> list[Attempt]:
    rows = conn.execute(
        f"SELECT {ATTEMPT_COLUMNS} FROM attempts a JOIN events e ON e.seq = a.event_seq "
        "WHERE e.id = ? ORDER BY a.id", (event_id,)).fetchall()
    return [attempt_from_row(event_id, r) for r in rows]


def redeliver(conn: sqlite3.Connection, ids: Sequence[str] | None, status: Status | None,
              trigger: str | None) -> int:
    """Back to pending, attempts reset, due now; the attempt history is kept.
    Events in flight are left alone."""
    now = now_us()

    def body(conn: sqlite3.Connection) -> int:
        columns = "seq, trigger_name, doc_id, status"
        if ids is not None:
            rows = select_by_ids(conn, columns, ids)
        else:
            where, params = ["status != 'delivering'"], []
            if status in FINISHED:
                # The terms of events_finished's WHERE, so that index serves it.
                where += ["status IN ('delivered', 'failed')", "status = ?"]
                params.append(status.value)
            if trigger is not None:
                where.append("trigger_name = ?")
                params.append(trigger)
            rows = conn.execute(f"SELECT {columns} FROM events WHERE {' AND '.join(where)}",
                                params).fetchall()
        rows = [r for r in rows if r[3] != Status.DELIVERING.value
                and (status is None or r[3] == status.value)
                and (trigger is None or r[1] == trigger)]
        active = {s.value for s in ACTIVE}
        # An event coming back from delivered/failed may be older than its row's
        # current head, and then it goes first.
        heads_before: dict[Row, int | None] = {}
        for _, trig, doc_id, st in rows:
            if st not in active and (trig, doc_id) not in heads_before:
                heads_before[(trig, doc_id)] = row_head(conn, (trig, doc_id))
        conn.executemany(
            "UPDATE events SET status = 'pending', attempts = 0, next_attempt_at = ?1, "
            "due_at = ?1, updated_at = ?1 WHERE seq = ?2",
            [(now, r[0]) for r in rows])
        fix_heads(conn, heads_before)
        return len(rows)

    return write(conn, body)


def purge_batch(conn: sqlite3.Connection, before_us: int, statuses: Sequence[Status],
                limit: int, trigger: str | None = None) -> int:
    """Delete up to ``limit`` finished events last updated before ``before_us``,
    with their attempts; returns how many. Active events are never purged: they
    are the queue."""
    wanted = [s.value for s in statuses if s in FINISHED]
    if not wanted:
        return 0

    def body(conn: sqlite3.Connection) -> int:
        seqs = [(r[0],) for r in conn.execute(
            "SELECT seq FROM events INDEXED BY events_finished "
            "WHERE status IN ('delivered', 'failed') "
            f"AND status IN ({','.join('?' * len(wanted))}) AND updated_at < ? "
            f"{'AND trigger_name = ? ' if trigger is not None else ''}LIMIT ?",
            (*wanted, before_us, *([trigger] if trigger is not None else []), limit))]
        conn.executemany("DELETE FROM attempts WHERE event_seq = ?", seqs)
        conn.executemany("DELETE FROM events WHERE seq = ?", seqs)
        return len(seqs)

    return write(conn, body)


def stats(conn: sqlite3.Connection) -> list[TriggerStats]:
    counts: dict[str, dict[str, int]] = {}
    for trigger, status, n in conn.execute(
            "SELECT trigger_name, status, count(*) FROM events GROUP BY trigger_name, status"):
        counts.setdefault(trigger, {})[status] = n
    return [TriggerStats(trigger=t, **c) for t, c in sorted(counts.items())]


def checkpoint(conn: sqlite3.Connection, source: str) -> Position | None:
    row = conn.execute("SELECT position FROM checkpoints WHERE source = ?",
                       (source,)).fetchone()
    return None if row is None else Position(row[0])


def checkpoints(conn: sqlite3.Connection) -> dict[str, Position]:
    return {s: Position(p) for s, p in conn.execute("SELECT source, position FROM checkpoints")}



# A paused trigger (its receiver down) is a meta row, so `dbevents status` in
# another process can show it: key "paused:<trigger>", value microseconds.
_PAUSED = "paused:"


def set_trigger_paused(conn: sqlite3.Connection, trigger: str, since_us: int | None) -> None:
    def body(c: sqlite3.Connection) -> None:
        if since_us is None:
            c.execute("DELETE FROM meta WHERE key = ?", (_PAUSED + trigger,))
        else:
            c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                      (_PAUSED + trigger, str(since_us)))
    write(conn, body)


def paused_triggers(conn: sqlite3.Connection) -> dict[str, int]:
    return {key[len(_PAUSED):]: int(value) for key, value in conn.execute(
        "SELECT key, value FROM meta WHERE key >= ? AND key < ?", (_PAUSED, "paused;"))}
