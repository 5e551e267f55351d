"""A receiver that is down for a while costs latency, not deliveries.

`dbevents run` in its own process, a private PostgreSQL with rows changing at
10/s, the SQLite eventing DB and a real receiver that answers 500 for a while.
Every event ends delivered once the receiver is back, in per-row order, none
failed; a receiver that fails one event only still fails that event after
1 + retries attempts while the others flow.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import Dbevents, cli, events
from testsupport.receiver import ThreadedReceiver
from testsupport.servers import PostgresServer

CONFIG = """
[eventing]
store = "sqlite:///events.db"

[databases.app]
type = "postgres"
url = "{app}"

[[triggers]]
name = "rows"
tables = ["items"]
url = "{hooks}/hook"
timeout = 2000
{schedule}
"""

ROWS, UPDATES = 20, 4  # 20 rows, each inserted then updated 4 times: 100 changes


@pytest.fixture
def app(postgres_server: PostgresServer) -> Iterator[tuple[PostgresServer, str]]:
    name = f"outage_{uuid.uuid4().hex[:8]}"
    postgres_server.create_database(name)
    postgres_server.execute("CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)", dbname=name)
    yield postgres_server, name
    postgres_server.drop_database(name)


def configure(tmp_path: Path, pg: PostgresServer, db: str, receiver: ThreadedReceiver,
              schedule: str = "") -> Path:
    config = tmp_path / "dbevents.toml"
    config.write_text(CONFIG.format(app=pg.dsn(db), hooks=receiver.url("").rstrip("/"),
                                    schedule=schedule))
    return config


def write_at_10_per_second(pg: PostgresServer, db: str) -> threading.Thread:
    """Insert every row, then update each in turn, one commit every 0.1 s; row
    ``id``'s value goes 0, 1, 2, ... in commit order."""
    def run() -> None:
        for step in range(UPDATES + 1):
            for row in range(ROWS):
                if step == 0:
                    pg.execute("INSERT INTO items VALUES (%s, 0)", (row,), dbname=db)
                else:
                    pg.execute("UPDATE items SET v = %s WHERE id = %s", (step, row), dbname=db)
                time.sleep(0.1)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def delivered_in_order(receiver: ThreadedReceiver) -> dict[int, list[int]]:
    """Per row, the values of the requests answered 2xx, in arrival order."""
    seen: dict[int, list[int]] = {}
    for r in receiver.requests("/hook"):
        if r.reply.status < 300:
            doc = r.json()["data"]["doc"]
            seen.setdefault(doc["id"], []).append(doc["v"])
    return seen


def wait_until_all_delivered(receiver: ThreadedReceiver, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sum(len(v) for v in delivered_in_order(receiver).values()) < ROWS * (UPDATES + 1):
        assert time.monotonic() < deadline, (
            f"{sum(len(v) for v in delivered_in_order(receiver).values())} of "
            f"{ROWS * (UPDATES + 1)} delivered after {timeout} s")
        time.sleep(0.2)


def outage(receiver: ThreadedReceiver, pg: PostgresServer, db: str, config: Path,
           down: float) -> Dbevents:
    """Run dbevents while the receiver answers 500 for ``down`` seconds from the
    first change on, then 200; return the process once everything arrived."""
    receiver.script("/hook", 500)
    run = Dbevents(config).start()
    writer = write_at_10_per_second(pg, db)
    time.sleep(down)
    receiver.script("/hook", 200)
    writer.join()
    wait_until_all_delivered(receiver, timeout=180)
    return run


def check_everything_delivered_once_in_order(config: Path, receiver: ThreadedReceiver) -> None:
    per_row = delivered_in_order(receiver)
    # Every change arrived exactly once with a 2xx, each row's in commit order.
    assert per_row == {row: list(range(UPDATES + 1)) for row in range(ROWS)}
    stored = events(config)
    assert len(stored) == ROWS * (UPDATES + 1)
    assert {e["status"] for e in stored} == {"delivered"}
    # Attempts of one row never overtook each other: a row's later value was never
    # sent before its earlier one was answered 2xx.
    sent: dict[int, list[tuple[int, int]]] = {}
    for r in receiver.requests("/hook"):
        doc = r.json()["data"]["doc"]
        sent.setdefault(doc["id"], []).append((doc["v"], r.reply.status))
    for row, attempts in sent.items():
        done = -1
        for value, status in attempts:
            assert value == done + 1, f"row {row}: value {value} sent after {done} ({attempts})"
            if status < 300:
                done = value


def test_down_for_10_seconds(app: tuple[PostgresServer, str], tmp_path: Path,
                             receiver: ThreadedReceiver) -> None:
    pg, db = app
    config = configure(tmp_path, pg, db, receiver)
    run = outage(receiver, pg, db, config, down=10)
    try:
        check_everything_delivered_once_in_order(config, receiver)
    finally:
        assert run.stop() == 0


def test_down_for_60_seconds(app: tuple[PostgresServer, str], tmp_path: Path,
                             receiver: ThreadedReceiver) -> None:
    """Longer than the default retry schedule's first two waits together: the
    trigger pauses, probes, and resumes; `status` shows the pause meanwhile."""
    pg, db = app
    config = configure(tmp_path, pg, db, receiver)
    receiver.script("/hook", 500)
    run = Dbevents(config).start()
    try:
        writer = write_at_10_per_second(pg, db)
        paused = run.wait_for_log("trigger paused", timeout=30)
        assert paused["trigger"] == "rows"
        status = json.loads(cli(config, "status", "--json").stdout)
        [rows] = [t for t in status["triggers"] if t["trigger"] == "rows"]
        assert rows["paused_since"] is not None
        time.sleep(max(0.0, 60 - (time.time() - _ts(paused))))
        receiver.script("/hook", 200)
        writer.join()
        wait_until_all_delivered(receiver, timeout=180)
        resumed = run.wait_for_log("trigger resumed", timeout=10)
        assert resumed["trigger"] == "rows" and resumed["paused_s"] >= 30
        check_everything_delivered_once_in_order(config, receiver)
        status = json.loads(cli(config, "status", "--json").stdout)
        [rows] = [t for t in status["triggers"] if t["trigger"] == "rows"]
        assert rows["paused_since"] is None
    finally:
        assert run.stop() == 0


def test_down_much_longer_than_the_whole_retry_schedule(
        app: tuple[PostgresServer, str], tmp_path: Path, receiver: ThreadedReceiver) -> None:
    """The retry schedule shortened to 0.1, 0.2, 0.4 s (0.7 s in all) and the
    receiver down 10 s, fourteen times that (as a 17-minute outage is to the
    default 1 s, 10 s, 60 s): without the pause every event of the outage would
    end failed; with it, only probes go out until the receiver is back."""
    pg, db = app
    config = configure(tmp_path, pg, db, receiver,
                       "backoff_base = 100\nbackoff_factor = 2\nbackoff_max = 400\n"
                       "probe_max = 500")
    # DBEVENTS_LONG_OUTAGE=600 runs it with the receiver down 10 minutes.
    down = float(os.environ.get("DBEVENTS_LONG_OUTAGE", "10"))
    run = outage(receiver, pg, db, config, down=down)
    try:
        check_everything_delivered_once_in_order(config, receiver)
        failures = [r for r in receiver.requests("/hook") if r.reply.status >= 500]
        # While paused only probes went out (at most 0.5 s apart), not every
        # event's every retry (about 100 events x 4 attempts).
        assert len(failures) < 20 + 2 * down
        said = [line["event"] for line in run.lines()]
        assert said.count("trigger paused") >= 1 and said.count("trigger resumed") >= 1
    finally:
        assert run.stop() == 0


def test_one_poisoned_event_still_fails_while_the_others_flow(
        app: tuple[PostgresServer, str], tmp_path: Path, receiver: ThreadedReceiver) -> None:
    pg, db = app
    config = configure(tmp_path, pg, db, receiver, "backoff_base = 10\nbackoff_max = 50")
    receiver.script("/hook", 200)
    receiver.script_matching("/hook", b'"doc":{"id":7,"v":0}', 500)
    run = Dbevents(config).start()
    try:
        for row in range(ROWS):
            pg.execute("INSERT INTO items VALUES (%s, 0)", (row,), dbname=db)
        deadline = time.monotonic() + 60
        while True:
            stored = {e["docId"]: e for e in events(config)}
            if len(stored) == ROWS and all(e["status"] in ("delivered", "failed")
                                           for e in stored.values()):
                break
            assert time.monotonic() < deadline, stored
            time.sleep(0.2)
        assert stored["7"]["status"] == "failed" and stored["7"]["attempts"] == 4
        assert {k for k, e in stored.items() if e["status"] == "delivered"} == \
            {str(r) for r in range(ROWS)} - {"7"}
        poisoned = [r for r in receiver.requests("/hook") if b'"id":7' in r.body]
        assert len(poisoned) == 4  # 1 + retries, no probe kept it alive
        assert not [line for line in run.lines() if line.get("event") == "trigger paused"]
    finally:
        assert run.stop() == 0


def _ts(line: dict[str, object]) -> float:
    from datetime import datetime
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00")).timestamp()
