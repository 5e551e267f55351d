"""The MongoDB source inside the real engine and launcher, against the scripted
server: config keys, payloads, restart from the stored checkpoint, and the
`dbevents mongodb reset-token` command."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from bson import Timestamp
from click.testing import CliRunner, Result
from dbevents import ConfigError, Position, SetupError, StoreSettings
from dbevents.cli import build
from dbevents.config import parse
from dbevents.engine import Engine
from dbevents.envelope import event_id
from dbevents.testing import DELIVERIES, MemoryStore, isolated_plugins
from dbevents_source_mongodb import plugin
from dbevents_source_mongodb.decode import token_position
from mongo_fake import FakeReplicaSet, token


def _plugins() -> Any:
    return isolated_plugins(("source-mongodb", plugin))


def _raw(url: str, **db: Any) -> dict[str, Any]:
    return {
        "eventing": {"store": "memory://e2e"},
        "databases": {"shop": {"type": "mongodb", "url": url, **db}},
        "triggers": [{"name": "orders-hook", "url": "https://hooks.example.com/x",
                      "sink": "memory", "tables": ["orders"]}],
    }


async def _run_until(engine: Engine, delivered: int, within: float = 10.0) -> None:
    task = asyncio.create_task(engine.run())
    end = time.monotonic() + within
    try:
        while len(DELIVERIES) < delivered:
            if task.done():
                task.result()
            assert time.monotonic() < end, f"only {len(DELIVERIES)} deliveries"
            await asyncio.sleep(0.01)
    finally:
        engine.stop()
        await asyncio.wait_for(task, 10)


async def _checkpoint() -> Position | None:
    return await MemoryStore(StoreSettings(url="memory://e2e")).checkpoint("shop")


async def test_engine_delivers_mongodb_payloads_and_resumes(fake: FakeReplicaSet) -> None:
    plugins = _plugins()
    cfg = parse(_raw(fake.url(), collections=["orders", "users"]), plugins)
    engine = Engine(cfg, plugins)
    task = asyncio.create_task(engine.run())
    # The first run starts from "now" and stores that point at once.
    end = time.monotonic() + 10
    while await _checkpoint() is None:
        assert time.monotonic() < end and not task.done()
        await asyncio.sleep(0.01)
    first = fake.insert({"_id": 1, "name": "ada"})
    fake.insert({"_id": 2}, coll="users")  # no trigger wants users
    while len(DELIVERIES) < 1:
        assert time.monotonic() < end and not task.done()
        await asyncio.sleep(0.01)
    engine.stop()
    await asyncio.wait_for(task, 10)
    # The stream was filtered on the server to what a trigger needs.
    assert fake.pipelines[0][1]["$match"]["$or"][0] == {"ns.coll": {"$in": ["orders"]}}

    [(trigger, ev_id, payload)] = DELIVERIES
    body = json.loads(payload)
    assert trigger == "orders-hook"
    assert ev_id == body["id"] == event_id("shop", first["_id"]["_data"], "orders-hook")
    assert body["type"] == "DB_INSERT"
    assert body["data"] == {"db": "mongodb", "col": "orders", "docId": "1",
                            "doc": {"_id": 1, "name": "ada"}}
    assert body["time"].endswith("Z")
    stored = await _checkpoint()
    assert stored is not None

    # A new engine resumes right after the stored checkpoint: nothing twice.
    upd = fake.update({"_id": 1, "name": "ada l."}, {"name": "ada l."}, [])
    engine = Engine(parse(_raw(fake.url()), plugins), plugins)
    await _run_until(engine, 2)
    assert fake.stages[-1]["startAfter"] == json.loads(stored.value)
    body = json.loads(DELIVERIES[1][2])
    assert body["type"] == "DB_UPDATE" and body["id"] == event_id(
        "shop", upd["_id"]["_data"], "orders-hook")
    assert body["data"]["updateDescription"] == {
        "updatedFields": {"name": "ada l."}, "removedFields": [], "truncatedArrays": []}
    assert len(DELIVERIES) == 2


async def test_history_lost_stops_the_engine(fake: FakeReplicaSet) -> None:
    fake.write_orders(5)
    fake.first_kept = 3
    await MemoryStore(StoreSettings(url="memory://e2e")).enqueue(
        [], {"shop": token_position(token(1))})
    plugins = _plugins()
    engine = Engine(parse(_raw(fake.url()), plugins), plugins)
    with pytest.raises(SetupError, match="fallen off the oplog") as err:
        await asyncio.wait_for(engine.run(), 10)
    assert getattr(err.value, "exit_code", None) == 2  # SetupError: the launcher exits 2


@pytest.mark.parametrize(("key", "value", "words"), [
    ("full_document", "always", "full_document must be one of updateLookup"),
    ("full_document_before_change", True, "expected a string"),
    ("start_at", "yesterday", 'start_at must be "now" or an ISO 8601 time'),
    ("collections", [], "list at least one collection"),
    ("batch_size", 0, "batch_size must be from 1 to 10000"),
    ("colections", ["orders"], "did you mean 'collections'"),
])
def test_bad_options_are_config_errors(key: str, value: Any, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(_raw("mongodb://localhost/app", **{key: value}), _plugins())
    assert words in str(err.value)
    assert "databases.shop" in str(err.value)


def test_a_truncate_trigger_is_refused() -> None:
    # MongoDB has no TRUNCATE and a dropped collection emits nothing per document:
    # a trigger waiting for truncate events here would never fire.
    raw = _raw("mongodb://localhost/app")
    raw["triggers"][0]["operations"] = ["delete", "truncate"]
    with pytest.raises(ConfigError) as err:
        parse(raw, _plugins())
    assert err.value.path == "triggers[0].operations"
    assert "(types mongodb) emits truncate events" in str(err.value)


def _invoke(tmp_path: Path, url: str, *args: str, stdin: str | None = None) -> Result:
    path = tmp_path / "dbevents.toml"
    path.write_text(f'''
[eventing]
store = "memory://e2e"
[databases.shop]
type = "mongodb"
url = "{url}"
[databases.other]
type = "memory"
url = "memory://other"
[[triggers]]
name = "t"
url = "https://hooks.example.com/x"
sink = "memory"
''')
    plugins = _plugins()
    return CliRunner().invoke(build(plugins), ["--config", str(path), *args], obj=plugins,
                              input=stdin)


async def test_reset_token_moves_the_checkpoint_to_now(fake: FakeReplicaSet,
                                                       tmp_path: Path) -> None:
    fake.write_orders(4)
    old = token_position(token(1))
    await MemoryStore(StoreSettings(url="memory://e2e")).enqueue([], {"shop": old})
    # The command runs its own event loop: run it off this one.
    result = await asyncio.to_thread(_invoke, tmp_path, fake.url(), "mongodb",
                                     "reset-token", "shop", "--yes")
    assert result.exit_code == 0, result.output
    now = token_position(token(4))
    assert await _checkpoint() == now
    assert f"checkpoint moved from {old} to {now} (now)" in result.output


async def test_reset_token_asks_first(fake: FakeReplicaSet, tmp_path: Path) -> None:
    old = token_position(token(0))
    await MemoryStore(StoreSettings(url="memory://e2e")).enqueue([], {"shop": old})
    fake.write_orders(2)
    result = await asyncio.to_thread(_invoke, tmp_path, fake.url(), "mongodb",
                                     "reset-token", "shop", stdin="n\n")
    assert result.exit_code == 1  # aborted
    assert "will never be delivered" in result.output
    assert await _checkpoint() == old


@pytest.mark.parametrize(("name", "words"), [
    ("nope", "no database 'nope' in the config (databases: other, shop)"),
    ("other", "database 'other' has type 'memory', not a MongoDB source"),
])
def test_reset_token_refuses_other_databases(tmp_path: Path, name: str, words: str) -> None:
    result = _invoke(tmp_path, "mongodb://localhost/app", "mongodb", "reset-token", name,
                     "--yes")
    assert result.exit_code == 2
    assert words in result.output


async def test_reset_token_runs_the_startup_checks(
        make_fake: Any, tmp_path: Path) -> None:
    fake = make_fake(kind="standalone")
    result = await asyncio.to_thread(_invoke, tmp_path, fake.url(), "mongodb",
                                     "reset-token", "shop", "--yes")
    assert result.exit_code == 2
    assert "rs.initiate()" in result.output
    assert await _checkpoint() is None


async def test_status_shows_how_long_the_oldest_waiting_change_has_waited(
        fake: FakeReplicaSet, tmp_path: Path) -> None:
    fake.write_orders(3)
    fake.events[1]["clusterTime"] = Timestamp(1000, 2)  # committed at server time 1000
    fake.operation_time = Timestamp(1090, 1)  # the server's time now
    await MemoryStore(StoreSettings(url="memory://e2e")).enqueue(
        [], {"shop": token_position(token(1))})
    result = await asyncio.to_thread(_invoke, tmp_path, fake.url(), "status", "--json")
    assert result.exit_code == 0, result.output
    shop = json.loads(result.output)["sources"]["shop"]
    assert shop["checkpoint"] == token_position(token(1)).value
    assert shop["caught_up"] is False and shop["lag_seconds"] == 90

    await MemoryStore(StoreSettings(url="memory://e2e")).enqueue(
        [], {"shop": token_position(token(3))})
    result = await asyncio.to_thread(_invoke, tmp_path, fake.url(), "status")
    assert result.exit_code == 0, result.output
    assert "caught_up=True lag_seconds=0.0" in result.output
