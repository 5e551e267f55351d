"""The versioned schema: created once however many processes start at once,
migrated in place, refused when newer than the code or not ours."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest
from dbevents.errors import ConfigError, SetupError
from dbevents.protocols import EventFilter, StoreSettings
from dbevents.testing import make_event
from dbevents.values import Attempt, Finish, Status
from dbevents_store_postgres import PostgresStore
from dbevents_store_postgres.schema import MIGRATIONS, VERSION

OpenPg = Callable[..., Awaitable[PostgresStore]]
Exec = Callable[..., list[tuple[object, ...]]]


def version_of(pg_exec: Exec, schema: str) -> int:
    [(value,)] = pg_exec(f"SELECT value FROM {schema}.meta WHERE key = 'schema_version'")
    return int(str(value))


async def test_first_start_creates_the_schema(open_pg: OpenPg, pg_exec: Exec,
                                              pg_schema: str) -> None:
    await open_pg()
    tables = pg_exec("SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1",
                     (pg_schema,))
    assert [t for (t,) in tables] == ["attempts", "capture_leases", "checkpoints", "events",
                                      "meta"]
    assert version_of(pg_exec, pg_schema) == VERSION
    assert pg_exec("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]


async def test_workers_starting_at_once_create_it_once(open_pg: OpenPg, pg_exec: Exec,
                                                       pg_schema: str) -> None:
    stores = await asyncio.gather(*(open_pg() for _ in range(6)))
    ids = {await s.instance_id() for s in stores}
    assert len(ids) == 1 and "" not in ids
    assert pg_exec(f"SELECT count(*) FROM {pg_schema}.meta") == [(2,)]


async def test_an_older_schema_is_migrated_in_place(open_pg: OpenPg, pg_exec: Exec,
                                                    pg_schema: str) -> None:
    old = await open_pg()
    ev = make_event()
    await old.enqueue([ev], {})
    instance = await old.instance_id()
    await old.close()

    class Newer(PostgresStore):
        MIGRATIONS = (*MIGRATIONS, ("ALTER TABLE {schema}.events ADD COLUMN note text",
                                    "CREATE INDEX events_note ON {schema}.events (note)"))

    new = await open_pg(cls=Newer)
    assert version_of(pg_exec, pg_schema) == VERSION + 1
    assert pg_exec("SELECT count(*) FROM information_schema.columns WHERE table_schema = %s "
                   "AND table_name = 'events' AND column_name = 'note'", (pg_schema,)) == [(1,)]
    got = await new.get_event(ev.id)  # the data came through
    assert got is not None and got.payload == ev.payload
    assert await new.instance_id() == instance

    # The older code now meets a store newer than itself.
    with pytest.raises(SetupError) as info:
        await open_pg()
    message = str(info.value)
    assert f"schema version {VERSION + 1}" in message and f"version {VERSION})" in message
    assert "upgrade dbevents-store-postgres" in message


async def test_a_failing_migration_changes_nothing(open_pg: OpenPg, pg_exec: Exec,
                                                   pg_schema: str) -> None:
    await (await open_pg()).close()

    class Broken(PostgresStore):
        MIGRATIONS = (*MIGRATIONS, ("CREATE TABLE {schema}.extra (x int)",
                                    "ALTER TABLE {schema}.nonexistent ADD COLUMN y int"))

    with pytest.raises(SetupError, match=f"for schema version {VERSION + 1} failed, and "
                       'nothing was changed: relation ".*nonexistent" does not exist'):
        await open_pg(cls=Broken)
    assert version_of(pg_exec, pg_schema) == VERSION
    assert pg_exec("SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename = "
                   "'extra'", (pg_schema,)) == [(0,)]
    await open_pg()  # still fine for the current code


async def test_a_schema_of_another_application_is_refused(open_pg: OpenPg, pg_exec: Exec,
                                                          pg_schema: str) -> None:
    pg_exec(f"CREATE SCHEMA {pg_schema}")
    pg_exec(f"CREATE TABLE {pg_schema}.orders (id int)")
    with pytest.raises(SetupError, match="not a dbevents eventing DB \\(orders\\)"):
        await open_pg()
    assert pg_exec("SELECT count(*) FROM pg_tables WHERE schemaname = %s",
                   (pg_schema,)) == [(1,)]


async def test_an_empty_schema_made_by_a_dba_is_used(open_pg: OpenPg, pg_exec: Exec,
                                                     pg_schema: str) -> None:
    pg_exec(f"CREATE SCHEMA {pg_schema}")
    store = await open_pg()
    assert await store.enqueue([make_event()], {}) == 1


async def test_two_schemas_in_one_database_are_two_stores(open_pg: OpenPg,
                                                          pg_url: str) -> None:
    one = await open_pg()
    other = await open_pg(url=pg_url + "_other")
    ev = make_event()
    await one.enqueue([ev], {})
    assert await other.get_event(ev.id) is None
    assert await one.instance_id() != await other.instance_id()
    assert one.location.channel != other.location.channel


@pytest.mark.parametrize(("query", "message"), [
    ("pool_max_size=x", "pool_max_size must be a number"),
    ("pool_min_size=5&pool_max_size=2", "exceeds pool_max_size"),
    ("pool_max_size=0", "at least 1"),
    ("colour=blue", 'invalid URI query parameter: "colour"'),
])
def test_bad_url_parameters_are_config_errors(pg_url: str, query: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        PostgresStore(StoreSettings(url=pg_url + "&" + query))
    assert info.value.path == "eventing.store"


async def test_a_version_1_schema_gains_request_ids_and_keeps_its_attempts(
        open_pg: OpenPg, pg_exec: Exec, pg_schema: str) -> None:
    class First(PostgresStore):  # the first release's schema
        MIGRATIONS = MIGRATIONS[:1]

    old = await open_pg(cls=First)
    ev = make_event()
    await old.enqueue([ev], {})
    await old.close()
    # The attempt, in version 1's columns.
    pg_exec(f"UPDATE {pg_schema}.events SET status = 'delivered', attempts = 1, head = false")
    pg_exec(f"INSERT INTO {pg_schema}.attempts (event_seq, number, started_at, duration_ms, ok, "
            "status_code, request_headers, batch_size) "
            f"SELECT seq, 1, created_at, 2.0, true, 200, '{{}}', 1 FROM {pg_schema}.events")
    assert version_of(pg_exec, pg_schema) == 1

    new = await open_pg()
    assert version_of(pg_exec, pg_schema) == VERSION
    (kept,) = await new.attempts(ev.id)
    assert (kept.number, kept.status_code, kept.request_id, kept.batch_index) == (1, 200, None, 0)
    later = make_event(doc_id="2")
    await new.enqueue([later], {})
    await new.claim({"t": 1}, 30.0, datetime.now(UTC))
    await new.finish([Finish(later.id, Attempt(later.id, 1, datetime.now(UTC), 2.0, True, 200,
                                               request_id="r-1"), Status.DELIVERED)])
    assert [e.id for e in await new.list_events(EventFilter(request_id="r-1"))] == [later.id]
