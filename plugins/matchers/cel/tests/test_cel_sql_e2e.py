"""End to end on the real servers: a private PostgreSQL and MariaDB, the real
sources, the SQLite eventing DB, the webhook sink and a real HTTP receiver. Only
the changes that satisfy the condition are stored and delivered; a trigger
without one sees every change (so the others were captured, and filtered)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from dbevents import EventFilter, StoreSettings
from dbevents.testing import isolated_plugins, parse_config, running
from dbevents_matcher_cel import plugin as cel_plugin
from dbevents_sink_webhook import plugin as webhook_plugin
from dbevents_source_mysql import plugin as mysql_plugin
from dbevents_source_postgres import plugin as pg_plugin
from dbevents_store_sqlite import plugin as sqlite_plugin
from structlog.testing import capture_logs

from testsupport.receiver import ThreadedReceiver
from testsupport.servers import MariaDBServer, PostgresServer

CONFIG = """
[eventing]
store = "sqlite:///{dir}/events.db"

[databases.shop]
type = "{type}"
url = "{url}"

[[triggers]]
name = "all"
tables = "orders"
url = "{hooks}/all"

[[triggers]]
name = "big-changes"
tables = "orders"
condition = '''{condition}'''
url = "{hooks}/big"
"""

# Inserts have no old row: `old` is {} there, so has() tells them apart.
CONDITION = ("doc.amount > 100 && doc.status != 'test' "
             "&& (!has(old.status) || old.status != doc.status)")

WRITES = [
    "INSERT INTO orders VALUES (1, 50, 'draft')",        # amount too small
    "INSERT INTO orders VALUES (2, 150, 'draft')",       # kept
    "UPDATE orders SET amount = 160 WHERE id = 2",       # status unchanged
    "UPDATE orders SET status = 'paid' WHERE id = 2",    # kept
    "UPDATE orders SET status = 'paid' WHERE id = 1",    # amount too small
    "INSERT INTO orders VALUES (3, 500, 'test')",        # excluded status
    "DELETE FROM orders WHERE id = 2",                   # doc: the row deleted, old: {}
    "INSERT INTO orders VALUES (4, 101, 'new')",         # kept
]
KEPT = [("DB_INSERT", "2"), ("DB_UPDATE", "2"), ("DB_DELETE", "2"), ("DB_INSERT", "4")]


def _plugins() -> Any:
    return isolated_plugins(("source-postgres", pg_plugin), ("source-mysql", mysql_plugin),
                            ("sink-webhook", webhook_plugin), ("store-sqlite", sqlite_plugin),
                            ("matcher-cel", cel_plugin), memory=False)


async def _run(tmp_path: Path, receiver: ThreadedReceiver, type_: str, url: str,
               execute: Any) -> None:
    plugins = _plugins()
    config = parse_config(CONFIG.format(dir=tmp_path, type=type_, url=url, condition=CONDITION,
                                        hooks=receiver.url("").rstrip("/")), plugins)
    with capture_logs() as logs:
        async with running(config, plugins):
            deadline = asyncio.get_running_loop().time() + 60
            while not any(e["event"] == "running" for e in logs):
                assert asyncio.get_running_loop().time() < deadline, "engine never ran"
                await asyncio.sleep(0.05)
            for sql in WRITES:
                await asyncio.to_thread(execute, sql)
            await asyncio.to_thread(receiver.wait_for, len(WRITES), "/all", 60)
            await asyncio.to_thread(receiver.wait_for, len(KEPT), "/big", 60)
    assert not [e for e in logs if e["event"] == "matcher_error"]
    big = [r.json() for r in receiver.requests("/big")]
    assert [(b["type"], b["data"]["docId"]) for b in big] == KEPT
    assert big[1]["data"]["old"]["status"] == "draft" and big[1]["data"]["doc"]["status"] == "paid"
    assert len(receiver.requests("/all")) == len(WRITES)

    store = plugins.get("store", "sqlite")(StoreSettings(url=config.eventing.store, role="admin"))
    await store.open()
    try:
        stored = await store.list_events(EventFilter(trigger="big-changes", limit=1000))
        every = await store.list_events(EventFilter(trigger="all", limit=1000))
    finally:
        await store.close()
    # Nothing stored for the changes the condition turned away.
    assert sorted((e.type, e.doc_id) for e in stored) == sorted(KEPT)
    assert len(every) == len(WRITES)


async def test_postgres(postgres_server: PostgresServer, pg_database: str, tmp_path: Path,
                        receiver: ThreadedReceiver) -> None:
    postgres_server.execute("CREATE TABLE orders (id int PRIMARY KEY, amount int NOT NULL, "
                            "status text NOT NULL); ALTER TABLE orders REPLICA IDENTITY FULL",
                            dbname=pg_database)
    await _run(tmp_path, receiver, "postgres", postgres_server.dsn(pg_database),
               lambda sql: postgres_server.execute(sql, dbname=pg_database))


async def test_mariadb(mariadb_server: MariaDBServer, mariadb_database: str, tmp_path: Path,
                       receiver: ThreadedReceiver) -> None:
    mariadb_server.execute("CREATE TABLE orders (id INT PRIMARY KEY, amount INT NOT NULL, "
                           "status VARCHAR(20) NOT NULL)", db=mariadb_database)
    await _run(tmp_path, receiver, "mysql", mariadb_server.dsn(mariadb_database),
               lambda sql: mariadb_server.execute(sql, db=mariadb_database))
