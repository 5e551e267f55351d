"""Fixtures for the PostgreSQL source tests: a fresh database on the session's
private PostgreSQL (wal_level = logical) and helpers to run sources on it."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
from dbevents import Change, ChangeBatch, Position, SourceSettings
from dbevents_source_postgres import PostgresOptions, PostgresSource

from testsupport.servers import PostgresServer


class Reader:
    """One ``changes()`` iteration, read in steps."""

    def __init__(self, source: PostgresSource, since: Position | None) -> None:
        self.source = source
        self._it = source.changes(since).__aiter__()
        self.batches: list[ChangeBatch] = []
        self.changes: list[Change] = []

    @property
    def checkpoints(self) -> list[Position]:
        return [b.checkpoint for b in self.batches if b.checkpoint is not None]

    async def next_batch(self, within: float = 20.0) -> ChangeBatch:
        batch = await asyncio.wait_for(self._it.__anext__(), within)
        self.batches.append(batch)
        self.changes.extend(batch.changes)
        return batch

    async def until(self, n: int, within: float = 20.0, confirm: bool = False
                    ) -> list[Change]:
        """Read until ``n`` changes in all and a batch that ends at a commit."""

        async def pull() -> None:
            while True:
                batch = await self.next_batch(within)
                if confirm and batch.checkpoint is not None:
                    await self.source.confirm(batch.checkpoint)
                if len(self.changes) >= n and batch.checkpoint is not None:
                    return

        await asyncio.wait_for(pull(), within)
        return self.changes

    async def close(self) -> None:
        await self._it.aclose()  # type: ignore[attr-defined]


class PgEnv:
    """A fresh database; sources made here are closed after the test."""

    def __init__(self, server: PostgresServer, dbname: str) -> None:
        self.server = server
        self.dbname = dbname
        self._sources: list[PostgresSource] = []
        self._readers: list[Reader] = []

    @property
    def url(self) -> str:
        return self.server.dsn(self.dbname)

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
                ) -> list[tuple[Any, ...]]:
        return self.server.execute(sql, params, dbname=self.dbname)

    def source(self, tables: Sequence[str] | None = None, operations: Sequence[str] = (),
               url: str | None = None, name: str | None = None,
               lease_held: Callable[[], bool] | None = None,
               **options: Any) -> PostgresSource:
        """``lease_held``: the source reads for a capture lease holder."""
        settings = SourceSettings(
            name=name or self.dbname, url=url or self.url,
            options=PostgresOptions(**options) if options else None,
            tables=frozenset(tables) if tables is not None else None,
            operations=frozenset(operations),
            leased=lease_held is not None, lease_held=lease_held)
        source = PostgresSource(settings)
        self._sources.append(source)
        return source

    async def started(self, **kwargs: Any) -> PostgresSource:
        source = self.source(**kwargs)
        await source.start()
        return source

    def reader(self, source: PostgresSource, since: Position | None = None) -> Reader:
        reader = Reader(source, since)
        self._readers.append(reader)
        return reader

    def slot(self, source: PostgresSource) -> dict[str, Any]:
        rows = self.server.execute(
            "SELECT active, active_pid, confirmed_flush_lsn::text, restart_lsn::text"
            " FROM pg_replication_slots WHERE slot_name = %s", (source.slot,))
        if not rows:
            return {}
        active, pid, confirmed, restart = rows[0]
        return {"active": active, "pid": pid, "confirmed": confirmed, "restart": restart}

    def wait_slot_released(self, slot: str, within: float = 10.0) -> None:
        """Until no session holds ``slot``. A closed replication connection's
        walsender exits (and releases the slot) a moment later, and
        pg_drop_replication_slot does not wait for that: it fails while active."""
        deadline = time.monotonic() + within
        while True:
            rows = self.server.execute(
                "SELECT active, active_pid FROM pg_replication_slots WHERE slot_name = %s",
                (slot,))
            if not rows or not rows[0][0]:
                return
            assert time.monotonic() < deadline, \
                f"slot {slot} still held by pid {rows[0][1]} after {within} s"
            time.sleep(0.05)

    def current_lsn(self) -> str:
        return str(self.execute("SELECT pg_current_wal_lsn()::text")[0][0])

    async def close(self) -> None:
        for reader in self._readers:
            # A reader may already have failed; closing is best effort.
            with contextlib.suppress(Exception):
                await reader.close()
        for source in self._sources:
            await source.close()


@pytest.fixture
async def pg(postgres_server: PostgresServer, pg_database: str) -> AsyncIterator[PgEnv]:
    env = PgEnv(postgres_server, pg_database)
    yield env
    await env.close()



@pytest.fixture
def role(pg: PgEnv) -> Iterator[str]:
    """A login role without privileges; dropped afterwards."""
    name = f"r_{uuid.uuid4().hex[:10]}"
    pg.server.execute(f"CREATE ROLE {name} LOGIN")
    yield name
    pg.server.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
    pg.execute(f"DROP OWNED BY {name}")
    pg.server.execute(f"DROP ROLE {name}")


class Proxy:
    """A TCP proxy in front of the server, to cut the network in the middle of
    a session: ``cut()`` drops every connection and refuses new ones,
    ``resume()`` accepts again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def resume(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
async def proxy(postgres_server: PostgresServer) -> AsyncIterator[Proxy]:
    p = Proxy(postgres_server.port)
    await p.resume()
    yield p
    await p.cut()
