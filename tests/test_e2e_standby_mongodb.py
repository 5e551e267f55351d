"""Warm standby with MongoDB at the wire level: two `dbevents run` processes on
one config, a scripted replica set (mockupdb; no mongod here), one PostgreSQL
eventing DB and one receiver. The holder is killed (-9) once its checkpoint is
stored; the standby takes the lease over and opens its change stream right
after the stored resume token, so every change is delivered once."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import Dbevents, events
from tests.test_e2e_standby import start_all, wait_delivered, wait_for_holder
from testsupport.receiver import ThreadedReceiver
from testsupport.servers import PostgresServer

sys.path.insert(0, str(Path(__file__).parents[1] / "plugins/sources/mongodb/tests"))
from mongo_fake import FakeReplicaSet, token

LEASE = 3.0  # seconds: [eventing] capture_lease
TAKEOVER_BOUND = LEASE + LEASE / 3 + 10.0  # slack for start-up and a loaded machine

CONFIG = """
[eventing]
store = "{store}"
capture_lease = "{lease}s"

[databases.shop]
type = "mongodb"
url = "{source}"

[[triggers]]
name = "orders"
tables = ["orders"]
url = "{hooks}/orders"
"""


@pytest.fixture
def setup(postgres_server: PostgresServer, tmp_path: Path,
          receiver: ThreadedReceiver) -> Iterator[tuple[list[Path], FakeReplicaSet, Any]]:
    """Two configs alike, the scripted replica set, a connection to the store."""
    fake = FakeReplicaSet().start()
    store_db = postgres_server.create_database(f"standby_mg_{uuid.uuid4().hex[:8]}")
    configs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        config = tmp_path / name / "dbevents.toml"
        config.write_text(CONFIG.format(store=postgres_server.dsn(store_db), lease=LEASE,
                                        source=fake.url(), hooks=receiver.url("").rstrip("/")))
        configs.append(config)
    conn = postgres_server.connect(store_db, autocommit=True)
    try:
        yield configs, fake, conn
    finally:
        conn.close()
        fake.stop()
        postgres_server.drop_database(store_db)


def stored_token(conn: Any) -> Any:
    row = conn.execute(
        "SELECT position FROM dbevents.checkpoints WHERE source = 'shop'").fetchone()
    return None if row is None else json.loads(row[0])


def test_a_standby_resumes_the_change_stream_from_the_stored_token(
        setup: tuple[list[Path], FakeReplicaSet, Any], receiver: ThreadedReceiver) -> None:
    configs, fake, conn = setup
    runs: list[Dbevents] = []
    try:
        runs = start_all(configs)
        first = fake.write_orders(5)
        wait_delivered(configs[0], 5)
        # The holder's checkpoint reaches the last change (the stream is quiet
        # after it): what it stored is all a successor needs.
        deadline = time.monotonic() + 30
        while stored_token(conn) != token(5):
            assert time.monotonic() < deadline, stored_token(conn)
            time.sleep(0.1)
        opened = len(fake.stages)
        runs[0].kill()
        later = fake.write_orders(5)  # while nobody captures
        new = wait_for_holder(runs[1:], TAKEOVER_BOUND)
        assert new.wait_for_log("capture lease acquired")["token"] == 2
        wait_delivered(configs[0], 10)
        # The new holder's change stream, its first aggregate after the kill,
        # started right after the stored token (startAfter: it also accepts an
        # invalidate's token).
        stage = fake.stages[opened]
        assert stage.get("startAfter") == token(5), fake.stages[opened:]
        assert "resumeAfter" not in stage and "startAtOperationTime" not in stage
        # Every change once: one event each, each delivered once.
        ids = [r.json()["id"] for r in receiver.requests("/orders")]
        assert len(ids) == len(set(ids)) == 10
        assert sorted(r.json()["data"]["doc"]["n"] for r in receiver.requests("/orders")) \
            == sorted([d["fullDocument"]["n"] for d in first + later])
        assert len(events(configs[1])) == 10
    finally:
        for run in runs[1:]:
            assert run.stop() == 0, run.text(complete=False)[-4000:]
