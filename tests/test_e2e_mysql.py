"""The whole path with MariaDB: `dbevents run` as its own process, a real private
MariaDB with a row binlog, the SQLite eventing DB and a real webhook receiver."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from tests.e2e import Dbevents, assert_envelopes, cli, cloudevent, events, show
from testsupport.receiver import Reply, ThreadedReceiver
from testsupport.servers import MariaDBServer

CONFIG = """
[eventing]
store = "sqlite:///events.db"

[databases.shop]
type = "mysql"
url = "{url}"

[databases.other]
type = "mysql"
url = "{other}"

[[triggers]]
name = "users"
databases = ["shop"]
tables = ["users"]
url = "{hooks}/users"

[[triggers]]
name = "order-inserts"
tables = ["orders"]
operations = ["insert"]
url = "{hooks}/orders"

[[triggers]]
name = "failing"
tables = "users"
operations = "update"
url = "{hooks}/fail"
retries = 2
timeout = 2000
backoff_base = 10
backoff_max = 50
"""


def test_insert_update_delete_filters_retries_and_redelivery(
        mariadb_server: MariaDBServer, tmp_path: Path, receiver: ThreadedReceiver) -> None:
    db, other = (f"e2e_{uuid.uuid4().hex[:8]}" for _ in range(2))
    for name in (db, other):
        mariadb_server.create_database(name)
        mariadb_server.execute(
            "CREATE TABLE users (id INT PRIMARY KEY, name VARCHAR(50) NOT NULL, email TEXT)",
            db=name)
        mariadb_server.execute(
            "CREATE TABLE orders (id INT PRIMARY KEY, total DECIMAL(10,2) NOT NULL)", db=name)
    # Attempt 1: HTTP 500; attempt 2: slower than the 2 s timeout; attempt 3: 500.
    # (A timeout well above a stall under load: the 500s must arrive as 500s.)
    receiver.script("/fail", 500, Reply(delay=30.0), 500)
    config = tmp_path / "dbevents.toml"
    config.write_text(CONFIG.format(url=mariadb_server.dsn(db), other=mariadb_server.dsn(other),
                                    hooks=receiver.url("").rstrip("/")))
    run = Dbevents(config)
    stopped: int | None = None
    try:
        run.start()
        # A first start stores its starting binlog position at once: changes from
        # then on are captured.
        deadline = time.monotonic() + 30
        while not all(s["checkpoint"] for s in json.loads(
                cli(config, "status", "--json").stdout)["sources"].values()):
            assert time.monotonic() < deadline, "no starting checkpoints stored"
            time.sleep(0.1)
        mariadb_server.execute("INSERT INTO users VALUES (1, 'ada', 'ada@example.com')", db=db)
        mariadb_server.execute("UPDATE users SET email = 'ada@lovelace.org' WHERE id = 1", db=db)
        mariadb_server.execute("DELETE FROM users WHERE id = 1", db=db)
        mariadb_server.execute("INSERT INTO orders VALUES (10, 12.50), (11, 0.10)", db=db)
        mariadb_server.execute("UPDATE orders SET total = 13 WHERE id = 10", db=db)
        # `users` watches shop only; `order-inserts` every database.
        mariadb_server.execute("INSERT INTO users VALUES (2, 'bob', NULL)", db=other)
        mariadb_server.execute("INSERT INTO orders VALUES (20, 1.00)", db=other)
        users = receiver.wait_for(3, "/users", timeout=30)
        orders = receiver.wait_for(3, "/orders", timeout=30)
        fails = receiver.wait_for(3, "/fail", timeout=30)

        assert [cloudevent(r).get_type() for r in users] == \
            ["DB_INSERT", "DB_UPDATE", "DB_DELETE"]
        # The exact envelope: these keys only, one source, times in ms UTC.
        bodies = [r.json() for r in users + orders + fails]
        assert_envelopes(bodies)
        assert all(r.headers["Content-Type"] == "application/json" for r in users)
        data = [r.json()["data"] for r in users]
        assert data[0] == {"db": "sql-mysql", "col": "users", "docId": "1",
                           "doc": {"id": 1, "name": "ada", "email": "ada@example.com"}}
        assert data[1] == {"db": "sql-mysql", "col": "users", "docId": "1",
                           "doc": {"id": 1, "name": "ada", "email": "ada@lovelace.org"},
                           "old": {"id": 1, "name": "ada", "email": "ada@example.com"}}
        assert data[2] == {"db": "sql-mysql", "col": "users", "docId": "1",
                           "doc": {"id": 1, "name": "ada", "email": "ada@lovelace.org"}}
        assert sorted((r.json()["data"]["docId"], r.json()["data"]["doc"]["total"])
                      for r in orders) == [("10", "12.50"), ("11", "0.10"), ("20", "1.00")]

        failed_id = fails[0].json()["id"]
        assert {r.json()["id"] for r in fails} == {failed_id}
        deadline = time.monotonic() + 30
        while show(config, failed_id)["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        log = show(config, failed_id)["attempts_log"]
        assert [a["status_code"] for a in log] == [500, None, 500]
        assert "timeout" in log[1]["error"]

        receiver.script("/fail", 200)
        cli(config, "events", "redeliver", "--status", "failed")
        receiver.wait_for(4, "/fail", timeout=30)
        assert len(receiver.requests("/users")) == 3  # nothing from `other`
    finally:
        # Clean up whatever happened; the exit code is checked afterwards.
        try:
            stopped = run.stop()
        finally:
            for name in (db, other):
                mariadb_server.drop_database(name)
    assert stopped == 0, run.text(complete=False)[-4000:]
    rows = events(config)
    assert sorted((r["trigger"], r["type"]) for r in rows) == sorted([
        ("users", "DB_INSERT"), ("users", "DB_UPDATE"), ("users", "DB_DELETE"),
        ("order-inserts", "DB_INSERT"), ("order-inserts", "DB_INSERT"),
        ("order-inserts", "DB_INSERT"), ("failing", "DB_UPDATE")])
