"""Queue behaviour beyond the core's contract: rows, heads, races between
enqueue and finish, late finishes, truncation, purge in batches."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import attrs
from dbevents.protocols import EventFilter
from dbevents.testing import make_event
from dbevents.values import Attempt, Event, Finish, Position, Status
from dbevents_store_postgres import PostgresStore
from dbevents_store_postgres.rows import MAX_BODY

from testsupport.servers import PostgresServer

OpenPg = Callable[..., Awaitable[PostgresStore]]
Exec = Callable[..., list[tuple[object, ...]]]


def now() -> datetime:
    return datetime.now(UTC)


def attempt(ev: Event, number: int = 1, ok: bool = True, body: str | None = "ok",
            error: str | None = None, headers: dict[str, str] | None = None) -> Attempt:
    return Attempt(event_id=ev.id, number=number, started_at=now(), duration_ms=2.0, ok=ok,
                   status_code=200 if ok else 500, response_body=body, error=error,
                   request_headers=headers or {})


def delivered(ev: Event) -> Finish:
    return Finish(ev.id, attempt(ev, ev.attempts + 1), Status.DELIVERED)


async def test_a_long_row_does_not_hold_up_other_rows(open_pg: OpenPg,
                                                      check_heads: Callable[[], None]) -> None:
    store = await open_pg()
    hot = [make_event(doc_id="hot", n=i) for i in range(300)]
    others = [make_event(doc_id=f"o{i}") for i in range(5)]
    await store.enqueue(hot[:150], {})
    await store.enqueue([*others, *hot[150:]], {})
    claimed = await store.claim({"t": 100}, 30.0, now())
    assert [e.id for e in claimed] == [hot[0].id] + [e.id for e in others]
    check_heads()
    await store.finish([delivered(e) for e in claimed])
    assert [e.id for e in await store.claim({"t": 100}, 30.0, now())] == [hot[1].id]
    check_heads()


async def test_events_without_a_doc_id_form_one_row(open_pg: OpenPg) -> None:
    store = await open_pg()
    n1, n2 = make_event(doc_id=None), make_event(doc_id=None)
    empty = make_event(doc_id="")  # an empty id is an id, not "no id"
    await store.enqueue([n1, n2, empty], {})
    assert [e.id for e in await store.claim({"t": 10}, 30.0, now())] == [n1.id, empty.id]
    got = await store.get_event(n2.id)
    assert got is not None and got.doc_id is None
    got = await store.get_event(empty.id)
    assert got is not None and got.doc_id == ""


async def test_duplicates_within_one_batch_are_stored_once(open_pg: OpenPg) -> None:
    store = await open_pg()
    a, b = make_event(doc_id="a"), make_event(doc_id="a")
    assert await store.enqueue([a, a, b, a], {}) == 2
    assert [e.id for e in await store.list_events(EventFilter())] == [b.id, a.id]
    [claimed] = await store.claim({"t": 10}, 30.0, now())
    assert claimed.id == a.id and claimed.seq < (await store.get_event(b.id)).seq  # type: ignore[union-attr]


async def test_a_redelivered_older_event_goes_before_its_row(
        open_pg: OpenPg, check_heads: Callable[[], None]) -> None:
    store = await open_pg()
    a1, a2 = make_event(doc_id="a"), make_event(doc_id="a")
    await store.enqueue([a1, a2], {})
    await store.claim({"t": 10}, 30.0, now())
    await store.finish([delivered(a1)])
    assert await store.redeliver([a1.id], None, None) == 1
    check_heads()
    # a2 was next in line; a1 is older and pending again, so it goes first.
    assert [e.id for e in await store.claim({"t": 10}, 30.0, now())] == [a1.id]
    await store.finish([delivered(a1)])
    assert [e.id for e in await store.claim({"t": 10}, 30.0, now())] == [a2.id]
    check_heads()


async def test_one_event_finished_twice_in_a_batch(open_pg: OpenPg,
                                                   check_heads: Callable[[], None]) -> None:
    store = await open_pg()
    a1, a2 = make_event(doc_id="a"), make_event(doc_id="a")
    await store.enqueue([a1, a2], {})
    await store.claim({"t": 10}, 30.0, now())
    await store.finish([Finish(a1.id, attempt(a1, 1, ok=False, error="timeout"),
                               Status.PENDING, now()),
                        Finish(a1.id, attempt(a1, 2), Status.DELIVERED)])
    got = await store.get_event(a1.id)
    assert got is not None and (got.status, got.attempts, got.last_error) == \
        (Status.DELIVERED, 2, None)
    assert [a.number for a in await store.attempts(a1.id)] == [1, 2]
    check_heads()
    assert [e.id for e in await store.claim({"t": 10}, 30.0, now())] == [a2.id]


async def test_a_late_finish_after_a_takeover(open_pg: OpenPg,
                                              check_heads: Callable[[], None]) -> None:
    slow, fast = await open_pg(), await open_pg()
    a1, a2 = make_event(doc_id="a"), make_event(doc_id="a")
    await slow.enqueue([a1, a2], {})
    [mine] = await slow.claim({"t": 10}, 1.0, now())
    later = now() + timedelta(seconds=2)
    [theirs] = await fast.claim({"t": 10}, 30.0, later)
    assert mine.id == theirs.id == a1.id
    await fast.finish([delivered(theirs)])
    await slow.finish([Finish(a1.id, attempt(a1, 1), Status.DELIVERED)])  # it got through too
    got = await fast.get_event(a1.id)
    assert got is not None and got.status is Status.DELIVERED
    assert len(await fast.attempts(a1.id)) == 2  # both attempts are in the log
    check_heads()
    assert [e.id for e in await fast.claim({"t": 10}, 30.0, later)] == [a2.id]


async def test_a_late_verdict_does_not_change_the_new_holders_event(
        open_pg: OpenPg, check_heads: Callable[[], None]) -> None:
    slow, fast = await open_pg(), await open_pg()
    a1, a2 = make_event(doc_id="a"), make_event(doc_id="a")
    await slow.enqueue([a1, a2], {})
    [mine] = await slow.claim({"t": 10}, 1.0, now())
    later = now() + timedelta(seconds=2)
    [theirs] = await fast.claim({"t": 10}, 30.0, later)  # the lease ran out: taken over
    # The first worker's attempt fails after the takeover: it is logged, but the
    # event stays the new holder's, in flight, not pending behind a backoff.
    await slow.finish([Finish(a1.id, attempt(a1, 1, ok=False, error="HTTP 500"),
                              Status.PENDING, now() + timedelta(hours=1))])
    got = await fast.get_event(a1.id)
    assert got is not None and got.status is Status.DELIVERING and got.last_error is None
    assert [a.error for a in await fast.attempts(a1.id)] == ["HTTP 500"]
    # The holder's verdict applies; a2 moves up behind it.
    await fast.finish([delivered(theirs)])
    got = await fast.get_event(a1.id)
    assert got is not None and got.status is Status.DELIVERED and got.attempts == 1
    check_heads()
    assert [e.id for e in await fast.claim({"t": 10}, 30.0, later)] == [a2.id]
    # A verdict for an event no longer in flight (delivered) is logged only.
    await slow.finish([Finish(a1.id, attempt(a1, 2, ok=False, error="timeout"),
                              Status.FAILED)])
    got = await fast.get_event(a1.id)
    assert got is not None and got.status is Status.DELIVERED
    assert len(await fast.attempts(a1.id)) == 3
    assert mine.id == a1.id


async def test_finish_of_a_purged_event_is_skipped(open_pg: OpenPg) -> None:
    store = await open_pg()
    ev, gone = make_event(doc_id="1"), make_event(doc_id="2")
    await store.enqueue([ev, gone], {})
    await store.claim({"t": 10}, 30.0, now())
    await store.finish([delivered(gone)])
    assert await store.purge(now() + timedelta(seconds=1), [Status.DELIVERED]) == 1
    await store.finish([delivered(gone), delivered(ev)])
    assert await store.get_event(gone.id) is None and await store.attempts(gone.id) == []
    assert len(await store.attempts(ev.id)) == 1


async def test_response_bodies_are_truncated_and_text_is_cleaned(open_pg: OpenPg) -> None:
    store = await open_pg()
    ev, odd = make_event(doc_id="1"), make_event(doc_id="2\x00x")
    await store.enqueue([ev, odd], {})
    await store.claim({"t": 10}, 30.0, now())
    big = "é" * MAX_BODY  # 2 bytes each: twice the limit
    await store.finish([
        Finish(ev.id, attempt(ev, body=big), Status.DELIVERED),
        Finish(odd.id, attempt(odd, ok=False, body="nul\x00 and \ud800 lone",
                               error="bad\x00error", headers={"x-a": "b\x00c",
                                                             "Authorization": "secret"}),
               Status.FAILED)])
    [kept] = await store.attempts(ev.id)
    assert kept.response_body is not None
    head, mark = kept.response_body[:MAX_BODY // 2], kept.response_body[MAX_BODY // 2:]
    assert head == "é" * (MAX_BODY // 2)
    assert mark == f"\n[dbevents: truncated, {2 * MAX_BODY} bytes in all]"
    [cleaned] = await store.attempts(odd.id)
    assert cleaned.response_body == "nul\ufffd and ? lone"
    assert cleaned.error == "bad\ufffderror"
    assert cleaned.request_headers == {"x-a": "b\ufffdc", "Authorization": "***"}
    got = await store.get_event(odd.id)
    assert got is not None and got.doc_id == "2\ufffdx" and got.last_error == "bad\ufffderror"


async def test_purge_goes_in_batches_and_spares_the_queue(open_pg: OpenPg) -> None:
    class SmallBatches(PostgresStore):
        PURGE_BATCH = 3

    store = await open_pg(cls=SmallBatches)
    done = [make_event(doc_id=str(i)) for i in range(10)]
    waiting = [make_event(doc_id=str(i)) for i in range(3)]  # behind done[0..2]
    await store.enqueue([*done, *waiting], {})
    claimed = await store.claim({"t": 100}, 30.0, now())
    assert len(claimed) == 10
    await store.finish([delivered(e) for e in claimed])
    assert await store.purge(now() + timedelta(seconds=1),
                             [Status.DELIVERED, Status.PENDING]) == 10
    assert {e.id for e in await store.list_events(EventFilter())} == {e.id for e in waiting}


async def test_next_due_follows_heads_and_leases(open_pg: OpenPg) -> None:
    store = await open_pg()
    assert await store.next_due() is None
    a1, a2 = make_event(doc_id="a"), make_event(doc_id="a")
    await store.enqueue([a1, a2], {})
    due = await store.next_due()
    assert due is not None and abs((due - now()).total_seconds()) < 5  # due now
    claimed_at = now()
    await store.claim({"t": 10}, 60.0, claimed_at)
    due = await store.next_due()  # a1's lease; a2 waits for a1, not for the clock
    assert due == claimed_at + timedelta(seconds=60)
    retry = now() + timedelta(seconds=30)
    await store.finish([Finish(a1.id, attempt(a1, ok=False, error="HTTP 503"), Status.PENDING,
                               retry)])
    assert await store.next_due() == retry


async def test_enqueues_racing_finishes_keep_every_row_moving(
        open_pg: OpenPg, check_heads: Callable[[], None]) -> None:
    """Enqueues land on rows whose heads are being finished at that moment: no row
    may be left without a head (stuck for ever) or deliver out of order."""
    producer, consumer_a, consumer_b = await open_pg(), await open_pg(), await open_pg()
    rows = ["r0", "r1", "r2"]  # few rows: enqueues keep landing on rows being finished
    produced: list[Event] = []
    order: dict[str, list[int]] = {r: [] for r in rows}
    in_flight: set[str] = set()
    stop = asyncio.Event()

    async def produce() -> None:
        for n in range(80):
            batch = [make_event(doc_id=random.choice(rows), n=n) for _ in range(2)]
            produced.extend(batch)
            await producer.enqueue(batch, {})
            await asyncio.sleep(0)
        stop.set()

    async def consume(store: PostgresStore) -> None:
        idle = 0
        while not stop.is_set() or idle < 3:
            claimed = await store.claim({"t": 4}, 30.0, now())
            if not claimed:
                idle += 1
                await asyncio.sleep(0.005)
                continue
            idle = 0
            for ev in claimed:
                assert ev.doc_id not in in_flight
                assert ev.doc_id is not None
                in_flight.add(ev.doc_id)
                order[ev.doc_id].append(ev.seq)
            for ev in claimed:
                in_flight.discard(ev.doc_id)  # type: ignore[arg-type]
            await store.finish([delivered(ev) for ev in claimed])

    await asyncio.gather(produce(), consume(consumer_a), consume(consumer_b))
    stats = await producer.stats()
    assert [(s.pending, s.delivering, s.delivered) for s in stats] == [(0, 0, len(produced))]
    for seqs in order.values():
        assert seqs == sorted(seqs)
    check_heads()


async def test_an_enqueue_beside_a_finish_that_moves_its_rows_head(
        open_pg: OpenPg, postgres_server: PostgresServer, pg_store_db: str, pg_schema: str,
        check_heads: Callable[[], None]) -> None:
    """The race the queue lock is there for, made to happen: a1 is the only
    event of its row and is being finished when a2 of the same row is enqueued;
    the enqueue commits after the finish. a2 must end up claimable (without the
    lock it would be stored as "not the head" and wait for ever)."""
    worker, capture = await open_pg(), await open_pg()
    a1, a2 = make_event(doc_id="a"), make_event(doc_id="a")
    await worker.enqueue([a1], {})
    await worker.claim({"t": 1}, 30.0, now())
    with postgres_server.connect(pg_store_db, autocommit=False) as hold_finish, \
            postgres_server.connect(pg_store_db, autocommit=False) as hold_enqueue:
        # The finish stops after updating a1, before recording the attempt.
        hold_finish.execute(f"LOCK TABLE {pg_schema}.attempts IN SHARE MODE")
        # The enqueue stops after inserting a2, before moving the checkpoint.
        hold_enqueue.execute(f"LOCK TABLE {pg_schema}.checkpoints IN SHARE MODE")
        finishing = asyncio.create_task(worker.finish([delivered(a1)]))
        await wait_for_lock_waiters(postgres_server, pg_store_db, 1)
        enqueuing = asyncio.create_task(capture.enqueue([a2], {"app": Position("1")}))
        await wait_for_lock_waiters(postgres_server, pg_store_db, 2)
        hold_finish.rollback()
        await asyncio.wait_for(finishing, 10)
        hold_enqueue.rollback()
        assert await asyncio.wait_for(enqueuing, 10) == 1
    check_heads()
    assert [e.id for e in await worker.claim({"t": 1}, 30.0, now())] == [a2.id]


async def wait_for_lock_waiters(server: PostgresServer, dbname: str, n: int) -> None:
    for _ in range(200):
        rows = server.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                              "AND wait_event_type = 'Lock'", (dbname,))
        if rows[0][0] >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("nothing waits for the lock")


async def test_stored_times_are_utc_and_headers_are_json(open_pg: OpenPg,
                                                         pg_exec: Exec, pg_schema: str) -> None:
    store = await open_pg()
    ev = make_event()
    await store.enqueue([ev], {})
    got = await store.get_event(ev.id)
    assert got is not None and got.created_at is not None
    assert got.created_at.utcoffset() == timedelta(0)
    await store.claim({"t": 1}, 30.0, now())
    await store.finish([Finish(ev.id, attempt(ev, headers={"content-type": "a/b"}),
                               Status.DELIVERED)])
    [(headers,)] = pg_exec(f"SELECT request_headers::text FROM {pg_schema}.attempts")
    assert json.loads(str(headers)) == {"content-type": "a/b"}


async def test_find_event_ids_by_prefix(open_pg: OpenPg) -> None:
    store = await open_pg()
    ids = ["ab_1", "ab%2", "abc3", "abx", "b", "AB4"]
    await store.enqueue([attrs.evolve(make_event(doc_id=i), id=i) for i in ids], {})
    assert await store.find_event_ids("ab_", 10) == ["ab_1"]  # "_" is no wildcard
    assert await store.find_event_ids("ab%", 10) == ["ab%2"]
    assert await store.find_event_ids("ab", 10) == ["ab%2", "ab_1", "abc3", "abx"]
    assert await store.find_event_ids("ab", 2) == ["ab%2", "ab_1"]
    assert await store.find_event_ids("c", 10) == []


async def test_a_row_another_worker_holds_is_not_held_for_this_one(
        open_pg: OpenPg, check_heads: Callable[[], None]) -> None:
    one, two = await open_pg(), await open_pg()
    a1, a2, a3, b1 = (make_event(doc_id="a"), make_event(doc_id="a"), make_event(doc_id="a"),
                      make_event(doc_id="b"))
    assert [e.id for e in await one.enqueue_held([a1], {}, 30.0)] == [a1.id]
    # a2's row is in the first worker's memory: the second stores it pending behind.
    assert [e.id for e in await two.enqueue_held([a2, b1], {}, 30.0)] == [b1.id]
    # Behind a pending event the first worker does not hold a3 either.
    assert await one.enqueue_held([a3], {}, 30.0) == []
    check_heads()
    # The second worker's lease on b1 is not the first one's to renew.
    assert await one.renew([a1.id, b1.id], 30.0) == [b1.id]
    await one.finish([delivered(a1)])
    check_heads()
    [claimed] = await two.claim({"t": 10}, 30.0, now())
    assert claimed.id == a2.id
