"""Warm standby with MariaDB: three `dbevents run` processes on one config (one
MariaDB source with `start = "end"`, one PostgreSQL eventing DB, one receiver).
One holds the capture lease and reads the binlog, the others stand by and
deliver. Killed (-9), the holder is replaced by a standby that reads on from
the stored binlog position; paused (SIGSTOP) past its lease and resumed, it is
fenced: it stores nothing more, its binlog reader is closed, and the new
holder's reader (same replica server_id by default) keeps reading. Throughout,
every change is delivered, the log holds one event per change, no event id
twice, and each row's events arrive in order."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import Dbevents, cli
from tests.test_e2e_crash import writer
from tests.test_e2e_standby import (
    LEASE,
    TAKEOVER_BOUND,
    check_delivery,
    check_fenced,
    has,
    logged_after,
    pause_until_taken_over,
    start_all,
    wait_delivered,
    wait_for_holder,
)
from testsupport.receiver import Reply, ThreadedReceiver
from testsupport.servers import MariaDBServer, PostgresServer

CHANGES = 1000

CONFIG = """
[eventing]
store = "{store}"
capture_lease = "{lease}s"

[databases.app]
type = "mysql"
url = "{source}"

[[triggers]]
name = "everything"
url = "{hooks}/all"
concurrency = 8
"""


@pytest.fixture
def setup(postgres_server: PostgresServer, mariadb_server: MariaDBServer, tmp_path: Path,
          receiver: ThreadedReceiver) -> Iterator[tuple[list[Path], Any]]:
    """Three configs alike (a log file each), the source table, a transaction
    maker on its own connection."""
    db = mariadb_server.create_database(f"standby_{uuid.uuid4().hex[:8]}")
    store_db = postgres_server.create_database(f"standby_my_{uuid.uuid4().hex[:8]}")
    mariadb_server.execute("CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)", db=db)
    receiver.script("/all", Reply(delay=(0.0, 0.01)))
    configs = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        config = tmp_path / name / "dbevents.toml"
        config.write_text(CONFIG.format(store=postgres_server.dsn(store_db), lease=LEASE,
                                        source=mariadb_server.dsn(db),
                                        hooks=receiver.url("").rstrip("/")))
        configs.append(config)
    conn = mariadb_server.connect(db, autocommit=False)

    @contextmanager
    def transaction() -> Iterator[Callable[[str, tuple[Any, ...]], None]]:
        with conn.cursor() as cur:
            conn.begin()
            yield lambda sql, params: cur.execute(sql, params) and None
            conn.commit()

    try:
        yield configs, transaction
    finally:
        conn.close()
        mariadb_server.drop_database(db)
        postgres_server.drop_database(store_db)


def binlog(text: str) -> tuple[str, int]:
    """A logged binlog position ("FILE:OFFSET[ gtid=...]") in the order the server
    writes them (file names carry a zero-padded sequence number)."""
    file, _, pos = text.split(" ", 1)[0].rpartition(":")
    return file, int(pos)


def test_a_standby_takes_over_the_binlog_from_a_killed_holder(
        setup: tuple[list[Path], Any], receiver: ThreadedReceiver) -> None:
    configs, transaction = setup
    runs: list[Dbevents] = []
    log: list[tuple[str, int]] = []
    done = threading.Event()
    thread = threading.Thread(target=writer, args=(transaction, CHANGES, log, done))
    try:
        runs = start_all(configs)
        # The first holder stored where the binlog ended (start = "end"); the
        # standbys found it there and anchored nothing of their own.
        assert sum(len([x for x in r.lines() if x.get("event") == "start position stored"])
                   for r in runs) == 1
        thread.start()
        while len(receiver.requests("/all")) < 100:
            time.sleep(0.05)
        runs[0].kill()
        new = wait_for_holder(runs[1:], TAKEOVER_BOUND)
        line = new.wait_for_log("capture lease acquired")
        assert line["token"] == 2
        # It reads on from the checkpoint the killed holder stored.
        start = new.wait_for_log("capture starting")
        assert start["since"] is not None
        shown = json.loads(cli(configs[1], "status", "--json").stdout)["sources"]["app"]
        assert (shown["holder"], shown["lease_token"]) == (line["holder"], 2)
        thread.join()
        wait_delivered(configs[0], len(log))
        check_delivery(receiver, configs[0], log)
    finally:
        done.wait(60)
        for run in runs[1:]:
            assert run.stop() == 0, run.text(complete=False)[-4000:]


def test_a_paused_holder_is_fenced_and_its_reader_closed(
        setup: tuple[list[Path], Any], receiver: ThreadedReceiver) -> None:
    configs, transaction = setup
    runs: list[Dbevents] = []
    log: list[tuple[str, int]] = []
    done = threading.Event()
    thread = threading.Thread(target=writer, args=(transaction, CHANGES, log, done))
    try:
        runs = start_all(configs)
        old = runs[0]
        assert old.proc is not None
        thread.start()
        while len(receiver.requests("/all")) < 100:
            time.sleep(0.05)
        new, resumed_at = pause_until_taken_over(old, runs[1:], then="reading the binlog")
        lost = old.wait_for_log("capture lease lost; capture stopped", timeout=60)
        assert lost["token"] == 1
        thread.join()
        wait_delivered(configs[0], len(log))
        check_delivery(receiver, configs[0], log)
        # Fenced, and its reader, whose dump the new holder's replaced, did not
        # reconnect (that would end the new holder's dump in turn).
        check_fenced(old, new, resumed_at, binlog)
        resumed = [x.get("event") for x in logged_after(old, resumed_at)]
        assert "binlog connection lost; reconnecting" not in resumed
        assert not has(new, "binlog connection lost; reconnecting")
        assert new.wait_for_log("capture lease acquired")["token"] == 2
        # The new holder is the one still capturing: the last changes were its.
        assert any(x.get("event") == "captured" for x in new.lines())
        assert old.proc.poll() is None  # it stays up, as a standby that delivers
    finally:
        done.wait(60)
        for run in runs:
            assert run.stop() == 0, run.text(complete=False)[-4000:]
