"""Benchmark of the PostgreSQL store (dbevents-store-postgres).

    uv run python bench/store_postgres.py [--events 100000] [--batch 500] [--durable]

Starts a private PostgreSQL server (testsupport.servers.PostgresServer: fsync
off unless --durable) and prints, on this machine:

- events enqueued per second through PostgresStore.enqueue (batches of --batch,
  one checkpoint per batch), next to baselines measured in the same run: the
  same rows written into an equivalent table (the store's own events table and
  indexes, in another schema) with INSERT ... ON CONFLICT DO NOTHING, one
  transaction per batch, three ways: executemany (pipeline mode), COPY into a
  temporary table + INSERT ... SELECT, and one INSERT ... SELECT FROM unnest()
  of arrays; and the ratio of the store to the fastest;
- claim -> finish throughput draining that backlog (--batch per claim), with one
  worker and with two sharing the store;
- enqueue -> claim -> finish cycles per second on an empty queue;
- the time of one claim behind a long single-row backlog (per-row order).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import structlog
from dbevents.protocols import StoreSettings
from dbevents.values import Attempt, Event, Finish, Position, Status
from dbevents_store_postgres import PostgresStore
from dbevents_store_postgres.schema import MIGRATIONS, render
from psycopg import sql

# testsupport lives at the repository root, which is not on the path of a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from testsupport.servers import PostgresServer

BASELINE_SCHEMA = "baseline"
COLUMNS = ("id", "trigger_name", "database_name", "db_type", "table_name", "doc_id",
           "event_type", "status", "attempts", "head", "next_attempt_at", "created_at",
           "updated_at", "payload")


def make_events(n: int, trigger: str = "t", doc_ids: int | None = None) -> list[Event]:
    """Events like the engine makes them: uuid ids, a CloudEvents JSON payload."""
    out = []
    now = "2024-01-01T00:00:00.000Z"
    for i in range(n):
        id_ = str(uuid.uuid4())
        doc_id = str(i if doc_ids is None else i % doc_ids)
        body = {"specversion": "1.0", "id": id_, "type": "DB_INSERT",
                "source": "6f1c1c0e-8a3f-5b7e-9d2a-3c4b5d6e7f80", "time": now,
                "datacontenttype": "application/json",
                "data": {"db": "sql-postgres", "database": "app", "col": "orders",
                         "docId": doc_id, "doc": {"id": i, "customer": f"c{i % 977}",
                                                  "total": "123.45", "status": "new",
                                                  "created_at": now}}}
        out.append(Event(id=id_, trigger=trigger, database="app", db_type="sql-postgres",
                         table="orders", doc_id=doc_id, type="DB_INSERT",
                         payload=json.dumps(body, separators=(",", ":")).encode()))
    return out


def batches(events: Sequence[Event], size: int) -> list[Sequence[Event]]:
    return [events[i:i + size] for i in range(0, len(events), size)]


def delivered(ev: Event) -> Finish:
    attempt = Attempt(event_id=ev.id, number=ev.attempts + 1, started_at=datetime.now(UTC),
                      duration_ms=3.2, ok=True, status_code=200, response_body="ok",
                      request_headers={"content-type": "application/json",
                                       "webhook-id": ev.id, "webhook-signature": "***"})
    return Finish(ev.id, attempt, Status.DELIVERED)


def rows(chunk: Sequence[Event], now: datetime) -> list[tuple[Any, ...]]:
    return [(e.id, e.trigger, e.database, e.db_type, e.table, e.doc_id, e.type, "pending", 0,
             True, now, now, now, e.payload) for e in chunk]


async def open_store(url: str, schema: str) -> PostgresStore:
    store = PostgresStore(StoreSettings(url=f"{url}?schema={schema}"))
    await store.open()
    return store


# -- baselines: the same rows into an equivalent table, without the store ------------
async def baseline_table(conn: psycopg.AsyncConnection[Any], name: str) -> sql.Composed:
    """The store's own DDL in a schema of its own: same columns, same indexes."""
    await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    for statement in MIGRATIONS[0]:
        await conn.execute(render(statement, name))
    return sql.SQL("{}.events").format(sql.Identifier(name))


async def checkpoint(conn: psycopg.AsyncConnection[Any], schema: str, i: int) -> None:
    await conn.execute(render(
        "INSERT INTO {schema}.checkpoints VALUES ('app', %s, now()) ON CONFLICT (source) "
        "DO UPDATE SET position = excluded.position", schema), (str(i),))


async def baseline_executemany(url: str, chunks: list[Sequence[Event]]) -> float:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        table = await baseline_table(conn, BASELINE_SCHEMA)
        query = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (id) DO NOTHING").format(
            table, sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
            sql.SQL(", ").join(sql.Placeholder(format="b") * len(COLUMNS)))
        started = time.perf_counter()
        for i, chunk in enumerate(chunks):
            async with conn.transaction():
                async with conn.cursor() as cur:
                    await cur.executemany(query, rows(chunk, datetime.now(UTC)))
                await checkpoint(conn, BASELINE_SCHEMA, i)
        return time.perf_counter() - started


async def baseline_copy(url: str, chunks: list[Sequence[Event]]) -> float:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        table = await baseline_table(conn, BASELINE_SCHEMA)
        cols = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
        await conn.execute(sql.SQL(
            "CREATE TEMP TABLE staging (LIKE {} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        ).format(table))
        # LIKE copies the generated and identity columns' definitions: drop them.
        for column in ("seq", "row_key", "due_at"):
            await conn.execute(sql.SQL("ALTER TABLE staging DROP COLUMN {}").format(
                sql.Identifier(column)))
        copy = sql.SQL("COPY staging ({}) FROM STDIN (FORMAT BINARY)").format(cols)
        insert = sql.SQL("INSERT INTO {} ({}) SELECT {} FROM staging ON CONFLICT (id) "
                         "DO NOTHING").format(table, cols, cols)
        types = ["text"] * 7 + ["text", "int4", "bool", "timestamptz", "timestamptz",
                                "timestamptz", "bytea"]
        started = time.perf_counter()
        for i, chunk in enumerate(chunks):
            async with conn.transaction():
                async with conn.cursor() as cur, cur.copy(copy) as cp:
                    cp.set_types(types)
                    for row in rows(chunk, datetime.now(UTC)):
                        await cp.write_row(row)
                await conn.execute(insert)
                await checkpoint(conn, BASELINE_SCHEMA, i)
        return time.perf_counter() - started


async def baseline_unnest(url: str, chunks: list[Sequence[Event]]) -> float:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        table = await baseline_table(conn, BASELINE_SCHEMA)
        query = sql.SQL(
            "INSERT INTO {} (id, trigger_name, database_name, db_type, table_name, doc_id, "
            "event_type, status, attempts, head, next_attempt_at, created_at, updated_at, "
            "payload) SELECT i, t, d, dt, tb, doc, ty, 'pending', 0, true, %(now)b, %(now)b, "
            "%(now)b, p FROM unnest(%(i)b::text[], %(t)b::text[], %(d)b::text[], "
            "%(dt)b::text[], %(tb)b::text[], %(doc)b::text[], %(ty)b::text[], "
            "%(p)b::bytea[]) AS u(i, t, d, dt, tb, doc, ty, p) ON CONFLICT (id) DO NOTHING"
        ).format(table)
        started = time.perf_counter()
        for i, chunk in enumerate(chunks):
            async with conn.transaction():
                await conn.execute(query, {
                    "now": datetime.now(UTC), "i": [e.id for e in chunk],
                    "t": [e.trigger for e in chunk], "d": [e.database for e in chunk],
                    "dt": [e.db_type for e in chunk], "tb": [e.table for e in chunk],
                    "doc": [e.doc_id for e in chunk], "ty": [e.type for e in chunk],
                    "p": [e.payload for e in chunk]})
                await checkpoint(conn, BASELINE_SCHEMA, i)
        return time.perf_counter() - started


# -- the store ----------------------------------------------------------------------
async def bench_enqueue(store: PostgresStore, chunks: list[Sequence[Event]]) -> float:
    started = time.perf_counter()
    for i, chunk in enumerate(chunks):
        await store.enqueue(chunk, {"app": Position(str(i))})
    return time.perf_counter() - started


async def drain(store: PostgresStore, batch: int) -> int:
    done = 0
    while True:
        claimed = await store.claim({"t": batch}, 60.0, datetime.now(UTC))
        if not claimed:
            return done
        await store.finish([delivered(ev) for ev in claimed])
        done += len(claimed)


async def bench_cycles(store: PostgresStore, chunks: list[Sequence[Event]]) -> float:
    started = time.perf_counter()
    for i, chunk in enumerate(chunks):
        await store.enqueue(chunk, {"app": Position(str(i))})
        claimed = await store.claim({"t": len(chunk)}, 60.0, datetime.now(UTC))
        await store.finish([delivered(ev) for ev in claimed])
    return time.perf_counter() - started


async def bench_hot_row(url: str, backlog: int, batch: int) -> tuple[float, int]:
    """One row with ``backlog`` events queued behind its in-flight head, then
    ``batch`` events of other rows: a claim must not wade through the row."""
    store = await open_store(url, "hot")
    try:
        for chunk in batches(make_events(backlog, doc_ids=1), 5000):
            await store.enqueue(chunk, {})
        await store.claim({"t": 1}, 60.0, datetime.now(UTC))  # the row's head is in flight
        await store.enqueue(make_events(batch), {})
        started = time.perf_counter()
        claimed = await store.claim({"t": batch}, 60.0, datetime.now(UTC))
        return time.perf_counter() - started, len(claimed)
    finally:
        await store.close()


async def run(url: str, n: int, size: int, hot_row: int) -> None:
    events = make_events(n)
    chunks = batches(events, size)
    print(f"payload: {sum(len(e.payload) for e in events) // n} bytes on average")

    base = {"executemany (pipeline)": await baseline_executemany(url, chunks),
            "COPY + INSERT SELECT": await baseline_copy(url, chunks),
            "INSERT SELECT unnest()": await baseline_unnest(url, chunks)}

    store = await open_store(url, "bench")
    try:
        took = await bench_enqueue(store, chunks)
        started = time.perf_counter()
        drained = await drain(store, size)
        drain_one = time.perf_counter() - started
    finally:
        await store.close()

    # Two workers (two stores, two pools) draining one backlog together.
    store = await open_store(url, "bench2")
    other = await open_store(url, "bench2")
    try:
        await bench_enqueue(store, chunks)
        started = time.perf_counter()
        counts = await asyncio.gather(drain(store, size), drain(other, size))
        drain_two = time.perf_counter() - started
    finally:
        await store.close()
        await other.close()

    cycle_chunks = chunks[: max(1, len(chunks) // 4)]
    cycle_events = sum(len(c) for c in cycle_chunks)
    store = await open_store(url, "cycles")
    try:
        cycles = await bench_cycles(store, cycle_chunks)
    finally:
        await store.close()
    hot, hot_claimed = await bench_hot_row(url, hot_row, size)

    rate = n / took
    print()
    for name, elapsed in base.items():
        print(f"baseline {name:<24} {n / elapsed:>10,.0f} rows/s")
    best_name, best = min(base.items(), key=lambda kv: kv[1])
    print(f"enqueue (PostgresStore)           {rate:>10,.0f} events/s")
    print(f"ratio store / fastest baseline    {rate / (n / best):>10.2f}  ({best_name})")
    print(f"claim -> finish, 1 worker         {drained / drain_one:>10,.0f} events/s")
    print(f"claim -> finish, 2 workers        {sum(counts) / drain_two:>10,.0f} events/s "
          f"({counts[0]} + {counts[1]})")
    print(f"enqueue -> claim -> finish        {len(cycle_chunks) / cycles:>10,.1f} cycles/s of "
          f"{size} events = {cycle_events / cycles:,.0f} events/s")
    print(f"claim behind a {hot_row}-event row  {hot * 1000:>8.1f} ms for {hot_claimed} events")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--hot-row", type=int, default=100_000,
                        help="events queued behind one row's head for the claim test")
    parser.add_argument("--durable", action="store_true",
                        help="fsync on (the test server's default is off)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    settings = {"fsync": True, "full_page_writes": True} if args.durable else {}
    with PostgresServer(settings) as server:
        version = server.execute("SHOW server_version")[0][0]
        fsync = server.execute("SHOW fsync")[0][0]
        print(f"PostgreSQL {version} (fsync {fsync}), psycopg {psycopg.__version__} "
              f"({psycopg.pq.__impl__}), Python {sys.version.split()[0]}; {args.events} events, "
              f"batches of {args.batch}")
        url = server.dsn(server.create_database("bench"))
        asyncio.run(run(url, args.events, args.batch, args.hot_row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
