"""`dbevents run` with the PostgreSQL eventing DB on its own server: the log
commands work on it, and when the store's server goes away mid-stream capture
pauses and resumes with nothing lost."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import Dbevents, cli, events, show
from testsupport.receiver import ThreadedReceiver
from testsupport.servers import PostgresServer

CONFIG = """
[eventing]
store = "{store}"

[databases.app]
type = "postgres"
url = "{source}"

[[triggers]]
name = "items"
url = "{hooks}/items"

[[triggers]]
name = "items-failing"
operations = "delete"
url = "{hooks}/fail"
retries = 1
backoff_base = 10
backoff_max = 20
"""


@pytest.fixture(scope="module")
def store_server() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.stop()


def test_log_commands_and_store_outage(postgres_server: PostgresServer,
                                       store_server: PostgresServer, tmp_path: Path,
                                       receiver: ThreadedReceiver) -> None:
    db = f"pgstore_{uuid.uuid4().hex[:8]}"
    postgres_server.create_database(db)
    postgres_server.execute("CREATE TABLE items (id int PRIMARY KEY, v int)", dbname=db)
    store_db = store_server.create_database(f"events_{uuid.uuid4().hex[:6]}")
    receiver.script("/fail", 500)
    config = tmp_path / "dbevents.toml"
    config.write_text(CONFIG.format(store=store_server.dsn(store_db),
                                    source=postgres_server.dsn(db),
                                    hooks=receiver.url("").rstrip("/")))
    run = Dbevents(config)
    stopped: int | None = None
    try:
        run.start()
        conn = postgres_server.connect(db)
        for i in range(1, 51):
            conn.execute("INSERT INTO items VALUES (%s, %s)", (i, i))
        receiver.wait_for(50, "/items", timeout=60)

        # The store's server goes away while writes continue.
        stopper = threading.Thread(target=store_server.pause, args=(3.0,))
        stopper.start()
        time.sleep(0.3)
        for i in range(51, 101):
            conn.execute("INSERT INTO items VALUES (%s, %s)", (i, i))
            time.sleep(0.02)
        conn.execute("DELETE FROM items WHERE id = 1")
        conn.close()
        stopper.join()
        received = receiver.wait_for(101, "/items", timeout=120)
        seen = {(r.json()["type"], r.json()["data"]["docId"]) for r in received}
        assert seen == {("DB_INSERT", str(i)) for i in range(1, 101)} | {("DB_DELETE", "1")}
        receiver.wait_for(2, "/fail", timeout=60)
        # The outage was real and seen by the running process (a store call
        # either failed and was retried, or waited for the pool to reconnect).
        assert any(line.get("level") == "warning" and "store" in json.dumps(line)
                   for line in run.lines())
    finally:
        # Clean up whatever happened; the exit code is checked afterwards.
        try:
            stopped = run.stop()
        finally:
            postgres_server.drop_database(db)
    assert stopped == 0, run.text(complete=False)[-4000:]

    # The log commands, on the PostgreSQL store.
    rows = events(config)
    assert len(rows) == 102 and len({r["id"] for r in rows}) == 102
    [failed] = events(config, "--status", "failed")
    detail = show(config, failed["id"])
    assert [a["status_code"] for a in detail["attempts_log"]] == [500, 500]
    status = json.loads(cli(config, "status", "--json").stdout)
    counts = {t["trigger"]: t for t in status["triggers"]}
    assert counts["items"]["delivered"] == 101 and counts["items-failing"]["failed"] == 1
    assert status["sources"]["app"]["checkpoint"]
    assert "1 event(s) queued" in cli(config, "events", "redeliver", "--status", "failed").stdout
    assert events(config, "--status", "pending")[0]["id"] == failed["id"]
    out = cli(config, "events", "purge", "--older-than", "0s", "--status", "delivered").stdout
    assert "101 event(s) purged" in out

