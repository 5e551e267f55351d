"""In-memory plugins for tests: a fake database with its source, a store and a
recording sink. State lives in module-level registries keyed by URL, so a test
can "crash" an engine and start a new one on the same database and store.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import attrs

from dbevents.hookspecs import hookimpl
from dbevents.protocols import EventFilter, SourceSettings, StoreSettings, TriggerStats
from dbevents.values import (
    Attempt,
    Change,
    ChangeBatch,
    Event,
    Finish,
    Operation,
    Outcome,
    Position,
    Status,
    Trigger,
)

# -- a fake database ---------------------------------------------------------


@attrs.define
class MemoryDatabase:
    """A committed-transaction log, like a WAL: each transaction is a list of
    (table, operation, doc_id, doc). ``confirmed`` is what the reader confirmed;
    like a replication slot, the log before it is gone for readers."""

    transactions: list[list[tuple[str, Operation, str | None, dict[str, Any] | None]]] = \
        attrs.field(factory=list)
    confirmed: int = 0  # transactions [0, confirmed) are forgotten
    times: list[datetime] = attrs.field(factory=list)
    _changed: asyncio.Event | None = None

    def commit(self, *changes: tuple[str, str, str | None, dict[str, Any] | None]) -> int:
        self.transactions.append([(t, Operation(op), d, doc) for t, op, d, doc in changes])
        self.times.append(datetime.now(UTC))
        if self._changed is not None:
            self._changed.set()
        return len(self.transactions) - 1

    def change_count(self) -> int:
        return sum(len(t) for t in self.transactions)


DATABASES: dict[str, MemoryDatabase] = {}


def database(name: str) -> MemoryDatabase:
    return DATABASES.setdefault(name, MemoryDatabase())


@attrs.frozen
class MemorySourceOptions:
    chunk: int = 100  # changes per batch inside a transaction


class MemorySource:
    """Reads a MemoryDatabase. Positions are transaction numbers: checkpoint N
    means transactions before N are stored."""

    db_type: ClassVar[str] = "memory"
    Options = MemorySourceOptions

    def __init__(self, settings: SourceSettings) -> None:
        self.settings = settings
        self.db = database(settings.url.removeprefix("memory://"))
        self.options = settings.options or MemorySourceOptions()
        self.confirmed: list[Position] = []

    async def start(self) -> None:
        self.db._changed = asyncio.Event()

    async def changes(self, since: Position | None) -> AsyncIterator[ChangeBatch]:
        # Like a replication slot, never earlier than what was confirmed.
        txn = max(int(since.value) if since else 0, self.db.confirmed)
        while True:
            assert self.db._changed is not None
            self.db._changed.clear()
            while txn < len(self.db.transactions):
                rows = self.db.transactions[txn]
                changes = [
                    Change(
                        database=self.settings.name, db_type=self.db_type, table=table,
                        operation=op, key=f"{txn}:{i}", time=self.db.times[txn],
                        doc_id=doc_id, doc=doc,
                    )
                    for i, (table, op, doc_id, doc) in enumerate(rows)
                ]
                step = max(1, self.options.chunk)
                for start in range(0, max(1, len(changes)), step):
                    last = start + step >= len(changes)
                    yield ChangeBatch(tuple(changes[start:start + step]),
                                      Position(str(txn + 1)) if last else None)
                txn += 1
            await self.db._changed.wait()

    async def confirm(self, position: Position) -> None:
        self.confirmed.append(position)
        self.db.confirmed = max(self.db.confirmed, int(position.value))

    async def close(self) -> None:
        pass

    async def status(self) -> Mapping[str, Any]:
        return {"lag_transactions": len(self.db.transactions) - self.db.confirmed}


# -- a store -------------------------------------------------------------------


@attrs.define
class _State:
    events: dict[str, Event] = attrs.field(factory=dict)
    attempts: dict[str, list[Attempt]] = attrs.field(factory=dict)
    checkpoints: dict[str, Position] = attrs.field(factory=dict)
    leases: dict[str, datetime] = attrs.field(factory=dict)
    instance: str = attrs.field(factory=lambda: str(uuid.uuid4()))
    seq: itertools.count = attrs.field(factory=lambda: itertools.count(1))  # type: ignore[type-arg]


STORES: dict[str, _State] = {}


class MemoryStore:
    """The store contract, in memory. Each method is atomic (no await inside)."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.name = settings.url.removeprefix("memory://")
        self.s = STORES.setdefault(self.name, _State())
        self._wakers: list[Callable[[], None]] = []

    async def open(self) -> None:
        if self.settings.role == "worker":
            # One worker per memory store: claims of a dead worker go back now.
            for eid in list(self.s.leases):
                ev = self.s.events[eid]
                if ev.status is Status.DELIVERING:
                    self.s.events[eid] = attrs.evolve(ev, status=Status.PENDING)
            self.s.leases.clear()

    async def close(self) -> None:
        pass

    async def instance_id(self) -> str:
        return self.s.instance

    async def checkpoint(self, source: str) -> Position | None:
        return self.s.checkpoints.get(source)

    async def enqueue(self, events: Sequence[Event], checkpoints: Mapping[str, Position]) -> int:
        now = datetime.now(UTC)
        new = 0
        for ev in events:
            if ev.id in self.s.events:
                continue
            self.s.events[ev.id] = attrs.evolve(
                ev, seq=next(self.s.seq), status=Status.PENDING, attempts=0,
                next_attempt_at=now, created_at=now, updated_at=now)
            new += 1
        self.s.checkpoints.update(checkpoints)
        return new

    async def claim(self, limits: Mapping[str, int], lease_seconds: float,
                    now: datetime) -> list[Event]:
        out: list[Event] = []
        taken = dict.fromkeys(limits, 0)
        blocked: set[tuple[str, str | None]] = set()
        for ev in sorted(self.s.events.values(), key=lambda e: e.seq):
            if ev.status not in (Status.PENDING, Status.DELIVERING):
                continue
            row = (ev.trigger, ev.doc_id)
            expired = ev.status is Status.DELIVERING and self.s.leases.get(ev.id, now) < now
            due = (ev.status is Status.PENDING and (ev.next_attempt_at or now) <= now) or expired
            if row in blocked:
                continue
            blocked.add(row)  # later events of this row wait for this one
            if not due or ev.trigger not in limits or taken[ev.trigger] >= limits[ev.trigger]:
                continue
            taken[ev.trigger] += 1
            claimed = attrs.evolve(ev, status=Status.DELIVERING, updated_at=now)
            self.s.events[ev.id] = claimed
            self.s.leases[ev.id] = now + timedelta(seconds=lease_seconds)
            out.append(claimed)
        return out

    async def release(self, event_ids: Sequence[str]) -> None:
        for eid in event_ids:
            ev = self.s.events.get(eid)
            if ev is not None and ev.status is Status.DELIVERING:
                self.s.events[eid] = attrs.evolve(ev, status=Status.PENDING)
                self.s.leases.pop(eid, None)

    async def finish(self, results: Sequence[Finish]) -> None:
        now = datetime.now(UTC)
        for f in results:
            ev = self.s.events.get(f.event_id)
            if ev is None:
                continue
            self.s.attempts.setdefault(f.event_id, []).append(f.attempt)
            self.s.leases.pop(f.event_id, None)
            self.s.events[f.event_id] = attrs.evolve(
                ev, status=f.status, attempts=f.attempt.number, updated_at=now,
                next_attempt_at=f.next_attempt_at,
                last_error=None if f.attempt.ok else f.attempt.error)

    async def next_due(self) -> datetime | None:
        # Only the head of each row counts: later events wait for it, not the clock.
        dues: list[datetime] = []
        heads: set[tuple[str, str | None]] = set()
        for e in sorted(self.s.events.values(), key=lambda e: e.seq):
            if e.status not in (Status.PENDING, Status.DELIVERING):
                continue
            row = (e.trigger, e.doc_id)
            if row in heads:
                continue
            heads.add(row)
            if e.status is Status.PENDING and e.next_attempt_at is not None:
                dues.append(e.next_attempt_at)
        return min(dues + list(self.s.leases.values()), default=None)

    def subscribe(self, wake: Callable[[], None]) -> None:
        self._wakers.append(wake)

    async def list_events(self, flt: EventFilter) -> list[Event]:
        evs = [e for e in self.s.events.values()
               if (flt.status is None or e.status is flt.status)
               and (flt.trigger is None or e.trigger == flt.trigger)
               and (flt.database is None or e.database == flt.database)]
        return sorted(evs, key=lambda e: e.seq, reverse=True)[: flt.limit]

    async def get_event(self, event_id: str) -> Event | None:
        return self.s.events.get(event_id)

    async def attempts(self, event_id: str) -> list[Attempt]:
        return list(self.s.attempts.get(event_id, []))

    async def redeliver(self, ids: Sequence[str] | None, status: Status | None,
                        trigger: str | None) -> int:
        now = datetime.now(UTC)
        n = 0
        for ev in list(self.s.events.values()):
            if ids is not None and ev.id not in ids:
                continue
            if status is not None and ev.status is not status:
                continue
            if trigger is not None and ev.trigger != trigger:
                continue
            if ev.status is Status.DELIVERING:
                continue
            self.s.events[ev.id] = attrs.evolve(ev, status=Status.PENDING, attempts=0,
                                                next_attempt_at=now, updated_at=now)
            n += 1
        return n

    async def purge(self, before: datetime, statuses: Sequence[Status]) -> int:
        final = {Status.DELIVERED, Status.FAILED}
        gone = [e.id for e in self.s.events.values()
                if e.status in statuses and e.status in final
                and (e.updated_at or before) < before]
        for eid in gone:
            del self.s.events[eid]
            self.s.attempts.pop(eid, None)
        return len(gone)

    async def stats(self) -> list[TriggerStats]:
        counts: dict[str, dict[str, int]] = {}
        for e in self.s.events.values():
            c = counts.setdefault(e.trigger, {})
            c[e.status.value] = c.get(e.status.value, 0) + 1
        return [TriggerStats(trigger=t, **c) for t, c in sorted(counts.items())]

    async def checkpoints(self) -> dict[str, Position]:
        return dict(self.s.checkpoints)


# -- a recording sink ----------------------------------------------------------


@attrs.frozen
class MemorySinkOptions:
    fail_first: int = 0  # fail this many attempts of each event, then succeed
    always_fail: bool = False
    delay_ms: int = 0  # each delivery takes this long (random 0..delay_ms if jitter)
    jitter: bool = False
    batch_size: int = 1


DELIVERIES: list[tuple[str, str, bytes]] = []  # (trigger, event id, payload), in order


class MemorySink:
    Options = MemorySinkOptions

    def __init__(self) -> None:
        self.opened = False
        self._seen: dict[str, int] = {}

    async def open(self) -> None:
        self.opened = True

    async def close(self) -> None:
        self.opened = False

    def batch_size(self, trigger: Trigger) -> int:
        opts = trigger.sink_options or MemorySinkOptions()
        return opts.batch_size

    async def deliver(self, trigger: Trigger, events: Sequence[Event]) -> Sequence[Outcome]:
        import random

        opts = trigger.sink_options or MemorySinkOptions()
        started = datetime.now(UTC)
        if opts.delay_ms:
            delay = random.uniform(0, opts.delay_ms) if opts.jitter else opts.delay_ms
            await asyncio.sleep(delay / 1000)
        out = []
        for ev in events:
            n = self._seen[ev.id] = self._seen.get(ev.id, 0) + 1
            ok = not opts.always_fail and n > opts.fail_first
            if ok:
                DELIVERIES.append((trigger.name, ev.id, ev.payload))
            out.append(Outcome(ok=ok, started_at=started, duration_ms=float(opts.delay_ms),
                               status_code=200 if ok else 500,
                               error=None if ok else "HTTP 500", batch_size=len(events)))
        return out


def reset() -> None:
    """Forget every memory database, store and delivery (between tests)."""
    DATABASES.clear()
    STORES.clear()
    DELIVERIES.clear()


class MemoryPlugin:
    """The plugin object registering all of the above, named "memory"."""

    @hookimpl
    def register_sources(self, register: Callable[[str, Any], None]) -> None:
        register("memory", MemorySource)

    @hookimpl
    def register_stores(self, register: Callable[[str, Any], None]) -> None:
        register("memory", MemoryStore)

    @hookimpl
    def register_sinks(self, register: Callable[[str, Any], None]) -> None:
        register("memory", MemorySink)
