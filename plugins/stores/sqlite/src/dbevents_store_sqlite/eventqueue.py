"""The queue side of the store: enqueue, claim, finish, release, next_due.

Each function takes the store's connection and runs exactly one transaction.

Per-row order rests on one invariant: ``head = 1`` exactly on the oldest active
(pending or delivering) event of each (trigger, doc_id) row. Claims only look at
heads, so a row with a long queue behind a slow event costs a claim nothing,
and finishing an event promotes the next one of its row (one index lookup).

Held events. ``enqueue_held`` stores new events already delivering, leased to
this process, for its dispatcher to send from memory: no claim, no read-back.
Only one worker runs on a file (the worker lock), so every delivering event is
this process's, and a new event is held exactly when its row has no pending
event: the earlier events of its row are then all in the dispatcher's memory,
which keeps their order. Held events are active like claimed ones, so the head
invariant is unchanged; their ``due_at`` is the lease expiry, which ``renew``
moves on while they wait.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from dbevents.values import Event, Finish, Position, Status

from dbevents_store_sqlite.connection import write
from dbevents_store_sqlite.rows import (
    ACTIVE,
    EVENT_COLUMNS,
    attempt_row,
    clean_text,
    encoded,
    event_from_row,
    from_us,
    now_us,
    to_us,
)

Row = tuple[str, str | None]  # (trigger, doc_id)

ACTIVE_SQL = "status IN ('pending', 'delivering')"  # the exact text of events_active's WHERE
_ACTIVE_VALUES = frozenset(s.value for s in ACTIVE)
_CHUNK = 500  # ids per `IN (...)`, well under SQLite's bound-parameter limit

# A new event heads its row unless an active event of the row is already stored
# (events earlier in the same batch included: each row is a statement of its own).
_INSERT = f"""
INSERT OR IGNORE INTO events (id, trigger_name, database_name, db_type, table_name, doc_id,
    event_type, status, attempts, head, due_at, next_attempt_at, created_at, updated_at,
    payload)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', 0,
    NOT EXISTS (SELECT 1 FROM events WHERE {ACTIVE_SQL} AND trigger_name = ?2
                AND doc_id IS ?6),
    ?8, ?8, ?8, ?8, ?9)
"""
# The same, held for this process (?10: delivering, leased until ?11) or not
# (?10: pending, due now), as decided per row beforehand (_ROW_BEHIND).
_INSERT_HELD = f"""
INSERT OR IGNORE INTO events (id, trigger_name, database_name, db_type, table_name, doc_id,
    event_type, status, attempts, head, due_at, next_attempt_at, created_at, updated_at,
    payload)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?10, 0,
    NOT EXISTS (SELECT 1 FROM events WHERE {ACTIVE_SQL} AND trigger_name = ?2
                AND doc_id IS ?6),
    ?11, ?8, ?8, ?8, ?9)
"""
# Whether a row has a pending event: then a new event of it waits behind that
# one in the store. Only one worker runs on a file, so every delivering event
# is this process's, and without a pending one the row's earlier events are
# all in its memory. Asked once per row and batch: the walk is as long as the
# row's active events (a hot row's held ones), so not once per event.
_ROW_BEHIND = f"""
SELECT 1 FROM events INDEXED BY events_active
WHERE {ACTIVE_SQL} AND trigger_name = ? AND doc_id IS ? AND status = 'pending' LIMIT 1
"""
_UPSERT_CHECKPOINT = """
INSERT INTO checkpoints (source, position, updated_at) VALUES (?, ?, ?)
ON CONFLICT (source) DO UPDATE SET position = excluded.position,
                                   updated_at = excluded.updated_at
"""
_CLAIM = f"""
SELECT {EVENT_COLUMNS} FROM events INDEXED BY events_heads
WHERE head = 1 AND trigger_name = ? AND due_at <= ? ORDER BY seq LIMIT ?
"""
_MARK_CLAIMED = "UPDATE events SET status = 'delivering', due_at = ?, updated_at = ? WHERE seq = ?"
_INSERT_ATTEMPT = """
INSERT INTO attempts (event_seq, number, started_at, duration_ms, ok, status_code, error,
                      request_headers, batch_size, response_body, request_id, batch_index)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_FINISH = """
UPDATE events SET status = ?, attempts = ?, next_attempt_at = ?, due_at = ?, updated_at = ?,
                  last_error = ?, head = ?
WHERE seq = ?
"""
# The same, for an event known by id that is still active (pending, or
# delivering: held or claimed by this worker), as nearly every finished event
# is: no read-back. Its head flag stays while it stays active (?8).
_FINISH_ACTIVE = f"""
UPDATE events SET status = ?1, attempts = ?2, next_attempt_at = ?3, due_at = ?4,
                  updated_at = ?5, last_error = ?6, head = CASE WHEN ?8 THEN head ELSE 0 END
WHERE id = ?7 AND {ACTIVE_SQL}
"""
_INSERT_ATTEMPT_BY_ID = """
INSERT INTO attempts (event_seq, number, started_at, duration_ms, ok, status_code, error,
                      request_headers, batch_size, response_body, request_id, batch_index)
VALUES ((SELECT seq FROM events WHERE id = ?), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# _PROMOTE for the row of the event with id ?1.
_PROMOTE_BY_ID = f"""
UPDATE events SET head = 1
WHERE seq = (SELECT min(a.seq) FROM events AS e, events AS a INDEXED BY events_active
             WHERE e.id = ?1 AND {ACTIVE_SQL.replace("status", "a.status", 1)}
               AND a.trigger_name = e.trigger_name AND a.doc_id IS e.doc_id)
  AND head = 0
"""
# After a head finished: the oldest remaining active event of its row heads it.
_PROMOTE = f"""
UPDATE events SET head = 1
WHERE seq = (SELECT min(seq) FROM events INDEXED BY events_active
             WHERE {ACTIVE_SQL} AND trigger_name = ?1 AND doc_id IS ?2)
  AND head = 0
"""
_ROW_HEAD = f"""
SELECT min(seq) FROM events INDEXED BY events_active
WHERE {ACTIVE_SQL} AND trigger_name = ? AND doc_id IS ?
"""


def enqueue(conn: sqlite3.Connection, events: Sequence[Event],
            checkpoints: Mapping[str, Position], durable: bool = False) -> int:
    now = now_us()
    rows = [(e.id, e.trigger, e.database, e.db_type, e.table, e.doc_id, e.type, now,
             e.payload) for e in events]

    def body(conn: sqlite3.Connection) -> int:
        before = conn.total_changes
        if rows:
            conn.executemany(_INSERT, rows)
        new = conn.total_changes - before
        if checkpoints:
            conn.executemany(_UPSERT_CHECKPOINT,
                             [(source, pos.value, now) for source, pos in checkpoints.items()])
        return new

    if not durable:
        return write(conn, body)
    conn.execute("PRAGMA synchronous = FULL")  # this commit fsyncs the WAL
    try:
        return write(conn, body)
    finally:
        conn.execute("PRAGMA synchronous = NORMAL")


def enqueue_held(conn: sqlite3.Connection, events: Sequence[Event],
                 checkpoints: Mapping[str, Position], lease_seconds: float,
                 durable: bool = False) -> list[Event]:
    """``enqueue``, the new events held for this process where their row allows
    (see _INSERT_HELD). The held ones come back without reading a row: only
    their seq and status, from the seq range this transaction wrote."""
    now = now_us()
    lease_until = now + round(lease_seconds * 1_000_000)

    def body(conn: sqlite3.Connection) -> list[tuple[str, int]]:
        held: list[tuple[str, int]] = []
        if events:
            behind = {row: conn.execute(_ROW_BEHIND, row).fetchone() is not None
                      for row in dict.fromkeys((e.trigger, e.doc_id) for e in events)}
            rows = [(e.id, e.trigger, e.database, e.db_type, e.table, e.doc_id, e.type, now,
                     e.payload) + (("pending", now) if behind[(e.trigger, e.doc_id)]
                                   else ("delivering", lease_until))
                    for e in events]
            last = conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
            conn.executemany(_INSERT_HELD, rows)
            held = conn.execute(
                "SELECT id, seq FROM events WHERE seq > ? AND status = 'delivering'",
                (last,)).fetchall()
        if checkpoints:
            conn.executemany(_UPSERT_CHECKPOINT,
                             [(source, pos.value, now) for source, pos in checkpoints.items()])
        return held

    if durable:
        conn.execute("PRAGMA synchronous = FULL")  # this commit fsyncs the WAL
    try:
        held = write(conn, body)
    finally:
        if durable:
            conn.execute("PRAGMA synchronous = NORMAL")
    if not held:
        return []
    by_id = {e.id: e for e in events}
    at = from_us(now)
    out = []
    for id_, seq in held:
        e = by_id[id_]
        out.append(Event(id_, e.trigger, e.database, e.db_type, e.table, e.doc_id, e.type,
                         e.payload, Status.DELIVERING, 0, seq, at, at, at, None))
    out.sort(key=lambda e: e.seq)
    return out


def renew(conn: sqlite3.Connection, event_ids: Sequence[str], lease_seconds: float) -> list[str]:
    until = now_us() + round(lease_seconds * 1_000_000)

    def body(conn: sqlite3.Connection) -> list[str]:
        lost = []
        for eid in event_ids:
            if conn.execute("UPDATE events SET due_at = ? WHERE id = ? AND status = 'delivering'",
                            (until, eid)).rowcount == 0:
                lost.append(eid)
        return lost

    return write(conn, body)


def claim(conn: sqlite3.Connection, limits: Mapping[str, int], lease_seconds: float,
          now: datetime) -> list[Event]:
    at = to_us(now)
    lease_until = at + round(lease_seconds * 1_000_000)

    def body(conn: sqlite3.Connection) -> list[Event]:
        rows: list[tuple[Any, ...]] = []
        for trigger, limit in limits.items():
            if limit > 0:
                rows += conn.execute(_CLAIM, (trigger, at, limit)).fetchall()
        if not rows:
            return []
        conn.executemany(_MARK_CLAIMED, [(lease_until, at, r[0]) for r in rows])
        rows.sort(key=lambda r: r[0])  # oldest first across triggers too
        # The rows as they are now: delivering, updated at `now`.
        return [event_from_row((*r[:8], Status.DELIVERING.value, *r[9:12], at, *r[13:]))
                for r in rows]

    return write(conn, body)


def finish(conn: sqlite3.Connection, results: Sequence[Finish]) -> None:
    now = now_us()

    def body(conn: sqlite3.Connection) -> None:
        if len({f.event_id for f in results}) == len(results):
            conn.execute("SAVEPOINT finish_active")
            if _finish_active(conn, results, now):
                conn.execute("RELEASE finish_active")
                return
            # Some event was no longer active (redelivered, finished or purged
            # meanwhile): the whole batch the long way, reading each event first.
            conn.execute("ROLLBACK TO finish_active")
            conn.execute("RELEASE finish_active")
        _finish_read(conn, results, now)

    write(conn, body)


def _finish_active(conn: sqlite3.Connection, results: Sequence[Finish], now: int) -> bool:
    """finish() when every event in ``results`` is still active and appears once:
    the rows are written by id, nothing read back. False (the caller rolls
    back) when that does not hold."""
    updates: list[tuple[Any, ...]] = []
    attempts: list[tuple[Any, ...]] = []
    left: list[tuple[str]] = []  # events leaving their row: the next one may head it
    done = encoded()
    for f in results:
        active = f.status in ACTIVE
        nxt = to_us(f.next_attempt_at) if f.next_attempt_at else None
        if active:
            nxt = now if nxt is None else nxt
        else:
            left.append((f.event_id,))
        updates.append((f.status.value, f.attempt.number, nxt, nxt if active else None, now,
                        None if f.attempt.ok else clean_text(f.attempt.error), f.event_id,
                        active))
        attempts.append(attempt_row(f.event_id, f.attempt, done))
    if conn.executemany(_FINISH_ACTIVE, updates).rowcount != len(updates):
        return False
    conn.executemany(_INSERT_ATTEMPT_BY_ID, attempts)
    conn.executemany(_PROMOTE_BY_ID, left)
    return True


def _finish_read(conn: sqlite3.Connection, results: Sequence[Finish], now: int) -> None:
    """finish() reading each event first: its row, status and head flag."""
    # id -> [seq, trigger, doc_id, status, head], kept current through the batch
    # (the same event may be finished twice in one batch).
    state = {r[0]: list(r[1:]) for r in select_by_ids(
        conn, "id, seq, trigger_name, doc_id, status, head", [f.event_id for f in results])}
    attempts: list[tuple[Any, ...]] = []
    updates: list[tuple[Any, ...]] = []
    left: dict[Row, None] = {}  # rows an event left: the next one may head them
    came_back: dict[Row, int | None] = {}  # rows an event re-entered: their old head
    done = encoded()  # once per request, not per event: see attempt_row
    for f in results:
        ev = state.get(f.event_id)
        if ev is None:
            continue  # purged meanwhile: nothing to record against
        seq, trigger, doc_id, status, head = ev
        attempts.append(attempt_row(seq, f.attempt, done))
        was_active, active = status in _ACTIVE_VALUES, f.status in ACTIVE
        nxt = to_us(f.next_attempt_at) if f.next_attempt_at else None
        if active:
            nxt = now if nxt is None else nxt
        due = nxt if active else None
        if was_active and not active:
            left[(trigger, doc_id)] = None
        elif active and not was_active and (trigger, doc_id) not in came_back:
            # Only a finish for an event that was no longer in flight (e.g.
            # redelivered meanwhile) gets here.
            came_back[(trigger, doc_id)] = row_head(conn, (trigger, doc_id))
        new_head = head if was_active and active else 0
        updates.append((f.status.value, f.attempt.number, nxt, due, now,
                        None if f.attempt.ok else clean_text(f.attempt.error),
                        new_head, seq))
        ev[3], ev[4] = f.status.value, new_head
    conn.executemany(_INSERT_ATTEMPT, attempts)
    conn.executemany(_FINISH, updates)
    conn.executemany(_PROMOTE, [row for row in left if row not in came_back])
    fix_heads(conn, came_back)


def fix_heads(conn: sqlite3.Connection, heads_before: Mapping[Row, int | None]) -> None:
    """Restore the head invariant on rows that events re-entered (an older event
    may now come first); called in the transaction that changed them, with each
    row's head from before."""
    unset: list[tuple[int]] = []
    mark: list[tuple[int]] = []
    for row, before in heads_before.items():
        after = row_head(conn, row)
        if before is not None and before != after:
            unset.append((before,))
        if after is not None:  # even if unchanged: its flag may have been cleared
            mark.append((after,))
    if unset:
        conn.executemany("UPDATE events SET head = 0 WHERE seq = ? AND head = 1", unset)
    if mark:
        conn.executemany("UPDATE events SET head = 1 WHERE seq = ? AND head = 0", mark)


def row_head(conn: sqlite3.Connection, row: Row) -> int | None:
    """The seq of the oldest active event of ``row``, if any."""
    seq: int | None = conn.execute(_ROW_HEAD, row).fetchone()[0]
    return seq


def release(conn: sqlite3.Connection, event_ids: Sequence[str]) -> None:
    now = now_us()

    def body(conn: sqlite3.Connection) -> None:
        conn.executemany(
            "UPDATE events SET status = 'pending', next_attempt_at = ?1, due_at = ?1, "
            "updated_at = ?1 WHERE id = ?2 AND status = 'delivering'",
            [(now, eid) for eid in event_ids])

    write(conn, body)


def release_all(conn: sqlite3.Connection) -> int:
    """Every claim back to pending, due now: at a worker's start, every lease in
    the file belongs to a process that is gone (the worker lock says so)."""
    now = now_us()

    def body(conn: sqlite3.Connection) -> int:
        return conn.execute(
            "UPDATE events INDEXED BY events_delivering SET status = 'pending', "
            "next_attempt_at = ?1, due_at = ?1, updated_at = ?1 WHERE status = 'delivering'",
            (now,)).rowcount

    return write(conn, body)


def next_due(conn: sqlite3.Connection) -> int | None:
    # Heads only: later events of a row wait for their head, not for the clock.
    # A delivering head's due_at is its lease expiry.
    due: int | None = conn.execute(
        "SELECT min(due_at) FROM events INDEXED BY events_heads_due WHERE head = 1").fetchone()[0]
    return due


def select_by_ids(conn: sqlite3.Connection, columns: str,
                   ids: Iterable[str]) -> list[tuple[Any, ...]]:
    unique = list(dict.fromkeys(ids))
    out: list[tuple[Any, ...]] = []
    for i in range(0, len(unique), _CHUNK):
        chunk = unique[i:i + _CHUNK]
        out += conn.execute(
            f"SELECT {columns} FROM events WHERE id IN ({','.join('?' * len(chunk))})",
            chunk).fetchall()
    return out

