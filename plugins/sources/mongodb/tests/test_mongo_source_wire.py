"""The MongoDB source against a scripted server (mockupdb): a real pymongo client
on a real socket, the server's answers written by the test (see mongo_fake.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from dbevents import (
    ChangeBatch,
    Operation,
    Position,
    SetupError,
    SourceSettings,
    SourceUnavailable,
)
from dbevents.testing import SourceContract
from dbevents_source_mongodb import MongoOptions, MongoSource
from dbevents_source_mongodb import source as source_module
from dbevents_source_mongodb.decode import token_position
from dbevents_source_mongodb.source import masked
from mongo_fake import FakeReplicaSet, flat, last_checkpoint, make_source, next_batches, token
from structlog.testing import capture_logs


async def started(sources: list[MongoSource], url: str, **kwargs: Any) -> MongoSource:
    source = make_source(url, **kwargs)
    await source.start()
    sources.append(source)
    return source


async def opened(source: MongoSource, since: Position | None = None
                 ) -> tuple[AsyncIterator[ChangeBatch], ChangeBatch]:
    """The source's iterator and its first batch (the initial checkpoint of a first run)."""
    it = source.changes(since).__aiter__()
    first = await asyncio.wait_for(it.__anext__(), 10)
    return it, first


async def wait_for(predicate: Callable[[], bool], within: float = 10.0) -> None:
    end = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.01)


# -- what a change becomes -------------------------------------------------------------


async def test_first_run_starts_from_now_with_a_durable_checkpoint(
        fake: FakeReplicaSet, sources: list[MongoSource]) -> None:
    fake.write_orders(2)  # before the source: not its business
    source = await started(sources, fake.url())
    it, first = await opened(source)
    assert first.changes == () and first.checkpoint == token_position(token(2))
    assert fake.stages == [{"fullDocument": "updateLookup"}]  # no token: from now
    fake.write_orders(1)
    [change] = flat(await next_batches(it, 1))
    assert change.key == token(3)["_data"]
    await it.aclose()  # type: ignore[attr-defined]


async def test_insert_update_replace_delete(fake: FakeReplicaSet,
                                            sources: list[MongoSource]) -> None:
    source = await started(sources, fake.url())
    it, _ = await opened(source)
    oid = ObjectId()
    ins = fake.insert({"_id": oid, "name": "ada", "tags": ["a", "b"]})
    upd = fake.update({"_id": oid, "name": "ada", "age": 36}, {"age": 36}, ["tags"])
    rep = fake.replace({"_id": oid, "name": "grace"})
    dele = fake.delete(oid)
    batches = await next_batches(it, 4)
    changes = flat(batches)
    assert [c.operation for c in changes] == [Operation.INSERT, Operation.UPDATE,
                                              Operation.UPDATE, Operation.DELETE]
    assert {c.database for c in changes} == {"shop"}
    assert {c.db_type for c in changes} == {"mongodb"}
    assert {c.table for c in changes} == {"orders"}
    assert {c.doc_id for c in changes} == {str(oid)}
    assert [c.key for c in changes] == [e["_id"]["_data"] for e in (ins, upd, rep, dele)]
    assert [c.time for c in changes] == [e["wallTime"] for e in (ins, upd, rep, dele)]
    insert, update, replace, delete = changes
    assert insert.doc == {"_id": str(oid), "name": "ada", "tags": ["a", "b"]}
    assert insert.extra == {}
    assert update.doc == {"_id": str(oid), "name": "ada", "age": 36}
    assert update.extra == {"updateDescription": {"updatedFields": {"age": 36},
                                                  "removedFields": ["tags"],
                                                  "truncatedArrays": []}}
    assert replace.doc == {"_id": str(oid), "name": "grace"} and replace.extra == {}
    # No pre-image: the document key stands in for the deleted document.
    assert delete.doc == {"_id": str(oid)} and delete.extra == {}
    assert last_checkpoint(batches) == token_position(dele["_id"])
    await it.aclose()  # type: ignore[attr-defined]


async def test_pre_images_fill_old_and_the_deleted_doc(fake: FakeReplicaSet,
                                                       sources: list[MongoSource]) -> None:
    fake.collections[0]["options"] = {"changeStreamPreAndPostImages": {"enabled": True}}
    source = await started(sources, fake.url(), full_document="whenAvailable",
                           full_document_before_change="required")
    it, _ = await opened(source)
    fake.update({"_id": 7, "v": 2}, {"v": 2}, [], before={"_id": 7, "v": 1})
    fake.delete(7, before={"_id": 7, "v": 2})
    update, delete = flat(await next_batches(it, 2))
    assert fake.stages[0] == {"fullDocument": "whenAvailable",
                              "fullDocumentBeforeChange": "required"}
    assert update.doc_id == "7" and update.doc == {"_id": 7, "v": 2}
    assert update.extra["old"] == {"_id": 7, "v": 1}
    assert delete.doc == {"_id": 7, "v": 2} and "old" not in delete.extra
    await it.aclose()  # type: ignore[attr-defined]


async def test_time_falls_back_to_cluster_time(fake: FakeReplicaSet,
                                               sources: list[MongoSource]) -> None:
    source = await started(sources, fake.url())
    it, _ = await opened(source)
    event = fake.insert({"_id": "a"})
    del event["wallTime"]  # servers before 6.0 send no wallTime
    [change] = flat(await next_batches(it, 1))
    assert change.time == datetime.fromtimestamp(event["clusterTime"].time, UTC)
    assert change.doc_id == "a"
    await it.aclose()  # type: ignore[attr-defined]


async def test_batches_are_bounded_and_in_order(fake: FakeReplicaSet,
                                                sources: list[MongoSource]) -> None:
    fake.first_batch = 100
    source = await started(sources, fake.url(), batch_size=3)
    it, _ = await opened(source)
    written = fake.write_orders(10)
    batches = await next_batches(it, 10)
    assert all(len(b.changes) <= 3 and b.checkpoint is not None for b in batches)
    assert [c.key for c in flat(batches)] == [e["_id"]["_data"] for e in written]
    await it.aclose()  # type: ignore[attr-defined]


async def test_server_side_filter_from_options_and_triggers(
        fake: FakeReplicaSet, sources: list[MongoSource]) -> None:
    fake.collections.append({"name": "users", "type": "collection", "options": {}})
    source = await started(sources, fake.url(), collections=["orders", "users"],
                           tables=frozenset({"orders", "audit"}),
                           operations=frozenset({"insert", "delete"}))
    it, _ = await opened(source)
    assert fake.pipelines[0][1:] == [{"$match": {"$and": [
        {"$or": [{"ns.coll": {"$in": ["orders"]}}, {"ns.coll": {"$exists": False}}]},
        {"operationType": {"$in": ["delete", "insert", "drop", "rename", "dropDatabase",
                                   "invalidate"]}},
    ]}}]
    await it.aclose()  # type: ignore[attr-defined]


async def test_no_filter_when_everything_is_wanted(fake: FakeReplicaSet,
                                                   sources: list[MongoSource]) -> None:
    source = await started(sources, fake.url(),
                           operations=frozenset({"insert", "update", "delete"}))
    it, _ = await opened(source)
    assert fake.pipelines[0] == [{"$changeStream": {"fullDocument": "updateLookup"}}]
    await it.aclose()  # type: ignore[attr-defined]


# -- resuming --------------------------------------------------------------------


async def test_restart_from_a_checkpoint_sends_start_after(
        fake: FakeReplicaSet, sources: list[MongoSource]) -> None:
    written = fake.write_orders(4)
    source = await started(sources, fake.url())
    it = source.changes(token_position(token(2))).__aiter__()
    changes = flat(await next_batches(it, 2))
    assert fake.stages[0]["startAfter"] == token(2)
    assert [c.key for c in changes] == [e["_id"]["_data"] for e in written[2:]]
    await it.aclose()  # type: ignore[attr-defined]


async def test_pymongo_resumes_a_dropped_connection_with_the_last_token(
        fake: FakeReplicaSet, sources: list[MongoSource]) -> None:
    source = await started(sources, fake.url())
    it, _ = await opened(source)
    before = fake.write_orders(2)
    first = flat(await next_batches(it, 2))
    fake.hangup_getmores = 1  # the next getMore: connection closed
    await wait_for(lambda: len(fake.stages) == 2)
    assert fake.stages[1]["resumeAfter"] == token(2)  # right after what was read
    after = fake.write_orders(2)
    second = flat(await next_batches(it, 2))
    assert [c.key for c in first + second] == [e["_id"]["_data"] for e in before + after]
    assert source.reconnects == 0  # the driver's own resume sufficed
    await it.aclose()  # type: ignore[attr-defined]


async def test_source_reconnects_with_start_after_when_the_driver_gives_up(
        fake: FakeReplicaSet, sources: list[MongoSource]) -> None:
    source = await started(sources, fake.url())
    it, _ = await opened(source)
    before = fake.write_orders(2)
    flat(await next_batches(it, 2))
    # The getMore and the driver's resume (and its one retry) all fail.
    fake.hangup_aggregates = 2
    fake.hangup_getmores = 1
    reader = asyncio.create_task(next_batches(it, 2))  # the engine reads all along
    await wait_for(lambda: len(fake.stages) >= 4)
    after = fake.write_orders(2)
    second = flat(await reader)
    assert [c.key for c in second] == [e["_id"]["_data"] for e in after]
    assert source.reconnects == 1
    assert fake.stages[-1] == {"fullDocument": "updateLookup", "startAfter": token(2)}
    assert before[-1]["_id"] == token(2)
    status = await source.reader_stats()
    assert status["reconnects"] == 1 and status["last_event_time"]
    await it.aclose()  # type: ignore[attr-defined]


async def test_history_lost_stops_with_a_setup_error(fake: FakeReplicaSet,
                                                     sources: list[MongoSource]) -> None:
    fake.write_orders(6)
    fake.first_kept = 4  # the oplog no longer holds the events before the 5th
    source = await started(sources, fake.url())
    with pytest.raises(SetupError) as err:
        await opened(source, token_position(token(2)))
    text = str(err.value)
    assert "fallen off the oplog" in text
    assert "between that checkpoint and now cannot be recovered" in text
    assert "dbevents mongodb reset-token shop" in text
    assert fake.stages == [{"fullDocument": "updateLookup", "startAfter": token(2)}]


async def test_history_lost_for_start_at(fake: FakeReplicaSet,
                                         sources: list[MongoSource]) -> None:
    fake.write_orders(3)
    fake.first_kept = 2
    source = await started(sources, fake.url(), start_at="2001-01-01T00:00:00Z")
    with pytest.raises(SetupError, match="fallen off the oplog"):
        await opened(source)
    assert fake.stages[0]["startAtOperationTime"].time == 978307200


async def test_a_checkpoint_that_is_no_token_is_refused(fake: FakeReplicaSet,
                                                        sources: list[MongoSource]) -> None:
    source = await started(sources, fake.url())
    with pytest.raises(SetupError, match="not a MongoDB resume token"):
        await opened(source, Position("0/16B3748"))


async def test_current_position_is_now_whatever_start_at_says(
        fake: FakeReplicaSet, sources: list[MongoSource]) -> None:
    fake.write_orders(3)
    source = await started(sources, fake.url(), start_at="2001-01-01T00:00:00Z")
    assert await source.current_position() == token_position(token(3))
    assert fake.stages == [{"fullDocument": "updateLookup"}]
    it = source.changes(await source.current_position()).__aiter__()
    later = fake.write_orders(1)
    [change] = flat(await next_batches(it, 1))
    assert change.key == later[0]["_id"]["_data"]
    await it.aclose()  # type: ignore[attr-defined]


async def test_reconnects_back_off_doubling_then_give_up(
        fake: FakeReplicaSet, sources: list[MongoSource],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # As shipped (and documented): 0.5 s doubling to 30 s, 8 reconnects in a row.
    assert (source_module.BACKOFF_FIRST, source_module.BACKOFF_MAX,
            source_module.MAX_FAILURES) == (0.5, 30.0, 8)
    # The same schedule at 1/100 of the scale: a full run would sleep 91.5 s.
    monkeypatch.setattr(source_module, "BACKOFF_FIRST", 0.005)
    monkeypatch.setattr(source_module, "BACKOFF_MAX", 0.3)
    source = await started(sources, fake.url())
    it, _ = await opened(source)
    fake.write_orders(1)
    flat(await next_batches(it, 1))
    # The connection drops and every new change stream is refused from then on.
    fake.hangup_aggregates = 1000
    fake.hangup_getmores = 1
    with capture_logs() as logs, pytest.raises(SourceUnavailable) as err:
        await asyncio.wait_for(it.__anext__(), 60)
    retries = [e for e in logs if e["event"] == "change stream failed; reconnecting"]
    assert [e["attempt"] for e in retries] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [e["retry_in"] for e in retries] == [
        0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.3, 0.3]
    assert "failed 8 reconnects in a row" in str(err.value)
    assert source.reconnects == 8
    # The driver's own resume first, then every reconnect of the source (each
    # aggregate tried twice: pymongo retries a read once), all after the last event.
    resumes = [s.get("resumeAfter") or s.get("startAfter") for s in fake.stages[1:]]
    assert resumes == [token(1)] * len(resumes)
    assert sum("startAfter" in s for s in fake.stages) == 2 * 8


# -- errors that retrying cannot cure ------------------------------------------------


class ErrorScript(FakeReplicaSet):
    """The scripted server, answering the next change-stream aggregate or getMore
    with a server error instead (code, code name, message)."""

    def __init__(self) -> None:
        super().__init__()
        self.aggregate_errors: list[tuple[int, str, str]] = []
        self.getmore_errors: list[tuple[int, str, str]] = []

    def _aggregate(self, request: Any) -> bool:
        with self._cond:
            error = self.aggregate_errors.pop(0) if self.aggregate_errors else None
            if error is not None:
                self.stages.append(dict(request.doc["pipeline"][0]["$changeStream"]))
        if error is not None:
            return self._error(request, *error)
        return super()._aggregate(request)

    def _get_more(self, request: Any) -> bool:
        with self._cond:
            error = self.getmore_errors.pop(0) if self.getmore_errors else None
        if error is not None:
            return self._error(request, *error)
        return super()._get_more(request)


@pytest.fixture
def scripted() -> Iterator[ErrorScript]:
    server = ErrorScript().start()
    yield server
    server.stop()


async def test_invalid_resume_token_says_how_to_start_again(
        scripted: ErrorScript, sources: list[MongoSource]) -> None:
    scripted.write_orders(4)
    scripted.aggregate_errors.append((
        260, "InvalidResumeToken", "Attempting to resume a change stream using "
        "'resumeAfter' is not allowed from an invalidate notification."))
    source = await started(sources, scripted.url())
    with pytest.raises(SetupError) as err:
        await opened(source, token_position(token(2)))
    text = str(err.value)
    assert "MongoDB rejects the resume token stored for database 'shop'" in text
    assert "not allowed from an invalidate notification" in text  # the server's words
    assert "dbevents mongodb reset-token shop" in text
    assert scripted.stages == [{"fullDocument": "updateLookup", "startAfter": token(2)}]
    assert source.reconnects == 0  # not retried


async def test_unauthorized_names_the_privileges(scripted: ErrorScript,
                                                 sources: list[MongoSource]) -> None:
    scripted.aggregate_errors.append((
        13, "Unauthorized", "not authorized on app to execute command { aggregate: 1 }"))
    source = await started(sources, scripted.url())
    with pytest.raises(SetupError) as err:
        await opened(source)
    text = str(err.value)
    assert "the MongoDB user in the URL of database 'shop' may not watch changes" in text
    assert "not authorized on app" in text
    assert "find and changeStream actions" in text and 'role: "read"' in text
    assert len(scripted.stages) == 1 and source.reconnects == 0


@pytest.mark.parametrize(("option", "image"), [
    ("full_document", "post-image"),
    ("full_document_before_change", "pre-image"),
])
async def test_a_required_image_missing_mid_stream(
        scripted: ErrorScript, sources: list[MongoSource], option: str, image: str) -> None:
    scripted.collections[0]["options"] = {"changeStreamPreAndPostImages": {"enabled": True}}
    source = await started(sources, scripted.url(), **{option: "required"})
    it, _ = await opened(source)
    written = scripted.write_orders(1)
    [change] = flat(await next_batches(it, 1))
    assert change.key == written[0]["_id"]["_data"]
    # What MongoDB answers when an image expired or was never recorded.
    scripted.getmore_errors.append((
        47, "NoMatchingDocument", f"Change stream was configured to require a {image} for "
        f"all update, delete and replace events, but the {image} was not found for event"))
    with pytest.raises(SetupError) as err:
        await asyncio.wait_for(it.__anext__(), 10)
    text = str(err.value)
    assert "a change has no pre- or post-image although the config requires one" in text
    assert f"but the {image} was not found" in text
    assert "changeStreamPreAndPostImages: {enabled: true}" in text
    assert '"whenAvailable"' in text
    assert source.reconnects == 0


# -- collection and database events ------------------------------------------------


async def test_drop_and_rename_emit_nothing_but_move_the_checkpoint(
        fake: FakeReplicaSet, sources: list[MongoSource]) -> None:
    source = await started(sources, fake.url())
    it, _ = await opened(source)
    fake.rename("orders", "orders_old")
    drop = fake.drop("orders_old")
    with capture_logs() as logs:
        batch = await asyncio.wait_for(it.__anext__(), 10)
        while batch.checkpoint != token_position(drop["_id"]):
            batch = await asyncio.wait_for(it.__anext__(), 10)
    assert batch.changes == ()
    # Nothing is emitted, so the log is the only trace of what happened.
    told = [e for e in logs if e["log_level"] == "warning"]
    assert told == [
        {"event": "collection renamed: later changes arrive under the new name",
         "log_level": "warning", "database": "shop", "operation": "rename",
         "collection": "orders", "db": "app", "to": "app.orders_old"},
        {"event": "collection dropped: its documents emit no delete events",
         "log_level": "warning", "database": "shop", "operation": "drop",
         "collection": "orders_old", "db": "app"},
    ]
    await it.aclose()  # type: ignore[attr-defined]


async def test_invalidate_restarts_the_stream_after_it(fake: FakeReplicaSet,
                                                       sources: list[MongoSource]) -> None:
    source = await started(sources, fake.url())
    it, _ = await opened(source)
    invalidate = fake.drop_database()
    later = fake.insert({"_id": 1})
    with capture_logs() as logs:
        batches = await next_batches(it, 1)
    assert [(e["event"], e.get("operation")) for e in logs
            if e["log_level"] == "warning"] == [
        ("collection dropped: its documents emit no delete events", "drop"),
        ("database dropped: its documents emit no delete events", "dropDatabase"),
        ("change stream invalidated; restarting it after the invalidate event",
         "invalidate"),
    ]
    [change] = flat(batches)
    assert change.key == later["_id"]["_data"]
    # startAfter: the server refuses resumeAfter with an invalidate token.
    assert fake.stages[-1]["startAfter"] == invalidate["_id"]
    cps = [b.checkpoint for b in batches]
    assert token_position(invalidate["_id"]) in cps
    await it.aclose()  # type: ignore[attr-defined]


async def test_idle_stream_checkpoints_the_servers_high_water_mark(
        fake: FakeReplicaSet, sources: list[MongoSource]) -> None:
    source = await started(sources, fake.url(), idle_checkpoint=0.05)
    it, first = await opened(source)
    fake.noise(3)  # changes the stream filters out
    batch = await asyncio.wait_for(it.__anext__(), 10)
    assert batch.changes == () and batch.checkpoint == token_position(token(3))
    assert first.checkpoint == token_position(token(0))
    await it.aclose()  # type: ignore[attr-defined]


# -- startup checks ------------------------------------------------------------------


async def test_not_a_replica_set(make_fake: Callable[..., FakeReplicaSet]) -> None:
    fake = make_fake(kind="standalone")
    source = make_source(fake.url())
    try:
        with pytest.raises(SetupError) as err:
            await source.start()
    finally:
        await source.close()
    text = str(err.value)
    assert "standalone server, not a replica set" in text
    assert "mongod --replSet rs0" in text and "rs.initiate()" in text


async def test_a_mongos_is_fine(make_fake: Callable[..., FakeReplicaSet],
                                sources: list[MongoSource]) -> None:
    fake = make_fake(kind="mongos")
    source = await started(sources, fake.url())
    it, first = await opened(source)
    assert first.checkpoint is not None
    await it.aclose()  # type: ignore[attr-defined]


async def test_authentication_failure(make_fake: Callable[..., FakeReplicaSet]) -> None:
    fake = make_fake(auth_fail=True)
    source = make_source(fake.url(userinfo="app:s3cret-pw@"))
    try:
        with pytest.raises(SetupError) as err:
            await source.start()
    finally:
        await source.close()
    assert "authentication to MongoDB" in str(err.value)
    assert "authSource" in str(err.value)
    assert "s3cret-pw" not in str(err.value)
    assert "app:***@" in str(err.value)


async def test_database_missing(fake: FakeReplicaSet) -> None:
    source = make_source(fake.url(path="shopp"))
    try:
        with pytest.raises(SetupError) as err:
            await source.start()
    finally:
        await source.close()
    assert "database 'shopp' does not exist" in str(err.value)
    assert "(it has: app)" in str(err.value)


async def test_no_database_named(fake: FakeReplicaSet) -> None:
    source = make_source(fake.url(path=""))
    try:
        with pytest.raises(SetupError, match="no MongoDB database to watch"):
            await source.start()
    finally:
        await source.close()


async def test_database_option_overrides_the_url_path(fake: FakeReplicaSet,
                                                      sources: list[MongoSource]) -> None:
    source = await started(sources, fake.url(path="admin"), database="app")
    it, _ = await opened(source)
    assert "aggregate" in fake.commands
    await it.aclose()  # type: ignore[attr-defined]


async def test_unreachable_server() -> None:
    source = make_source("mongodb://u:pw@127.0.0.1:9/app?serverSelectionTimeoutMS=200")
    try:
        with pytest.raises(SetupError) as err:
            await source.start()
    finally:
        await source.close()
    assert "cannot use MongoDB at mongodb://u:***@127.0.0.1:9/app" in str(err.value)
    assert ":pw@" not in str(err.value)


async def test_required_images_need_them_enabled(fake: FakeReplicaSet) -> None:
    source = make_source(fake.url(), full_document="required")
    try:
        with pytest.raises(SetupError) as err:
            await source.start()
    finally:
        await source.close()
    assert ('db.runCommand({collMod: "orders", changeStreamPreAndPostImages: '
            '{enabled: true}})') in str(err.value)


async def test_images_need_mongodb_6(make_fake: Callable[..., FakeReplicaSet]) -> None:
    fake = make_fake(max_wire=13)  # MongoDB 5.0
    source = make_source(fake.url(), full_document_before_change="whenAvailable")
    try:
        with pytest.raises(SetupError, match=r"need MongoDB 6\.0"):
            await source.start()
    finally:
        await source.close()


def test_masked_urls_hide_the_password() -> None:
    assert masked("mongodb://u:p@h1:27017,h2:27018/app?replicaSet=rs0") == \
        "mongodb://u:***@h1:27017,h2:27018/app?replicaSet=rs0"
    assert masked("mongodb://u:p@h/app") == "mongodb://u:***@h/app"
    assert masked("mongodb://h/app") == "mongodb://h/app"


# -- the source contract, through the scripted server -------------------------------------


class _Env:
    def __init__(self, fake: FakeReplicaSet) -> None:
        self.fake = fake
        # MongoDB keeps no reader state (no slot); a fixed start time makes "from the
        # beginning" the same moment for every fresh source, as the contract expects.
        self.start_at = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()

        self.written: list[dict[str, Any]] = []
        # Pre-images on, so an update carries the document before it ("old").
        fake.collections[0]["options"] = {"changeStreamPreAndPostImages": {"enabled": True}}

    def make_source(self, batch_size: int | None = None) -> MongoSource:
        more = {} if batch_size is None else {"batch_size": batch_size}
        return MongoSource(SourceSettings(
            name="shop", url=self.fake.url(),
            options=MongoOptions(start_at=self.start_at,
                                 full_document_before_change="whenAvailable", **more)))

    async def write(self, n: int) -> None:
        self.written += [e["fullDocument"] for e in self.fake.write_orders(n)]

    async def update_and_delete(self) -> None:
        # A transaction's events are consecutive in the stream, each with its token.
        first, second = self.written[:2]
        self.fake.update({**first, "n": -1}, {"n": -1}, [], before=first)
        self.fake.delete(second["_id"], before=second)


class TestMongoSourceContract(SourceContract):
    TIMEOUT = 10.0
    RESUMES_INSIDE_A_TRANSACTION = True  # every event's resume token is a resume point

    @pytest.fixture
    def source_env(self, fake: FakeReplicaSet) -> _Env:
        return _Env(fake)


async def test_preflight_lists_the_problem_instead_of_raising(
        make_fake: Callable[..., FakeReplicaSet]) -> None:
    source = make_source(make_fake(kind="standalone").url())
    problems = await source.preflight()
    assert len(problems) == 1
    assert "standalone server, not a replica set" in problems[0].message
    assert source._client is None  # closed again


async def test_preflight_of_a_replica_set_is_clean(fake: FakeReplicaSet) -> None:
    assert await make_source(fake.url()).preflight() == []
