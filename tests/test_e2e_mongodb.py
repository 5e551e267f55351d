"""The whole path with MongoDB at the wire level: `dbevents run` as its own
process against scripted replica sets (mockupdb; no mongod can be installed
here), the SQLite eventing DB and a real webhook receiver."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bson import ObjectId

from tests.e2e import Dbevents, assert_envelopes, cli, cloudevent, events, show
from testsupport.receiver import Reply, ThreadedReceiver

sys.path.insert(0, str(Path(__file__).parents[1] / "plugins/sources/mongodb/tests"))
from mongo_fake import FakeReplicaSet

CONFIG = """
[eventing]
store = "sqlite:///events.db"

[databases.shop]
type = "mongodb"
url = "{shop}"
collections = ["orders", "users"]

[databases.other]
type = "mongodb"
url = "{other}"

[[triggers]]
name = "orders"
databases = ["shop"]
tables = ["orders"]
url = "{hooks}/orders"

[[triggers]]
name = "user-inserts"
tables = "users"
operations = "insert"
url = "{hooks}/users"

[[triggers]]
name = "order-deletes-failing"
databases = "shop"
tables = ["orders"]
operations = ["delete"]
url = "{hooks}/fail"
retries = 2
timeout = 2000
backoff_base = 10
backoff_max = 50
"""


def _checkpoint(config: Path, database: str) -> str | None:
    status = json.loads(cli(config, "status", "--json").stdout)
    return status["sources"][database]["checkpoint"]


def _wait_status(config: Path, event_id: str, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while show(config, event_id)["status"] != status:
        assert time.monotonic() < deadline, \
            f"event {event_id} never became {status}: {show(config, event_id)}"
        time.sleep(0.1)


@pytest.fixture
def fakes() -> Iterator[tuple[FakeReplicaSet, FakeReplicaSet]]:
    shop, other = FakeReplicaSet().start(), FakeReplicaSet().start()
    yield shop, other
    shop.stop()
    other.stop()


def test_payloads_filters_retries_and_redelivery_through_dbevents_run(
        fakes: tuple[FakeReplicaSet, FakeReplicaSet], tmp_path: Path,
        receiver: ThreadedReceiver) -> None:
    shop, other = fakes
    # Attempt 1: HTTP 500; attempt 2: slower than the 2 s timeout; attempt 3: 500.
    # (A timeout well above a stall under load: the 500s must arrive as 500s.)
    receiver.script("/fail", 500, Reply(delay=30.0), 500)
    config = tmp_path / "dbevents.toml"
    config.write_text(CONFIG.format(shop=shop.url(), other=other.url(),
                                    hooks=receiver.url("").rstrip("/")))
    run = Dbevents(config).start()
    try:
        # A first start begins at "now" and stores that point at once: changes
        # from then on are captured.
        deadline = time.monotonic() + 30
        while not (_checkpoint(config, "shop") and _checkpoint(config, "other")):
            assert time.monotonic() < deadline, "no starting checkpoints stored"
            time.sleep(0.1)
        oid = ObjectId()
        shop.insert({"_id": oid, "total": 12.5, "items": ["a", "b"]})
        shop.update({"_id": oid, "total": 13.0, "items": ["a", "b"]}, {"total": 13.0}, [])
        shop.delete(oid)
        shop.insert({"_id": "u1", "name": "ada"}, coll="users")
        shop.update({"_id": "u1", "name": "ada l."}, {"name": "ada l."}, [], coll="users")
        other.insert({"_id": 7, "total": 1.0})  # `orders` watches shop only
        other.insert({"_id": "u2", "name": "bob"}, coll="users")  # every database
        orders = receiver.wait_for(3, "/orders", timeout=30)
        users = receiver.wait_for(2, "/users", timeout=30)
        fails = receiver.wait_for(3, "/fail", timeout=30)

        # The exact seed payload, validated by the CloudEvents SDK.
        assert [cloudevent(r).get_type() for r in orders] == \
            ["DB_INSERT", "DB_UPDATE", "DB_DELETE"]
        bodies = [r.json() for r in orders + users + fails]
        assert_envelopes(bodies)
        assert all(r.headers["Content-Type"] == "application/json" for r in orders)
        hex_id = str(oid)
        assert [r.json()["data"] for r in orders] == [
            {"db": "mongodb", "col": "orders", "docId": hex_id,
             "doc": {"_id": hex_id, "total": 12.5, "items": ["a", "b"]}},
            {"db": "mongodb", "col": "orders", "docId": hex_id,
             "doc": {"_id": hex_id, "total": 13.0, "items": ["a", "b"]},
             "updateDescription": {"updatedFields": {"total": 13.0}, "removedFields": [],
                                   "truncatedArrays": []}},
            {"db": "mongodb", "col": "orders", "docId": hex_id, "doc": {"_id": hex_id}},
        ]
        assert sorted(r.json()["data"]["docId"] for r in users) == ["u1", "u2"]

        # Retries: 1 + 2 attempts, the same event each time, then failed.
        failed_id = fails[0].json()["id"]
        assert {r.json()["id"] for r in fails} == {failed_id}
        assert fails[0].json()["data"] == orders[2].json()["data"]
        _wait_status(config, failed_id, "failed")
        # The invocation log.
        shown = show(config, failed_id)
        assert shown["attempts"] == 3 and shown["status"] == "failed"
        log = shown["attempts_log"]
        assert [a["number"] for a in log] == [1, 2, 3]
        assert [a["status_code"] for a in log] == [500, None, 500]
        assert "timeout" in log[1]["error"]
        # Cut at the 2 s timeout, not when the handler answers 30 s later.
        assert 1990 <= log[1]["duration_ms"] < 20_000
        assert shown["payload"]["type"] == "DB_DELETE"

        # Redelivery by the CLI: back to pending, delivered on the next attempt.
        receiver.script("/fail", 200)
        out = cli(config, "events", "redeliver", failed_id).stdout
        assert "1 event(s) queued" in out
        receiver.wait_for(4, "/fail", timeout=30)
        _wait_status(config, failed_id, "delivered")
        time.sleep(0.5)
        assert len(receiver.requests("/users")) == 2  # the users update matched nothing
        assert len(receiver.requests("/orders")) == 3  # nothing from `other`
    finally:
        assert run.stop() == 0

    rows = events(config)
    assert sorted((r["trigger"], r["type"]) for r in rows) == sorted([
        ("orders", "DB_INSERT"), ("orders", "DB_UPDATE"), ("orders", "DB_DELETE"),
        ("user-inserts", "DB_INSERT"), ("user-inserts", "DB_INSERT"),
        ("order-deletes-failing", "DB_DELETE")])
    assert {r["status"] for r in rows} == {"delivered"}
