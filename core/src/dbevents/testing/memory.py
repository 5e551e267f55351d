"""In-memory plugins for tests: a fake database with its source, a store and a
recording sink. State lives in module-level registries keyed by URL, so a test
can "crash" an engine and start a new one on the same database and store.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import uuid
from collections import deque
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
    like a replication slot, the log before it is gone for readers. An update's
    row before it, when given, is kept in ``olds`` under (transaction, index)."""

    transactions: list[list[tuple[str, Operation, str | None, dict[str, Any] | None]]] = \
        attrs.field(factory=list)
    confirmed: int = 0  # transactions [0, confirmed) are forgotten
    times: list[datetime] = attrs.field(factory=list)
    olds: dict[tuple[int, int], dict[str, Any]] = attrs.field(factory=dict)
    _changed: asyncio.Event | None = None

    def commit(self, *changes: tuple[str, str, str | None, dict[str, Any] | None]
               | tuple[str, str, str | None, dict[str, Any] | None, dict[str, Any]]) -> int:
        """Each change is (table, operation, doc_id, doc), or for an update with its
        old row, (table, operation, doc_id, doc, old)."""
        txn = len(self.transactions)
        self.transactions.append([(c[0], Operation(c[1]), c[2], c[3]) for c in changes])
        for i, c in enumerate(changes):
            if len(c) == 5:
                self.olds[(txn, i)] = c[4]
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
                        extra={"old": self.db.olds[(txn, i)]} if (txn, i) in self.db.olds
                        else {},
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

    @classmethod
    async def probe_status(cls, settings: SourceSettings) -> Mapping[str, Any]:
        db = database(settings.url.removeprefix("memory://"))
        return {"lag_transactions": len(db.transactions) - db.confirmed}


# -- a store -------------------------------------------------------------------


Row = tuple[str, str | None]  # (trigger, doc_id): the unit of per-row order


@attrs.define
class _State:
    events: dict[str, Event] = attrs.field(factory=dict)
    attempts: dict[str, list[Attempt]] = attrs.field(factory=dict)
    checkpoints: dict[str, Position] = attrs.field(factory=dict)
    paused: dict[str, datetime] = attrs.field(factory=dict)
    leases: dict[str, datetime] = attrs.field(factory=dict)
    instance: str = attrs.field(factory=lambda: str(uuid.uuid4()))
    seq: itertools.count = attrs.field(factory=lambda: itertools.count(1))  # type: ignore[type-arg]
    # Indexes, so a claim costs O(events claimed), not O(events stored): the
    # unfinished events of each row in order, and heaps of candidates. Heap
    # entries may go stale; they are checked when popped.
    rows: dict[Row, deque[str]] = attrs.field(factory=dict)
    ready: dict[str, list[tuple[int, str]]] = attrs.field(factory=dict)  # trigger -> (seq, id)
    timed: list[tuple[datetime, int, str]] = attrs.field(factory=list)  # retries, leases


STORES: dict[str, _State] = {}


def _evolve(ev: Event, status: Status, attempts: int, updated_at: datetime,
            next_attempt_at: datetime | None, last_error: str | None) -> Event:
    # attrs.evolve looks the fields up on every call; claims and finishes are hot
    # in the dispatcher benchmarks, so build the new value directly.
    return Event(ev.id, ev.trigger, ev.database, ev.db_type, ev.table, ev.doc_id, ev.type,
                 ev.payload, status, attempts, ev.seq, next_attempt_at, ev.created_at,
                 updated_at, last_error)


_UNFINISHED = (Status.PENDING, Status.DELIVERING)


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
                    self._candidate(eid)
            self.s.leases.clear()

    async def close(self) -> None:
        pass

    async def instance_id(self) -> str:
        return self.s.instance

    async def checkpoint(self, source: str) -> Position | None:
        return self.s.checkpoints.get(source)

    # -- the indexes ---------------------------------------------------------
    def _candidate(self, eid: str) -> None:
        ev = self.s.events[eid]
        heapq.heappush(self.s.ready.setdefault(ev.trigger, []), (ev.seq, eid))

    def _is_head(self, ev: Event) -> bool:
        row = self.s.rows.get((ev.trigger, ev.doc_id))
        return bool(row) and row[0] == ev.id  # type: ignore[index]

    def _add_to_row(self, ev: Event) -> None:
        row = self.s.rows.setdefault((ev.trigger, ev.doc_id), deque())
        if ev.id in row:
            return
        # Redelivered events may be older than the row's unfinished ones.
        at = next((i for i, eid in enumerate(row) if self.s.events[eid].seq > ev.seq),
                  len(row))
        row.insert(at, ev.id)
        if at == 0:
            self._candidate(ev.id)

    def _leave_row(self, ev: Event) -> None:
        key = (ev.trigger, ev.doc_id)
        row = self.s.rows.get(key)
        if not row or ev.id not in row:
            return
        was_head = row[0] == ev.id
        row.remove(ev.id)
        if not row:
            del self.s.rows[key]
        elif was_head:
            self._candidate(row[0])

    # -- the contract ----------------------------------------------------------
    async def enqueue(self, events: Sequence[Event], checkpoints: Mapping[str, Position]) -> int:
        now = datetime.now(UTC)
        new = 0
        for ev in events:
            if ev.id in self.s.events:
                continue
            ev = self.s.events[ev.id] = attrs.evolve(
                ev, seq=next(self.s.seq), status=Status.PENDING, attempts=0,
                next_attempt_at=now, created_at=now, updated_at=now)
            self._add_to_row(ev)
            new += 1
        self.s.checkpoints.update(checkpoints)
        return new

    async def enqueue_held(self, events: Sequence[Event], checkpoints: Mapping[str, Position],
                           lease_seconds: float) -> list[Event]:
        now = datetime.now(UTC)
        until = now + timedelta(seconds=lease_seconds)
        held: list[Event] = []
        for ev in events:
            if ev.id in self.s.events:
                continue
            row = self.s.rows.get((ev.trigger, ev.doc_id))
            # One worker per memory store: every delivering event is this one's.
            mine = not row or all(self.s.events[e].status is Status.DELIVERING for e in row)
            ev = self.s.events[ev.id] = Event(
                ev.id, ev.trigger, ev.database, ev.db_type, ev.table, ev.doc_id, ev.type,
                ev.payload, Status.DELIVERING if mine else Status.PENDING, 0, next(self.s.seq),
                now, now, now, None)
            if mine:
                self.s.leases[ev.id] = until
                heapq.heappush(self.s.timed, (until, ev.seq, ev.id))
                held.append(ev)
            self._add_to_row(ev)
        self.s.checkpoints.update(checkpoints)
        return held

    async def renew(self, event_ids: Sequence[str], lease_seconds: float) -> list[str]:
        until = datetime.now(UTC) + timedelta(seconds=lease_seconds)
        lost = []
        for eid in event_ids:
            ev = self.s.events.get(eid)
            if ev is None or ev.status is not Status.DELIVERING:
                lost.append(eid)
                continue
            self.s.leases[eid] = until
            heapq.heappush(self.s.timed, (until, ev.seq, eid))
        return lost

    async def claim(self, limits: Mapping[str, int], lease_seconds: float,
                    now: datetime) -> list[Event]:
        timed = self.s.timed
        while timed and timed[0][0] <= now:  # retries now due, leases run out
            self._candidate(heapq.heappop(timed)[2])
        out: list[Event] = []
        until = now + timedelta(seconds=lease_seconds)
        for trigger, limit in limits.items():
            heap = self.s.ready.get(trigger)
            later: list[tuple[datetime, int, str]] = []
            while heap and limit > 0:
                seq, eid = heapq.heappop(heap)
                ev = self.s.events.get(eid)
                if ev is None or not self._is_head(ev):
                    continue  # stale: finished, purged, or waiting behind its row
                if ev.status is Status.PENDING:
                    due_at = ev.next_attempt_at or now
                elif ev.status is Status.DELIVERING:
                    due_at = self.s.leases.get(eid, now)  # taken over once expired
                    if due_at > now:
                        continue  # its lease is in `timed` already
                else:
                    continue
                if due_at > now:
                    later.append((due_at, seq, eid))
                    continue
                claimed = self.s.events[eid] = _evolve(
                    ev, Status.DELIVERING, ev.attempts, now, ev.next_attempt_at, ev.last_error)
                self.s.leases[eid] = until
                heapq.heappush(timed, (until, seq, eid))
                out.append(claimed)
                limit -= 1
            for item in later:
                heapq.heappush(timed, item)
        out.sort(key=lambda e: e.seq)
        return out

    async def release(self, event_ids: Sequence[str]) -> None:
        for eid in event_ids:
            ev = self.s.events.get(eid)
            if ev is not None and ev.status is Status.DELIVERING:
                self.s.events[eid] = attrs.evolve(ev, status=Status.PENDING)
                self.s.leases.pop(eid, None)
                self._candidate(eid)

    async def finish(self, results: Sequence[Finish]) -> None:
        now = datetime.now(UTC)
        for f in results:
            ev = self.s.events.get(f.event_id)
            if ev is None:
                continue
            self.s.attempts.setdefault(f.event_id, []).append(f.attempt)
            self.s.leases.pop(f.event_id, None)
            ev = self.s.events[f.event_id] = _evolve(
                ev, f.status, f.attempt.number, now, f.next_attempt_at,
                None if f.attempt.ok else f.attempt.error)
            if f.status in _UNFINISHED:
                heapq.heappush(self.s.timed, (f.next_attempt_at or now, ev.seq, ev.id))
            else:
                self._leave_row(ev)

    async def next_due(self) -> datetime | None:
        # Only the head of each row counts: later events wait for it, not the clock.
        timed = self.s.timed
        while timed:
            at, _, eid = timed[0]
            ev = self.s.events.get(eid)
            if ev is not None and self._is_head(ev) and (
                    (ev.status is Status.PENDING and ev.next_attempt_at == at)
                    or (ev.status is Status.DELIVERING and self.s.leases.get(eid) == at)):
                break
            heapq.heappop(timed)  # stale
        now = datetime.now(UTC)
        for heap in self.s.ready.values():
            while heap:  # the top of each ready heap, cleaned: due now, or nothing
                seq, eid = heap[0]
                ev = self.s.events.get(eid)
                if ev is not None and ev.status is Status.PENDING and self._is_head(ev):
                    due = ev.next_attempt_at or now
                    if due <= now:
                        return due
                    heapq.heappush(timed, (due, seq, eid))
                heapq.heappop(heap)
        return timed[0][0] if timed else None

    def subscribe(self, wake: Callable[[], None]) -> None:
        self._wakers.append(wake)

    async def list_events(self, flt: EventFilter) -> list[Event]:
        if flt.request_id is not None:
            places = {eid: a.batch_index for eid, attempts in self.s.attempts.items()
                      for a in attempts if a.request_id == flt.request_id}
            members = [self.s.events[eid] for eid in places if eid in self.s.events]
            return sorted(members, key=lambda e: places[e.id])[: flt.limit]
        evs = [e for e in self.s.events.values()
               if (flt.status is None or e.status is flt.status)
               and (flt.trigger is None or e.trigger == flt.trigger)
               and (flt.database is None or e.database == flt.database)
               and (flt.table is None or e.table == flt.table)
               and (flt.doc_id is None or e.doc_id == flt.doc_id)
               and (flt.since is None or (e.created_at is not None
                                          and e.created_at >= flt.since))
               and (flt.until is None or (e.created_at is not None
                                          and e.created_at < flt.until))
               and (flt.before_seq is None or e.seq < flt.before_seq)]
        return sorted(evs, key=lambda e: e.seq, reverse=True)[: flt.limit]

    async def get_event(self, event_id: str) -> Event | None:
        return self.s.events.get(event_id)

    async def find_event_ids(self, prefix: str, limit: int) -> list[str]:
        return sorted(i for i in self.s.events if i.startswith(prefix))[:limit]

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
            ev = self.s.events[ev.id] = attrs.evolve(ev, status=Status.PENDING, attempts=0,
                                                     next_attempt_at=now, updated_at=now)
            self._add_to_row(ev)
            self._candidate(ev.id)
            n += 1
        return n

    async def purge(self, before: datetime, statuses: Sequence[Status],
                    trigger: str | None = None) -> int:
        final = {Status.DELIVERED, Status.FAILED}
        gone = [e.id for e in self.s.events.values()
                if e.status in statuses and e.status in final
                and (e.updated_at or before) < before
                and (trigger is None or e.trigger == trigger)]
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

    async def set_trigger_paused(self, trigger: str, since: datetime | None) -> None:
        if since is None:
            self.s.paused.pop(trigger, None)
        else:
            self.s.paused[trigger] = since

    async def paused_triggers(self) -> dict[str, datetime]:
        return dict(self.s.paused)


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
        # Several events went out together: one request, as a batching sink reports it.
        request = str(uuid.uuid4()) if len(events) > 1 else None
        for ev in events:
            n = self._seen[ev.id] = self._seen.get(ev.id, 0) + 1
            ok = not opts.always_fail and n > opts.fail_first
            if ok:
                DELIVERIES.append((trigger.name, ev.id, ev.payload))
            out.append(Outcome(ok=ok, started_at=started, duration_ms=float(opts.delay_ms),
                               status_code=200 if ok else 500,
                               error=None if ok else "HTTP 500", batch_size=len(events),
                               request_id=request))
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
