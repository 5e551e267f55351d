"""The engine: source -> matcher -> store (events + checkpoint, one transaction,
the events held for this process) -> source.confirm, with the dispatcher
delivering the stored batch from memory.

A source position is confirmed to the database only after the events up to it
and the checkpoint are committed together, so a crash at any instant loses no
change; event ids derive from the source position, so a replay after a crash
stores nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog

from dbevents.backoff import Backoff
from dbevents.config import Config, resolve_store_url
from dbevents.dispatcher import Dispatcher
from dbevents.errors import CaptureLost, ConfigError, SetupError, SourceUnavailable
from dbevents.masking import mask_dsn
from dbevents.matching import TriggerMatcher
from dbevents.observers import make_observers
from dbevents.plugins import Plugins
from dbevents.protocols import (
    LeasesCapture,
    Sink,
    Source,
    SourceSettings,
    Store,
    StoreRole,
    StoreSettings,
    capture_leasing,
    in_flight_counts,
    initial_position,
)
from dbevents.services import make_services
from dbevents.values import ChangeBatch, Event, Position, Status

log = structlog.get_logger("dbevents.engine")
T = TypeVar("T")

QUEUE_BATCHES = 8  # decoded batches buffered ahead of the store per source
MAX_CHANGES_PER_TXN = 5000  # batches coalesced into one store transaction
RETENTION_EVERY = 60.0  # seconds between retention sweeps
CAPTURE_STOP_WAIT = 10.0  # seconds a capture that lost its lease has to stop


async def _within(seconds: float, call: Awaitable[T]) -> T:
    """``call``, or TimeoutError after ``seconds``. Not asyncio.wait_for: before
    Python 3.12 it returns normally when the call completes just as the caller
    is cancelled, and the cancellation is lost."""
    async with asyncio.timeout(seconds):
        return await call


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # the lease is gone: how the capture ended no longer matters


def make_store(url: str, plugins: Plugins, config_dir: Any,
               role: StoreRole = "worker") -> Store:
    scheme = url.split("://", 1)[0].lower()
    try:
        cls = plugins.get("store", scheme)
    except KeyError:
        raise ConfigError(
            f"no store plugin handles the URL scheme {scheme!r}; installed stores: "
            f"{', '.join(plugins.names('store')) or 'none'}",
            path="eventing.store",
        ) from None
    store: Store = cls(StoreSettings(url=resolve_store_url(url, config_dir),
                                     config_dir=config_dir, role=role))
    return store


class Engine:
    def __init__(self, config: Config, plugins: Plugins, store: Store | None = None,
                 sinks: Mapping[str, Sink] | None = None) -> None:
        self.config = config
        self.plugins = plugins
        self.store = store or make_store(config.eventing.store, plugins, config.dir)
        self.matcher = TriggerMatcher(
            config.triggers,
            {name: plugins.get("matcher", name)() for name in plugins.names("matcher")},
        )
        # A store that keeps capture leases lets several processes share the
        # config: each source is captured by whichever holds its lease.
        self.leases: LeasesCapture | None = capture_leasing(self.store)
        # The store's name for this worker when it has one: one name per process
        # in `dbevents status`, for the events it holds and the leases.
        counting = in_flight_counts(self.store)
        self.holder = counting.worker_id if counting is not None else \
            f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # source -> until when (monotonic) its lease is surely this process's.
        self._lease_until: dict[str, float] = {}
        self.sinks: dict[str, Sink] = dict(sinks or {})
        for trigger in config.triggers:
            if trigger.sink not in self.sinks:
                self.sinks[trigger.sink] = plugins.get("sink", trigger.sink)()
        self.sources: dict[str, Source] = {}
        for name, db in config.databases.items():
            cls = plugins.get("source", db.type)
            self.sources[name] = cls(SourceSettings(
                name=name, url=db.url, options=db.options,
                tables=self.matcher.tables_for(name),
                operations=self.matcher.operations_for(name),
                config_dir=config.dir, leased=self.leases is not None,
                lease_held=(functools.partial(self._lease_held, name)
                            if self.leases is not None else None),
            ))
        self.dispatcher = Dispatcher(self.store, config.triggers, self.sinks)
        self.observers = self.dispatcher.observers = make_observers(config, plugins)
        self.source_id = ""
        self.captured = 0
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Run until stop(); raises SetupError when a startup check fails."""
        await self.store.open()
        opened: list[Any] = []
        try:
            # Work enqueued or redelivered by another process (a CLI command, a
            # second worker) wakes this dispatcher too.
            self.store.subscribe(self.dispatcher.notify)
            self.source_id = self.config.eventing.source_id or await self.store.instance_id()
            # Services (e.g. [admin]) start once the store is open; closed with the rest.
            # A service's wake (after a redeliver) means the store has work that
            # is not in memory: notify, so the dispatcher claims it.
            for service in make_services(self.config, self.plugins, self.store,
                                         self.dispatcher.notify, self.observers):
                await service.start()
                opened.append(service)
            # Sources captured from the start are started (slot made, position
            # anchored) before "running": a change committed after that line is
            # never skipped. With leases, those whose lease this process takes.
            held: dict[str, tuple[int, float]] = {}
            for name, source in self.sources.items():
                if self.leases is None:
                    await self._start_source(name, source)
                    opened.append(source)
                    continue
                asked = time.monotonic()
                token = await self._acquire(name, self.leases)
                if token is not None:
                    try:
                        await self._start_source(name, source)
                    except BaseException:
                        with contextlib.suppress(Exception):
                            await source.close()
                        raise
                    held[name] = (token, asked)
            for sink in self.sinks.values():
                await sink.open()
                opened.append(sink)
            log.info("running", sources=len(self.sources), triggers=len(self.config.triggers),
                     source_id=self.source_id,
                     holder=self.holder if self.leases is not None else None)
            if self.leases is None:
                tasks = [asyncio.create_task(self._capture(name, src), name=f"capture-{name}")
                         for name, src in self.sources.items()]
            else:
                tasks = [asyncio.create_task(self._hold(name, src, self.leases, held.get(name)),
                                             name=f"hold-{name}")
                         for name, src in self.sources.items()]
            tasks.append(asyncio.create_task(self._retention(), name="retention"))
            dispatch = asyncio.create_task(self.dispatcher.run(self._stop), name="dispatcher")
            stop_wait = asyncio.create_task(self._stop.wait())
            try:
                done, _ = await asyncio.wait([*tasks, dispatch, stop_wait],
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not stop_wait and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
            finally:
                self._stop.set()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                # In-flight attempts finish (bounded) and their results are recorded.
                await asyncio.gather(dispatch, return_exceptions=True)
                stop_wait.cancel()
        finally:
            for part in reversed(opened):
                with contextlib.suppress(Exception):
                    await part.close()
            with contextlib.suppress(Exception):
                await self.store.close()
            log.info("stopped", captured=self.captured, delivered=self.dispatcher.delivered,
                     failed=self.dispatcher.failed)

    async def _start_source(self, name: str, source: Source) -> None:
        await source.start()
        log.info("source ready", database=name, type=self.config.databases[name].type,
                 url=mask_dsn(self.config.databases[name].url))
        await self._anchor(name, source)

    # -- capture leases ----------------------------------------------------------
    def _lease_held(self, name: str) -> bool:
        return self._lease_until.get(name, 0.0) > time.monotonic()

    async def _acquire(self, name: str, leases: LeasesCapture) -> int | None:
        every = self.config.eventing.capture_lease / 3
        try:
            token = await _within(
                every, leases.acquire_capture(name, self.holder,
                                              self.config.eventing.capture_lease))
        except Exception as exc:  # a timeout too
            log.warning("capture lease: store unreachable; trying again", database=name,
                        error=str(exc) or type(exc).__name__, retry_in=round(every, 1))
            return None
        if token is not None:
            log.info("capture lease acquired", database=name, holder=self.holder, token=token)
        return token

    async def _hold(self, name: str, source: Source, leases: LeasesCapture,
                    first: tuple[int, float] | None) -> None:
        """Capture ``name`` only while this process holds its lease: a standby
        tries to take it every third of the ttl (delivering meanwhile, the
        dispatcher runs regardless); the holder renews it as often and stops
        capturing at once when a renewal fails or finds it taken, before the
        ttl runs out. The store fences every write with the lease's token, so a
        holder that was paused past the ttl stores and confirms nothing.
        ``first``: the lease taken at startup (token, when asked), its source
        already started."""
        every = self.config.eventing.capture_lease / 3
        waiting = False
        while True:
            if first is not None:
                (token, asked), started, first = first, True, None
            else:
                asked = time.monotonic()
                got = await self._acquire(name, leases)
                if got is None:
                    if not waiting:
                        log.info("standby: another process captures this source",
                                 database=name, holder=self.holder, retry_every=round(every, 1))
                        waiting = True
                    await asyncio.sleep(every)
                    continue
                token, started = got, False
            waiting = False
            why = await self._while_held(name, source, leases, token, asked, started)
            self.observers.source_state(name, False, why)
            log.warning("capture lease lost; capture stopped", database=name,
                        holder=self.holder, token=token, reason=why)

    async def _while_held(self, name: str, source: Source, leases: LeasesCapture,
                          token: int, asked: float, started: bool) -> str:
        """Start the source and capture until the lease is lost; returns why.
        The source is closed before returning (a replication slot freed for
        the next holder); on shutdown the lease is released for a quick
        takeover."""
        ttl = self.config.eventing.capture_lease
        every = ttl / 3
        # Counted from before the acquire was sent: never later than the store's expiry.
        valid_until = self._lease_until[name] = asked + ttl
        capture: asyncio.Task[None] | None = None
        stopping = False
        try:
            if not started:
                await self._start_source(name, source)
            capture = asyncio.create_task(self._capture(name, source), name=f"capture-{name}")
            while True:
                await asyncio.wait({capture}, timeout=every)
                if capture.done():
                    exc = capture.exception()
                    if isinstance(exc, CaptureLost):
                        return str(exc)
                    if exc is not None:
                        raise exc
                    return "capture ended"
                asked = time.monotonic()
                try:
                    kept = await _within(max(0.05, valid_until - asked - every / 2),
                                         leases.renew_capture(name, self.holder, token, ttl))
                except Exception as exc:  # a timeout too
                    return f"renewing the lease failed: {str(exc) or type(exc).__name__}"
                if not kept:
                    return "another process took the lease over"
                valid_until = self._lease_until[name] = asked + ttl
        except CaptureLost as exc:
            return str(exc)
        except asyncio.CancelledError:
            stopping = True
            raise
        finally:
            self._lease_until.pop(name, None)
            if capture is not None:
                capture.cancel()
                # Bounded: closing the source below ends whatever read is left.
                capture.add_done_callback(_retrieve)
                if not (await asyncio.wait({capture}, timeout=CAPTURE_STOP_WAIT))[0]:
                    log.warning("capture did not stop in time; closing the source",
                                database=name)
            with contextlib.suppress(Exception):
                await source.close()
            if stopping:
                with contextlib.suppress(Exception):
                    await _within(5.0, leases.release_capture(name, self.holder, token))

    async def _anchor(self, name: str, source: Source) -> None:
        """A database seen for the first time, whose source starts at "now": that
        position is stored before dbevents says it is running. Otherwise a change
        made after that line but before capture began, or before a crash that came
        first, would lie before a "now" taken later, and be skipped."""
        initial = initial_position(source)
        if initial is None:
            return
        if await self._retry_store(lambda: self.store.checkpoint(name)) is not None:
            return
        position = await initial()
        if position is not None:
            await self._retry_store(lambda: self.store.enqueue([], {name: position}))
            log.info("start position stored", database=name, position=str(position))

    # -- capture -------------------------------------------------------------
    async def _capture(self, name: str, source: Source) -> None:
        backoff = Backoff(0.5, 30.0)
        while True:
            try:
                await self._capture_once(name, source)
                return
            except (SetupError, CaptureLost):
                raise
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                kind = "unavailable" if isinstance(exc, SourceUnavailable) else "failed"
                self.observers.source_state(name, False, str(exc) or type(exc).__name__)
                delay = backoff.next()
                log.warning(f"source {kind}; restarting from the checkpoint",
                            database=name, error=str(exc), retry_in=round(delay, 1),
                            exc_info=not isinstance(exc, SourceUnavailable))
                await asyncio.sleep(delay)

    async def _capture_once(self, name: str, source: Source) -> None:
        since = await self._retry_store(lambda: self.store.checkpoint(name))
        log.info("capture starting", database=name, since=str(since) if since else None)
        self.observers.source_state(name, True)
        queue: asyncio.Queue[ChangeBatch | BaseException] = asyncio.Queue(QUEUE_BATCHES)

        async def read() -> None:
            try:
                async for batch in source.changes(since):
                    await queue.put(batch)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                await queue.put(exc)
                return
            await queue.put(EOFError())

        reader = asyncio.create_task(read(), name=f"read-{name}")
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    if isinstance(item, EOFError):
                        raise SourceUnavailable("the change stream ended")
                    raise item
                batches = [item]
                size = len(item.changes)
                # Coalesce what is already decoded into one store transaction.
                while size < MAX_CHANGES_PER_TXN and not queue.empty():
                    nxt = queue.get_nowait()
                    if isinstance(nxt, BaseException):
                        await self._store_batches(name, source, batches)
                        if isinstance(nxt, EOFError):
                            raise SourceUnavailable("the change stream ended")
                        raise nxt
                    batches.append(nxt)
                    size += len(nxt.changes)
                await self._store_batches(name, source, batches)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _store_batches(self, name: str, source: Source, batches: list[ChangeBatch]) -> None:
        started = time.perf_counter()
        changes = [c for b in batches for c in b.changes]
        checkpoint: Position | None = None
        for b in batches:
            if b.checkpoint is not None:
                checkpoint = b.checkpoint
        events = self.matcher.events(changes, self.source_id)
        cps = {name: checkpoint} if checkpoint is not None else {}
        dispatcher = self.dispatcher
        if events and dispatcher.room():
            # Stored held for this process: the dispatcher delivers them from
            # memory and the store is not read for them.
            ticket = dispatcher.ticket()
            tries = 0

            async def write() -> list[Event]:
                nonlocal tries
                tries += 1
                return await self.store.enqueue_held(events, cps, dispatcher.lease_seconds)

            try:
                held = await self._retry_store(write)
                dispatcher.hand(held, ticket)
            finally:
                dispatcher.untick(ticket)
            new = len(held)
            if new < len(events):
                # Stored behind a row's pending event, or replayed: the store
                # has them. After a retried write, also events an attempt whose
                # reply was lost stored held for us: handed back, not left to
                # wait out their lease.
                ids = {ev.id for ev in held}
                dispatcher.stored_behind([ev for ev in events if ev.id not in ids],
                                         release=tries > 1)
        elif events or cps:
            new = await self._retry_store(lambda: self.store.enqueue(events, cps))
            if events:
                # Memory is full: stored pending, delivered by claims. Not only
                # when `new`: a retried write may find its events stored by an
                # attempt whose reply was lost (new == 0), and they still wait.
                dispatcher.notify()
        else:
            new = 0
        if checkpoint is not None:
            await source.confirm(checkpoint)
        self.captured += len(changes)
        self.observers.batch(name, changes, events, new, checkpoint)
        if changes:
            log.info("captured", database=name, changes=len(changes), events=len(events),
                     new=new, checkpoint=str(checkpoint) if checkpoint else None,
                     ms=round((time.perf_counter() - started) * 1000, 1))

    async def _retry_store(self, call: Any) -> Any:
        """Store writes are retried until the store is back; meanwhile nothing is
        confirmed to the source, so capture simply pauses."""
        backoff = Backoff(0.5, 10.0)
        while True:
            try:
                return await call()
            except (SetupError, CaptureLost, asyncio.CancelledError):
                raise
            except Exception as exc:
                delay = backoff.next()
                log.warning("store write failed; capture paused", error=str(exc),
                            retry_in=round(delay, 1))
                await asyncio.sleep(delay)

    async def _retention(self) -> None:
        keep = self.config.eventing.retention
        while True:
            try:
                before = datetime.now(UTC) - timedelta(seconds=keep)
                purged = await self.store.purge(before, [Status.DELIVERED])
                if purged:
                    log.info("retention purge", purged=purged, before=before.isoformat())
            except Exception as exc:
                log.warning("retention purge failed", error=str(exc))
            await asyncio.sleep(RETENTION_EVERY)
