"""`dbevents status` with two `dbevents run` processes sharing one PostgreSQL
eventing DB and a slow receiver: each worker is shown under the name it holds
events and leases by, with the events it holds in flight right now, and the
one capturing the source with what it captures. (The source is MariaDB.)"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import Dbevents, cli
from tests.test_e2e_standby import start_all, wait_delivered
from testsupport.receiver import Reply, ThreadedReceiver
from testsupport.servers import MariaDBServer, PostgresServer

ROWS = 60
SLOW = 12.0  # seconds the receiver takes once the events are redelivered

CONFIG = """
[eventing]
store = "{store}"
capture_lease = "3s"

[databases.app]
type = "mysql"
url = "{source}"

[[triggers]]
name = "everything"
url = "{hooks}/all"
concurrency = 4
timeout = 60000
"""


@pytest.fixture
def configs(postgres_server: PostgresServer, mariadb_server: MariaDBServer, tmp_path: Path,
            receiver: ThreadedReceiver) -> Iterator[tuple[list[Path], str]]:
    """Two configs alike (a log file each), and the source database's name."""
    db = mariadb_server.create_database(f"workers_{uuid.uuid4().hex[:8]}")
    store_db = postgres_server.create_database(f"workers_ev_{uuid.uuid4().hex[:8]}")
    mariadb_server.execute("CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)", db=db)
    out = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        config = tmp_path / name / "dbevents.toml"
        config.write_text(CONFIG.format(store=postgres_server.dsn(store_db),
                                        source=mariadb_server.dsn(db),
                                        hooks=receiver.url("").rstrip("/")))
        out.append(config)
    try:
        yield out, db
    finally:
        mariadb_server.drop_database(db)
        postgres_server.drop_database(store_db)


def workers(config: Path) -> list[dict[str, Any]]:
    shown: list[dict[str, Any]] = json.loads(cli(config, "status", "--json").stdout)["workers"]
    return shown


def test_status_shows_each_workers_in_flight_events(
        configs: tuple[list[Path], str], receiver: ThreadedReceiver,
        mariadb_server: MariaDBServer) -> None:
    configs, db = configs
    runs: list[Dbevents] = []
    try:
        runs = start_all(configs)
        holder = runs[0].wait_for_log("capture lease acquired")["holder"]
        standby = runs[1].wait_for_log("running")["holder"]
        mariadb_server.execute(
            "INSERT INTO items VALUES " + ", ".join(f"({i}, {i})" for i in range(1, ROWS + 1)),
            db=db)
        wait_delivered(configs[0], ROWS)
        # Nothing in flight now; the holder is shown as capturing.
        assert workers(configs[0]) == [
            {"worker": holder, "in_flight": 0, "captures": ["app"]}]

        # Redelivered, the events are pending in the store: both workers are woken
        # and claim up to what they send at once, which the slow receiver keeps
        # in flight.
        receiver.script("/all", Reply(delay=SLOW))
        cli(configs[1], "events", "redeliver", "--status", "delivered")
        deadline = time.monotonic() + 60
        while True:
            shown = {w["worker"]: w for w in workers(configs[1])}
            if set(shown) == {holder, standby} and all(
                    w["in_flight"] > 0 for w in shown.values()):
                break
            assert time.monotonic() < deadline, shown
            time.sleep(0.2)
        assert shown[holder]["captures"] == ["app"] and shown[standby]["captures"] == []
        # Never more than a worker sends at once plus one round queued (2 x 4).
        assert all(w["in_flight"] <= 8 for w in shown.values()), shown
        text = cli(configs[0], "status").stdout
        table = text[text.index("WORKER"):].splitlines()
        assert [line.split()[0] for line in table[1:]] == sorted([holder, standby])
        receiver.script("/all", 200)
    finally:
        for run in runs:
            assert run.stop(timeout=SLOW + 30) == 0, run.text(complete=False)[-4000:]
