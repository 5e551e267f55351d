"""Fixtures for the mysql source tests: a database on the session's private MariaDB
(testsupport), a second private server the tests may restart and reconfigure, and
helpers that read a source the way the engine does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pymysql
import pytest
from dbevents import Change, ChangeBatch, Position, SourceSettings
from dbevents_source_mysql import MysqlOptions, MysqlSource

from testsupport.fixtures import unique_name
from testsupport.servers import MariaDBServer

TIMEOUT = 20.0


def position(server: MariaDBServer) -> str:
    file, pos = server.execute("SHOW MASTER STATUS")[0][:2]
    return f"{file}:{pos}"


class MysqlEnv:
    """One fresh database with a table ``items``; sources made here start reading
    at the binlog position the database had when it was made."""

    def __init__(self, server: MariaDBServer, database: str) -> None:
        self.server = server
        self.database = database
        self._conn: Any = None
        self.execute("CREATE TABLE items (id INT AUTO_INCREMENT PRIMARY KEY, "
                     "name VARCHAR(100) NOT NULL)")
        self.start = position(server)
        self.sources: list[MysqlSource] = []

    def execute(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """One statement, autocommit, on a connection kept open (connecting is the
        slow part on a busy machine)."""
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = self.server.connect(self.database)
            try:
                with self._conn.cursor() as cur:
                    cur.execute(sql, params)
                    return list(cur.fetchall()) if cur.description else []
            except pymysql.err.OperationalError:
                self.close()  # e.g. the server restarted: connect again, once
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def settings(self, name: str = "app", url: str | None = None,
                 tables: frozenset[str] | None = None,
                 operations: frozenset[str] = frozenset(), **options: Any) -> SourceSettings:
        options.setdefault("start", self.start)
        return SourceSettings(name=name, url=url or self.server.dsn(self.database),
                              options=MysqlOptions(**options), tables=tables,
                              operations=operations)

    def make_source(self, **kwargs: Any) -> MysqlSource:
        source = MysqlSource(self.settings(**kwargs))
        self.sources.append(source)
        return source

    async def write(self, n: int) -> None:
        """``n`` single-row INSERTs, each its own transaction (autocommit)."""
        def run() -> None:
            conn = self.server.connect(self.database)
            try:
                with conn.cursor() as cur:
                    for i in range(n):
                        cur.execute("INSERT INTO items (name) VALUES (%s)", (f"item {i}",))
            finally:
                conn.close()
        await asyncio.to_thread(run)

    async def update_and_delete(self) -> None:
        """In one transaction: update the first row ``write`` inserted, delete the
        second (the server logs full row images, so the update carries ``old``)."""
        def run() -> None:
            conn = self.server.connect(self.database)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT id FROM items ORDER BY id LIMIT 2")
                    first, second = (row[0] for row in cur.fetchall())
                    cur.execute("BEGIN")
                    cur.execute("UPDATE items SET name = 'renamed' WHERE id = %s", (first,))
                    cur.execute("DELETE FROM items WHERE id = %s", (second,))
                    cur.execute("COMMIT")
            finally:
                conn.close()
        await asyncio.to_thread(run)


@pytest.fixture
async def mysql_env(mariadb_server: MariaDBServer,
                    mariadb_database: str) -> AsyncIterator[MysqlEnv]:
    env = MysqlEnv(mariadb_server, mariadb_database)
    yield env
    for source in env.sources:
        await source.close()
    env.close()


@pytest.fixture(scope="session")
def private_server() -> Iterator[MariaDBServer]:
    """A MariaDB of these tests' own: restarted, reconfigured and purged by them."""
    server = MariaDBServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def private_env(private_server: MariaDBServer) -> AsyncIterator[MysqlEnv]:
    database = private_server.create_database(unique_name("my"))
    env = MysqlEnv(private_server, database)
    yield env
    for source in env.sources:
        await source.close()
    env.close()
    if private_server.running:
        private_server.drop_database(database)


class Reading:
    """A source's changes() iterated in the background, like the engine does."""

    def __init__(self, source: MysqlSource, since: Position | None) -> None:
        self.source = source
        self.batches: list[ChangeBatch] = []
        self.changes: list[Change] = []
        self._new = asyncio.Event()
        self._task = asyncio.create_task(self._run(since))

    async def _run(self, since: Position | None) -> None:
        try:
            async for batch in self.source.changes(since):
                self.batches.append(batch)
                self.changes.extend(batch.changes)
                self._new.set()
        finally:
            self._new.set()  # a waiter sees the end, and the error

    @property
    def checkpoint(self) -> Position | None:
        return next((b.checkpoint for b in reversed(self.batches) if b.checkpoint), None)

    async def wait_for(self, n: int) -> list[Change]:
        """Until ``n`` changes arrived and a checkpoint followed the last of them
        (callers write a last marker row so that anything not wanted before it would
        have arrived by then)."""
        async def until() -> None:
            while True:
                if self._task.done():
                    self._task.result()  # the reader's error, if any
                    raise AssertionError("the source stopped")
                if len(self.changes) >= n and self.batches[-1].checkpoint is not None:
                    return
                self._new.clear()
                await self._new.wait()
        await asyncio.wait_for(until(), TIMEOUT)
        return self.changes

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def reading() -> AsyncIterator[Any]:
    """``await reading(source, since=None)`` -> a started Reading, stopped afterwards."""
    started: list[Reading] = []

    async def start(source: MysqlSource, since: Position | None = None) -> Reading:
        await source.start()
        r = Reading(source, since)
        started.append(r)
        return r

    yield start
    for r in started:
        await r.stop()
        await r.source.close()
