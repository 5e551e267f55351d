"""The whole path with PostgreSQL: `dbevents run` as its own process, a real
private PostgreSQL, the SQLite eventing DB and a real webhook receiver."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import Dbevents, assert_envelopes, cli, cloudevent, events, show
from testsupport.receiver import Reply, ThreadedReceiver
from testsupport.servers import PostgresServer

CONFIG = """
[eventing]
store = "sqlite:///events.db"

[databases.app]
type = "postgres"
url = "{app}"

[databases.other]
type = "postgres"
url = "{other}"

[[triggers]]
name = "users-all"
databases = ["app"]
tables = ["users"]
url = "{hooks}/users"

[[triggers]]
name = "orders-inserts"
tables = "orders"
operations = "INSERT"
url = "{hooks}/orders"

[[triggers]]
name = "user-deletes-failing"
databases = "app"
tables = ["users"]
operations = ["delete"]
url = "{hooks}/fail"
retries = 2
timeout = 2000
backoff_base = 10
backoff_max = 50
"""

TABLES = """
CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL, email text);
CREATE TABLE orders (id int PRIMARY KEY, total numeric(10,2) NOT NULL);
"""


@pytest.fixture
def setup(postgres_server: PostgresServer, tmp_path: Path,
          receiver: ThreadedReceiver) -> Iterator[tuple[Path, PostgresServer, list[str]]]:
    names = [f"e2e_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for name in names:
        postgres_server.create_database(name)
        postgres_server.execute(TABLES, dbname=name)
    config = tmp_path / "dbevents.toml"
    config.write_text(CONFIG.format(app=postgres_server.dsn(names[0]),
                                    other=postgres_server.dsn(names[1]),
                                    hooks=receiver.url("").rstrip("/")))
    yield config, postgres_server, names
    for name in names:
        postgres_server.drop_database(name)


def test_insert_update_delete_filters_retries_and_redelivery(
        setup: tuple[Path, PostgresServer, list[str]], receiver: ThreadedReceiver) -> None:
    config, pg, (app, other) = setup
    # Attempt 1: HTTP 500; attempt 2: slower than the 2 s timeout; attempt 3: 500.
    # (A timeout well above a stall under load: the 500s must arrive as 500s.)
    receiver.script("/fail", 500, Reply(delay=30.0), 500)
    run = Dbevents(config).start()
    try:
        pg.execute("INSERT INTO users VALUES (1, 'ada', 'ada@example.com')", dbname=app)
        pg.execute("UPDATE users SET email = 'ada@lovelace.org' WHERE id = 1", dbname=app)
        pg.execute("DELETE FROM users WHERE id = 1", dbname=app)
        pg.execute("INSERT INTO users VALUES (2, 'bob', NULL)", dbname=other)  # not app
        pg.execute("INSERT INTO orders VALUES (10, 12.50)", dbname=app)
        pg.execute("UPDATE orders SET total = 13 WHERE id = 10", dbname=app)  # not insert
        pg.execute("INSERT INTO orders VALUES (20, 0.10)", dbname=other)

        users = receiver.wait_for(3, "/users", timeout=30)
        orders = receiver.wait_for(2, "/orders", timeout=30)
        fails = receiver.wait_for(3, "/fail", timeout=30)

        # The exact seed payload, validated by the CloudEvents SDK.
        parsed = [cloudevent(r) for r in users]
        assert [e.get_type() for e in parsed] == ["DB_INSERT", "DB_UPDATE", "DB_DELETE"]
        assert [e.get_specversion() for e in parsed] == ["1.0"] * 3
        bodies = [r.json() for r in users]
        assert_envelopes(bodies)
        assert [b["data"] for b in bodies] == [
            {"db": "sql-postgres", "col": "users", "docId": "1",
             "doc": {"id": 1, "name": "ada", "email": "ada@example.com"}},
            {"db": "sql-postgres", "col": "users", "docId": "1",
             "doc": {"id": 1, "name": "ada", "email": "ada@lovelace.org"}},
            {"db": "sql-postgres", "col": "users", "docId": "1", "doc": {"id": 1}},
        ]
        assert all(r.headers["Content-Type"] == "application/json" for r in users)
        assert sorted((r.json()["data"]["docId"], r.json()["data"]["doc"]["total"])
                      for r in orders) == [("10", "12.50"), ("20", "0.10")]

        # Retries: 1 + 2 attempts, the same event each time, then failed.
        assert len({r.json()["id"] for r in fails}) == 1
        failed_id = fails[0].json()["id"]
        run.wait_for_log("delivery")
        _wait_status(config, failed_id, "failed")
        shown = show(config, failed_id)
        assert shown["attempts"] == 3 and shown["status"] == "failed"
        log = shown["attempts_log"]
        assert [a["number"] for a in log] == [1, 2, 3]
        assert log[0]["status_code"] == 500 and log[2]["status_code"] == 500
        assert log[1]["status_code"] is None and "timeout" in log[1]["error"]
        # Cut at the 2 s timeout, not when the handler answers 30 s later.
        assert 1990 <= log[1]["duration_ms"] < 20_000
        assert shown["payload"]["type"] == "DB_DELETE"

        # Redelivery by the CLI: back to pending, delivered on the next attempt.
        receiver.script("/fail", 200)
        out = cli(config, "events", "redeliver", failed_id).stdout
        assert "1 event(s) queued" in out
        receiver.wait_for(4, "/fail", timeout=30)
        _wait_status(config, failed_id, "delivered")

        # The event log: one event per change and matching trigger.
        log_rows = events(config)
        assert sorted((e["trigger"], e["type"]) for e in log_rows) == sorted([
            ("users-all", "DB_INSERT"), ("users-all", "DB_UPDATE"), ("users-all", "DB_DELETE"),
            ("orders-inserts", "DB_INSERT"), ("orders-inserts", "DB_INSERT"),
            ("user-deletes-failing", "DB_DELETE")])
        status = cli(config, "status", "--json").stdout
        assert '"failed": 0' in status
    finally:
        assert run.stop() == 0


def _wait_status(config: Path, event_id: str, status: str, timeout: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if show(config, event_id)["status"] == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"event {event_id} never became {status}: {show(config, event_id)}")
