"""The versioned schema: created on first start, migrated in place, a newer one
refused."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dbevents.errors import SetupError
from dbevents.protocols import EventFilter
from dbevents.testing import make_event
from dbevents.values import Attempt, Finish, Position, Status
from dbevents_store_sqlite import SqliteStore, schema

OpenStore = Callable[..., Awaitable[SqliteStore]]


def _exists(path: Path) -> bool:
    return path.exists()


def _header(path: Path) -> tuple[int, int]:
    with sqlite3.connect(path) as raw:
        return (raw.execute("PRAGMA user_version").fetchone()[0],
                raw.execute("PRAGMA application_id").fetchone()[0])


async def test_first_start_creates_the_schema(open_sqlite: OpenStore, db_path: Path) -> None:
    assert not _exists(db_path)
    await open_sqlite()
    assert _header(db_path) == (schema.latest(), schema.APPLICATION_ID)
    with sqlite3.connect(db_path) as raw:
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"events", "attempts", "checkpoints", "meta"} <= tables


async def test_reopening_an_up_to_date_file_changes_nothing(open_sqlite: OpenStore,
                                                           db_path: Path) -> None:
    first = await open_sqlite()
    instance = await first.instance_id()
    await first.close()
    with sqlite3.connect(db_path) as raw:
        before = raw.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    second = await open_sqlite()
    assert await second.instance_id() == instance
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == before


async def test_an_older_file_is_migrated_in_place(open_sqlite: OpenStore, db_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    old = await open_sqlite()
    ev = make_event()
    await old.enqueue([ev], {"app": Position("7")})
    instance = await old.instance_id()
    await old.close()
    # The next release of the code adds a step.
    step = ("ALTER TABLE events ADD COLUMN note TEXT",
            "CREATE INDEX events_note ON events (note) WHERE note IS NOT NULL")
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, step))
    new = await open_sqlite()
    assert _header(db_path)[0] == len(schema.MIGRATIONS)
    assert await new.instance_id() == instance
    assert await new.checkpoint("app") == Position("7")
    [kept] = await new.list_events(EventFilter())
    assert kept.id == ev.id and kept.payload == ev.payload
    assert [e.id for e in await new.claim({"t": 1}, 30.0, datetime.now(UTC))] == [ev.id]
    with sqlite3.connect(db_path) as raw:
        columns = {r[1] for r in raw.execute("PRAGMA table_info(events)")}
    assert "note" in columns


async def test_a_failing_migration_leaves_the_file_as_it_was(
        open_sqlite: OpenStore, db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = await open_sqlite()
    await old.enqueue([make_event()], {})
    await old.close()
    broken = ("ALTER TABLE events ADD COLUMN note TEXT", "CREATE TABLE events (x)")
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, broken))
    with pytest.raises(SetupError, match="already exists"):
        await open_sqlite()
    assert _header(db_path)[0] == len(schema.MIGRATIONS) - 1
    with sqlite3.connect(db_path) as raw:
        assert "note" not in {r[1] for r in raw.execute("PRAGMA table_info(events)")}
        assert raw.execute("SELECT count(*) FROM events").fetchone()[0] == 1


async def test_a_cli_command_does_not_migrate_under_a_running_worker(
        open_sqlite: OpenStore, db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await open_sqlite()  # an older worker, still running
    current = schema.latest()
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, ("SELECT 1",)))
    with pytest.raises(SetupError) as info:
        await open_sqlite(role="admin")
    assert f"schema version {current}" in str(info.value)
    assert f"needs version {current + 1}" in str(info.value)
    assert _header(db_path)[0] == current


async def test_a_newer_file_is_refused(open_sqlite: OpenStore, db_path: Path) -> None:
    store = await open_sqlite()
    await store.close()
    with sqlite3.connect(db_path) as raw:
        raw.execute("PRAGMA user_version = 99")
    with pytest.raises(SetupError) as info:
        await open_sqlite()
    message = str(info.value)
    assert "schema version 99" in message and f"versions 1 to {schema.latest()}" in message
    assert str(db_path) in message
    assert _header(db_path)[0] == 99  # untouched


async def test_another_applications_database_is_refused(open_sqlite: OpenStore,
                                                       db_path: Path) -> None:
    with sqlite3.connect(db_path) as raw:
        raw.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(SetupError, match=r"not a dbevents eventing DB.*customers"):
        await open_sqlite()
    with sqlite3.connect(db_path) as raw:
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"customers"}


async def test_a_version_1_file_gains_request_ids_and_keeps_its_attempts(
        open_sqlite: OpenStore, db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file as the first release wrote it: one event, delivered, one attempt.
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
    old = await open_sqlite()
    ev = make_event()
    await old.enqueue([ev], {})
    await old.close()
    with sqlite3.connect(db_path) as raw:  # the attempt, in version 1's columns
        raw.execute("UPDATE events SET status = 'delivered', attempts = 1, head = 0")
        raw.execute("INSERT INTO attempts (event_seq, number, started_at, duration_ms, ok, "
                    "status_code, request_headers, batch_size) "
                    "SELECT seq, 1, created_at, 2.0, 1, 200, '{}', 1 FROM events")
    assert _header(db_path)[0] == 1
    monkeypatch.undo()
    new = await open_sqlite()
    assert _header(db_path)[0] == schema.latest()
    (kept,) = await new.attempts(ev.id)
    assert (kept.number, kept.status_code, kept.request_id, kept.batch_index) == (1, 200, None, 0)
    # A batch attempt recorded after the upgrade carries its request.
    later = make_event(doc_id="2")
    await new.enqueue([later], {})
    await new.claim({"t": 1}, 30.0, datetime.now(UTC))
    await new.finish([Finish(later.id, Attempt(later.id, 1, datetime.now(UTC), 2.0, True, 200,
                                               batch_size=1, request_id="r-1", batch_index=0),
                             Status.DELIVERED)])
    assert [e.id for e in await new.list_events(EventFilter(request_id="r-1"))] == [later.id]
