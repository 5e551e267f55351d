"""Capture leases: one process at a time captures a source; the others wait.

A lease row per source names its holder, a fencing token and an expiry, all
judged by the store server's clock (``now()``), so the clocks of the worker
machines never matter. A takeover raises the token by one and tokens never go
back (release only moves the expiry), so "the stored token is still mine" means
"nobody captured this source since I took it".

The fence lives in the enqueue transaction (see eventqueue): it reads the lease
rows ``FOR SHARE`` before it commits, so an acquire (an UPDATE of the row)
either commits first, and the enqueue sees the new token and rolls back, or
waits for the enqueue to commit, and the new holder reads the checkpoint that
enqueue wrote.
"""

from __future__ import annotations

from datetime import UTC
from typing import Any

import psycopg
from dbevents.protocols import CaptureLease

from dbevents_store_postgres.schema import render
from dbevents_store_postgres.url import Location

# Free, expired, or already this holder's: taken, with the next token.
ACQUIRE = """
INSERT INTO {schema}.capture_leases AS l (source, holder, token, expires_at, acquired_at)
VALUES (%(source)s, %(holder)s, 1, now() + make_interval(secs => %(ttl)s), now())
ON CONFLICT (source) DO UPDATE
SET holder = excluded.holder, token = l.token + 1, expires_at = excluded.expires_at,
    acquired_at = excluded.acquired_at
WHERE l.expires_at <= now() OR l.holder = excluded.holder
RETURNING l.token
"""

RENEW = """
UPDATE {schema}.capture_leases SET expires_at = now() + make_interval(secs => %(ttl)s)
WHERE source = %(source)s AND holder = %(holder)s AND token = %(token)s
RETURNING 1
"""

RELEASE = """
UPDATE {schema}.capture_leases SET expires_at = now()
WHERE source = %(source)s AND holder = %(holder)s AND token = %(token)s
"""

# A lease that ran out whose row is still locked by a fenced write: that write's
# holder is frozen mid-transaction (a pipelined transaction waiting on its
# client is not "idle in transaction", so the server would wait for ever). Its
# session is ended: the write rolls back, and the takeover goes ahead.
END_FROZEN_WRITER = """
SELECT pg_terminate_backend(l.pid) FROM {schema}.capture_leases c
JOIN pg_locks l ON l.locktype = 'transactionid' AND l.granted AND l.transactionid = c.xmax
WHERE c.source = %(source)s AND c.expires_at <= now() AND l.pid <> pg_backend_pid()
"""

LIST = """
SELECT source, holder, token, expires_at, expires_at > now() FROM {schema}.capture_leases
ORDER BY source
"""

# In the enqueue's transaction: the lease rows of the sources it writes, locked
# against a takeover until it commits.
FENCE = """
SELECT source, holder, token FROM {schema}.capture_leases
WHERE source = ANY(%(source)s) ORDER BY source FOR SHARE
"""


class LeaseStatements:
    def __init__(self, loc: Location) -> None:
        self.acquire = render(ACQUIRE, loc.schema)
        self.renew = render(RENEW, loc.schema)
        self.release = render(RELEASE, loc.schema)
        self.list = render(LIST, loc.schema)
        self.end_frozen_writer = render(END_FROZEN_WRITER, loc.schema)
        self.fence = render(FENCE, loc.schema)


async def acquire(conn: Any, q: Any, source: str, holder: str, ttl: float) -> int | None:
    """None also while the row is locked: a holder's enqueue is in flight, or
    frozen half-way past the lease (then its session is ended, see
    END_FROZEN_WRITER, and the next try takes the lease)."""
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '200ms'")
            row = await (await conn.execute(q.leases.acquire, {
                "source": source, "holder": holder, "ttl": ttl})).fetchone()
    except psycopg.errors.LockNotAvailable:
        await conn.execute(q.leases.end_frozen_writer, {"source": source})
        return None
    return None if row is None else int(row[0])


async def renew(conn: Any, q: Any, source: str, holder: str, token: int, ttl: float) -> bool:
    row = await (await conn.execute(q.leases.renew, {
        "source": source, "holder": holder, "token": token, "ttl": ttl})).fetchone()
    return row is not None


async def release(conn: Any, q: Any, source: str, holder: str, token: int) -> None:
    await conn.execute(q.leases.release, {"source": source, "holder": holder, "token": token})


async def list_leases(conn: Any, q: Any) -> list[CaptureLease]:
    rows = await (await conn.execute(q.leases.list)).fetchall()
    return [CaptureLease(r[0], r[1], int(r[2]), r[3].astimezone(UTC), bool(r[4])) for r in rows]
