"""Positions, batching, memory, crashes, restarts and the idle heartbeat."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import psycopg
import pytest
from dbevents import Change, Position, SetupError, SourceUnavailable
from dbevents_source_postgres.pgoutput import parse_lsn
from structlog.testing import capture_logs

if TYPE_CHECKING:
    from plugins.sources.postgres.tests.conftest import PgEnv, Proxy


def _commit_lsn(change: Change) -> int:
    return parse_lsn(change.key.split(":")[0])


async def test_a_large_transaction_streams_in_batches(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    source = await pg.started(tables=["t"], batch_size=1000)
    pg.execute("INSERT INTO t SELECT generate_series(1, 2500)")
    reader = pg.reader(source)
    await reader.until(2500)
    sizes = [(len(b.changes), b.checkpoint is not None) for b in reader.batches]
    # Stored early, positioned only at the commit.
    assert sizes == [(1000, False), (1000, False), (500, True)]
    big = reader.changes
    assert [c.key.split(":")[1] for c in big] == [str(i) for i in range(2500)]
    assert len({c.key.split(":")[0] for c in big}) == 1
    # The checkpoint is the commit's end, past its commit LSN.
    first_checkpoint = reader.checkpoints[0]
    assert parse_lsn(first_checkpoint.value) > _commit_lsn(big[0])


MEMORY_CHILD = """
import asyncio, json, resource, sys
from dbevents import SourceSettings
from dbevents_source_postgres import PostgresOptions, PostgresSource

def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

async def main() -> None:
    url, name, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    source = PostgresSource(SourceSettings(name=name, url=url, tables=frozenset({"big"}),
                                           options=PostgresOptions(batch_size=1000)))
    await source.start()
    batches = source.changes(None)
    first = await anext(batches)  # everything is imported and warm from here on
    seen, base = len(first.changes), rss_peak()
    held = sys.getsizeof(first.changes) + sum(
        sys.getsizeof(c) + sys.getsizeof(c.key) + sys.getsizeof(c.doc)
        + sum(sys.getsizeof(v) for v in c.doc.values()) for c in first.changes)
    del first
    async for batch in batches:
        seen += len(batch.changes)
        if seen >= rows:
            break
    print(json.dumps({"seen": seen, "growth": rss_peak() - base,
                      "whole": held * rows // 1000}))
    await batches.aclose()
    await source.close()

asyncio.run(main())
"""


async def test_memory_stays_bounded_through_a_200k_row_transaction(
        pg: PgEnv, tmp_path: Path) -> None:
    rows, payload = 200_000, 200
    pg.execute("CREATE TABLE big (id int PRIMARY KEY, body text)")
    await (await pg.started(tables=["big"])).close()  # the slot, before the writes
    pg.execute(f"INSERT INTO big SELECT i, repeat('x', {payload})"
               f" FROM generate_series(1, {rows}) i")
    # A separate process, so its peak RSS is this reader's alone (libpq's buffers
    # included), with nothing else of the test run in it.
    script = tmp_path / "drain.py"
    script.write_text(textwrap.dedent(MEMORY_CHILD))
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(script), pg.url, pg.dbname, str(rows)],
        capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(next(line for line in out.stdout.splitlines()
                             if line.startswith("{")))
    assert report["seen"] == rows
    raw = rows * payload  # the row bodies alone
    # Holding the transaction would take `whole` bytes (a batch's objects, times
    # the batches); the reader's peak grows by a small fraction of even the raw data.
    assert report["whole"] > 2 * raw
    assert report["growth"] < raw / 4, report


async def test_confirm_moves_the_slot_and_a_restart_resumes_after_it(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    source = await pg.started(tables=["t"])
    for i in range(3):
        pg.execute("INSERT INTO t VALUES (%s)", (i,))
    reader = pg.reader(source)
    first = await reader.until(3)
    checkpoint = reader.checkpoints[-1]
    await source.confirm(checkpoint)
    deadline = time.monotonic() + 10
    while parse_lsn(pg.slot(source)["confirmed"]) < parse_lsn(checkpoint.value):
        assert time.monotonic() < deadline, "the slot never took the confirmed position"
        await asyncio.sleep(0.05)
    await reader.close()
    await source.close()

    pg.execute("INSERT INTO t VALUES (3)")
    again = await pg.started(tables=["t"])
    later = await pg.reader(again, checkpoint).until(1)
    assert [c.doc for c in later] == [{"id": 3}]
    assert not {c.key for c in later} & {c.key for c in first}


async def test_a_restart_from_an_older_checkpoint_skips_nothing_and_repeats_keys(
        pg: PgEnv) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    source = await pg.started(tables=["t"])
    pg.execute("INSERT INTO t VALUES (1)")
    pg.execute("INSERT INTO t VALUES (2)")
    reader = pg.reader(source)
    first = await reader.until(2)
    await reader.close()
    await source.close()  # nothing confirmed: the engine stored nothing
    again = await pg.started(tables=["t"])
    second = await pg.reader(again, None).until(2)
    assert [(c.key, c.doc) for c in second] == [(c.key, c.doc) for c in first]


CHILD = """
import asyncio, sys
from dbevents import Position, SourceSettings
from dbevents_source_postgres import PostgresOptions, PostgresSource

async def main() -> None:
    url, name, out = sys.argv[1], sys.argv[2], sys.argv[3]
    source = PostgresSource(SourceSettings(name=name, url=url, tables=frozenset({"t"}),
                                           options=PostgresOptions(batch_size=500)))
    await source.start()
    stored = 0
    with open(out, "a") as f:
        async for batch in source.changes(None):
            # Like the engine: store the batch (here: append it), then confirm.
            for c in batch.changes:
                f.write(f"K {c.key} {c.doc_id}\\n")
            stored += len(batch.changes)
            if batch.checkpoint is not None:
                f.write(f"C {batch.checkpoint.value}\\n")
            f.flush()
            if batch.checkpoint is not None:
                await source.confirm(batch.checkpoint)
            if stored >= 7000:
                # Mid-way through the second transaction: wait here for the kill,
                # so the parent never races the reader past the next commit.
                await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_killed_reader_loses_nothing_and_duplicates_no_key(
        pg: PgEnv, tmp_path: Path) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    total, per_txn = 20_000, 5000
    await (await pg.started(tables=["t"])).close()  # the slot, before the writes
    for start in range(0, total, per_txn):
        pg.execute("INSERT INTO t SELECT generate_series(%s::int, %s::int)",
                   (start, start + per_txn - 1))
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    out = tmp_path / "stored.txt"
    out.touch()
    child = await asyncio.create_subprocess_exec(sys.executable, str(script), pg.url,
                                                 pg.dbname, str(out))
    try:
        deadline = time.monotonic() + 30
        # Kill it inside the second transaction: after one checkpoint, mid-way.
        while sum(1 for line in out.read_text().splitlines() if line.startswith("K")) < 7000:
            assert child.returncode is None, "the reader died by itself"
            assert time.monotonic() < deadline, "the reader made no progress"
            await asyncio.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    lines = out.read_text().splitlines()
    stored: dict[str, str] = {}
    checkpoint = None
    for line in lines:
        kind, value, *rest = line.split(" ")
        if kind == "K":
            stored[value] = rest[0]
        else:
            checkpoint = Position(value)
    assert checkpoint is not None and 5000 <= len(stored) < 10_000

    # The engine restarts from its stored checkpoint; replayed changes keep their keys.
    source = await pg.started(tables=["t"])
    reader = pg.reader(source, checkpoint)
    rest_of_it = await reader.until(total - 5000)
    assert all(_commit_lsn(c) >= parse_lsn(checkpoint.value) for c in rest_of_it)
    keys_of_row: dict[str, set[str]] = defaultdict(set)
    for key, row in [*stored.items(), *((c.key, c.doc_id) for c in rest_of_it)]:
        keys_of_row[row].add(key)
    assert set(keys_of_row) == {str(i) for i in range(total)}  # nothing lost
    assert all(len(keys) == 1 for keys in keys_of_row.values())  # one key per row
    replayed = {c.key for c in rest_of_it} & set(stored)
    assert replayed  # the partly stored transaction came again, with the same keys


async def test_the_stream_survives_a_server_restart(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    total = 20_000
    source = await pg.started(tables=["t"], batch_size=500)
    for start in range(0, total, 5000):
        pg.execute("INSERT INTO t SELECT generate_series(%s::int, %s::int)", (start, start + 4999))
    reader = pg.reader(source)
    await reader.until(2000, confirm=True)
    # Keep reading while the server restarts, as the engine does: a fast shutdown
    # waits for its walsenders to see their WAL confirmed.
    with capture_logs() as logs:
        restart = asyncio.ensure_future(asyncio.to_thread(pg.server.restart))
        await reader.until(total, within=60, confirm=True)
        await restart
        pg.execute("INSERT INTO t VALUES (-1)")  # written after the restart
        await reader.until(total + 1, within=60, confirm=True)
    events = [e["event"] for e in logs]
    assert "replication stream unavailable; reconnecting" in events
    assert events.count("replication stream started") >= 1  # a new session
    keys_of_row: dict[str | None, set[str]] = defaultdict(set)
    for c in reader.changes:
        keys_of_row[c.doc_id].add(c.key)
    assert set(keys_of_row) == {str(i) for i in range(-1, total)}
    assert all(len(keys) == 1 for keys in keys_of_row.values())


async def test_a_terminated_walsender_is_reconnected_without_confirming_anything(
        pg: PgEnv) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    source = await pg.started(tables=["t"], status_interval=0.2)
    before = parse_lsn(pg.slot(source)["confirmed"])
    pg.execute("INSERT INTO t VALUES (1)")
    reader = pg.reader(source)
    await reader.until(1)  # handed out, not confirmed
    pid = pg.slot(source)["pid"]
    pg.server.execute("SELECT pg_terminate_backend(%s)", (pid,))
    pg.execute("INSERT INTO t VALUES (2)")
    await reader.until(2)
    assert [c.doc for c in reader.changes] == [{"id": 1}, {"id": 2}]
    assert pg.slot(source)["pid"] != pid
    # The new session resumed after what was handed out, but its status updates
    # report only what was confirmed.
    await asyncio.sleep(1.0)
    assert parse_lsn(pg.slot(source)["confirmed"]) == before
    await source.confirm(reader.checkpoints[-1])
    deadline = time.monotonic() + 10
    while parse_lsn(pg.slot(source)["confirmed"]) < parse_lsn(reader.checkpoints[-1].value):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_an_idle_slot_follows_the_wal_only_once_everything_is_confirmed(
        pg: PgEnv) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pg.execute("CREATE TABLE unwatched (id int)")
    source = await pg.started(tables=["t"], status_interval=0.2)
    pg.execute("INSERT INTO t VALUES (1)")
    reader = pg.reader(source)
    await reader.until(1)  # read, but not confirmed: the engine has not stored it
    checkpoint = parse_lsn(reader.checkpoints[-1].value)
    pending = asyncio.ensure_future(reader.next_batch(within=30))

    async def wal_elsewhere() -> int:
        # Traffic the source has nothing to emit for: another database's and an
        # unwatched table's.
        pg.server.execute("CREATE TABLE IF NOT EXISTS heartbeat_probe (n int)")
        pg.server.execute("INSERT INTO heartbeat_probe VALUES (1)")
        pg.execute("INSERT INTO unwatched VALUES (1)")
        return parse_lsn(pg.current_lsn())

    try:
        await wal_elsewhere()
        await asyncio.sleep(1.0)
        assert parse_lsn(pg.slot(source)["confirmed"]) < checkpoint  # never past unstored

        await source.confirm(reader.checkpoints[-1])
        target = await wal_elsewhere()
        deadline = time.monotonic() + 15
        while parse_lsn(pg.slot(source)["confirmed"]) < target:
            assert time.monotonic() < deadline, "the idle slot did not move on"
            await asyncio.sleep(0.1)
        assert not pending.done()  # and nothing was emitted for that traffic
    finally:
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        pg.server.execute("DROP TABLE IF EXISTS heartbeat_probe")


async def test_status_reports_the_slot_lag(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    source = await pg.started(tables=["t"])
    pg.execute("INSERT INTO t SELECT i, repeat('y', 100) FROM generate_series(1, 1000) i")
    status = await type(source).probe_status(source.settings)
    assert status["slot"] == source.slot and status["slot_active"] is False
    assert status["lag_bytes"] > 100_000
    reader = pg.reader(source)
    await reader.until(1000, confirm=True)
    # The confirmation reaches the server with the next status update: poll for it.
    deadline = time.monotonic() + 10
    while True:
        after = await type(source).probe_status(source.settings)
        if after["slot_active"] is True and after["lag_bytes"] < 100_000:
            break
        assert time.monotonic() < deadline, f"the slot's lag did not drop: {after}"
        await asyncio.sleep(0.1)
    missing = await type(source).probe_status(
        attrs.evolve(source.settings, name="no_such_database_key", options=None))
    assert missing == {"slot": "dbevents_no_such_database_key", "slot_exists": False}
    json.dumps(after)  # fit for `dbevents status --json`


async def test_status_says_whether_the_reader_has_stored_all_it_was_sent(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    source = await pg.started(tables=["t"])
    pg.execute("INSERT INTO t VALUES (1), (2), (3)")
    status = await type(source).probe_status(source.settings)
    assert "caught_up" not in status  # no reader: the bytes alone tell (lag_bytes)
    reader = pg.reader(source)
    await reader.until(3)  # read, not confirmed: the engine has not stored it yet
    status = await type(source).probe_status(source.settings)
    assert status["slot_active"] is True and status["caught_up"] is False
    await source.confirm(reader.checkpoints[-1])
    pending = asyncio.create_task(reader.next_batch(60))  # reading on, like the engine
    try:
        deadline = time.monotonic() + 15
        while not (await type(source).probe_status(source.settings)).get("caught_up"):
            assert time.monotonic() < deadline, "the reader never counted as caught up"
            await asyncio.sleep(0.1)
        assert not pending.done()
    finally:
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)


async def test_a_slot_dropped_under_a_running_source_is_a_setup_error(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    source = await pg.started(tables=["t"])
    reader = pg.reader(source)
    pg.execute("INSERT INTO t VALUES (1)")
    await reader.until(1)
    # The source reconnects at once: end its session until the drop gets through.
    deadline = time.monotonic() + 10
    while True:
        pg.server.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                          " WHERE slot_name = %s AND active_pid IS NOT NULL", (source.slot,))
        try:
            pg.server.execute("SELECT pg_drop_replication_slot(%s)", (source.slot,))
            break
        except psycopg.errors.ObjectInUse:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    pg.execute("INSERT INTO t VALUES (2)")
    with pytest.raises(SetupError, match=f"{source.slot}.*does not exist"):
        await reader.until(2, within=15)


async def test_a_network_cut_is_retried_then_reported_unavailable(
        pg: PgEnv, proxy: Proxy) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    url = pg.url.replace(f":{pg.server.port}/", f":{proxy.port}/")
    source = await pg.started(tables=["t"], url=url, reconnect_for=1.5, receive_timeout=5)
    pg.execute("INSERT INTO t VALUES (1)")
    reader = pg.reader(source)
    await reader.until(1, confirm=True)
    await proxy.cut()  # connections dropped, new ones refused
    with capture_logs() as logs, pytest.raises(SourceUnavailable, match="unavailable for"):
        await reader.next_batch(within=30)
    assert sum(e["event"] == "replication stream unavailable; reconnecting"
               for e in logs) >= 2
    # The engine then starts it again from its checkpoint, once the network is back.
    await proxy.resume()
    pg.execute("INSERT INTO t VALUES (2)")
    again = await pg.reader(source, reader.checkpoints[-1]).until(1)
    assert [c.doc for c in again] == [{"id": 2}]


SHORT_TIMEOUT = 2.0  # seconds: the walsender ends a session silent for longer


def _short_timeout_url(pg: PgEnv) -> str:
    # wal_sender_timeout is a per-session setting, so this stream alone gets it.
    return f"{pg.url}?options=-c%20wal_sender_timeout%3D{SHORT_TIMEOUT:g}s"


async def test_the_short_wal_sender_timeout_ends_a_silent_session(pg: PgEnv) -> None:
    """The control for the two tests below: a replication session that never
    answers is ended after the timeout the URL sets."""
    slot = f"silent_{pg.dbname[-12:]}"
    conn = await psycopg.AsyncConnection.connect(_short_timeout_url(pg), replication="database",
                                                 autocommit=True)
    try:
        await conn.execute(f"CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL pgoutput")
        pid = conn.info.backend_pid
        await conn.execute(f"START_REPLICATION SLOT {slot} LOGICAL 0/0"
                           " (proto_version '1', publication_names 'none')")
        deadline = time.monotonic() + 5 * SHORT_TIMEOUT
        while pg.server.execute("SELECT 1 FROM pg_stat_replication WHERE pid = %s", (pid,)):
            assert time.monotonic() < deadline, "the silent walsender was not ended"
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def test_keepalives_keep_an_idle_stream_alive(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    source = await pg.started(tables=["t"], url=_short_timeout_url(pg))
    reader = pg.reader(source)
    pg.execute("INSERT INTO t VALUES (1)")
    await reader.until(1, confirm=True)
    pid = pg.slot(source)["pid"]
    with capture_logs() as logs:
        pending = asyncio.ensure_future(reader.next_batch(within=60))
        await asyncio.sleep(4 * SHORT_TIMEOUT)
        assert not pending.done()
        assert pg.slot(source)["pid"] == pid  # the same walsender throughout
        pg.execute("INSERT INTO t VALUES (2)")
        batch = await pending
        assert [c.doc for c in batch.changes] == [{"id": 2}] and batch.checkpoint
    assert [c.doc for c in reader.changes] == [{"id": 1}, {"id": 2}]
    assert not [e for e in logs if "reconnecting" in e["event"]]
    assert pg.slot(source)["pid"] == pid


async def test_a_slow_consumer_keeps_its_stream_alive(pg: PgEnv) -> None:
    """While the engine holds a batch (the reader is suspended, nothing reads the
    socket), the status updates alone must reach the server in time, although
    the default status_interval (10 s) is longer than the server's timeout."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    source = await pg.started(tables=["t"], url=_short_timeout_url(pg))
    reader = pg.reader(source)
    pg.execute("INSERT INTO t VALUES (1)")
    await reader.until(1)
    pid = pg.slot(source)["pid"]
    with capture_logs() as logs:
        pg.execute("INSERT INTO t VALUES (2)")  # waits in the socket, unread
        await asyncio.sleep(4 * SHORT_TIMEOUT)  # a slow store
        assert pg.slot(source)["pid"] == pid
        await reader.until(2, confirm=True)
    assert [c.doc for c in reader.changes] == [{"id": 1}, {"id": 2}]
    assert not [e for e in logs if "reconnecting" in e["event"]]
    assert pg.slot(source)["pid"] == pid
