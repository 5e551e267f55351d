"""One worker per SQLite file, and a worker's start takes back the claims of
the one before it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dbevents.errors import SetupError
from dbevents.protocols import EventFilter
from dbevents.testing import make_event
from dbevents.values import Status
from dbevents_store_sqlite import SqliteStore

OpenStore = Callable[..., Awaitable[SqliteStore]]

# A worker in another process: claims everything with a long lease, says so,
# then waits to be killed.
CHILD = textwrap.dedent("""
    import asyncio, sys
    from datetime import UTC, datetime
    from dbevents.protocols import StoreSettings
    from dbevents_store_sqlite import SqliteStore

    async def main() -> None:
        store = SqliteStore(StoreSettings(url="sqlite:///" + sys.argv[1]))
        await store.open()
        claimed = await store.claim({"t": 100}, 3600.0, datetime.now(UTC))
        print("claimed", len(claimed), flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


@pytest.fixture
def child_worker(db_path: Path) -> Iterator[Callable[[], subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(db_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


async def test_a_second_worker_is_refused(open_sqlite: OpenStore, db_path: Path) -> None:
    await open_sqlite()
    with pytest.raises(SetupError) as info:
        await open_sqlite()
    message = str(info.value)
    assert message.startswith("another dbevents process")
    assert f"is using this eventing DB: {db_path}" in message
    assert f"pid {os.getpid()}" in message


async def test_cli_commands_run_next_to_the_worker(open_sqlite: OpenStore) -> None:
    worker = await open_sqlite()
    ev = make_event()
    await worker.enqueue([ev], {})
    admin = await open_sqlite(role="admin")
    assert [e.id for e in await admin.list_events(EventFilter())] == [ev.id]
    second_admin = await open_sqlite(role="admin")
    assert await second_admin.get_event(ev.id) is not None


async def test_the_lock_is_free_again_after_close(open_sqlite: OpenStore) -> None:
    first = await open_sqlite()
    await first.close()
    second = await open_sqlite()
    assert await second.instance_id() == await first.instance_id()


async def test_a_killed_workers_claims_come_back_at_once(
        open_sqlite: OpenStore, child_worker: Callable[[], subprocess.Popen[str]]) -> None:
    setup = await open_sqlite(role="admin")
    a1, a2, b1 = make_event(doc_id="a"), make_event(doc_id="a"), make_event(doc_id="b")
    await setup.enqueue([a1, a2, b1], {})

    child = child_worker()
    assert child.stdout is not None
    line = child.stdout.readline()
    while line and not line.startswith("claimed"):  # skip its log lines
        line = child.stdout.readline()
    assert line.split() == ["claimed", "2"]  # a1 and b1; a2 waits behind a1

    with pytest.raises(SetupError, match=f"another dbevents process \\(pid {child.pid}\\)"):
        await open_sqlite()
    # A CLI command looks without taking anything back.
    admin = await open_sqlite(role="admin")
    assert (await admin.get_event(a1.id)).status is Status.DELIVERING  # type: ignore[union-attr]

    child.send_signal(signal.SIGKILL)
    child.wait()
    worker = await open_sqlite()
    for ev in (a1, b1):
        got = await worker.get_event(ev.id)
        assert got is not None and got.status is Status.PENDING and got.attempts == 0
    # Due now, not in an hour when the dead worker's leases would have run out.
    claimed = await worker.claim({"t": 100}, 30.0, datetime.now(UTC))
    assert [e.id for e in claimed] == [a1.id, b1.id]


async def test_an_admin_open_releases_nothing(open_sqlite: OpenStore) -> None:
    worker = await open_sqlite()
    ev = make_event()
    await worker.enqueue([ev], {})
    await worker.claim({"t": 1}, 30.0, datetime.now(UTC))
    await open_sqlite(role="admin")
    got = await worker.get_event(ev.id)
    assert got is not None and got.status is Status.DELIVERING
    assert await worker.claim({"t": 1}, 30.0, datetime.now(UTC)) == []
