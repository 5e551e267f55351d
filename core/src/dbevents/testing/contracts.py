"""Contract suites every plugin's tests subclass. Each suite states, as tests,
what the engine relies on; a plugin that passes them keeps the guarantees.

The suites use pytest with pytest-asyncio in auto mode (``asyncio_mode = "auto"``
under ``[tool.pytest.ini_options]``); ``pip install "dbevents[testing]"`` installs
both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import attrs
import pytest

from dbevents.envelope import dumps
from dbevents.plugins import Plugins
from dbevents.protocols import (
    EventFilter,
    Sink,
    Source,
    SourceSettings,
    Store,
    in_flight_counts,
    options_class,
    status_probe,
    trigger_pauses,
)
from dbevents.testing.plugins import isolated_plugins
from dbevents.values import (
    Attempt,
    Change,
    ChangeBatch,
    Event,
    Finish,
    Operation,
    Position,
    Status,
    Trigger,
)


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

    async def test_purge_one_trigger(self, store: Store) -> None:
        evs = [make_event(trigger=t, doc_id="1") for t in ("a", "b")]
        await store.enqueue(evs, {})
        await self._claim_all(store, ("a", "b"))
        await store.finish([Finish(e.id, _attempt(e, 1, True), Status.DELIVERED) for e in evs])
        future = _now() + timedelta(seconds=5)
        assert await store.purge(future, [Status.DELIVERED], trigger="a") == 1
        assert await store.get_event(evs[0].id) is None
        assert await store.get_event(evs[1].id) is not None

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

    async def test_filters_by_table_doc_time_and_pages_by_seq(self, store: Store) -> None:
        started = _now() - timedelta(seconds=1)
        evs = [make_event(doc_id=str(i), table="users" if i < 3 else "orders")
               for i in range(5)]
        await store.enqueue(evs, {})
        assert len(await store.list_events(EventFilter(table="orders"))) == 2
        [one] = await store.list_events(EventFilter(doc_id="1", table="users"))
        assert one.id == evs[1].id
        later = _now() + timedelta(seconds=5)
        assert len(await store.list_events(EventFilter(since=started, until=later))) == 5
        assert await store.list_events(EventFilter(since=later)) == []
        assert await store.list_events(EventFilter(until=started)) == []
        # Newest first; each page continues below the last seq seen.
        first = await store.list_events(EventFilter(limit=2))
        rest = await store.list_events(EventFilter(limit=10, before_seq=first[-1].seq))
        assert [e.id for e in first + rest] == [e.id for e in reversed(evs)]

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

    async def test_a_paused_trigger_is_recorded_for_other_processes(
            self, store: Store, open_store: Callable[..., Awaitable[Store]]) -> None:
        pauses = trigger_pauses(store)
        if pauses is None:
            pytest.skip("the store keeps no record of paused triggers (optional)")
        since = _now().replace(microsecond=0)
        await pauses.set_trigger_paused("t", since)
        await pauses.set_trigger_paused("u", since)
        await pauses.set_trigger_paused("u", None)
        other = trigger_pauses(await open_store(role="admin"))
        assert other is not None
        assert await other.paused_triggers() == {"t": since}
        await pauses.set_trigger_paused("t", None)
        assert await other.paused_triggers() == {}


    async def test_in_flight_counts_each_workers_live_leases(
            self, store: Store, open_store: Callable[..., Awaitable[Store]]) -> None:
        mine = in_flight_counts(store)
        if mine is None:
            pytest.skip("the store keeps no per-worker in-flight counts (optional)")
        other = await open_store(role="worker")
        theirs = in_flight_counts(other)
        assert theirs is not None and theirs.worker_id != mine.worker_id
        a, b, c, d = (make_event(doc_id=str(i)) for i in range(4))
        assert len(await store.enqueue_held([a, b], {}, self.LEASE)) == 2
        await other.enqueue([c], {})
        assert [e.id for e in await self._claim_all(other)] == [c.id]
        # A lease that ran out is nobody's in flight (any worker may claim it).
        assert len(await store.enqueue_held([d], {}, 0.2)) == 1
        await asyncio.sleep(0.5)
        want = {mine.worker_id: 2, theirs.worker_id: 1}
        assert await mine.in_flight() == want
        await store.finish([Finish(a.id, _attempt(a, 1, True), Status.DELIVERED)])
        await other.release([c.id])
        admin = in_flight_counts(await open_store(role="admin"))  # `dbevents status`
        assert admin is not None
        assert await admin.in_flight() == {mine.worker_id: 1}


class SourceContract:
    """Subclass and provide ``source_env``: an object with

    - ``make_source(batch_size: int | None = None) -> Source``: a new, unstarted
      source on the test database; with ``batch_size``, one that hands out at most
      that many changes per batch (so one transaction spans several batches);
    - ``async write(n) -> None``: commit ``n`` single-row inserts, each in its own
      transaction, to a table the source watches (new rows every call);
    - ``async update_and_delete() -> None``: in ONE transaction, update the first
      row ``write`` inserted and then delete the second, on a table set up so the
      update reports the row before it (``old``).

    Set ``RESUMES_INSIDE_A_TRANSACTION = True`` when every change is a resume point
    (MongoDB's resume tokens); otherwise a batch that ends inside a transaction
    must carry no checkpoint.
    """

    TIMEOUT = 20.0
    RESUMES_INSIDE_A_TRANSACTION = False

    async def _pull(self, it: AsyncIterator[ChangeBatch], n: int) -> list[ChangeBatch]:
        """Batches from ``it`` until ``n`` changes came and a checkpoint after them."""
        batches: list[ChangeBatch] = []

        async def pull() -> None:
            count = 0
            while True:
                batch = await it.__anext__()
                batches.append(batch)
                count += len(batch.changes)
                if count >= n and batch.checkpoint is not None:
                    return

        await asyncio.wait_for(pull(), self.TIMEOUT)
        return batches

    async def _batches(self, source: Source, since: Position | None, n: int
                       ) -> list[ChangeBatch]:
        it = source.changes(since).__aiter__()
        try:
            return await self._pull(it, n)
        finally:
            await it.aclose()  # type: ignore[attr-defined]

    async def _read(self, source: Source, since: Position | None, n: int
                    ) -> tuple[list[Change], list[Position]]:
        batches = await self._batches(source, since, n)
        changes = [c for b in batches for c in b.changes]
        return changes, [b.checkpoint for b in batches if b.checkpoint is not None]

    async def _read_fresh(self, source_env: Any, since: Position | None, n: int
                          ) -> list[Change]:
        source = source_env.make_source()
        await source.start()
        try:
            changes, _ = await self._read(source, since, n)
        finally:
            await source.close()
        return changes

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
        # Each insert names its row (docId, the unit of per-row order) and carries it.
        assert all(c.doc_id is not None and c.doc for c in changes)
        assert len({c.doc_id for c in changes}) == 5

    async def test_update_and_delete_name_their_rows(self, source_env: Any,
                                                     started: Source) -> None:
        await source_env.write(2)
        await source_env.update_and_delete()
        changes, _ = await self._read(started, None, 4)
        assert [c.operation for c in changes] == [Operation.INSERT, Operation.INSERT,
                                                  Operation.UPDATE, Operation.DELETE]
        first, second, update, delete = changes
        assert (update.doc_id, delete.doc_id) == (first.doc_id, second.doc_id)
        assert len({c.key for c in changes}) == 4
        # An update carries the new row and, beside it, the row before it ("old").
        assert update.doc and update.doc != first.doc
        assert isinstance(update.extra.get("old"), Mapping)
        # A delete's document is the old row (or its key): never an "old" beside it.
        assert delete.doc and "old" not in delete.extra

    async def test_no_checkpoint_where_reading_cannot_resume(self, source_env: Any) -> None:
        source = source_env.make_source(batch_size=1)
        await source.start()
        try:
            await source_env.write(2)
            await source_env.update_and_delete()
            batches = await self._batches(source, None, 4)
        finally:
            await source.close()
        changes = [c for b in batches for c in b.changes]
        assert [c.operation for c in changes] == [Operation.INSERT, Operation.INSERT,
                                                  Operation.UPDATE, Operation.DELETE]
        assert max(len(b.changes) for b in batches) == 1  # batch_size is honoured
        [at_update] = [b for b in batches if b.changes and b.changes[-1] is changes[2]]
        if self.RESUMES_INSIDE_A_TRANSACTION:
            # The checkpoint between the update and the delete must resume at the delete.
            assert at_update.checkpoint is not None
            later = await self._read_fresh(source_env, at_update.checkpoint, 1)
            assert [c.key for c in later] == [changes[3].key]
        else:
            # Resuming there would skip the rest of the transaction: no checkpoint.
            assert at_update.checkpoint is None

    async def test_replay_from_a_checkpoint_gives_the_same_keys(self, source_env: Any,
                                                                started: Source) -> None:
        await source_env.write(1)
        it = started.changes(None).__aiter__()
        try:
            head = await self._pull(it, 1)
            checkpoint = head[-1].checkpoint  # just after the first insert
            assert checkpoint is not None
            await source_env.write(2)
            tail = await self._pull(it, 2)
        finally:
            await it.aclose()  # type: ignore[attr-defined]
        await started.confirm(checkpoint)  # as the engine does once it is stored
        await started.close()
        keys = [c.key for b in head + tail for c in b.changes]
        assert len(keys) == 3
        await source_env.write(2)
        # A crash after that checkpoint was stored: the next run reads on from it,
        # and the changes after it come again with the same keys (the same event
        # ids, so the store drops the duplicates), then the new ones.
        later = await self._read_fresh(source_env, checkpoint, 4)
        assert [c.key for c in later[:2]] == keys[1:3]
        assert len({c.key for c in later[:4]}) == 4
        assert keys[0] not in {c.key for c in later}

    async def test_unconfirmed_changes_are_read_again(self, source_env: Any,
                                                      started: Source) -> None:
        await source_env.write(3)
        first, _ = await self._read(started, None, 3)
        await started.close()
        second = await self._read_fresh(source_env, None, 3)
        assert [c.key for c in second[:3]] == [c.key for c in first[:3]]

    async def test_status_probe_gives_a_mapping(self, started: Source) -> None:
        probe = status_probe(type(started))
        settings = getattr(started, "settings", None)
        if probe is not None and isinstance(settings, SourceSettings):
            assert isinstance(await probe(settings), Mapping)

    async def test_close_while_reading_lets_the_next_source_in(self, source_env: Any,
                                                               started: Source) -> None:
        # The engine closes a source whose iterator is still open (at shutdown);
        # the database must be free for the next run at once (e.g. a replication
        # slot no longer active).
        await source_env.write(1)
        it = started.changes(None).__aiter__()
        got: list[Change] = []
        while not got:
            got.extend((await asyncio.wait_for(it.__anext__(), self.TIMEOUT)).changes)
        await started.close()
        with contextlib.suppress(Exception):
            await it.aclose()  # type: ignore[attr-defined]
        await started.close()  # twice is fine
        again = await self._read_fresh(source_env, None, 1)
        assert again[0].key == got[0].key

    async def test_close_before_start_is_fine(self, source_env: Any) -> None:
        await source_env.make_source().close()


class SinkContract:
    """Subclass and provide ``sink`` (opened; the fixture closes it afterwards) and
    ``ok_trigger`` / ``failing_trigger`` fixtures: triggers aimed at a receiver that
    accepts / rejects everything. A sink that talks to something that can stop
    answering also overrides ``silent_trigger``: a trigger aimed at a receiver that
    takes the request and never answers, with a short ``timeout``."""

    @pytest.fixture
    def silent_trigger(self) -> Trigger | None:
        return None

    async def test_one_outcome_per_event(self, sink: Sink, ok_trigger: Trigger) -> None:
        evs = [make_event(trigger=ok_trigger.name, doc_id=str(i)) for i in range(3)]
        size = sink.batch_size(ok_trigger)
        assert size >= 1
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

    async def test_a_batch_has_an_outcome_per_event_sharing_one_request(
            self, sink: Sink, ok_trigger: Trigger, failing_trigger: Trigger) -> None:
        n = min(sink.batch_size(ok_trigger), 3)
        if n < 2:
            pytest.skip("the sink sends one event per delivery for ok_trigger")
        evs = [make_event(trigger=ok_trigger.name, doc_id=str(i)) for i in range(n)]
        outcomes = list(await sink.deliver(ok_trigger, evs))
        assert len(outcomes) == n and all(o.ok for o in outcomes)
        # The log rebuilds the request from the events sharing its request_id.
        assert all(o.batch_size == n for o in outcomes)
        assert len({o.request_id for o in outcomes}) == 1 and outcomes[0].request_id
        m = max(1, min(sink.batch_size(failing_trigger), 3))
        bad = [make_event(trigger=failing_trigger.name, doc_id=str(i)) for i in range(m)]
        failed = list(await sink.deliver(failing_trigger, bad))
        assert len(failed) == m and not any(o.ok for o in failed)

    async def test_a_receiver_that_never_answers_is_a_failed_outcome(
            self, sink: Sink, silent_trigger: Trigger | None) -> None:
        if silent_trigger is None:
            pytest.skip("no silent_trigger: nothing this sink talks to can hang")
        ev = make_event(trigger=silent_trigger.name)
        # The bound only keeps a hanging sink from hanging the suite.
        [outcome] = await asyncio.wait_for(sink.deliver(silent_trigger, [ev]),
                                           silent_trigger.timeout / 1000 * 10 + 30)
        assert not outcome.ok and outcome.error and "timeout" in outcome.error.lower()
        assert not outcome.give_up  # worth retrying

    async def test_close_after_use_twice_and_unused(self, sink: Sink,
                                                    ok_trigger: Trigger) -> None:
        [outcome] = await sink.deliver(ok_trigger, [make_event(trigger=ok_trigger.name)])
        assert outcome.ok
        await sink.close()
        await sink.close()  # the fixture closes it once more: closing twice is fine
        unused = type(sink)()
        await unused.open()
        await unused.close()


class MatcherContract:
    """Subclass and provide:

    - ``matcher_plugin``: the plugin object (module or instance) whose
      ``register_matchers`` hook registers the matcher;
    - ``matcher_name``: the name it registers;
    - ``trigger_keys``: the trigger keys it adds, as they appear in the TOML
      (a dict, e.g. ``{"statuses": ["paid"]}``);
    - ``matching`` / ``not_matching``: a Change those keys take / reject.
    """

    @pytest.fixture
    def plugins(self, matcher_plugin: object) -> Plugins:
        return isolated_plugins(("matcher-under-test", matcher_plugin))

    def _config(self, plugins: Plugins, keys: Mapping[str, Any]) -> Any:
        from dbevents import config as cfg

        raw = {"eventing": {"store": "memory://matcher-contract"},
               "databases": {"app": {"type": "memory", "url": "memory://matcher-contract"}},
               "triggers": [{"name": "narrowed", "url": "http://unused", "sink": "memory",
                             **keys},
                            {"name": "plain", "url": "http://unused", "sink": "memory"}]}
        return cfg.parse(raw, plugins, {})

    def test_registered_by_name_as_a_class_with_attrs_options(
            self, plugins: Plugins, matcher_name: str) -> None:
        cls = plugins.get("matcher", matcher_name)
        assert isinstance(cls, type)  # the engine makes one instance: cls()
        options = options_class(cls)
        assert options is not None and attrs.has(options)
        assert callable(cls().matches)

    def test_keys_parse_into_its_options(self, plugins: Plugins, matcher_name: str,
                                         trigger_keys: Mapping[str, Any]) -> None:
        narrowed, plain = self._config(plugins, trigger_keys).triggers
        options = narrowed.matcher_options[matcher_name]
        assert isinstance(options, cast(type, options_class(plugins.get("matcher", matcher_name))))
        assert plain.matcher_options == {}  # keys not set: the matcher is never asked

    def test_it_narrows_only_triggers_that_set_its_keys(
            self, plugins: Plugins, trigger_keys: Mapping[str, Any],
            matching: Change, not_matching: Change) -> None:
        from dbevents.matching import TriggerMatcher

        triggers = self._config(plugins, trigger_keys).triggers
        instances = {n: plugins.get("matcher", n)() for n in plugins.names("matcher")}
        m = TriggerMatcher(triggers, instances)
        assert [t.name for t in m.match(matching)] == ["narrowed", "plain"]
        assert [t.name for t in m.match(not_matching)] == ["plain"]

    def test_answers_a_bool_and_the_same_every_time(
            self, plugins: Plugins, matcher_name: str, trigger_keys: Mapping[str, Any],
            matching: Change, not_matching: Change) -> None:
        narrowed = self._config(plugins, trigger_keys).triggers[0]
        options = narrowed.matcher_options[matcher_name]
        matcher = plugins.get("matcher", matcher_name)()
        assert [matcher.matches(matching, options) for _ in range(2)] == [True, True]
        assert [matcher.matches(not_matching, options) for _ in range(2)] == [False, False]

    def test_changes_without_a_document_do_not_raise(
            self, plugins: Plugins, matcher_name: str, trigger_keys: Mapping[str, Any],
            matching: Change) -> None:
        # A TRUNCATE has no row, and a delete may carry only the key.
        narrowed = self._config(plugins, trigger_keys).triggers[0]
        options = narrowed.matcher_options[matcher_name]
        matcher = plugins.get("matcher", matcher_name)()
        for op in (Operation.TRUNCATE, Operation.DELETE):
            bare = attrs.evolve(matching, operation=op, doc=None, doc_id=None)
            assert isinstance(matcher.matches(bare, options), bool)
