"""What the source emits for row changes, transactions and DDL, and how it
survives a killed reader and a restarted server."""

from __future__ import annotations

import asyncio
import base64
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from dbevents import Change, Position
from dbevents_source_mysql.packets import PacketStream
from dbevents_source_mysql.position import BinlogPosition

from testsupport.fixtures import unique_name


def _ops(changes: list[Change]) -> list[tuple[str, str | None]]:
    return [(c.operation.value, c.doc_id) for c in changes]


async def test_insert_update_delete(mysql_env: Any, reading: Any) -> None:
    r = await reading(mysql_env.make_source(name="shop"))
    mysql_env.execute("INSERT INTO items (name) VALUES ('apple')")
    mysql_env.execute("UPDATE items SET name = 'pear' WHERE id = 1")
    mysql_env.execute("DELETE FROM items WHERE id = 1")
    changes = await r.wait_for(3)
    assert _ops(changes) == [("insert", "1"), ("update", "1"), ("delete", "1")]
    insert, update, delete = changes
    assert insert.doc == {"id": 1, "name": "apple"} and not insert.extra
    assert update.doc == {"id": 1, "name": "pear"}
    assert update.extra == {"old": {"id": 1, "name": "apple"}}
    assert delete.doc == {"id": 1, "name": "pear"} and not delete.extra
    for c in changes:
        assert (c.database, c.db_type, c.table) == ("shop", "sql-mysql", "items")
        assert c.time.tzinfo is not None and c.time.utcoffset().total_seconds() == 0
    # Keys: the rows event's binlog file and offset, and the row's index in it.
    file = mysql_env.start.split(":")[0]
    assert all(c.key.startswith(file + ":") and c.key.endswith(":0") for c in changes)
    assert len({c.key for c in changes}) == 3
    assert r.checkpoint is not None


async def test_time_is_the_binlog_events_timestamp(mysql_env: Any, reading: Any) -> None:
    r = await reading(mysql_env.make_source())
    # The server's clock around the statement: the event's timestamp is when it
    # began, in whole seconds.
    (before,), = mysql_env.execute("SELECT UNIX_TIMESTAMP(SYSDATE(6))")
    mysql_env.execute("INSERT INTO items (name) VALUES ('now')")
    (after,), = mysql_env.execute("SELECT UNIX_TIMESTAMP(SYSDATE(6))")
    # A session may set the timestamp its statements carry into the binlog: a time
    # no clock reading could produce shows which one the source reports.
    mysql_env.execute("SET timestamp = 1234567890")
    mysql_env.execute("INSERT INTO items (name) VALUES ('then')")
    mysql_env.execute("SET timestamp = DEFAULT")
    now, then = await r.wait_for(2)
    assert int(before) <= now.time.timestamp() <= after
    assert now.time.microsecond == 0 and now.time.utcoffset() == timedelta(0)
    assert then.time == datetime(2009, 2, 13, 23, 31, 30, tzinfo=UTC)


async def test_multi_row_statements(mysql_env: Any, reading: Any) -> None:
    r = await reading(mysql_env.make_source())
    mysql_env.execute("INSERT INTO items (name) VALUES ('a'), ('b'), ('c')")
    mysql_env.execute("UPDATE items SET name = UPPER(name)")
    mysql_env.execute("DELETE FROM items WHERE id > 1")
    changes = await r.wait_for(8)
    assert _ops(changes) == [("insert", "1"), ("insert", "2"), ("insert", "3"),
                             ("update", "1"), ("update", "2"), ("update", "3"),
                             ("delete", "2"), ("delete", "3")]
    assert [c.doc["name"] for c in changes if c.doc] == ["a", "b", "c", "A", "B", "C", "B", "C"]
    # One rows event per statement here: one prefix, row indexes 0, 1, 2.
    prefixes = [c.key.rsplit(":", 1) for c in changes[:3]]
    assert len({p for p, _ in prefixes}) == 1 and [i for _, i in prefixes] == ["0", "1", "2"]
    assert len({c.key for c in changes}) == 8


async def test_a_transaction_is_checkpointed_at_its_commit(mysql_env: Any,
                                                           reading: Any) -> None:
    r = await reading(mysql_env.make_source(batch_size=2))
    conn = mysql_env.server.connect(mysql_env.database, autocommit=False)
    try:
        with conn.cursor() as cur:
            for name in ("a", "b", "c", "d", "e"):
                cur.execute("INSERT INTO items (name) VALUES (%s)", (name,))
        conn.commit()
    finally:
        conn.close()
    await r.wait_for(5)
    with_changes = [b for b in r.batches if b.changes]
    # batch_size 2: the transaction goes out in chunks; only its end carries a position.
    assert [len(b.changes) for b in with_changes] == [2, 2, 1]
    assert [b.checkpoint is not None for b in with_changes] == [False, False, True]


async def test_checkpoints_carry_the_gtid_of_the_transaction_they_end(
        mysql_env: Any, reading: Any) -> None:
    r = await reading(mysql_env.make_source())
    (server_id,), = mysql_env.execute("SELECT @@server_id")
    for n, name in enumerate(("a", "b"), 1):
        mysql_env.execute("INSERT INTO items (name) VALUES (%s)", (name,))
        # The GTID MariaDB gave this session's last transaction: domain-server-seq.
        (gtid,), = mysql_env.execute("SELECT @@last_gtid")
        assert gtid.split("-")[1] == str(server_id)
        await r.wait_for(n)
        checkpoint = r.checkpoint
        assert checkpoint is not None and checkpoint.value.endswith(f" gtid={gtid}")
        position = BinlogPosition.from_position(checkpoint)
        assert position.gtid == gtid
    # Resuming uses the file and offset, which it shares with the server's own view.
    (file, offset, *_), = mysql_env.execute("SHOW MASTER STATUS")
    assert (position.file, position.pos) == (file, offset)


async def test_a_rolled_back_transaction_emits_nothing(mysql_env: Any, reading: Any) -> None:
    r = await reading(mysql_env.make_source())
    conn = mysql_env.server.connect(mysql_env.database, autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO items (name) VALUES ('ghost')")
            cur.execute("UPDATE items SET name = 'ghost 2'")
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("INSERT INTO items (name) VALUES ('real')")
        conn.commit()
    finally:
        conn.close()
    changes = await r.wait_for(1)  # 'real' committed after the rollback: a marker
    assert [c.doc["name"] for c in changes if c.doc] == ["real"]


async def test_truncate(mysql_env: Any, reading: Any) -> None:
    other = mysql_env.server.create_database(unique_name("other"))
    try:
        mysql_env.server.execute("CREATE TABLE x (id INT PRIMARY KEY)", db=other)
        r = await reading(mysql_env.make_source())
        mysql_env.execute("INSERT INTO items (name) VALUES ('a')")
        mysql_env.execute("TRUNCATE TABLE items")
        mysql_env.server.execute("TRUNCATE TABLE x", db=other)  # not watched
        mysql_env.execute(f"TRUNCATE `{other}`.`x`")  # from our database, still not ours
        mysql_env.execute("INSERT INTO items (name) VALUES ('b')")
        changes = await r.wait_for(3)
        assert _ops(changes) == [("insert", "1"), ("truncate", None), ("insert", "1")]
        truncate = changes[1]
        assert (truncate.table, truncate.doc, truncate.database) == ("items", None, "app")
    finally:
        mysql_env.server.drop_database(other)


async def test_operations_not_asked_for_are_skipped(mysql_env: Any, reading: Any) -> None:
    r = await reading(mysql_env.make_source(operations=frozenset({"insert", "delete"})))
    mysql_env.execute("INSERT INTO items (name) VALUES ('a')")
    mysql_env.execute("UPDATE items SET name = 'b'")
    mysql_env.execute("TRUNCATE TABLE items")
    mysql_env.execute("INSERT INTO items (name) VALUES ('c')")
    mysql_env.execute("DELETE FROM items")
    changes = await r.wait_for(3)
    assert _ops(changes) == [("insert", "1"), ("insert", "1"), ("delete", "1")]


async def test_alter_table_mid_stream(mysql_env: Any, reading: Any) -> None:
    source = mysql_env.make_source()
    r = await reading(source)
    mysql_env.execute("INSERT INTO items (name) VALUES ('before')")
    await r.wait_for(1)
    mysql_env.execute("ALTER TABLE items ADD COLUMN price DECIMAL(8,2) NOT NULL DEFAULT 1.50")
    mysql_env.execute("INSERT INTO items (name, price) VALUES ('added', 2.25)")
    mysql_env.execute("ALTER TABLE items DROP COLUMN name, ADD COLUMN tag VARCHAR(10) FIRST")
    mysql_env.execute("UPDATE items SET tag = 'x' WHERE id = 2")
    changes = await r.wait_for(3)
    assert changes[0].doc == {"id": 1, "name": "before"}
    assert changes[1].doc == {"id": 2, "name": "added", "price": "2.25"}
    assert changes[2].doc == {"tag": "x", "id": 2, "price": "2.25"}
    assert list(changes[2].doc) == ["tag", "id", "price"]
    assert changes[2].extra == {"old": {"tag": None, "id": 2, "price": "2.25"}}
    assert (await source.reader_stats())["table_definitions"] == 3


async def test_several_databases_and_table_filter(mysql_env: Any, reading: Any) -> None:
    server = mysql_env.server
    second = server.create_database(unique_name("second"))
    try:
        server.execute("CREATE TABLE items (id INT PRIMARY KEY, name TEXT)", db=second)
        server.execute("CREATE TABLE skipped (id INT PRIMARY KEY)", db=second)
        both = [mysql_env.database, second]
        r = await reading(mysql_env.make_source(schemas=both))
        only = await reading(mysql_env.make_source(
            name="only", schemas=both, server_id=123456,
            tables=frozenset({f"{second}.items"})))
        mysql_env.execute("INSERT INTO items (name) VALUES ('first')")
        server.execute("INSERT INTO items VALUES (7, 'second')", db=second)
        server.execute("INSERT INTO skipped VALUES (1)", db=second)
        server.execute("INSERT INTO items VALUES (8, 'marker')", db=second)
        changes = await r.wait_for(4)
        assert [c.table for c in changes] == [f"{mysql_env.database}.items", f"{second}.items",
                                              f"{second}.skipped", f"{second}.items"]
        assert [(c.table, c.doc_id) for c in await only.wait_for(2)] == [
            (f"{second}.items", "7"), (f"{second}.items", "8")]
    finally:
        server.drop_database(second)


async def test_doc_id_composite_and_missing_keys(mysql_env: Any, reading: Any) -> None:
    mysql_env.execute("CREATE TABLE pair (a INT, b VARCHAR(5), v INT, PRIMARY KEY (b, a))")
    mysql_env.execute("CREATE TABLE nokey (v INT)")
    r = await reading(mysql_env.make_source())
    mysql_env.execute("INSERT INTO pair VALUES (1, 'x\"y', 5)")
    mysql_env.execute("INSERT INTO nokey VALUES (5)")
    changes = await r.wait_for(2)
    assert [c.doc_id for c in changes] == ['["x\\"y",1]', None]


async def _drain(source: Any, since: Position | None, stored: dict[str, Change],
                 stop_after: int | None) -> Position | None:
    """Read like the engine: a batch's changes and checkpoint are stored together.
    With ``stop_after`` the reader is "killed" after that many batches, the last
    one lost before it was stored."""
    checkpoint = since
    batches = 0
    it = source.changes(since).__aiter__()
    try:
        while True:
            batch = await asyncio.wait_for(it.__anext__(), 20)
            batches += 1
            if stop_after is not None and batches >= stop_after:
                return checkpoint  # crash: this batch never reached the store
            for change in batch.changes:
                stored.setdefault(change.key, change)  # the store dedupes by id
            if batch.checkpoint is not None:
                checkpoint = batch.checkpoint
            if stop_after is None and len(stored) >= 300 and batch.checkpoint is not None:
                return checkpoint
    finally:
        await it.aclose()


async def test_kill_and_restart_loses_nothing_and_keys_are_stable(mysql_env: Any) -> None:
    rnd = random.Random(3)

    def write() -> None:
        conn = mysql_env.server.connect(mysql_env.database, autocommit=False)
        try:
            done = 0
            while done < 300:
                n = min(rnd.randint(1, 7), 300 - done)
                with conn.cursor() as cur:
                    cur.executemany("INSERT INTO items (name) VALUES (%s)",
                                    [(f"n{done + k}",) for k in range(n)])
                conn.commit()
                done += n
        finally:
            conn.close()

    writer = asyncio.create_task(asyncio.to_thread(write))
    stored: dict[str, Change] = {}
    checkpoint = None
    for stop_after in (3, 5, 2, None):
        source = mysql_env.make_source(batch_size=4)
        await source.start()
        checkpoint = await _drain(source, checkpoint, stored, stop_after)
        await source.close()
    await writer
    ids = sorted(int(c.doc_id or 0) for c in stored.values())
    assert ids == list(range(1, 301))  # every row once: nothing lost, nothing twice
    # A reader from the start again gives the very same keys.
    again: dict[str, Change] = {}
    source = mysql_env.make_source()
    await source.start()
    await _drain(source, None, again, None)
    await source.close()
    assert again.keys() == stored.keys()
    assert {k: c.doc for k, c in again.items()} == {k: c.doc for k, c in stored.items()}


async def test_server_restart(private_env: Any, reading: Any) -> None:
    source = private_env.make_source()
    r = await reading(source)
    await private_env.write(3)
    await r.wait_for(3)
    await asyncio.to_thread(private_env.server.restart)
    await private_env.write(3)
    changes = await r.wait_for(6)
    assert sorted(int(c.doc_id) for c in changes) == [1, 2, 3, 4, 5, 6]
    assert len({c.key for c in changes}) == 6
    status = await source.reader_stats()
    assert status["reconnects"] >= 1
    # The server started a new binlog file: the later changes come from it.
    assert changes[0].key.split(":")[0] != changes[-1].key.split(":")[0]


async def test_an_event_larger_than_a_protocol_packet(private_env: Any, reading: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A row of 17 MiB: its event spans two 16 MiB protocol packets."""
    joined: list[int] = []
    original = PacketStream.joined

    def counting(self: PacketStream, pos: int) -> Any:
        result = original(self, pos)
        if result is not None:
            joined.append(len(result[0]))
        return result

    monkeypatch.setattr(PacketStream, "joined", counting)
    server = private_env.server
    (old,), = server.execute("SELECT @@global.max_allowed_packet")
    server.execute("SET GLOBAL max_allowed_packet = 67108864")
    try:
        private_env.execute("CREATE TABLE big (id INT PRIMARY KEY, body LONGBLOB)")
        r = await reading(private_env.make_source())
        body = bytes(range(256)) * (17 * 4096)  # 17 MiB
        conn = server.connect(private_env.database)
        try:
            with conn.cursor() as cur:
                cur.execute("INSERT INTO big VALUES (1, %s)", (body,))
        finally:
            conn.close()
        await private_env.write(1)
        changes = await r.wait_for(2)
        assert [c.table for c in changes] == ["big", "items"]
        assert base64.b64decode(changes[0].doc["body"]) == body
        assert joined and joined[0] > 17 * 2**20
    finally:
        server.execute(f"SET GLOBAL max_allowed_packet = {old}")
