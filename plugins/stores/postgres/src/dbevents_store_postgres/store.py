"""PostgresStore: the eventing DB in PostgreSQL, shared by any number of
dbevents processes.

Calls go through a psycopg connection pool; each store method is one
transaction (purge: one per batch). open() does its checks on a connection of
its own first, so that what is wrong comes out as one SetupError naming it,
rather than as a pool that keeps retrying in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
import structlog
from dbevents.errors import SetupError, StoreUnavailable
from dbevents.protocols import CaptureLease, EventFilter, Problem, StoreSettings, TriggerStats
from dbevents.values import Attempt, Event, Finish, Position, Status
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from dbevents_store_postgres import diagnose, eventlog, eventqueue, leases, schema
from dbevents_store_postgres.eventqueue import Conn, Statements
from dbevents_store_postgres.notify import Listener
from dbevents_store_postgres.url import Location, parse_url

T = TypeVar("T")
log = structlog.get_logger("dbevents.store.postgres")

MIN_SERVER_VERSION = 120000  # generated columns


class PostgresStore:
    """The ``postgresql`` store. See the package README for the URL, the
    privileges it needs, leases and LISTEN/NOTIFY."""

    MIGRATIONS: tuple[schema.Step, ...] = schema.MIGRATIONS
    PURGE_BATCH = 1000  # events (and their attempts) deleted per transaction
    RETRIES = 3  # reruns of a transaction PostgreSQL rolled back (deadlock)

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.location: Location = parse_url(settings.url)
        self.worker = settings.role == "worker"
        # Written on each event this worker leases (claim, enqueue_held): who
        # holds it, for `dbevents status` (CountsInFlight) and people reading the
        # table. The engine names its capture leases with it too.
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._q = Statements(self.location)
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._instance = ""
        self._listener = Listener(self.location)
        self._pool_check: asyncio.Task[None] | None = None
        # source -> (holder, token) of the capture leases this instance took:
        # every write of those sources is fenced by them.
        self._fences: dict[str, tuple[str, int]] = {}

    # -- lifecycle ---------------------------------------------------------
    async def open(self) -> None:
        if self._pool is not None:
            return
        loc = self.location
        try:
            conn = await psycopg.AsyncConnection.connect(loc.conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise diagnose.connect_error(exc, loc) from None
        try:
            migrated = await self._prepare(conn)
        except psycopg.OperationalError as exc:
            raise diagnose.connect_error(exc, loc) from None
        finally:
            await conn.close()
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            loc.conninfo, kwargs={"autocommit": True}, min_size=loc.pool_min_size,
            max_size=loc.pool_max_size, timeout=loc.pool_timeout, open=False,
            configure=_configure, name=f"dbevents-{loc.schema}")
        try:
            await pool.open(wait=True, timeout=loc.pool_timeout)
        except PoolTimeout:
            await pool.close()
            raise SetupError(
                f"the eventing DB {loc.display} at {loc.where} accepted one connection but "
                f"the pool could not open {loc.pool_min_size} within {loc.pool_timeout:g}s; "
                "check the server's max_connections and its log") from None
        self._pool = pool
        log.info("eventing DB ready", store=loc.display, schema=loc.schema,
                 version=len(self.MIGRATIONS), migrated_from=migrated, role=self.settings.role)
        if self._listener.wakers:
            self._listener.start()

    async def preflight(self) -> list[Problem]:
        """For `dbevents check --connect`: what open() checks (reachable, writable,
        version, the right to create the schema or the grants on it), creating and
        migrating nothing."""
        loc = self.location
        try:
            conn = await psycopg.AsyncConnection.connect(loc.conninfo, autocommit=True)
        except psycopg.Error as exc:
            return [Problem(str(diagnose.connect_error(exc, loc)))]
        problems: list[SetupError] = []
        try:
            row = await (await conn.execute(
                "SELECT pg_is_in_recovery(), current_setting('transaction_read_only'), "
                "current_setting('server_version_num')::int, "
                "has_database_privilege(current_database(), 'CREATE'), "
                "(SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename = ANY(%s))",
                (loc.schema, list(schema.TABLES)))).fetchone()
            assert row is not None
            in_recovery, read_only, server_version, may_create, tables = row
            if in_recovery or read_only == "on":
                problems.append(diagnose.read_only(loc, in_recovery))
            if server_version < MIN_SERVER_VERSION:
                problems.append(SetupError(
                    f"the eventing DB {loc.display} runs PostgreSQL "
                    f"{server_version // 10000}; dbevents needs 12 or newer"))
            exists = await (await conn.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s", (loc.schema,))).fetchone()
            if exists is None and not may_create:
                problems.append(diagnose.cannot_create_schema(
                    loc, psycopg.errors.InsufficientPrivilege("permission denied for database")))
            elif tables == len(schema.TABLES):
                grants = await schema.missing_privileges(conn, loc)
                if grants:
                    problems.append(diagnose.missing_grants(loc, grants))
        except psycopg.Error as exc:
            problems.append(diagnose.connect_error(exc, loc))
        finally:
            await conn.close()
        return [Problem(str(p)) for p in problems]

    async def _prepare(self, conn: Conn) -> int | None:
        """Checks, schema creation or migration, privileges, instance id."""
        loc = self.location
        row = await (await conn.execute(
            "SELECT pg_is_in_recovery(), current_setting('transaction_read_only'), "
            "current_setting('server_version_num')::int")).fetchone()
        assert row is not None
        in_recovery, read_only, server_version = row
        if in_recovery or read_only == "on":
            raise diagnose.read_only(loc, in_recovery)
        if server_version < MIN_SERVER_VERSION:
            raise SetupError(f"the eventing DB {loc.display} runs PostgreSQL "
                             f"{server_version // 10000}; dbevents needs 12 or newer")
        try:
            migrated = await schema.migrate(conn, loc, self.MIGRATIONS)
            if migrated is not None:
                log.info("eventing DB schema migrated", store=loc.display, schema=loc.schema,
                         from_version=migrated, to_version=len(self.MIGRATIONS))
            grants = await schema.missing_privileges(conn, loc)
            if grants:
                raise diagnose.missing_grants(loc, grants)
            self._instance = await schema.instance_id(conn, loc)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise await self._privilege_error(conn, exc) from None
        except psycopg.errors.ReadOnlySqlTransaction:
            raise diagnose.read_only(loc, in_recovery=False) from None
        except psycopg.OperationalError:
            raise  # the connection went: open() says so
        except psycopg.Error as exc:
            # A migration step failed: its transaction rolled back whole.
            raise SetupError(
                f"preparing the eventing DB {loc.display} (schema {loc.schema!r}) for schema "
                f"version {len(self.MIGRATIONS)} failed, and nothing was changed: "
                f"{diagnose.short(exc)}") from exc
        return migrated

    async def _privilege_error(self, conn: Conn, exc: psycopg.Error) -> SetupError:
        loc = self.location
        row = await (await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                                        (loc.schema,))).fetchone()
        if row is None:
            return diagnose.cannot_create_schema(loc, exc)
        grants = await schema.missing_privileges(conn, loc)
        if grants:
            return diagnose.missing_grants(loc, grants)
        return diagnose.cannot_migrate(loc, exc)

    async def close(self) -> None:
        await self._listener.stop()
        task, self._pool_check = self._pool_check, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=5.0)

    # -- running calls ---------------------------------------------------------
    async def _run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``fn(conn, statements, *args)`` on a pooled connection. A lost
        connection or a server that is down becomes StoreUnavailable, which the
        engine retries; the pool is then checked so that the retry finds live
        connections."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable(f"the eventing DB {self.location.display} is not open")
        attempt = 0
        while True:
            try:
                async with pool.connection() as conn:
                    return await fn(conn, self._q, *args)
            except psycopg.errors.TransactionRollback as exc:
                # A deadlock between two finishes of one row (a lease that ran out
                # while its attempt went on): rolled back whole, so run it again.
                attempt += 1
                if attempt > self.RETRIES:
                    raise StoreUnavailable(f"eventing DB {self.location.display}: "
                                           f"{diagnose.short(exc)}") from exc
                log.info("transaction rolled back by the server; running it again",
                         error=diagnose.short(exc), attempt=attempt)
            except psycopg.OperationalError as exc:
                self._check_pool()
                raise StoreUnavailable(f"eventing DB {self.location.display}: "
                                       f"{diagnose.short(exc)}") from exc

    def _check_pool(self) -> None:
        """After one connection failed the others are suspect too (a server
        restart drops them all): have the pool test its idle connections."""
        pool = self._pool
        if pool is None or (self._pool_check is not None and not self._pool_check.done()):
            return

        async def check() -> None:
            with contextlib.suppress(Exception):
                await pool.check()

        self._pool_check = asyncio.get_running_loop().create_task(check())

    # -- the queue -------------------------------------------------------------
    async def instance_id(self) -> str:
        return self._instance

    async def checkpoint(self, source: str) -> Position | None:
        return await self._run(eventlog.checkpoint, source)

    async def enqueue(self, events: Sequence[Event], checkpoints: Mapping[str, Position]) -> int:
        if not events and not checkpoints:
            return 0
        return await self._run(eventqueue.enqueue, events, checkpoints, _now(), self._fences)

    async def enqueue_held(self, events: Sequence[Event], checkpoints: Mapping[str, Position],
                           lease_seconds: float) -> list[Event]:
        if not events and not checkpoints:
            return []
        return await self._run(eventqueue.enqueue_held, events, checkpoints, lease_seconds,
                               _now(), self.worker_id, self._fences)

    # -- capture leases ---------------------------------------------------------
    async def acquire_capture(self, source: str, holder: str, ttl: float) -> int | None:
        token = await self._run(leases.acquire, source, holder, ttl)
        if token is not None:
            self._fences[source] = (holder, token)
        return token

    async def renew_capture(self, source: str, holder: str, token: int, ttl: float) -> bool:
        return await self._run(leases.renew, source, holder, token, ttl)

    async def release_capture(self, source: str, holder: str, token: int) -> None:
        await self._run(leases.release, source, holder, token)

    async def capture_leases(self) -> list[CaptureLease]:
        return await self._run(leases.list_leases)

    async def renew(self, event_ids: Sequence[str], lease_seconds: float) -> list[str]:
        if not event_ids:
            return []
        return await self._run(eventqueue.renew, event_ids, lease_seconds, _now(),
                               self.worker_id)

    async def claim(self, limits: Mapping[str, int], lease_seconds: float,
                    now: datetime) -> list[Event]:
        wanted = {t: n for t, n in limits.items() if n > 0}
        if not wanted:
            return []
        return await self._run(eventqueue.claim, wanted, lease_seconds, now, self.worker_id)

    async def finish(self, results: Sequence[Finish]) -> None:
        if results:
            await self._run(eventqueue.finish, results, _now(), self.worker_id)

    async def release(self, event_ids: Sequence[str]) -> None:
        """This store's own claims only: a claim another worker took over after
        the lease ran out is that worker's now."""
        if event_ids:
            await self._run(eventqueue.release, event_ids, _now(), self.worker_id)

    async def next_due(self) -> datetime | None:
        return await self._run(eventqueue.next_due)

    def subscribe(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever any process enqueues, releases or redelivers
        (LISTEN on a connection of its own). Workers only: a CLI command has
        nothing to wake."""
        if not self.worker:
            return
        self._listener.add(wake)
        if self._pool is not None:
            self._listener.start()

    # -- the log ----------------------------------------------------------------
    async def list_events(self, flt: EventFilter) -> list[Event]:
        return await self._run(eventlog.list_events, flt)

    async def get_event(self, event_id: str) -> Event | None:
        return await self._run(eventlog.get_event, event_id)

    async def find_event_ids(self, prefix: str, limit: int) -> list[str]:
        return await self._run(eventlog.find_event_ids, prefix, limit)

    async def attempts(self, event_id: str) -> list[Attempt]:
        return await self._run(eventlog.attempts, event_id)

    async def redeliver(self, ids: Sequence[str] | None, status: Status | None,
                        trigger: str | None) -> int:
        return await self._run(eventlog.redeliver, ids, status, trigger, _now())

    async def purge(self, before: datetime, statuses: Sequence[Status],
                    trigger: str | None = None) -> int:
        """Delivered/failed events last updated before ``before``, with their
        attempts, PURGE_BATCH per transaction so that workers' writes get in
        between. Active events are never purged."""
        total = 0
        while True:
            n = await self._run(eventlog.purge_batch, before, statuses, self.PURGE_BATCH,
                                trigger)
            total += n
            if n < self.PURGE_BATCH:
                return total

    async def stats(self) -> list[TriggerStats]:
        return await self._run(eventlog.stats)

    async def checkpoints(self) -> dict[str, Position]:
        return await self._run(eventlog.checkpoints)

    async def in_flight(self) -> dict[str, int]:
        return await self._run(eventlog.in_flight)

    async def set_trigger_paused(self, trigger: str, since: datetime | None) -> None:
        await self._run(eventlog.set_trigger_paused, trigger, since)

    async def paused_triggers(self) -> dict[str, datetime]:
        return await self._run(eventlog.paused_triggers)


async def _configure(conn: Conn) -> None:
    """Settings of every pooled connection.

    Bitmap scans off: the queue's statements walk indexes in order and stop
    early, where a bitmap scan fetches everything that matches first (see
    eventqueue). A session left idle inside a transaction (a worker frozen
    half-way through a finish) would hold the queue lock and stop every
    enqueue, and a capture holder frozen in the middle of an enqueue would hold
    its lease row against a takeover: the server ends it after 5 s. The
    store's own transactions never wait on the client.
    """
    await conn.execute("SET enable_bitmapscan = off; "
                       "SET idle_in_transaction_session_timeout = '5s'")


def _now() -> datetime:
    return datetime.now(UTC)
