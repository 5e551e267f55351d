"""The whole path with MongoDB at the wire level: `dbevents run` as its own
process against a scripted replica set (mockupdb; no mongod can be installed
here), the SQLite eventing DB and a real webhook receiver."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bson import ObjectId

from tests.e2e import Dbevents, cli, cloudevent, events
from testsupport.receiver import ThreadedReceiver

sys.path.insert(0, str(Path(__file__).parents[1] / "plugins/sources/mongodb/tests"))
from mongo_fake import FakeReplicaSet

CONFIG = """
[eventing]
store = "sqlite:///events.db"

[databases.shop]
type = "mongodb"
url = "{url}"
collections = ["orders", "users"]

[[triggers]]
name = "orders"
tables = ["orders"]
url = "{hooks}/orders"

[[triggers]]
name = "user-inserts"
tables = "users"
operations = "insert"
url = "{hooks}/users"
"""


def _checkpoint(config: Path) -> str | None:
    status = json.loads(cli(config, "status", "--json").stdout)
    return status["sources"]["shop"]["checkpoint"]


@pytest.fixture
def fake() -> Iterator[FakeReplicaSet]:
    server = FakeReplicaSet().start()
    yield server
    server.stop()


def test_insert_update_delete_through_dbevents_run(fake: FakeReplicaSet, tmp_path: Path,
                                                    receiver: ThreadedReceiver) -> None:
    config = tmp_path / "dbevents.toml"
    config.write_text(CONFIG.format(url=fake.url(), hooks=receiver.url("").rstrip("/")))
    run = Dbevents(config).start()
    try:
        # A first start begins at "now" and stores that point at once: changes
        # from then on are captured.
        deadline = time.monotonic() + 30
        while not _checkpoint(config):
            assert time.monotonic() < deadline, "no starting checkpoint stored"
            time.sleep(0.1)
        oid = ObjectId()
        fake.insert({"_id": oid, "total": 12.5, "items": ["a", "b"]})
        fake.update({"_id": oid, "total": 13.0, "items": ["a", "b"]}, {"total": 13.0}, [])
        fake.delete(oid)
        fake.insert({"_id": "u1", "name": "ada"}, coll="users")
        fake.update({"_id": "u1", "name": "ada l."}, {"name": "ada l."}, [], coll="users")
        orders = receiver.wait_for(3, "/orders", timeout=30)
        users = receiver.wait_for(1, "/users", timeout=30)
        time.sleep(0.5)
        assert len(receiver.requests("/users")) == 1  # the update matched no trigger
    finally:
        assert run.stop() == 0

    assert [cloudevent(r).get_type() for r in orders] == ["DB_INSERT", "DB_UPDATE", "DB_DELETE"]
    data = [r.json()["data"] for r in orders]
    hex_id = str(oid)
    assert data[0] == {"db": "mongodb", "col": "orders", "docId": hex_id,
                       "doc": {"_id": hex_id, "total": 12.5, "items": ["a", "b"]}}
    assert data[1]["doc"] == {"_id": hex_id, "total": 13.0, "items": ["a", "b"]}
    assert data[1]["updateDescription"] == {"updatedFields": {"total": 13.0},
                                            "removedFields": [], "truncatedArrays": []}
    assert data[2] == {"db": "mongodb", "col": "orders", "docId": hex_id,
                       "doc": {"_id": hex_id}}
    assert users[0].json()["data"]["docId"] == "u1"
    rows = events(config)
    assert sorted(r["trigger"] for r in rows) == ["orders"] * 3 + ["user-inserts"]
    assert {r["status"] for r in rows} == {"delivered"}
