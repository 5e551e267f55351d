"""Contract suites every plugin's tests subclass. Each suite states, as tests,
what the engine relies on; a plugin that passes them keeps the guarantees.

The suites use pytest with pytest-asyncio (asyncio_mode = "auto" or strict with
the marks below).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest

from dbevents.envelope import dumps
from dbevents.protocols import EventFilter, Sink, Source, Store
from dbevents.values import Attempt, Change, Event, Finish, Position, Status, Trigger


def make_event(trigger: str = "t", doc_id: str | None = "1", n: int = 0,
               database: str = "app", table: str = "users") -> Event:
    id_ = str(uuid.uuid4())
    body = {"specversion": "1.0", "id": id_, "type": "DB_INSERT", "source": "test",
            "time": "2024-01-01T00:00:00.000Z",
            "data": {"db": "sql-postgres", "col": table, "docId": doc_id, "doc": {"n": n}}}
    return Event(id=id_, trigger=trigger, database=database, db_type="sql-postgres",
                 table=table, doc_id=doc_id, type="DB_INSERT", payload=dumps(body))


def _attempt(ev: Event, number: int, ok: bool, error: str | None = None) -> Attempt:
    return Attempt(event_id=ev.id, number=number, started_at=datetime.now(UTC),
                   duration_ms=1.5, ok=ok, status_code=200 if ok else 500,
                   response_body="ok" if ok else "boom", error=error,
                   request_headers={"content-type": "application/json",
                                    "authorization": "***"})


def _now() -> datetime:
    return datetime.now(UTC)


class StoreContract:
    """Subclass and provide the ``open_store`` fixture: an async factory
    ``open_store(role="worker") -> Store`` that opens a store on one shared
    location (every call sees the same data), closed by the fixture afterwards."""

    LEASE = 30.0

    @pytest.fixture
    async def store(self, open_store: Callable[..., Awaitable[Store]]) -> Store:
        return await open_store()

    async def _claim_all(self, store: Store, triggers: tuple[str, ...] = ("t",),
                         now: datetime | None = None, limit: int = 100) -> list[Event]:
        return await store.claim(dict.fromkeys(triggers, limit), self.LEASE, now or _now())

    async def test_enqueue_is_idempotent_by_id(self, store: Store) -> None:
        evs = [make_event(doc_id=str(i)) for i in range(5)]
        assert await store.enqueue(evs, {}) == 5
        extra = make_event(doc_id="9")
        assert await store.enqueue([*evs[2:], extra], {}) == 1
        listed = await store.list_events(EventFilter(limit=100))
        assert sorted(e.id for e in listed) == sorted([e.id for e in evs] + [extra.id])

    async def test_checkpoint_moves_with_events(self, store: Store) -> None:
        assert await store.checkpoint("app") is None
        await store.enqueue([make_event()], {"app": Position("0/10")})
        assert await store.checkpoint("app") == Position("0/10")
        await store.enqueue([], {"app": Position("0/20"), "other": Position("x")})
        assert await store.checkpoint("app") == Position("0/20")
        assert (await store.checkpoints()) == {"app": Position("0/20"), "other": Position("x")}

    async def test_payload_and_fields_round_trip(self, store: Store) -> None:
        ev = make_event(doc_id="42", table="orders")
        await store.enqueue([ev], {})
        got = await store.get_event(ev.id)
        assert got is not None
        assert got.payload == ev.payload and json.loads(got.payload)["id"] == ev.id
        assert (got.trigger, got.database, got.table, got.doc_id, got.type) == \
            ("t", "app", "orders", "42", "DB_INSERT")
        assert got.status is Status.PENDING and got.attempts == 0
        assert got.created_at is not None
        assert await store.get_event(str(uuid.uuid4())) is None

    async def test_enqueue_held_hands_new_events_to_memory(self, store: Store) -> None:
        evs = [make_event(doc_id=str(i), n=i) for i in range(3)]
        held = await store.enqueue_held(evs, {"app": Position("0/30")}, self.LEASE)
        assert [e.id for e in held] == [e.id for e in evs]
        assert all(e.status is Status.DELIVERING and e.attempts == 0 for e in held)
        assert [e.seq for e in held] == sorted(e.seq for e in held)
        assert held[0].payload == evs[0].payload
        assert await store.checkpoint("app") == Position("0/30")
        stored = await store.get_event(evs[0].id)
        assert stored is not None and stored.status is Status.DELIVERING
        assert await self._claim_all(store) == []  # leased to this worker: not claimed
        # A replay stores nothing twice and hands nothing out again.
        assert await store.enqueue_held(evs, {}, self.LEASE) == []
        later = _now() + timedelta(seconds=self.LEASE + 5)
        assert len(await self._claim_all(store, now=later)) == 3  # a dead holder's: due

    async def test_enqueue_held_keeps_a_row_behind_its_pending_event(self, store: Store) -> None:
        a1, a2, a3 = make_event(doc_id="a"), make_event(doc_id="a"), make_event(doc_id="a")
        b1 = make_event(doc_id="b")
        await store.enqueue([a1], {})  # pending: a later event of its row waits in the store
        held = await store.enqueue_held([a2, b1], {}, self.LEASE)
        assert [e.id for e in held] == [b1.id]
        got = await store.get_event(a2.id)
        assert got is not None and got.status is Status.PENDING
        assert [e.id for e in await self._claim_all(store)] == [a1.id]
        # Still behind a pending event (a2), though this worker holds a1 now.
        assert [e.id for e in await store.enqueue_held([a3], {}, self.LEASE)] == []
        await store.finish([Finish(a1.id, _attempt(a1, 1, True), Status.DELIVERED)])
        assert [e.id for e in await self._claim_all(store)] == [a2.id]
        await store.finish([Finish(a2.id, _attempt(a2, 1, True), Status.DELIVERED)])
        assert [e.id for e in await self._claim_all(store)] == [a3.id]

    async def test_enqueue_held_behind_held_events_of_its_row(self, store: Store) -> None:
        a1, a2 = make_event(doc_id="a"), make_event(doc_id="a")
        assert [e.id for e in await store.enqueue_held([a1], {}, self.LEASE)] == [a1.id]
        assert [e.id for e in await store.enqueue_held([a2], {}, self.LEASE)] == [a2.id]
        await store.finish([Finish(a1.id, _attempt(a1, 1, True), Status.DELIVERED)])
        assert await self._claim_all(store) == []  # a2 is still held
        # Handed back on shutdown: pending, due now.
        await store.release([a2.id])
        assert [e.id for e in await self._claim_all(store)] == [a2.id]

    async def test_renew_keeps_held_events_from_claims(self, store: Store) -> None:
        ev, other = make_event(doc_id="a"), make_event(doc_id="b")
        await store.enqueue_held([ev, other], {}, 1.0)
        assert await store.renew([ev.id, other.id], self.LEASE) == []
        assert await self._claim_all(store, now=_now() + timedelta(seconds=5)) == []
        await store.finish([Finish(ev.id, _attempt(ev, 1, True), Status.DELIVERED)])
        assert await store.renew([ev.id, other.id], self.LEASE) == [ev.id]

    async def test_claim_keeps_per_row_order(self, store: Store) -> None:
        a1, a2, b1 = make_event(doc_id="a"), make_event(doc_id="a"), make_event(doc_id="b")
        await store.enqueue([a1, a2, b1], {})
        claimed = await self._claim_all(store)
        assert [e.id for e in claimed] == [a1.id, b1.id]  # a2 waits behind a1
        assert all(e.status is Status.DELIVERING for e in claimed)
        assert await self._claim_all(store) == []  # nothing is handed out twice
        await store.finish([Finish(a1.id, _attempt(a1, 1, True), Status.DELIVERED)])
        again = await self._claim_all(store)
        assert [e.id for e in again] == [a2.id]

    async def test_pending_retry_blocks_later_events_of_its_row(self, store: Store) -> None:
        a1, a2 = make_event(doc_id="a"), make_event(doc_id="a")
        await store.enqueue([a1, a2], {})
        assert [e.id for e in await self._claim_all(store)] == [a1.id]
        later = _now() + timedelta(seconds=60)
        await store.finish([Finish(a1.id, _attempt(a1, 1, False, "HTTP 500"), Status.PENDING,
                                   later)])
        assert await self._claim_all(store) == []  # a1 waits for its retry; a2 behind it
        due = await store.next_due()
        assert due is not None and abs((due - later).total_seconds()) < 1
        retry = await self._claim_all(store, now=later + timedelta(seconds=1))
        assert [e.id for e in retry] == [a1.id] and retry[0].attempts == 1

    async def test_failed_event_unblocks_its_row(self, store: Store) -> None:
        a1, a2 = make_event(doc_id="a"), make_event(doc_id="a")
        await store.enqueue([a1, a2], {})
        await self._claim_all(store)
        await store.finish([Finish(a1.id, _attempt(a1, 4, False, "HTTP 500"), Status.FAILED)])
        got = await store.get_event(a1.id)
        assert got is not None and got.status is Status.FAILED and got.attempts == 4
        assert got.last_error == "HTTP 500"
        assert [e.id for e in await self._claim_all(store)] == [a2.id]

    async def test_claim_limits_per_trigger(self, store: Store) -> None:
        evs = [make_event(trigger="x", doc_id=str(i)) for i in range(10)]
        evs += [make_event(trigger="y", doc_id=str(i)) for i in range(10)]
        await store.enqueue(evs, {})
        claimed = await store.claim({"x": 3, "y": 4}, self.LEASE, _now())
        assert sum(e.trigger == "x" for e in claimed) == 3
        assert sum(e.trigger == "y" for e in claimed) == 4
        # Oldest first within a trigger.
        assert [e.id for e in claimed if e.trigger == "x"] == [e.id for e in evs[:3]]
        # A trigger not asked for is not handed out.
        assert all(e.trigger in ("x", "y") for e in claimed)
        assert await store.claim({"z": 5}, self.LEASE, _now()) == []

    async def test_expired_lease_is_claimed_again(self, store: Store) -> None:
        ev = make_event()
        await store.enqueue([ev], {})
        assert len(await self._claim_all(store)) == 1
        assert await self._claim_all(store, now=_now() + timedelta(seconds=self.LEASE / 2)) == []
        later = _now() + timedelta(seconds=self.LEASE + 5)
        assert [e.id for e in await self._claim_all(store, now=later)] == [ev.id]

    async def test_release_gives_claims_back(self, store: Store) -> None:
        ev = make_event()
        await store.enqueue([ev], {})
        await self._claim_all(store)
        await store.release([ev.id])
        got = await store.get_event(ev.id)
        assert got is not None and got.status is Status.PENDING and got.attempts == 0
        assert [e.id for e in await self._claim_all(store)] == [ev.id]

    async def test_finish_records_every_attempt(self, store: Store) -> None:
        ev = make_event()
        await store.enqueue([ev], {})
        await self._claim_all(store)
        await store.finish([Finish(ev.id, _attempt(ev, 1, False, "timeout"), Status.PENDING,
                                   _now())])
        await self._claim_all(store)
        await store.finish([Finish(ev.id, _attempt(ev, 2, True), Status.DELIVERED)])
        attempts = await store.attempts(ev.id)
        assert [(a.number, a.ok, a.error) for a in attempts] == [(1, False, "timeout"),
                                                                 (2, True, None)]
        assert attempts[1].status_code == 200 and attempts[1].response_body == "ok"
        assert attempts[0].request_headers["authorization"] == "***"
        got = await store.get_event(ev.id)
        assert got is not None and got.status is Status.DELIVERED and got.attempts == 2

    async def test_a_batch_request_is_recorded_by_reference(self, store: Store) -> None:
        # Three events in one request, a fourth alone: each attempt says which
        # request carried it and where, and the request's events come back in
        # that order (the body is rebuilt from them, never stored twice).
        evs = [make_event(doc_id=str(i)) for i in range(4)]
        await store.enqueue(evs, {})
        await self._claim_all(store)
        request = str(uuid.uuid4())
        order = [evs[2], evs[0], evs[1]]
        finishes = [Finish(ev.id, attrs.evolve(_attempt(ev, 1, True), batch_size=3,
                                               request_id=request, batch_index=i),
                           Status.DELIVERED) for i, ev in enumerate(order)]
        finishes.append(Finish(evs[3].id, _attempt(evs[3], 1, True), Status.DELIVERED))
        await store.finish(finishes)
        for i, ev in enumerate(order):
            (attempt,) = await store.attempts(ev.id)
            assert (attempt.request_id, attempt.batch_index, attempt.batch_size) == \
                (request, i, 3)
        (alone,) = await store.attempts(evs[3].id)
        assert (alone.request_id, alone.batch_index, alone.batch_size) == (None, 0, 1)
        members = await store.list_events(EventFilter(request_id=request))
        assert [e.id for e in members] == [e.id for e in order]
        assert [e.payload for e in members] == [e.payload for e in order]
        assert await store.list_events(EventFilter(request_id=str(uuid.uuid4()))) == []

    async def test_redeliver_failed(self, store: Store) -> None:
        evs = [make_event(doc_id=str(i)) for i in range(3)]
        await store.enqueue(evs, {})
        await self._claim_all(store)
        await store.finish([Finish(evs[0].id, _attempt(evs[0], 4, False), Status.FAILED),
                            Finish(evs[1].id, _attempt(evs[1], 4, False), Status.FAILED),
                            Finish(evs[2].id, _attempt(evs[2], 1, True), Status.DELIVERED)])
        assert await store.redeliver(None, Status.FAILED, "t") == 2
        for ev in evs[:2]:
            got = await store.get_event(ev.id)
            assert got is not None and got.status is Status.PENDING and got.attempts == 0
        assert len(await store.attempts(evs[0].id)) == 1  # history is kept
        assert await store.redeliver([evs[2].id], None, None) == 1
        assert len(await self._claim_all(store)) == 3

    async def test_purge(self, store: Store) -> None:
        evs = [make_event(doc_id=str(i)) for i in range(3)]
        await store.enqueue(evs, {})
        await self._claim_all(store)
        await store.finish([Finish(evs[0].id, _attempt(evs[0], 1, True), Status.DELIVERED),
                            Finish(evs[1].id, _attempt(evs[1], 1, False), Status.FAILED)])
        assert await store.purge(_now() - timedelta(hours=1), [Status.DELIVERED]) == 0
        future = _now() + timedelta(seconds=5)
        assert await store.purge(future, [Status.DELIVERED]) == 1
        assert await store.get_event(evs[0].id) is None
        assert await store.attempts(evs[0].id) == []
        assert await store.get_event(evs[1].id) is not None  # failed kept
        assert await store.purge(future, [Status.FAILED]) == 1
        assert await store.get_event(evs[2].id) is not None  # delivering never purged

    async def test_stats_and_filters(self, store: Store) -> None:
        evs = [make_event(trigger="x", doc_id=str(i)) for i in range(3)]
        evs.append(make_event(trigger="y", database="other"))
        await store.enqueue(evs, {})
        await store.claim({"x": 1}, self.LEASE, _now())
        stats = {s.trigger: s for s in await store.stats()}
        assert (stats["x"].pending, stats["x"].delivering) == (2, 1)
        assert stats["y"].pending == 1
        assert len(await store.list_events(EventFilter(trigger="x"))) == 3
        assert len(await store.list_events(EventFilter(database="other"))) == 1
        assert len(await store.list_events(EventFilter(status=Status.DELIVERING))) == 1
        assert len(await store.list_events(EventFilter(limit=2))) == 2

    async def test_instance_id_is_kept(self, store: Store,
                                       open_store: Callable[..., Awaitable[Store]]) -> None:
        first = await store.instance_id()
        assert first
        other = await open_store(role="admin")
        assert await other.instance_id() == first

    async def test_a_worker_start_takes_back_dead_claims(
            self, store: Store, open_store: Callable[..., Awaitable[Store]]) -> None:
        """A new worker must get a crashed worker's claims back, at the latest when
        the lease runs out (stores shared by many workers) or at once (single-worker
        stores)."""
        ev = make_event()
        await store.enqueue([ev], {})
        await self._claim_all(store)
        await store.close()  # the worker dies holding its claim
        fresh = await open_store(role="worker")
        later = _now() + timedelta(seconds=self.LEASE + 5)
        assert [e.id for e in await self._claim_all(fresh, now=later)] == [ev.id]


class SourceContract:
    """Subclass and provide ``source_env``: an object with

    - ``make_source() -> Source``: a new, unstarted source on the test database;
    - ``async write(n) -> None``: commit ``n`` single-row inserts, each in its own
      transaction, to a table the source watches.
    """

    TIMEOUT = 20.0

    async def _read(self, source: Source, since: Position | None, n: int
                    ) -> tuple[list[Change], list[Position]]:
        changes: list[Change] = []
        checkpoints: list[Position] = []
        it = source.changes(since).__aiter__()

        async def pull() -> None:
            while True:
                batch = await it.__anext__()
                changes.extend(batch.changes)
                if batch.checkpoint is not None:
                    checkpoints.append(batch.checkpoint)
                if len(changes) >= n and batch.checkpoint is not None:
                    return

        await asyncio.wait_for(pull(), self.TIMEOUT)
        await it.aclose()  # type: ignore[attr-defined]
        return changes, checkpoints

    @pytest.fixture
    async def started(self, source_env: Any) -> AsyncIterator[Source]:
        source = source_env.make_source()
        await source.start()
        yield source
        await source.close()

    async def test_changes_arrive_in_commit_order(self, source_env: Any,
                                                  started: Source) -> None:
        await source_env.write(5)
        changes, checkpoints = await self._read(started, None, 5)
        assert len(changes) == 5 and checkpoints
        assert len({c.key for c in changes}) == 5
        assert all(c.database for c in changes)
        assert all(c.time.tzinfo is not None for c in changes)
        assert [c.operation.value for c in changes] == ["insert"] * 5
        assert type(started).db_type == changes[0].db_type

    async def test_replay_from_a_checkpoint_gives_the_same_keys(
            self, source_env: Any, started: Source) -> None:
        await source_env.write(3)
        first, cps = await self._read(started, None, 3)
        await started.confirm(cps[-1])
        await started.close()
        await source_env.write(2)
        again = source_env.make_source()
        await again.start()
        try:
            later, _ = await self._read(again, cps[-1], 2)
        finally:
            await again.close()
        assert len(later) >= 2
        assert not {c.key for c in later} & {c.key for c in first}  # nothing before

    async def test_unconfirmed_changes_are_read_again(self, source_env: Any,
                                                      started: Source) -> None:
        await source_env.write(3)
        first, _ = await self._read(started, None, 3)
        await started.close()
        again = source_env.make_source()
        await again.start()
        try:
            second, _ = await self._read(again, None, 3)
        finally:
            await again.close()
        assert [c.key for c in second[:3]] == [c.key for c in first[:3]]

    async def test_status_is_a_mapping(self, started: Source) -> None:
        status = getattr(started, "status", None)
        if status is not None:
            assert isinstance(await status(), dict)


class SinkContract:
    """Subclass and provide ``sink`` (opened) and ``ok_trigger`` / ``failing_trigger``
    fixtures: triggers aimed at a receiver that accepts / rejects everything."""

    async def test_one_outcome_per_event(self, sink: Sink, ok_trigger: Trigger) -> None:
        evs = [make_event(trigger=ok_trigger.name, doc_id=str(i)) for i in range(3)]
        size = sink.batch_size(ok_trigger)
        outcomes = []
        for i in range(0, len(evs), size):
            outcomes += list(await sink.deliver(ok_trigger, evs[i:i + size]))
        assert len(outcomes) == 3 and all(o.ok for o in outcomes)
        assert all(o.started_at.tzinfo is not None and o.duration_ms >= 0 for o in outcomes)

    async def test_a_batch_reports_its_request(self, sink: Sink, ok_trigger: Trigger) -> None:
        # The dispatcher groups a batch's outcomes by the request the sink
        # reports: one request_id for the events that went out together.
        size = min(3, sink.batch_size(ok_trigger))
        evs = [make_event(trigger=ok_trigger.name, doc_id=str(i), n=i) for i in range(size)]
        outcomes = list(await sink.deliver(ok_trigger, evs))
        assert len(outcomes) == size and all(o.ok for o in outcomes)
        if size > 1:
            ids = {o.request_id for o in outcomes}
            assert len(ids) == 1 and None not in ids
            assert all(o.batch_size == size for o in outcomes)

    async def test_failure_is_an_outcome_not_an_exception(self, sink: Sink,
                                                          failing_trigger: Trigger) -> None:
        ev = make_event(trigger=failing_trigger.name)
        [outcome] = await sink.deliver(failing_trigger, [ev])
        assert not outcome.ok and outcome.error
