"""Fixtures for the PostgreSQL store tests, on the session's private server.

Most tests get a schema of their own in one shared database (``?schema=`` in
the store URL), which is much quicker than a database each; tests that change
database-wide settings use the ``pg_database`` fixture instead.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from dbevents.protocols import StoreSettings
from dbevents_store_postgres import PostgresStore

from testsupport.servers import PostgresServer

OpenPg = Callable[..., Awaitable[PostgresStore]]


@pytest.fixture(scope="session")
def pg_store_db(postgres_server: PostgresServer) -> Iterator[str]:
    name = postgres_server.create_database(f"stores_{uuid.uuid4().hex[:8]}")
    yield name
    postgres_server.drop_database(name)


@pytest.fixture
def pg_schema() -> str:
    return f"ev_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def pg_url(postgres_server: PostgresServer, pg_store_db: str, pg_schema: str) -> str:
    """A store URL of a schema no other test uses."""
    return f"{postgres_server.dsn(pg_store_db)}?schema={pg_schema}"


@pytest.fixture
async def open_pg(pg_url: str) -> AsyncIterator[OpenPg]:
    """``await open_pg(role="worker", url=pg_url, cls=PostgresStore)``: an opened
    store; every store opened is closed afterwards."""
    opened: list[PostgresStore] = []

    async def open_(role: str = "worker", url: str | None = None,
                    cls: type[PostgresStore] = PostgresStore) -> PostgresStore:
        store = cls(StoreSettings(url=url or pg_url, role=role))
        await store.open()
        opened.append(store)
        return store

    yield open_
    for store in reversed(opened):
        await store.close()


Exec = Callable[..., list[tuple[object, ...]]]


@pytest.fixture
def pg_exec(postgres_server: PostgresServer, pg_store_db: str) -> Exec:
    """``pg_exec(sql, params)``: one statement as the superuser on the shared
    database, outside any store."""

    def run(sql: str, params: object = None) -> list[tuple[object, ...]]:
        return postgres_server.execute(sql, params, dbname=pg_store_db)  # type: ignore[arg-type]

    return run


@pytest.fixture
def check_heads(pg_exec: Exec, pg_schema: str) -> Callable[[], None]:
    """Assert the store's bookkeeping: the oldest active event of every row is
    its head, and no finished event is one."""

    def check() -> None:
        headless = pg_exec(
            f"SELECT DISTINCT ON (trigger_name, row_key) trigger_name, doc_id, seq, head "
            f"FROM {pg_schema}.events WHERE status IN ('pending', 'delivering') "
            f"ORDER BY trigger_name, row_key, seq")
        assert [r for r in headless if not r[3]] == []
        finished = pg_exec(f"SELECT seq FROM {pg_schema}.events "
                           "WHERE head AND status IN ('delivered', 'failed')")
        assert finished == []

    return check
