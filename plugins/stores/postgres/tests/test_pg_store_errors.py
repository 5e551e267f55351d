"""What goes wrong: unreachable servers, logins, read-only databases, missing
privileges (SetupError at open), and a server restarting under a running store
(operations fail, then recover)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import structlog
from dbevents.errors import SetupError, StoreUnavailable
from dbevents.protocols import StoreSettings
from dbevents.testing import make_event
from dbevents.values import Attempt, Finish, Status
from dbevents_store_postgres import PostgresStore

from testsupport.ports import free_port
from testsupport.servers import PostgresServer

OpenPg = Callable[..., Awaitable[PostgresStore]]
Exec = Callable[..., list[tuple[object, ...]]]
PASSWORD = "Corr3ct-Horse"


@pytest.fixture(scope="module")
def own_server() -> Iterator[PostgresServer]:
    """A private server of this module's own, as tests here restart it and
    change its login rules: one role logs in with a password."""
    server = PostgresServer().start()
    try:
        hba = server.datadir / "pg_hba.conf"
        hba.write_text("host all pw_user 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        server.execute(f"CREATE ROLE pw_user LOGIN PASSWORD '{PASSWORD}'")
        server.execute("GRANT CREATE ON DATABASE postgres TO pw_user")
        server.execute("SELECT pg_reload_conf()")
        yield server
    finally:
        server.stop()


@pytest.fixture
async def opened() -> AsyncIterator[OpenPg]:
    stores: list[PostgresStore] = []

    async def open_(url: str, role: str = "worker") -> PostgresStore:
        store = PostgresStore(StoreSettings(url=url, role=role))
        await store.open()
        stores.append(store)
        return store

    yield open_
    for store in stores:
        await store.close()


async def open_fails(url: str) -> str:
    with pytest.raises(SetupError) as info:
        store = PostgresStore(StoreSettings(url=url))
        await store.open()
        await store.close()
    assert info.value.exit_code == 2
    return str(info.value)


async def test_an_unreachable_server(opened: OpenPg) -> None:
    port = free_port()
    message = await open_fails(f"postgresql://app:s3cret-pw@127.0.0.1:{port}/events")
    assert f"cannot reach PostgreSQL at 127.0.0.1:{port}" in message
    assert "Connection refused" in message
    assert "postgresql://app:***@127.0.0.1" in message and "s3cret-pw" not in message


async def test_a_wrong_password(own_server: PostgresServer, opened: OpenPg) -> None:
    url = f"postgresql://pw_user:Wr0ng-pw@127.0.0.1:{own_server.port}/postgres"
    message = await open_fails(url)
    assert "refused the login of user 'pw_user'" in message
    assert "authentication failed" in message and "Wr0ng-pw" not in message
    # The right one works, and it shows up in no log line.
    with structlog.testing.capture_logs() as logs:
        await opened(f"postgresql://pw_user:{PASSWORD}@127.0.0.1:{own_server.port}/postgres"
                     f"?schema=pw_{uuid.uuid4().hex[:6]}")
    assert logs and PASSWORD not in repr(logs)


async def test_a_password_in_the_query_is_masked_too(opened: OpenPg) -> None:
    port = free_port()
    message = await open_fails(f"postgresql://app@127.0.0.1:{port}/events?password=s3cret-pw")
    assert "s3cret-pw" not in message and "password=***" in message


async def test_an_unknown_role_or_database(postgres_server: PostgresServer) -> None:
    message = await open_fails(postgres_server.dsn("postgres", user="nobody_here"))
    assert "has no role 'nobody_here'" in message
    message = await open_fails(postgres_server.dsn("no_such_db"))
    assert "has no database 'no_such_db'" in message


async def test_a_read_only_database(postgres_server: PostgresServer, pg_database: str) -> None:
    postgres_server.execute(
        f"ALTER DATABASE {pg_database} SET default_transaction_read_only = on")
    message = await open_fails(postgres_server.dsn(pg_database))
    assert "is read-only for user 'postgres'" in message
    assert "default_transaction_read_only" in message


async def test_missing_privileges_are_named_with_their_grants(
        postgres_server: PostgresServer, pg_store_db: str, pg_schema: str, pg_exec: Exec,
        opened: OpenPg) -> None:
    role = f"limited_{uuid.uuid4().hex[:6]}"
    postgres_server.execute(f"CREATE ROLE {role} LOGIN")
    as_role = f"{postgres_server.dsn(pg_store_db, user=role)}?schema={pg_schema}"
    message = await open_fails(as_role)
    assert f"user '{role}' may not create the schema '{pg_schema}'" in message
    assert f'GRANT CREATE ON DATABASE "{pg_store_db}" TO "{role}"' in message

    # A DBA creates the store as its owner; the role can't use it yet.
    owner = await opened(f"{postgres_server.dsn(pg_store_db)}?schema={pg_schema}")
    message = await open_fails(as_role)
    assert f'GRANT USAGE ON SCHEMA "{pg_schema}" TO "{role}"' in message
    pg_exec(f"GRANT USAGE ON SCHEMA {pg_schema} TO {role}")
    pg_exec(f"GRANT SELECT ON ALL TABLES IN SCHEMA {pg_schema} TO {role}")
    message = await open_fails(as_role)
    for table in ("events", "attempts", "checkpoints", "meta"):
        assert f'GRANT INSERT, UPDATE, DELETE ON "{pg_schema}"."{table}" TO "{role}"' \
            in message

    pg_exec(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {pg_schema} "
            f"TO {role}")
    store = await opened(as_role)
    ev = make_event()
    assert await store.enqueue([ev], {}) == 1
    [claimed] = await store.claim({"t": 1}, 30.0, datetime.now(UTC))
    await store.finish([Finish(ev.id, Attempt(event_id=ev.id, number=1,
                                              started_at=datetime.now(UTC), duration_ms=1.0,
                                              ok=True), Status.DELIVERED)])
    assert claimed.id == ev.id and len(await owner.attempts(ev.id)) == 1
    assert await store.purge(datetime.now(UTC) + timedelta(seconds=1), [Status.DELIVERED]) == 1


async def test_a_server_restart_under_a_running_store(own_server: PostgresServer,
                                                      opened: OpenPg) -> None:
    url = (f"{own_server.dsn()}?schema=restart_{uuid.uuid4().hex[:6]}"
           "&pool_timeout=3")
    store = await opened(url)
    other = await opened(url)
    woken = asyncio.Event()
    store.subscribe(woken.set)
    await asyncio.wait_for(store._listener.connected.wait(), 10)
    before = [make_event(doc_id=str(i)) for i in range(10)]
    assert await store.enqueue(before, {}) == 10

    await asyncio.to_thread(own_server.restart)

    # The pool's connections died with the server: the engine sees a failure it
    # retries (StoreUnavailable), and a retry soon gets through.
    after = [make_event(doc_id=str(i)) for i in range(10, 20)]
    failures: list[Exception] = []
    deadline = time.monotonic() + 20
    while True:
        try:
            assert await store.enqueue(after, {}) == 10
            break
        except StoreUnavailable as exc:
            failures.append(exc)
            assert time.monotonic() < deadline, f"no recovery: {failures}"
            await asyncio.sleep(0.2)
    assert failures, "the first operation after the restart should have failed"
    assert all("eventing DB postgresql://postgres@127.0.0.1" in str(f) for f in failures)
    stats = await store.stats()
    assert [s.pending for s in stats] == [20]

    # The listener reconnected too: another store's enqueue wakes this one.
    await asyncio.wait_for(store._listener.connected.wait(), 15)
    woken.clear()
    for _ in range(50):  # the other store's pool may need a retry of its own
        try:
            await other.enqueue([make_event()], {})
            break
        except StoreUnavailable:
            await asyncio.sleep(0.2)
    await asyncio.wait_for(woken.wait(), 10)


async def test_preflight_lists_missing_rights_and_creates_nothing(
        postgres_server: PostgresServer, pg_store_db: str, pg_schema: str,
        opened: OpenPg) -> None:
    role = f"limited_{uuid.uuid4().hex[:6]}"
    postgres_server.execute(f"CREATE ROLE {role} LOGIN")
    as_role = f"{postgres_server.dsn(pg_store_db, user=role)}?schema={pg_schema}"
    problems = await PostgresStore(StoreSettings(url=as_role)).preflight()
    assert len(problems) == 1
    assert f"user '{role}' may not create the schema '{pg_schema}'" in problems[0].message

    owner_url = f"{postgres_server.dsn(pg_store_db)}?schema={pg_schema}"
    assert await PostgresStore(StoreSettings(url=owner_url)).preflight() == []
    assert postgres_server.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                                   (pg_schema,), dbname=pg_store_db) == []

    await opened(owner_url)  # created by its owner: the role now lacks the grants
    problems = await PostgresStore(StoreSettings(url=as_role)).preflight()
    assert [p.message for p in problems if f'GRANT USAGE ON SCHEMA "{pg_schema}"' in p.message]

    down = f"postgresql://u:S3cret-pw@127.0.0.1:{free_port()}/x"
    problems = await PostgresStore(StoreSettings(url=down)).preflight()
    assert len(problems) == 1 and "cannot reach PostgreSQL" in problems[0].message
    assert "S3cret-pw" not in problems[0].message
