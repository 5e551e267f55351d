"""How far behind capture is, with MariaDB: `dbevents status` while the worker is
stopped, the admin service's lag metrics while capture is held back (the
eventing DB locked by another writer) and once it has caught up, and
`dbevents console`'s lag metrics beside a stopped worker. Real processes
and servers throughout: `dbevents run`, a private MariaDB, the SQLite eventing
DB, a webhook receiver; /metrics parsed with prometheus-client's parser."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from plugins.admin.tests.support import TOKEN, Admin
from tests.e2e import Dbevents, cli
from testsupport.ports import free_port
from testsupport.receiver import ThreadedReceiver
from testsupport.servers import MariaDBServer

CONFIG = """
[eventing]
store = "sqlite:///events.db"

[databases.shop]
type = "mysql"
url = "{url}"
heartbeat = 0.5

[admin]
listen = "127.0.0.1:{port}"
token = "{token}"

[[triggers]]
name = "items"
tables = ["items"]
url = "{hook}"
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def shop(mariadb_server: MariaDBServer, tmp_path: Path,
         receiver: ThreadedReceiver) -> Iterator[tuple[Path, Callable[[str], Any]]]:
    db = f"lag_{uuid.uuid4().hex[:8]}"
    mariadb_server.create_database(db)
    mariadb_server.execute("CREATE TABLE items (id INT PRIMARY KEY, name TEXT)", db=db)
    config = tmp_path / "dbevents.toml"
    config.write_text(CONFIG.format(url=mariadb_server.dsn(db), port=free_port(),
                                    token=TOKEN, hook=receiver.url("/hook")))
    try:
        yield config, lambda sql: mariadb_server.execute(sql, db=db)
    finally:
        mariadb_server.drop_database(db)


def status(config: Path) -> dict[str, Any]:
    return dict(json.loads(cli(config, "status", "--json").stdout)["sources"]["shop"])


def wait_until(what: str, ready: Callable[[], bool], timeout: float = 60) -> None:
    """Wait for another process to get somewhere (not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"still not {what} after {timeout} s"
        time.sleep(0.2)


def scrape(admin: Admin) -> Samples:
    request = urllib.request.Request(admin.base + "/metrics",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def lag(admin: Admin, name: str) -> float | None:
    return scrape(admin).get((name, (("database", "shop"),)))


def test_status_shows_the_binlog_bytes_a_stopped_worker_is_behind(
        shop: tuple[Path, Callable[[str], Any]], receiver: ThreadedReceiver) -> None:
    config, sql = shop
    run = Dbevents(config).start()
    try:
        wait_until("checkpointed", lambda: status(config)["checkpoint"] is not None)
        wait_until("caught up", lambda: status(config).get("lag_bytes") == 0)
    finally:
        run.stop()
    sql("INSERT INTO items VALUES (1, 'a'), (2, 'b')")
    sql("INSERT INTO items VALUES (3, 'c')")
    behind = status(config)
    assert behind["lag_bytes"] > 0 and behind["caught_up"] is False
    assert behind["server_position"] != behind["checkpoint"].split(" ")[0]

    run = Dbevents(config).start()
    try:
        wait_until("delivered", lambda: len(receiver.requests("/hook")) == 3)
        wait_until("caught up", lambda: status(config).get("lag_bytes") == 0)
        after = status(config)
        assert after["caught_up"] is True
        assert after["checkpoint"].split(" ")[0] == after["server_position"]
    finally:
        run.stop()


def test_lag_seconds_grow_while_capture_is_held_back(
        shop: tuple[Path, Callable[[str], Any]], receiver: ThreadedReceiver) -> None:
    config, sql = shop
    listen = tomllib.loads(config.read_text())["admin"]["listen"]
    run = Dbevents(config).start()
    admin = Admin(base=f"http://{listen}", config=config, receiver=receiver,
                  sql=sql, process=run)
    try:
        sql("INSERT INTO items VALUES (1, 'a')")
        admin.wait_until("delivered", lambda: len(receiver.requests("/hook")) == 1)
        admin.wait_until("caught up", lambda: lag(admin, "dbevents_source_lag_bytes") == 0
                         and lag(admin, "dbevents_source_lag_seconds") == 0)

        # Another writer holds the eventing DB: capture reads the row but cannot
        # store it, so the checkpoint stays behind the binlog.
        holder = sqlite3.connect(config.parent / "events.db", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            sql("INSERT INTO items VALUES (2, 'b')")
            admin.wait_until("behind", lambda: (lag(admin, "dbevents_source_lag_bytes")
                                                or 0) > 0)
            first = lag(admin, "dbevents_source_lag_seconds")
            assert first is not None and first > 0
            admin.wait_until("growing", lambda: (lag(admin, "dbevents_source_lag_seconds")
                                                 or 0) > first)
            assert len(receiver.requests("/hook")) == 1
        finally:
            holder.execute("ROLLBACK")
            holder.close()

        admin.wait_until("delivered", lambda: len(receiver.requests("/hook")) == 2)
        admin.wait_until("caught up again",
                         lambda: lag(admin, "dbevents_source_lag_bytes") == 0
                         and lag(admin, "dbevents_source_lag_seconds") == 0)
    finally:
        run.stop()


def test_console_exports_the_lag_of_a_stopped_worker(
        shop: tuple[Path, Callable[[str], Any]], receiver: ThreadedReceiver,
        tmp_path: Path) -> None:
    config, sql = shop
    run = Dbevents(config).start()
    try:
        wait_until("caught up", lambda: status(config).get("lag_bytes") == 0)
    finally:
        run.stop()
    sql("INSERT INTO items VALUES (1, 'a'), (2, 'b')")

    port = free_port()
    log = (tmp_path / "console.log").open("wb")
    console = subprocess.Popen(
        [sys.executable, "-m", "dbevents.cli", "--config", str(config), "--log-format",
         "json", "console", "--listen", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "DBEVENTS_CONFIG"})
    admin = Admin(base=f"http://127.0.0.1:{port}", config=config, receiver=receiver,
                  sql=sql, process=run)
    try:
        def behind() -> bool:
            try:
                return (lag(admin, "dbevents_source_lag_bytes") or 0) > 0
            except OSError:
                return False  # not listening yet

        wait_until("probed", behind)
        # Behind since before the console started: nothing tells since when.
        assert lag(admin, "dbevents_source_lag_seconds") is None

        run = Dbevents(config).start()
        try:
            wait_until("delivered", lambda: len(receiver.requests("/hook")) == 2)
            wait_until("caught up", lambda: lag(admin, "dbevents_source_lag_bytes") == 0
                       and lag(admin, "dbevents_source_lag_seconds") == 0)
        finally:
            run.stop()
    finally:
        console.send_signal(signal.SIGTERM)
        assert console.wait(30) == 0
        log.close()
