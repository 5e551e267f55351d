"""A dbevents-like worker process for the multi-process tests (not a test).

    python pg_store_worker.py URL drain   # claim and finish until the queue is empty
    python pg_store_worker.py URL hang LEASE  # claim once, print, wait to be killed

Prints {"ready": true} once the store is open, then (drain: after a line on
stdin, so that several workers start together) one JSON line per claim:
{"claimed": [event ids]}.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from datetime import UTC, datetime

import structlog
from dbevents.protocols import StoreSettings
from dbevents.values import Attempt, Finish, Status
from dbevents_store_postgres import PostgresStore

TRIGGERS = {"x": 7, "y": 5}


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def drain(store: PostgresStore) -> None:
    idle = 0
    while idle < 10:
        claimed = await store.claim(TRIGGERS, 30.0, datetime.now(UTC))
        if not claimed:
            stats = await store.stats()
            if all(s.pending == 0 and s.delivering == 0 for s in stats):
                idle += 1
            await asyncio.sleep(0.01)
            continue
        idle = 0
        # Taken after the claim committed: an earlier event of a row must have
        # been finished before this moment (the tests check it).
        started = datetime.now(UTC)
        say(claimed=[e.id for e in claimed])
        await asyncio.sleep(random.uniform(0, 0.01))  # the "delivery"
        done = datetime.now(UTC)
        ms = (done - started).total_seconds() * 1000
        await store.finish([
            Finish(e.id, Attempt(event_id=e.id, number=e.attempts + 1, started_at=started,
                                 duration_ms=ms, ok=True, status_code=200), Status.DELIVERED)
            for e in claimed])


async def hang(store: PostgresStore, lease: float) -> None:
    claimed = await store.claim(TRIGGERS, lease, datetime.now(UTC))
    say(claimed=[e.id for e in claimed])
    await asyncio.sleep(3600)


async def main() -> None:
    url, mode = sys.argv[1], sys.argv[2]
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    store = PostgresStore(StoreSettings(url=url))
    await store.open()
    say(ready=True)
    try:
        if mode == "drain":
            await asyncio.to_thread(sys.stdin.readline)
            await drain(store)
        else:
            await hang(store, float(sys.argv[3]))
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main())
