"""What a SQLite store keeps across a close and a reopen, and how it stores it."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dbevents.protocols import EventFilter, StoreSettings
from dbevents.testing import make_event
from dbevents.values import Attempt, Finish, Position, Status
from dbevents_store_sqlite import SqliteStore

OpenStore = Callable[..., Awaitable[SqliteStore]]


def _attempt(event_id: str, number: int, ok: bool, when: datetime) -> Attempt:
    return Attempt(event_id=event_id, number=number, started_at=when, duration_ms=12.5, ok=ok,
                   status_code=200 if ok else 503, response_body="fine" if ok else "busy",
                   error=None if ok else "HTTP 503",
                   request_headers={"content-type": "application/json", "x-api-key": "s3cret"})


async def test_everything_survives_a_reopen(open_sqlite: OpenStore) -> None:
    store = await open_sqlite()
    instance = await store.instance_id()
    delivered, failed, waiting = (make_event(doc_id=str(i)) for i in range(3))
    await store.enqueue([delivered, failed, waiting], {"app": Position("0/AB")})
    await store.claim({"t": 10}, 30.0, datetime.now(UTC))
    started = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
    retry_at = datetime.now(UTC) + timedelta(minutes=5)
    await store.finish([
        Finish(delivered.id, _attempt(delivered.id, 1, True, started), Status.DELIVERED),
        Finish(failed.id, _attempt(failed.id, 4, False, started), Status.FAILED),
        Finish(waiting.id, _attempt(waiting.id, 1, False, started), Status.PENDING, retry_at),
    ])
    await store.close()

    again = await open_sqlite()
    assert await again.instance_id() == instance
    assert await again.checkpoints() == {"app": Position("0/AB")}
    got = {e.id: e for e in await again.list_events(EventFilter(limit=10))}
    assert (got[delivered.id].status, got[failed.id].status, got[waiting.id].status) == \
        (Status.DELIVERED, Status.FAILED, Status.PENDING)
    assert got[failed.id].attempts == 4 and got[failed.id].last_error == "HTTP 503"
    assert got[waiting.id].next_attempt_at == retry_at  # to the microsecond
    assert got[delivered.id].payload == delivered.payload
    [attempt] = await again.attempts(delivered.id)
    assert attempt.started_at == started and attempt.started_at.tzinfo is not None
    assert attempt.duration_ms == 12.5 and attempt.response_body == "fine"
    assert attempt.request_headers == {"content-type": "application/json", "x-api-key": "***"}
    # The retry keeps its row's place: not due now, due after retry_at.
    assert await again.claim({"t": 10}, 30.0, datetime.now(UTC)) == []
    later = await again.claim({"t": 10}, 30.0, retry_at + timedelta(seconds=1))
    assert [e.id for e in later] == [waiting.id]


async def test_times_are_utc_and_seq_follows_enqueue_order(open_sqlite: OpenStore) -> None:
    store = await open_sqlite()
    first = [make_event(doc_id=str(i)) for i in range(3)]
    second = [make_event(doc_id=str(i)) for i in range(3)]
    await store.enqueue(first, {})
    await store.enqueue(second, {})
    listed = await store.list_events(EventFilter(limit=10))
    assert [e.id for e in reversed(listed)] == [e.id for e in first + second]  # newest first
    seqs = [e.seq for e in reversed(listed)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6
    for ev in listed:
        assert ev.created_at is not None and ev.created_at.utcoffset() == timedelta(0)
        assert ev.next_attempt_at == ev.created_at == ev.updated_at


async def test_duplicates_inside_one_batch_count_once(open_sqlite: OpenStore) -> None:
    store = await open_sqlite()
    ev = make_event()
    assert await store.enqueue([ev, ev, make_event(doc_id="2")], {}) == 2
    assert len(await store.list_events(EventFilter())) == 2


async def test_a_replayed_batch_moves_the_checkpoint_and_stores_nothing(
        open_sqlite: OpenStore) -> None:
    store = await open_sqlite()
    batch = [make_event(doc_id=str(i)) for i in range(4)]
    assert await store.enqueue(batch, {"app": Position("1")}) == 4
    assert await store.enqueue(batch, {"app": Position("2")}) == 0
    assert await store.checkpoint("app") == Position("2")
    assert len(await store.list_events(EventFilter())) == 4


async def test_the_file_is_in_wal_mode_and_synchronous_is_configurable(
        open_sqlite: OpenStore, db_path: Path) -> None:
    normal = await open_sqlite()
    assert await normal._call(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 1
    await normal.close()
    full = await open_sqlite(query="synchronous=full")
    assert await full._call(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_sqlite_runs_on_its_own_thread(open_sqlite: OpenStore) -> None:
    store = await open_sqlite()
    ident = await store._call(lambda c: threading.get_ident())
    assert ident != threading.get_ident()
    assert ident == await store._call(lambda c: threading.get_ident())  # always the same one


async def test_a_relative_path_is_relative_to_the_config_folder(tmp_path: Path) -> None:
    store = SqliteStore(StoreSettings(url="sqlite:///data.db", config_dir=tmp_path))
    await store.open()
    try:
        await store.enqueue([make_event()], {})
    finally:
        await store.close()
    assert (tmp_path / "data.db").is_file()


async def test_in_memory_store_works_for_a_trial() -> None:
    store = SqliteStore(StoreSettings(url="sqlite:///:memory:"))
    await store.open()
    try:
        ev = make_event()
        assert await store.enqueue([ev], {}) == 1
        assert [e.id for e in await store.claim({"t": 5}, 30.0, datetime.now(UTC))] == [ev.id]
    finally:
        await store.close()


async def test_subscribe_wakes_on_another_process_commit(open_sqlite: OpenStore) -> None:
    worker = await open_sqlite()
    worker.WATCH_INTERVAL = 0.02
    woken = threading.Event()
    worker.subscribe(woken.set)
    admin = await open_sqlite(role="admin")
    await asyncio.sleep(0.1)  # the watcher has read the starting version
    ev = make_event()
    await worker.enqueue([ev], {})  # its own commit: the engine wakes itself for these
    await asyncio.sleep(0.1)
    assert not woken.is_set()
    await admin.redeliver([ev.id], None, None)
    for _ in range(200):
        if woken.is_set():
            break
        await asyncio.sleep(0.01)
    assert woken.is_set()
