"""A capture holder's source and the replication slot a previous holder may still
hold; cancellations of a reader and of a closing stream that must not be lost."""

from __future__ import annotations

import asyncio
import select
from typing import TYPE_CHECKING

import pytest
from dbevents_source_postgres.replication import ReplicationStream
from structlog.testing import capture_logs

if TYPE_CHECKING:
    from plugins.sources.postgres.tests.conftest import PgEnv


async def test_a_reader_cancelled_as_its_data_arrives_ends(pg: PgEnv) -> None:
    """The cancellation reaches a read whose socket turned readable in the same
    loop pass (the data is there, its task not yet resumed): the read ends
    cancelled rather than returning the data and reading on."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    source = await pg.started(tables=["t"])
    stream = await ReplicationStream.open(pg.url, source.slot, [source.publication], 0, 0)
    try:
        while True:  # until the read waits for the socket (keepalives come first)
            read = asyncio.create_task(stream.read())
            await asyncio.sleep(0.1)
            if not read.done():
                break
        pg.execute("INSERT INTO t VALUES (1)")
        # Block the loop until the data is on the socket: the next pass runs
        # this task first, then the socket's callback, which completes what
        # the read waits on; the cancel comes in the pass after, before the
        # read resumes.
        select.select([stream._fd], [], [], 10)
        await asyncio.sleep(0)
        asyncio.get_running_loop().call_soon(read.cancel)
        with pytest.raises(asyncio.CancelledError):
            await read
    finally:
        await stream.close()


async def test_a_lease_holder_ends_the_previous_reader_of_its_slot(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    first = await pg.started(tables=["t"])
    old = pg.reader(first)
    pg.execute("INSERT INTO t VALUES (1)")
    await old.until(1, confirm=True)
    walsender = pg.slot(first)["pid"]
    assert walsender is not None

    holder = pg.source(tables=["t"], lease_held=lambda: True)
    await holder.start()
    new = pg.reader(holder, since=old.checkpoints[-1])
    with capture_logs() as logs:
        pg.execute("INSERT INTO t VALUES (2)")
        await new.until(1)
    assert [c.doc for c in new.changes] == [{"id": 2}]
    [ended] = [e for e in logs if e["event"].startswith("replication slot held by a previous")]
    assert (ended["slot"], ended["backend_pid"]) == (holder.slot, walsender)
    assert ended["log_level"] == "warning"
    assert pg.slot(holder)["pid"] not in (None, walsender)
    assert not pg.server.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (walsender,))


async def test_without_the_lease_the_previous_reader_is_left_alone(pg: PgEnv) -> None:
    """A source whose process no longer holds the lease (a holder paused past
    it) must not end the reader of the process that holds it now: it waits."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    first = await pg.started(tables=["t"])
    current = pg.reader(first)
    pg.execute("INSERT INTO t VALUES (1)")
    await current.until(1, confirm=True)
    walsender = pg.slot(first)["pid"]

    paused = pg.source(tables=["t"], lease_held=lambda: False)
    await paused.start()
    stale = pg.reader(paused, since=current.checkpoints[-1])
    with capture_logs() as logs:
        pending = asyncio.ensure_future(stale.next_batch(within=60))
        while len([e for e in logs if "reconnecting" in e["event"]]) < 2:
            assert not pending.done()
            await asyncio.sleep(0.05)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
    assert all("is active for PID" in e["error"] for e in logs if "reconnecting" in e["event"])
    assert not [e for e in logs if e["event"].startswith("replication slot held by")]
    assert pg.slot(first)["pid"] == walsender
    # The holder's stream goes on.
    pg.execute("INSERT INTO t VALUES (2)")
    await current.until(2)
    assert [c.doc for c in current.changes] == [{"id": 1}, {"id": 2}]


async def test_a_holder_not_allowed_to_end_the_reader_waits_for_it(pg: PgEnv,
                                                                   role: str) -> None:
    """The previous reader runs as a superuser, the holder as a plain role with
    REPLICATION: PostgreSQL refuses to end that session, so the holder says so
    once and keeps retrying the slot."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pg.server.execute(f"ALTER ROLE {role} WITH REPLICATION")
    pg.execute(f"GRANT SELECT ON t TO {role}")
    first = await pg.started(tables=["t"])
    current = pg.reader(first)
    pg.execute("INSERT INTO t VALUES (1)")
    await current.until(1, confirm=True)
    walsender = pg.slot(first)["pid"]

    holder = pg.source(tables=["t"], url=pg.server.dsn(pg.dbname, user=role),
                       lease_held=lambda: True)
    waiting = pg.reader(holder, since=current.checkpoints[-1])
    with capture_logs() as logs:
        pending = asyncio.ensure_future(waiting.next_batch(within=60))
        while len([e for e in logs if "reconnecting" in e["event"]]) < 2:
            assert not pending.done()
            await asyncio.sleep(0.05)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
    [refused] = [e for e in logs if e["event"].startswith("cannot end the previous reader")]
    assert refused["slot"] == holder.slot and "superuser" in refused["error"]
    assert pg.slot(first)["pid"] == walsender


async def test_a_close_cancelled_half_way_closes_and_stays_cancelled(pg: PgEnv) -> None:
    """The stream's close waits for its status timer to end; a cancellation of
    the closing task arriving then is kept (a reader stopped while it closed a
    broken stream went on reconnecting), and the session is closed anyway."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    source = await pg.started(tables=["t"])
    stream = await ReplicationStream.open(pg.url, source.slot, [source.publication], 0, 0)
    closing = asyncio.create_task(stream.close())
    await asyncio.sleep(0)  # it runs first, up to waiting for its timer
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    pg.wait_slot_released(source.slot)
