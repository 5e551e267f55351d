"""A reader's cancellation arriving with its data."""

from __future__ import annotations

import asyncio
import select
from typing import TYPE_CHECKING

import pytest
from dbevents_source_postgres.replication import ReplicationStream

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
