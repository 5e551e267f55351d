"""The queue on a real SQLite file: per-row order over many rows, the same
claims as the reference MemoryStore, next_due, truncation and batched purge."""

from __future__ import annotations

import random
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
import pytest
from dbevents.protocols import EventFilter, Store, StoreSettings
from dbevents.testing import MemoryStore, make_event
from dbevents.values import Attempt, Event, Finish, Status
from dbevents_store_sqlite import SqliteStore
from dbevents_store_sqlite.eventlog import purge_batch
from dbevents_store_sqlite.rows import MAX_BODY, to_us

OpenStore = Callable[..., Awaitable[SqliteStore]]
LEASE = 30.5  # never a whole number of seconds from a claim, so no tie with the clock


def _attempt(ev: Event, ok: bool, body: str | None = "ok") -> Attempt:
    return Attempt(event_id=ev.id, number=ev.attempts + 1, started_at=datetime.now(UTC),
                   duration_ms=2.0, ok=ok, status_code=200 if ok else 500,
                   response_body=body, error=None if ok else "HTTP 500")


def _finish(ev: Event, verdict: str, retry_at: datetime | None = None) -> Finish:
    if verdict == "delivered":
        return Finish(ev.id, _attempt(ev, True), Status.DELIVERED)
    if verdict == "failed":
        return Finish(ev.id, _attempt(ev, False), Status.FAILED)
    return Finish(ev.id, _attempt(ev, False), Status.PENDING, retry_at)


async def test_many_rows_keep_their_order(open_sqlite: OpenStore) -> None:
    rng = random.Random(7)
    store = await open_sqlite()
    rows = [(t, d) for t in ("x", "y") for d in [*map(str, range(30)), None]]
    events = [make_event(trigger=t, doc_id=d) for t, d in (rng.choice(rows) for _ in range(900))]
    for i in range(0, len(events), 100):
        await store.enqueue(events[i:i + 100], {})
    seq = {e.id: e.seq for e in await store.list_events(EventFilter(limit=1000))}
    busy: dict[tuple[str, str | None], str] = {}  # row -> event in flight
    last_done: dict[tuple[str, str | None], int] = {}  # row -> seq of its last finished event
    finished = 0
    now = datetime.now(UTC)
    while finished < len(events):
        claimed = await store.claim({"x": 40, "y": 25}, LEASE, now)
        assert claimed, "work is left but nothing can be claimed"
        assert [e.seq for e in claimed] == sorted(e.seq for e in claimed)
        for ev in claimed:
            row = (ev.trigger, ev.doc_id)
            assert row not in busy, f"two events of {row} in flight"
            assert seq[ev.id] > last_done.get(row, 0), f"{row} went backwards"
            busy[row] = ev.id
        results = []
        for ev in claimed:
            verdict = rng.choices(["delivered", "failed", "retry"], [80, 5, 15])[0]
            results.append(_finish(ev, verdict, now))  # a retry is due at once
            if verdict != "retry":
                row = (ev.trigger, ev.doc_id)
                del busy[row]
                last_done[row] = seq[ev.id]
                finished += 1
            else:
                del busy[(ev.trigger, ev.doc_id)]
        await store.finish(results)
    stats = {s.trigger: s for s in await store.stats()}
    assert sum(s.delivered + s.failed for s in stats.values()) == len(events)
    assert sum(s.pending + s.delivering for s in stats.values()) == 0
    assert await store.next_due() is None


async def test_a_long_row_does_not_hold_up_the_others(open_sqlite: OpenStore) -> None:
    store = await open_sqlite()
    hot = [make_event(doc_id="hot") for _ in range(3000)]
    for i in range(0, len(hot), 500):
        await store.enqueue(hot[i:i + 500], {})
    others = [make_event(doc_id=str(i)) for i in range(5)]
    await store.enqueue(others, {})
    first = await store.claim({"t": 100}, LEASE, datetime.now(UTC))
    assert [e.id for e in first] == [hot[0].id] + [e.id for e in others]
    assert await store.claim({"t": 100}, LEASE, datetime.now(UTC)) == []
    await store.finish([_finish(hot[0], "delivered")])
    assert [e.id for e in await store.claim({"t": 100}, LEASE, datetime.now(UTC))] == [hot[1].id]


async def test_next_due_counts_heads_and_leases_only(open_sqlite: OpenStore) -> None:
    store = await open_sqlite()
    assert await store.next_due() is None
    a1, a2 = make_event(doc_id="a"), make_event(doc_id="a")
    await store.enqueue([a1, a2], {})
    due = await store.next_due()
    assert due is not None and due <= datetime.now(UTC)
    now = datetime.now(UTC)
    await store.claim({"t": 10}, LEASE, now)
    # a2 is due but waits behind a1: only a1's lease counts.
    assert await store.next_due() == datetime.fromtimestamp(to_us(now) / 1e6 + LEASE, UTC)
    retry_at = now + timedelta(seconds=5)
    await store.finish([_finish(a1, "retry", retry_at)])
    assert await store.next_due() == retry_at
    await store.claim({"t": 10}, LEASE, retry_at)
    await store.finish([_finish(a1, "delivered")])
    # Now a2 heads its row: its own due time counts.
    a2_now = await store.get_event(a2.id)
    assert a2_now is not None and await store.next_due() == a2_now.next_attempt_at


async def test_redelivering_an_older_event_puts_it_first_again(open_sqlite: OpenStore) -> None:
    store = await open_sqlite()
    a1, a2, a3 = (make_event(doc_id="a") for _ in range(3))
    await store.enqueue([a1, a2, a3], {})
    now = datetime.now(UTC)
    await store.claim({"t": 10}, LEASE, now)
    await store.finish([_finish(a1, "failed")])
    assert [e.id for e in await store.claim({"t": 10}, LEASE, now)] == [a2.id]
    await store.finish([_finish(a2, "delivered")])
    assert await store.redeliver([a1.id], None, None) == 1
    # a1 is older than a3, so it goes first; a3 waits for it.
    now = datetime.now(UTC)
    assert [e.id for e in await store.claim({"t": 10}, LEASE, now)] == [a1.id]
    await store.finish([_finish(a1, "delivered")])
    assert [e.id for e in await store.claim({"t": 10}, LEASE, now)] == [a3.id]


@pytest.mark.parametrize("seed", range(5))
async def test_claims_match_the_memory_store(open_sqlite: OpenStore, seed: int) -> None:
    """The same random sequence of operations on MemoryStore (the reference) and
    on SqliteStore gives the same claims, counts and final states."""
    rng = random.Random(seed)
    memory = MemoryStore(StoreSettings(url=f"memory://sqlite-diff-{uuid.uuid4()}"))
    await memory.open()
    sqlite = await open_sqlite()
    stores: tuple[Store, Store] = (memory, sqlite)
    clock = datetime.now(UTC) + timedelta(seconds=1)
    known: list[Event] = []
    in_flight: list[Event] = []
    for _ in range(80):
        op = rng.random()
        if op < 0.3:
            new = [make_event(trigger=rng.choice("xy"), doc_id=rng.choice(["1", "2", "3", None]))
                   for _ in range(rng.randint(1, 6))]
            batch = new + rng.sample(known, min(len(known), rng.randint(0, 2)))
            known += new
            counts = [await s.enqueue(batch, {}) for s in stores]
            assert counts[0] == counts[1] == len(new)
        elif op < 0.6:
            limits = {"x": rng.randint(0, 4), "y": rng.randint(0, 4)}
            claims = [await s.claim(limits, LEASE, clock) for s in stores]
            assert [e.id for e in claims[1]] == [e.id for e in claims[0]]
            in_flight += claims[0]
        elif op < 0.85 and in_flight:
            chosen = rng.sample(in_flight, rng.randint(1, len(in_flight)))
            in_flight = [e for e in in_flight if e not in chosen]
            results = [_finish(ev, rng.choice(["delivered", "failed", "retry"]),
                               clock + timedelta(seconds=rng.choice([0, 5, 50])))
                       for ev in chosen]
            for s in stores:
                await s.finish(results)
        elif op < 0.9 and in_flight:
            chosen = rng.sample(in_flight, rng.randint(1, len(in_flight)))
            in_flight = [e for e in in_flight if e not in chosen]
            for s in stores:
                await s.release([e.id for e in chosen])
        elif op < 0.95:
            trigger = rng.choice(["x", "y", None])
            counts = [await s.redeliver(None, Status.FAILED, trigger) for s in stores]
            assert counts[0] == counts[1]
        else:
            clock += timedelta(seconds=rng.choice([1, 10, 100]))
        assert await sqlite.stats() == await memory.stats()
        assert (await sqlite.next_due() is None) == (await memory.next_due() is None)
    for ev in known:
        mine, ref = await sqlite.get_event(ev.id), await memory.get_event(ev.id)
        assert mine is not None and ref is not None
        assert (mine.status, mine.attempts, mine.last_error) == \
            (ref.status, ref.attempts, ref.last_error)
        assert len(await sqlite.attempts(ev.id)) == len(await memory.attempts(ev.id))


@pytest.mark.parametrize(("body", "kept"), [
    (None, None),
    ("short", "short"),
    ("x" * MAX_BODY, "x" * MAX_BODY),  # exactly 64 KiB is kept whole
])
async def test_bodies_up_to_64_kib_are_kept_whole(open_sqlite: OpenStore, body: str | None,
                                                  kept: str | None) -> None:
    assert await _stored_body(await open_sqlite(), body) == kept


async def test_longer_bodies_keep_their_first_64_kib(open_sqlite: OpenStore) -> None:
    store = await open_sqlite()
    ascii_body = "a" * (MAX_BODY + 10_000)
    stored = await _stored_body(store, ascii_body)
    assert stored == "a" * MAX_BODY + f"\n[dbevents: truncated, {MAX_BODY + 10_000} bytes in all]"
    # A 3-byte character straddling the limit is dropped, never cut in half.
    multibyte = "a" * (MAX_BODY - 1) + "€" * 10
    stored = await _stored_body(store, multibyte)
    assert stored is not None
    kept, mark = stored.split("\n[dbevents: truncated, ")
    assert kept == "a" * (MAX_BODY - 1) and mark == f"{MAX_BODY - 1 + 30} bytes in all]"


async def _stored_body(store: SqliteStore, body: str | None) -> str | None:
    ev = make_event(doc_id=str(uuid.uuid4()))
    await store.enqueue([ev], {})
    await store.claim({"t": 1000}, LEASE, datetime.now(UTC))
    await store.finish([Finish(ev.id, _attempt(ev, True, body), Status.DELIVERED)])
    [attempt] = await store.attempts(ev.id)
    return attempt.response_body


async def test_purge_works_in_batches(open_sqlite: OpenStore, db_path: Path) -> None:
    store = await open_sqlite()
    evs = [make_event(doc_id=str(i)) for i in range(60)]
    await store.enqueue(evs, {})
    await store.claim({"t": 100}, LEASE, datetime.now(UTC))
    results = [_finish(ev, "delivered") for ev in evs[:50]]
    results += [_finish(ev, "failed") for ev in evs[50:55]]
    await store.finish(results)  # evs[55:] stay in flight
    later = datetime.now(UTC) + timedelta(seconds=1)

    # One batch is one transaction deleting at most `limit` events.
    with sqlite3.connect(db_path) as raw:
        assert purge_batch(raw, to_us(later), [Status.DELIVERED], 7) == 7
        raw.commit()
    store.PURGE_BATCH = 7
    assert await store.purge(later, [Status.DELIVERED, Status.PENDING, Status.DELIVERING]) == 43
    left = await store.list_events(EventFilter(limit=100))
    assert sorted(e.status.value for e in left) == ["delivering"] * 5 + ["failed"] * 5
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT count(*) FROM attempts").fetchone()[0] == 5
    assert await store.purge(later, [Status.FAILED]) == 5
    assert await store.purge(later, [Status.FAILED]) == 0


async def test_an_event_finished_twice_in_one_batch_keeps_its_row_moving(
        open_sqlite: OpenStore) -> None:
    store = await open_sqlite()
    a1, a2 = make_event(doc_id="a"), make_event(doc_id="a")
    await store.enqueue([a1, a2], {})
    now = datetime.now(UTC)
    await store.claim({"t": 10}, LEASE, now)
    # Delivered, then (a late duplicate result) back to pending: a1 heads its row again.
    await store.finish([_finish(a1, "delivered"), _finish(a1, "retry", now)])
    assert [e.id for e in await store.claim({"t": 10}, LEASE, now)] == [a1.id]
    await store.finish([_finish(a1, "delivered")])
    assert [e.id for e in await store.claim({"t": 10}, LEASE, now)] == [a2.id]


async def test_a_batch_with_an_event_no_longer_active_is_recorded_whole(
        open_sqlite: OpenStore) -> None:
    """Results are written by id without reading the events first while every
    one is still active; one that is not (a late result for an event already
    finished) sends the whole batch the long way, and nothing of the first try
    stays."""
    store = await open_sqlite()
    a1, b1, b2 = make_event(doc_id="a"), make_event(doc_id="b"), make_event(doc_id="b")
    await store.enqueue([a1, b1, b2], {})
    now = datetime.now(UTC)
    assert [e.id for e in await store.claim({"t": 10}, LEASE, now)] == [a1.id, b1.id]
    await store.finish([_finish(a1, "delivered")])
    await store.finish([_finish(b1, "delivered"), _finish(a1, "retry", now)])
    # b1 done: b2 heads row b; a1 back to pending heads row a again.
    assert [e.id for e in await store.claim({"t": 10}, LEASE, now)] == [a1.id, b2.id]
    assert [len(await store.attempts(e.id)) for e in (a1, b1, b2)] == [2, 1, 0]
    got = await store.get_event(b1.id)
    assert got is not None and got.status is Status.DELIVERED


async def test_find_event_ids_by_prefix(open_sqlite: OpenStore) -> None:
    store = await open_sqlite()
    ids = ["ab_1", "ab%2", "abc3", "abx", "b"]
    await store.enqueue([attrs.evolve(make_event(doc_id=i), id=i) for i in ids], {})
    assert await store.find_event_ids("ab_", 10) == ["ab_1"]  # "_" is no wildcard
    assert await store.find_event_ids("ab%", 10) == ["ab%2"]
    assert await store.find_event_ids("ab", 10) == sorted(ids[:4])
    assert await store.find_event_ids("ab", 2) == sorted(ids[:4])[:2]
    assert await store.find_event_ids("abc3", 10) == ["abc3"]
    assert await store.find_event_ids("c", 10) == []
