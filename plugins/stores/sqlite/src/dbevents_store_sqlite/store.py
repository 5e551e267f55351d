"""SqliteStore: the eventing DB in one SQLite file.

One connection, used only from one dedicated thread: every store method is
handed to that thread and awaited, so the event loop never blocks on SQLite and
no two transactions of this process ever interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog
from dbevents.errors import SetupError, StoreUnavailable
from dbevents.protocols import EventFilter, Problem, StoreSettings, TriggerStats
from dbevents.values import Attempt, Event, Finish, Position, Status

from dbevents_store_sqlite import eventlog, eventqueue, schema
from dbevents_store_sqlite.connection import BUSY_TIMEOUT, connect
from dbevents_store_sqlite.location import Location, parse_url
from dbevents_store_sqlite.lock import WorkerLock
from dbevents_store_sqlite.rows import from_us, to_us

T = TypeVar("T")
log = structlog.get_logger("dbevents.store.sqlite")


class SqliteStore:
    """The ``sqlite`` store. See the package README for URL forms, durability,
    locking and truncation."""

    PURGE_BATCH = 1000  # events (and their attempts) deleted per transaction
    WATCH_INTERVAL = 1.0  # seconds between looks for other processes' commits

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.location: Location = parse_url(settings.url, Path(settings.config_dir))
        self.worker = settings.role == "worker"
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock: WorkerLock | None = None
        self._instance = ""
        self._wakers: list[Callable[[], None]] = []
        self._watcher: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------
    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbevents-sqlite")
        try:
            migrated, released = await self._in_thread(self._open)
        except BaseException:
            await self.close()
            raise
        # A CLI command's open is routine; a worker's start is worth a line.
        line = log.info if self.worker else log.debug
        line("eventing DB ready", path=str(self.location), role=self.settings.role,
             schema=schema.latest(), created=(migrated == 0) or None,
             migrated_from=migrated or None, synchronous=self.location.synchronous,
             leases_released=released or None)
        self._start_watcher()

    async def preflight(self) -> list[Problem]:
        """For `dbevents check --connect`: what open() checks, without creating or
        migrating anything (the file is opened read-only, if it exists)."""
        return await asyncio.to_thread(self._preflight)

    def _preflight(self) -> list[Problem]:
        path = self.location.path
        if path is None:  # in memory: nothing that could be wrong yet
            return []
        try:
            _preflight(path)
        except SetupError as exc:
            return [Problem(str(exc))]
        if not path.exists():
            return []  # created by the first `dbevents run`
        try:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                version, app_id, tables = schema.read_version(conn)
                schema.check(str(self.location), version, app_id, tables)
            finally:
                conn.close()
        except SetupError as exc:
            return [Problem(str(exc))]
        except sqlite3.Error as exc:
            return [Problem(str(_open_error(exc, self.location)))]
        return []

    def _open(self) -> tuple[int | None, int]:
        """In the store's thread: checks, lock, connection, schema, leases."""
        loc = self.location
        if loc.path is not None:
            _preflight(loc.path)
            if self.worker:
                assert loc.lock_path is not None
                self._lock = WorkerLock(loc.lock_path, loc.path)
                self._lock.acquire()
        try:
            self._conn = conn = connect(loc)
            version, app_id, tables = schema.read_version(conn)
            schema.check(str(loc), version, app_id, tables)
            migrated = None
            if version < schema.latest():
                with self._migration_lock(version):
                    migrated, _ = schema.migrate(conn, str(loc))
            self._instance = schema.instance_id(conn)
            # Only one worker can hold the file, so every claim in it is a dead
            # process's: give them back now rather than when their leases run out.
            released = eventqueue.release_all(conn) if self.worker else 0
        except sqlite3.Error as exc:
            raise _open_error(exc, loc) from exc
        return migrated, released

    @contextlib.contextmanager
    def _migration_lock(self, version: int) -> Iterator[None]:
        """A CLI command migrates an existing file only while no worker runs: a
        running worker of an older release would find its tables changed."""
        loc = self.location
        if self.worker or version == 0 or loc.path is None or loc.lock_path is None:
            yield
            return
        lock = WorkerLock(loc.lock_path, loc.path)
        try:
            lock.acquire()
        except SetupError:
            raise SetupError(
                f"the eventing DB {loc} has schema version {version} and this dbevents needs "
                f"version {schema.latest()}; a running dbevents process holds it: stop it and "
                "start the upgraded one, which migrates the file") from None
        try:
            yield
        finally:
            lock.release()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # Queued behind every call already handed to the thread.
        await asyncio.get_running_loop().run_in_executor(executor, self._close_connection)
        executor.shutdown(wait=False)

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        # Only now may another worker start on the file.
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- running calls on the store's thread ----------------------------------
    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StoreUnavailable(f"the eventing DB {self.location} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` on the store's thread; a SQLite failure becomes
        StoreUnavailable, which the engine retries."""
        return await self._in_thread(self._run, fn, *args)

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._conn is None:
            raise StoreUnavailable(f"the eventing DB {self.location} is not open")
        try:
            return fn(self._conn, *args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"eventing DB {self.location}: {exc}") from exc

    # -- the queue -------------------------------------------------------------
    async def instance_id(self) -> str:
        return self._instance

    async def checkpoint(self, source: str) -> Position | None:
        return await self._call(eventlog.checkpoint, source)

    async def enqueue(self, events: Sequence[Event], checkpoints: Mapping[str, Position]) -> int:
        if not events and not checkpoints:
            return 0
        # A transaction that moves a checkpoint is flushed to disk even in
        # "normal" mode: the database is told it may forget those changes right
        # after, so this commit must survive a power cut too. Claims and results
        # (lost at worst as a redelivery) stay cheap.
        durable = bool(checkpoints) and self.location.synchronous == "normal"
        return await self._call(eventqueue.enqueue, events, checkpoints, durable)

    async def enqueue_held(self, events: Sequence[Event], checkpoints: Mapping[str, Position],
                           lease_seconds: float) -> list[Event]:
        if not events and not checkpoints:
            return []
        durable = bool(checkpoints) and self.location.synchronous == "normal"
        return await self._call(eventqueue.enqueue_held, events, checkpoints, lease_seconds,
                                durable)

    async def renew(self, event_ids: Sequence[str], lease_seconds: float) -> list[str]:
        if not event_ids:
            return []
        return await self._call(eventqueue.renew, event_ids, lease_seconds)

    async def claim(self, limits: Mapping[str, int], lease_seconds: float,
                    now: datetime) -> list[Event]:
        wanted = {t: n for t, n in limits.items() if n > 0}
        if not wanted:
            return []
        return await self._call(eventqueue.claim, wanted, lease_seconds, now)

    async def finish(self, results: Sequence[Finish]) -> None:
        if results:
            await self._call(eventqueue.finish, results)

    async def release(self, event_ids: Sequence[str]) -> None:
        if event_ids:
            await self._call(eventqueue.release, event_ids)

    async def next_due(self) -> datetime | None:
        return from_us(await self._call(eventqueue.next_due))

    def subscribe(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` when another process commits to the file (a CLI
        `events redeliver`), noticed within WATCH_INTERVAL. This process's own
        enqueues wake the dispatcher directly."""
        self._wakers.append(wake)
        self._start_watcher()

    def _start_watcher(self) -> None:
        if self._watcher is not None or not self._wakers or self._executor is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # started by open()
        self._watcher = loop.create_task(self._watch(), name="dbevents-sqlite-watch")

    async def _watch(self) -> None:
        # data_version changes only when another connection commits.
        last = await self._call(_data_version)
        while True:
            await asyncio.sleep(self.WATCH_INTERVAL)
            try:
                version = await self._call(_data_version)
            except StoreUnavailable:
                continue
            if version != last:
                last = version
                for wake in self._wakers:
                    wake()

    # -- the log ----------------------------------------------------------------
    async def list_events(self, flt: EventFilter) -> list[Event]:
        return await self._call(eventlog.list_events, flt)

    async def get_event(self, event_id: str) -> Event | None:
        return await self._call(eventlog.get_event, event_id)

    async def find_event_ids(self, prefix: str, limit: int) -> list[str]:
        return await self._call(eventlog.find_event_ids, prefix, limit)

    async def attempts(self, event_id: str) -> list[Attempt]:
        return await self._call(eventlog.attempts, event_id)

    async def redeliver(self, ids: Sequence[str] | None, status: Status | None,
                        trigger: str | None) -> int:
        return await self._call(eventlog.redeliver, ids, status, trigger)

    async def purge(self, before: datetime, statuses: Sequence[Status],
                    trigger: str | None = None) -> int:
        """Delivered/failed events last updated before ``before``, with their
        attempts, PURGE_BATCH per transaction so the worker's own writes (and
        the CLI's) get in between."""
        total = 0
        while True:
            n = await self._call(eventlog.purge_batch, to_us(before), statuses,
                                 self.PURGE_BATCH, trigger)
            total += n
            if n < self.PURGE_BATCH:
                return total

    async def stats(self) -> list[TriggerStats]:
        return await self._call(eventlog.stats)

    async def checkpoints(self) -> dict[str, Position]:
        return await self._call(eventlog.checkpoints)

    async def set_trigger_paused(self, trigger: str, since: datetime | None) -> None:
        await self._call(eventlog.set_trigger_paused, trigger,
                         None if since is None else to_us(since))

    async def paused_triggers(self) -> dict[str, datetime]:
        found = await self._call(eventlog.paused_triggers)
        return {t: moment for t, us in found.items() if (moment := from_us(us)) is not None}


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def _preflight(path: Path) -> None:
    """Clear errors for what SQLite would only report as "unable to open"."""
    folder = path.parent
    if not folder.is_dir():
        raise SetupError(
            f"the folder {folder} for the eventing DB {path} does not exist; create it "
            f"(mkdir -p {folder}) or change [eventing] store")
    if path.is_dir():
        raise SetupError(f"the eventing DB {path} is a folder; [eventing] store must name a "
                         "file, e.g. sqlite:///dbevents.db")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise SetupError(
            f"the eventing DB {path} is read-only for this user; dbevents writes to it even "
            "to show the log (WAL mode): give the user running dbevents read and write "
            "access to it, or point [eventing] store elsewhere")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SetupError(
            f"the folder {folder} is not writable by this user; SQLite creates "
            f"{path.name}-wal and {path.name}-shm next to the eventing DB {path} (and "
            f"dbevents {path.name}.lock): make the folder writable, or point [eventing] "
            "store elsewhere")


def _open_error(exc: sqlite3.Error, loc: Location) -> SetupError:
    text = str(exc)
    lowered = text.lower()
    corrupt = type(exc) is sqlite3.DatabaseError  # SQLITE_NOTADB, SQLITE_CORRUPT
    if corrupt or "not a database" in lowered or "malformed" in lowered:
        return SetupError(
            f"the eventing DB {loc} is not a SQLite database or is corrupt ({text}); restore "
            "it from a backup, or move it aside so that dbevents starts a new, empty one "
            "(its event log and checkpoints are then lost)")
    if "readonly" in lowered or "read-only" in lowered:
        return SetupError(
            f"the eventing DB {loc} cannot be written ({text}); give the user running "
            "dbevents write access to it and to its folder, or point [eventing] store elsewhere")
    if "locked" in lowered or "busy" in lowered:
        return SetupError(
            f"the eventing DB {loc} stayed locked by another process for {BUSY_TIMEOUT:g}s "
            f"({text}); try again when it is done")
    if "full" in lowered:
        return SetupError(f"the disk holding the eventing DB {loc} is full ({text})")
    return SetupError(f"cannot open the eventing DB {loc}: {text}")
