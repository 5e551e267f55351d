"""A worker frozen (SIGSTOP, a paused VM) in the middle of a pipelined
transaction that holds the queue lock: the server waits for it for ever, so an
enqueue that waits for the lock ends that session and goes ahead when tried
again. A holder that is working, not frozen, is left alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

import psycopg
import pytest
from dbevents.errors import StoreUnavailable
from dbevents.testing import make_event
from dbevents_store_postgres import PostgresStore
from dbevents_store_postgres.eventqueue import FROZEN_AFTER
from dbevents_store_postgres.url import parse_url

from testsupport.servers import PostgresServer

OpenPg = Callable[..., Awaitable[PostgresStore]]


@pytest.fixture
def holder(postgres_server: PostgresServer, pg_store_db: str) -> Iterator[psycopg.Connection]:
    conn = postgres_server.connect(pg_store_db)
    yield conn
    conn.close()


def alive(postgres_server: PostgresServer, pid: int) -> bool:
    return bool(postgres_server.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)))


async def test_an_enqueue_ends_a_frozen_holder_of_the_queue_lock(
        open_pg: OpenPg, pg_url: str, holder: psycopg.Connection,
        postgres_server: PostgresServer) -> None:
    store = await open_pg()
    k1, k2 = parse_url(pg_url).lock_key("queue")
    # What a finish sends first, and then its client stops: no Sync follows.
    pg = holder.pgconn
    pg.enter_pipeline_mode()
    pg.send_query_params(b"BEGIN", None)
    pg.send_query_params(b"SELECT pg_advisory_xact_lock_shared($1, $2)",
                         [str(k1).encode(), str(k2).encode()])
    pg.send_flush_request()
    pg.flush()
    pid = pg.backend_pid
    while not postgres_server.execute(
            "SELECT 1 FROM pg_locks WHERE pid = %s AND locktype = 'advisory' AND granted",
            (pid,)):
        await asyncio.sleep(0.05)
    await asyncio.sleep(FROZEN_AFTER)  # silent that long: frozen
    with pytest.raises(StoreUnavailable, match="lock timeout"):
        await store.enqueue([make_event(n=1)], {})
    deadline = time.monotonic() + 30
    while alive(postgres_server, pid):  # terminated: it exits at once
        assert time.monotonic() < deadline, "the frozen session was not ended"
        await asyncio.sleep(0.05)
    assert await store.enqueue([make_event(n=1)], {}) == 1


async def test_a_working_holder_of_the_queue_lock_is_left_alone(
        open_pg: OpenPg, pg_url: str, holder: psycopg.Connection,
        postgres_server: PostgresServer) -> None:
    store = await open_pg()
    k1, k2 = parse_url(pg_url).lock_key("queue")
    pid = holder.info.backend_pid
    pg = holder.pgconn
    pg.enter_pipeline_mode()
    pg.send_query_params(b"BEGIN", None)
    pg.send_query_params(b"SELECT pg_advisory_xact_lock_shared($1, $2)",
                         [str(k1).encode(), str(k2).encode()])
    # Busy on the server (a long statement), not waiting for its client.
    pg.send_query_params(b"SELECT pg_sleep(60)", None)
    pg.send_flush_request()
    pg.flush()
    while not postgres_server.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event = 'PgSleep'", (pid,)):
        await asyncio.sleep(0.05)
    await asyncio.sleep(FROZEN_AFTER)
    with pytest.raises(StoreUnavailable, match="lock timeout"):
        await store.enqueue([make_event(n=1)], {})
    assert alive(postgres_server, pid)
    postgres_server.execute("SELECT pg_terminate_backend(%s)", (pid,))
