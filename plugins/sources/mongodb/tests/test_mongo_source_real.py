"""The MongoDB source against a real replica set, end to end.

Runs only when MONGODB_URI points at a replica set (or a mongos), e.g.
``MONGODB_URI="mongodb://localhost:27017/?replicaSet=rs0"``; skipped otherwise, with
the reason. Each test works in its own fresh database and drops it afterwards. The
docs (docs/source-mongodb.md) show how to start a one-member replica set for this.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
from bson import ObjectId
from click.testing import CliRunner
from dbevents import (
    ChangeBatch,
    Operation,
    Position,
    SetupError,
    SourceSettings,
    StoreSettings,
)
from dbevents.cli import build
from dbevents.config import parse
from dbevents.engine import Engine
from dbevents.testing import MemoryStore, SourceContract, isolated_plugins
from dbevents_source_mongodb import MongoOptions, MongoSource, plugin
from dbevents_source_mongodb.decode import position_token, token_position
from mongo_fake import flat, next_batches
from pymongo import AsyncMongoClient
from structlog.testing import capture_logs
from test_mongo_convert import EXPECTED, SAMPLE

URI = os.environ.get("MONGODB_URI", "")

pytestmark = pytest.mark.skipif(
    not URI, reason="MONGODB_URI is not set: these tests need a MongoDB replica set "
                    "(see docs/source-mongodb.md, which lists what each kind of test "
                    "covers); the wire-level tests run against a scripted server")


class RealDb:
    def __init__(self, client: AsyncMongoClient[dict[str, Any]], name: str,
                 hello: dict[str, Any]) -> None:
        self.client = client
        self.name = name
        self.hello = hello
        self.db = client[name]

    def source(self, **options: Any) -> MongoSource:
        return MongoSource(SourceSettings(name="real", url=URI,
                                          options=MongoOptions(database=self.name, **options)))

    def server_now_iso(self) -> str:
        # The server's clock, not ours: startAtOperationTime is compared with it.
        return (self.hello["localTime"] - timedelta(seconds=1)).isoformat()


@pytest.fixture
async def real() -> AsyncIterator[RealDb]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        URI, tz_aware=True, serverSelectionTimeoutMS=5000)
    try:
        hello = await client.admin.command("hello")
        if not (hello.get("setName") or hello.get("msg") == "isdbgrid"):
            pytest.skip("MONGODB_URI points at a standalone server, not a replica set")
        name = f"dbevents_test_{uuid.uuid4().hex[:12]}"
        await client[name].create_collection("orders")
        yield RealDb(client, name, hello)
        await client.drop_database(name)
    finally:
        await client.close()


async def opened(source: MongoSource) -> tuple[AsyncIterator[ChangeBatch], ChangeBatch]:
    await source.start()
    it = source.changes(None).__aiter__()
    return it, await asyncio.wait_for(it.__anext__(), 20)


async def test_real_insert_update_replace_delete(real: RealDb) -> None:
    source = real.source()
    try:
        it, first = await opened(source)
        assert first.checkpoint is not None and first.changes == ()
        orders = real.db.orders
        oid = ObjectId()
        await orders.insert_one({"_id": oid, "name": "ada", "tags": ["a"]})
        await orders.update_one({"_id": oid}, {"$set": {"age": 36}, "$unset": {"tags": ""}})
        # updateLookup reads the document when the event is read: read the update
        # before the document changes again.
        changes = flat(await next_batches(it, 2, 20))
        await orders.replace_one({"_id": oid}, {"name": "grace"})
        await orders.delete_one({"_id": oid})
        changes += flat(await next_batches(it, 2, 20))
        await it.aclose()  # type: ignore[attr-defined]
    finally:
        await source.close()
    assert [c.operation for c in changes] == [Operation.INSERT, Operation.UPDATE,
                                              Operation.UPDATE, Operation.DELETE]
    assert {c.doc_id for c in changes} == {str(oid)}
    assert {c.table for c in changes} == {"orders"}
    assert len({c.key for c in changes}) == 4
    assert all(c.time.tzinfo is not None for c in changes)
    insert, update, replace, delete = changes
    assert insert.doc == {"_id": str(oid), "name": "ada", "tags": ["a"]}
    assert update.doc == {"_id": str(oid), "name": "ada", "age": 36}
    assert update.extra["updateDescription"]["updatedFields"] == {"age": 36}
    assert update.extra["updateDescription"]["removedFields"] == ["tags"]
    assert replace.doc == {"_id": str(oid), "name": "grace"}
    assert delete.doc == {"_id": str(oid)}


async def test_real_pre_and_post_images(real: RealDb) -> None:
    if int(real.hello.get("maxWireVersion", 0)) < 17:
        pytest.skip("pre- and post-images need MongoDB 6.0+")
    await real.db.command("collMod", "orders", changeStreamPreAndPostImages={"enabled": True})
    source = real.source(full_document="required", full_document_before_change="required")
    try:
        it, _ = await opened(source)
        await real.db.orders.insert_one({"_id": 1, "v": 1})
        await real.db.orders.update_one({"_id": 1}, {"$set": {"v": 2}})
        await real.db.orders.delete_one({"_id": 1})
        _, update, delete = flat(await next_batches(it, 3, 20))
        await it.aclose()  # type: ignore[attr-defined]
    finally:
        await source.close()
    assert update.doc == {"_id": 1, "v": 2} and update.extra["old"] == {"_id": 1, "v": 1}
    assert delete.doc == {"_id": 1, "v": 2}


async def test_real_required_images_not_enabled(real: RealDb) -> None:
    if int(real.hello.get("maxWireVersion", 0)) < 17:
        pytest.skip("pre- and post-images need MongoDB 6.0+")
    source = real.source(full_document_before_change="required")
    try:
        with pytest.raises(SetupError, match="changeStreamPreAndPostImages"):
            await source.start()
    finally:
        await source.close()


async def test_real_drop_database_invalidates_and_the_stream_restarts(real: RealDb) -> None:
    source = real.source()
    try:
        it, _ = await opened(source)
        await real.client.drop_database(real.name)
        await real.db.fresh.insert_one({"_id": "after"})
        [change] = flat(await next_batches(it, 1, 30))
        await it.aclose()  # type: ignore[attr-defined]
    finally:
        await source.close()
    assert (change.table, change.doc_id) == ("fresh", "after")


async def test_real_history_lost(real: RealDb) -> None:
    source = real.source(start_at="2001-01-01T00:00:00Z")  # before any oplog entry
    try:
        with pytest.raises(SetupError, match="fallen off the oplog"):
            await opened(source)
    finally:
        await source.close()


async def test_real_reset_position_skips_what_came_before(real: RealDb) -> None:
    await real.db.orders.insert_one({"_id": "before"})
    source = real.source()
    try:
        await source.start()
        now = await source.current_position()
        await real.db.orders.insert_one({"_id": "after"})
        it = source.changes(now).__aiter__()
        [change] = flat(await next_batches(it, 1, 20))
        await it.aclose()  # type: ignore[attr-defined]
    finally:
        await source.close()
    assert change.doc_id == "after"


async def test_real_database_missing(real: RealDb) -> None:
    source = MongoSource(SourceSettings(name="real", url=URI, options=MongoOptions(
        database=f"{real.name}_missing")))
    try:
        with pytest.raises(SetupError, match="does not exist"):
            await source.start()
    finally:
        await source.close()


async def test_real_authentication_failure(real: RealDb) -> None:
    scheme, rest = URI.split("://", 1)
    rest = rest.split("@", 1)[-1]  # drop any credentials of the URI
    url = f"{scheme}://dbevents-nobody:wrong-pw@{rest}"
    source = MongoSource(SourceSettings(name="real", url=url,
                                        options=MongoOptions(database=real.name)))
    try:
        with pytest.raises(SetupError, match="authentication to MongoDB") as err:
            await source.start()
    finally:
        await source.close()
    assert "wrong-pw" not in str(err.value)


async def test_real_bson_types(real: RealDb) -> None:
    """Every row of the type table, stored and sent back by the server itself."""
    source = real.source()
    try:
        it, _ = await opened(source)
        await real.db.orders.insert_one(dict(SAMPLE))
        [change] = flat(await next_batches(it, 1, 20))
        await it.aclose()  # type: ignore[attr-defined]
    finally:
        await source.close()
    assert change.doc_id == "65f0c0ffee0000000000abcd"
    # Standard JSON, as a receiver parses it (no NaN literals).
    assert json.loads(json.dumps(change.doc, allow_nan=False)) == EXPECTED


async def test_real_rename_and_drop_are_logged_and_emit_nothing(real: RealDb) -> None:
    source = real.source()
    try:
        it, _ = await opened(source)
        with capture_logs() as logs:
            await real.db.orders.insert_one({"_id": 1})
            await real.db.orders.rename("orders_old")
            await real.db.orders_old.insert_one({"_id": 2})
            await real.db.orders_old.drop()
            # A change after them: once it is read, so are they.
            await real.db.fresh.insert_one({"_id": 3})
            changes = flat(await next_batches(it, 3, 30))
        await it.aclose()  # type: ignore[attr-defined]
    finally:
        await source.close()
    assert [(c.operation, c.table, c.doc_id) for c in changes] == [
        (Operation.INSERT, "orders", "1"), (Operation.INSERT, "orders_old", "2"),
        (Operation.INSERT, "fresh", "3")]
    warned = [(e["event"], e.get("collection"), e.get("to")) for e in logs
              if e["log_level"] == "warning"]
    assert warned == [
        ("collection renamed: later changes arrive under the new name", "orders",
         f"{real.name}.orders_old"),
        ("collection dropped: its documents emit no delete events", "orders_old", None),
    ]


def _engine_config(real: RealDb) -> dict[str, Any]:
    return {
        "eventing": {"store": "memory://real"},
        "databases": {"real": {"type": "mongodb", "url": URI, "database": real.name}},
        "triggers": [{"name": "t", "url": "https://hooks.example.com/x", "sink": "memory"}],
    }


def _stored() -> MemoryStore:
    return MemoryStore(StoreSettings(url="memory://real"))


def _reset_token(tmp_path: Path) -> Any:
    path = tmp_path / "dbevents.toml"
    plugins = isolated_plugins(("source-mongodb", plugin))
    return CliRunner().invoke(build(plugins), ["--config", str(path), "mongodb",
                                               "reset-token", "real", "--yes"], obj=plugins)


async def test_real_reset_token_command(real: RealDb, tmp_path: Path) -> None:
    source = real.source()
    try:
        await source.start()
        old = await source.current_position()
    finally:
        await source.close()
    await _stored().enqueue([], {"real": old})
    await real.db.orders.insert_one({"_id": "given-up"})
    # A JSON string is a valid TOML basic string: the URI is quoted safely.
    (tmp_path / "dbevents.toml").write_text(
        f'[eventing]\nstore = "memory://real"\n[databases.real]\ntype = "mongodb"\n'
        f'url = {json.dumps(URI)}\ndatabase = "{real.name}"\n')
    # The command runs its own event loop: run it off this one.
    result = await asyncio.to_thread(_reset_token, tmp_path)
    assert result.exit_code == 0, result.output
    new = await _stored().checkpoint("real")
    assert new is not None and new != old
    assert f"checkpoint moved from {old} to {new} (now)" in result.output
    # From the new checkpoint only what came after the reset is read.
    await real.db.orders.insert_one({"_id": "after"})
    source = real.source()
    try:
        await source.start()
        it = source.changes(new).__aiter__()
        [change] = flat(await next_batches(it, 1, 20))
        await it.aclose()  # type: ignore[attr-defined]
    finally:
        await source.close()
    assert change.doc_id == "after"


def _older(position: Position, seconds: int) -> Position:
    """The same resume token moved back in time: its ``_data`` opens with the
    cluster time (0x82, then 4 bytes of seconds and 4 of increment, hex)."""
    data = position_token(position, "real")["_data"]
    assert data[:2] == "82", f"unexpected resume token format {data!r}"
    return token_position({"_data": f"82{seconds:08X}{data[10:]}"})


async def test_real_history_lost_from_a_stored_token(real: RealDb) -> None:
    source = real.source()
    try:
        await source.start()
        now = await source.current_position()
    finally:
        await source.close()
    # A token from before any oplog entry: what a checkpoint older than the oplog
    # window looks like to the server.
    lost = _older(now, int(datetime(2001, 1, 1, tzinfo=UTC).timestamp()))
    await _stored().enqueue([], {"real": lost})
    plugins = isolated_plugins(("source-mongodb", plugin))
    engine = Engine(parse(_engine_config(real), plugins), plugins)
    with pytest.raises(SetupError, match="fallen off the oplog") as err:
        await asyncio.wait_for(engine.run(), 30)
    assert "dbevents mongodb reset-token real" in str(err.value)
    assert await _stored().checkpoint("real") == lost  # nothing skipped on its own


class _RealEnv:
    def __init__(self, real: RealDb) -> None:
        self.real = real
        # No reader state lives on the server: a fixed start time makes "from the
        # beginning" the same moment for every fresh source.
        self.start_at = real.server_now_iso()

    def make_source(self, batch_size: int | None = None) -> MongoSource:
        more = {} if batch_size is None else {"batch_size": batch_size}
        return self.real.source(start_at=self.start_at,
                                full_document_before_change="whenAvailable", **more)

    async def write(self, n: int) -> None:
        for i in range(n):
            await self.real.db.orders.insert_one({"n": i})

    async def update_and_delete(self) -> None:
        orders = self.real.db.orders
        first, second = [d["_id"] async for d in orders.find({}, sort=[("_id", 1)], limit=2)]

        async def txn(session: Any) -> None:
            await orders.update_one({"_id": first}, {"$set": {"n": -1}}, session=session)
            await orders.delete_one({"_id": second}, session=session)

        async with self.real.client.start_session() as session:
            await session.with_transaction(txn)


class TestRealMongoSourceContract(SourceContract):
    RESUMES_INSIDE_A_TRANSACTION = True  # every event's resume token is a resume point

    @pytest.fixture
    async def source_env(self, real: RealDb) -> _RealEnv:
        if int(real.hello.get("maxWireVersion", 0)) < 17:
            pytest.skip("an update's old document needs pre-images: MongoDB 6.0+")
        # Pre-images on, so an update carries the document before it ("old").
        await real.db.command("collMod", "orders",
                              changeStreamPreAndPostImages={"enabled": True})
        return _RealEnv(real)


async def test_real_status_probe_lag(real: RealDb) -> None:
    source = real.source()
    try:
        await source.start()
        before = await source.current_position()
    finally:
        await source.close()
    await real.db.orders.insert_one({"_id": "waiting"})

    async def probe(checkpoint: Position) -> dict[str, Any]:
        settings = attrs.evolve(real.source().settings, checkpoint=checkpoint)
        return dict(await MongoSource.probe_status(settings))

    behind = await probe(before)
    assert behind["caught_up"] is False and behind["lag_seconds"] >= 0
    reader = real.source()
    try:
        await reader.start()
        it = reader.changes(before).__aiter__()
        batches = await next_batches(it, 1, 20)
        await it.aclose()  # type: ignore[attr-defined]
    finally:
        await reader.close()
    # The change's own checkpoint: nothing after it in this database.
    cps = [b.checkpoint for b in batches if b.checkpoint is not None]
    assert (await probe(cps[-1]))["caught_up"] is True
