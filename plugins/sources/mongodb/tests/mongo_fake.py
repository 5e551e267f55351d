"""A scripted MongoDB for the wire-level tests: mockupdb (a real socket speaking the
wire protocol) answering a real pymongo client as a replica-set primary with a
change stream over an in-memory event log.

It answers hello/isMaster, listDatabases, listCollections, aggregate with
$changeStream (resumeAfter, startAfter, startAtOperationTime), getMore (waiting up
to maxTimeMS for new events, like a tailable-await cursor), killCursors and
endSessions; and it can hang up, refuse authentication, lose history (error 286)
or pose as a standalone server or a mongos. It records every $changeStream stage
it receives, so tests can assert the token a client resumed with.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from bson import Int64, ObjectId, Timestamp
from dbevents import Change, ChangeBatch, Position, SourceSettings
from dbevents_source_mongodb import MongoOptions, MongoSource
from mockupdb import MockupDB

DB = "app"
MAX_WAIT = 0.2  # seconds an empty getMore waits at most (a real server: maxTimeMS)


def token(n: int) -> dict[str, str]:
    """The resume token "after event n" (events count from 1)."""
    return {"_data": f"82{n:014X}"}


def token_number(tok: Any) -> int:
    return int(tok["_data"][2:], 16)


class FakeReplicaSet:
    def __init__(self, kind: str = "replicaset", *, auth_fail: bool = False,
                 databases: tuple[str, ...] = (DB, "admin", "local"),
                 max_wire: int = 21, first_batch: int = 2) -> None:
        self.kind = kind  # "replicaset", "standalone" or "mongos"
        self.auth_fail = auth_fail
        self.databases = databases
        self.max_wire = max_wire
        self.first_batch = first_batch  # events at most in an aggregate's firstBatch
        self.collections: list[dict[str, Any]] = [
            {"name": "orders", "type": "collection", "options": {}}]
        self.events: list[dict[str, Any]] = []  # the oplog, as change events
        self.first_kept = 0  # events before this index fell off the oplog
        self.stages: list[dict[str, Any]] = []  # every $changeStream stage received
        self.pipelines: list[list[dict[str, Any]]] = []
        self.commands: list[str] = []
        self.hangup_getmores = 0  # the next N getMores: close the connection instead
        self.hangup_aggregates = 0  # the next N change-stream aggregates: likewise
        # The logical time commands report (operationTime); None: the clock's now.
        self.operation_time: Timestamp | None = None
        self._cond = threading.Condition()
        self._cursors: dict[int, int] = {}  # cursor id -> index of its next event
        self._next_cursor = 7000
        self._closing = False
        self.server = MockupDB(auto_ismaster=False)

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> FakeReplicaSet:
        self.server.autoresponds(self._handle)
        self.server.run()
        return self

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self.server.stop()

    @property
    def address(self) -> str:
        return f"localhost:{self.server.port}"

    def url(self, path: str = DB, query: str = "serverSelectionTimeoutMS=3000",
            userinfo: str = "") -> str:
        rs = "&replicaSet=rs0" if self.kind == "replicaset" else ""
        return f"mongodb://{userinfo}{self.address}/{path}?{query}{rs}"

    # -- writing events --------------------------------------------------------------
    def _append(self, op: str, coll: str | None, hidden: bool = False,
                **fields: Any) -> dict[str, Any]:
        with self._cond:
            n = len(self.events) + 1
            now = datetime.now(UTC)
            event: dict[str, Any] = {
                "_id": token(n), "operationType": op,
                "clusterTime": Timestamp(int(time.time()), n),
                "wallTime": now.replace(microsecond=now.microsecond // 1000 * 1000),
                "ns": {"db": DB, "coll": coll} if coll else {"db": DB},
                **fields,
            }
            if op == "invalidate":
                del event["ns"]
            if hidden:
                event["hidden"] = True
            self.events.append(event)
            self._cond.notify_all()
            return event

    def insert(self, doc: dict[str, Any], coll: str = "orders") -> dict[str, Any]:
        return self._append("insert", coll, fullDocument=doc,
                            documentKey={"_id": doc["_id"]})

    def update(self, doc: dict[str, Any], updated: dict[str, Any], removed: list[str],
               coll: str = "orders", before: dict[str, Any] | None = None) -> dict[str, Any]:
        extra = {"fullDocumentBeforeChange": before} if before is not None else {}
        return self._append(
            "update", coll, fullDocument=doc, documentKey={"_id": doc["_id"]},
            updateDescription={"updatedFields": updated, "removedFields": removed,
                               "truncatedArrays": []}, **extra)

    def replace(self, doc: dict[str, Any], coll: str = "orders") -> dict[str, Any]:
        return self._append("replace", coll, fullDocument=doc,
                            documentKey={"_id": doc["_id"]})

    def delete(self, _id: Any, coll: str = "orders",
               before: dict[str, Any] | None = None) -> dict[str, Any]:
        extra = {"fullDocumentBeforeChange": before} if before is not None else {}
        return self._append("delete", coll, documentKey={"_id": _id}, **extra)

    def drop(self, coll: str) -> dict[str, Any]:
        return self._append("drop", coll)

    def rename(self, coll: str, to: str) -> dict[str, Any]:
        return self._append("rename", coll, to={"db": DB, "coll": to})

    def drop_database(self) -> dict[str, Any]:
        """What MongoDB reports for a database-level stream: drop of each collection,
        dropDatabase, then invalidate (the cursor closes after it)."""
        self.drop("orders")
        self._append("dropDatabase", None)
        return self._append("invalidate", None)

    def noise(self, n: int) -> None:
        """Changes the stream filters out (another collection): they move the
        postBatchResumeToken but return no event."""
        for _ in range(n):
            self._append("insert", "elsewhere", hidden=True)

    def write_orders(self, n: int) -> list[dict[str, Any]]:
        return [self.insert({"_id": ObjectId(), "n": i}) for i in range(n)]

    # -- the server ---------------------------------------------------------------------
    def _handle(self, request: Any) -> bool:
        name = request.command_name or ""
        self.commands.append(name)
        handler: Callable[[Any], bool] | None = {
            "hello": self._hello, "ismaster": self._hello, "isMaster": self._hello,
            "saslStart": self._sasl, "listDatabases": self._list_databases,
            "listCollections": self._list_collections, "aggregate": self._aggregate,
            "getMore": self._get_more, "killCursors": self._kill_cursors,
            "endSessions": lambda r: r.reply({}),
            "ping": lambda r: r.reply({"operationTime": self._now()}),
        }.get(name)
        if handler is None:
            return request.command_err(59, f"no such command: {name}")
        return handler(request)

    def _hello(self, request: Any) -> bool:
        doc: dict[str, Any] = {
            "ismaster": True, "isWritablePrimary": True, "helloOk": True,
            "minWireVersion": 0, "maxWireVersion": self.max_wire,
            "maxBsonObjectSize": 16777216, "maxMessageSizeBytes": 48000000,
            "maxWriteBatchSize": 100000, "localTime": datetime.now(UTC),
            "logicalSessionTimeoutMinutes": 30, "connectionId": 1,
        }
        if self.kind == "replicaset":
            doc.update(setName="rs0", setVersion=1, hosts=[self.address],
                       primary=self.address, me=self.address)
        elif self.kind == "mongos":
            doc["msg"] = "isdbgrid"
        return request.reply(doc)

    def _now(self) -> Timestamp:
        return self.operation_time or Timestamp(int(time.time()), len(self.events))

    def _sasl(self, request: Any) -> bool:
        if self.auth_fail:
            return request.command_err(18, "Authentication failed.",
                                       codeName="AuthenticationFailed")
        return request.command_err(2, "this fake server cannot do SCRAM")

    def _list_databases(self, request: Any) -> bool:
        return request.reply({"databases": [{"name": n} for n in self.databases]})

    def _list_collections(self, request: Any) -> bool:
        return request.reply({"cursor": {"id": Int64(0), "ns": f"{DB}.$cmd.listCollections",
                                         "firstBatch": self.collections}})

    def _error(self, request: Any, code: int, name: str, message: str) -> bool:
        return request.reply({"ok": 0, "code": code, "codeName": name, "errmsg": message,
                              "errorLabels": ["NonResumableChangeStreamError"]})

    def _aggregate(self, request: Any) -> bool:
        pipeline = list(request.doc["pipeline"])
        stage = dict(pipeline[0]["$changeStream"])
        with self._cond:
            self.stages.append(stage)
            self.pipelines.append(pipeline)
            if self.hangup_aggregates:
                self.hangup_aggregates -= 1
                return request.hangup()
            if self.kind == "standalone":
                return request.command_err(
                    40573, "The $changeStream stage is only supported on replica sets")
            start = self._start_index(request, stage)
            if start is None:
                return True  # replied with an error
            batch, nxt, dead = self._slice(start, self.first_batch)
            cursor_id = 0
            if not dead:
                self._next_cursor += 1
                cursor_id = self._next_cursor
                self._cursors[cursor_id] = nxt
        return request.reply(self._cursor_doc("firstBatch", cursor_id, batch, nxt))

    def _start_index(self, request: Any, stage: dict[str, Any]) -> int | None:
        resume = stage.get("resumeAfter") or stage.get("startAfter")
        if resume is not None:
            n = token_number(resume)
            if n < self.first_kept:
                self._error(request, 286, "ChangeStreamHistoryLost",
                            "Resume of change stream was not possible, as the resume point "
                            "may no longer be in the oplog.")
                return None
            if n > len(self.events):
                self._error(request, 280, "ChangeStreamFatalError",
                            "cannot resume stream; the resume token was not found.")
                return None
            if ("resumeAfter" in stage and n > 0
                    and self.events[n - 1]["operationType"] == "invalidate"):
                self._error(request, 260, "InvalidResumeToken",
                            "Attempting to resume a change stream using 'resumeAfter' is "
                            "not allowed from an invalidate notification.")
                return None
            return n
        at = stage.get("startAtOperationTime")
        if at is not None:
            if self.first_kept and at <= self.events[self.first_kept - 1]["clusterTime"]:
                self._error(request, 286, "ChangeStreamHistoryLost",
                            "Resume of change stream was not possible, as the resume point "
                            "may no longer be in the oplog.")
                return None
            return next((i for i, e in enumerate(self.events) if e["clusterTime"] >= at),
                        len(self.events))
        return len(self.events)  # from now

    def _slice(self, start: int, limit: int) -> tuple[list[dict[str, Any]], int, bool]:
        """Events from ``start`` (skipping hidden ones), at most ``limit``, stopping
        after an invalidate; the next index; whether the cursor is now dead."""
        out: list[dict[str, Any]] = []
        i = start
        while i < len(self.events) and len(out) < limit:
            event = self.events[i]
            i += 1
            if event.get("hidden"):
                continue
            out.append(event)
            if event["operationType"] == "invalidate":
                return out, i, True
        return out, i, False

    def _cursor_doc(self, key: str, cursor_id: int, batch: list[dict[str, Any]],
                    nxt: int) -> dict[str, Any]:
        return {"cursor": {"id": Int64(cursor_id), "ns": f"{DB}.$cmd.aggregate", key: batch,
                           "postBatchResumeToken": token(nxt)},
                "operationTime": self._now()}

    def _get_more(self, request: Any) -> bool:
        cursor_id = int(request.doc["getMore"])
        with self._cond:
            if self.hangup_getmores:
                self.hangup_getmores -= 1
                return request.hangup()
            if cursor_id not in self._cursors:
                return request.command_err(43, f"cursor id {cursor_id} not found")
        wait = min(request.doc.get("maxTimeMS", 1000) / 1000, MAX_WAIT)
        limit = int(request.doc.get("batchSize", 100))
        # Answer from another thread: mockupdb serialises its handlers, and a
        # waiting getMore must not hold up the other connections.
        threading.Thread(target=self._serve_get_more, args=(request, cursor_id, wait, limit),
                         daemon=True).start()
        return True

    def _serve_get_more(self, request: Any, cursor_id: int, wait: float, limit: int) -> None:
        with self._cond:
            def ready() -> bool:
                return self._closing or any(
                    not e.get("hidden") for e in self.events[self._cursors.get(cursor_id, 0):])

            self._cond.wait_for(ready, timeout=wait)
            start = self._cursors.get(cursor_id, len(self.events))
            batch, nxt, dead = self._slice(start, limit)
            if dead:
                self._cursors.pop(cursor_id, None)
            else:
                self._cursors[cursor_id] = nxt
        doc = self._cursor_doc("nextBatch", 0 if dead else cursor_id, batch, nxt)
        with contextlib.suppress(OSError):  # the client may have gone away meanwhile
            request.reply(doc)

    def _kill_cursors(self, request: Any) -> bool:
        ids = [int(i) for i in request.doc.get("cursors", [])]
        with self._cond:
            for i in ids:
                self._cursors.pop(i, None)
        return request.reply({"cursorsKilled": ids, "cursorsNotFound": [],
                              "cursorsAlive": [], "cursorsUnknown": []})


def make_source(url: str, *, name: str = "shop", tables: frozenset[str] | None = None,
                operations: frozenset[str] = frozenset(), **options: Any) -> MongoSource:
    return MongoSource(SourceSettings(name=name, url=url, options=MongoOptions(**options),
                                      tables=tables, operations=operations))


async def next_batches(it: AsyncIterator[ChangeBatch], changes: int,
                       within: float = 10.0) -> list[ChangeBatch]:
    """Batches until ``changes`` changes have arrived and the last batch has a checkpoint."""
    out: list[ChangeBatch] = []

    async def pull() -> None:
        seen = 0
        while True:
            batch = await it.__anext__()
            out.append(batch)
            seen += len(batch.changes)
            if seen >= changes and batch.checkpoint is not None:
                return

    await asyncio.wait_for(pull(), within)
    return out


def flat(batches: list[ChangeBatch]) -> list[Change]:
    return [c for b in batches for c in b.changes]


def last_checkpoint(batches: list[ChangeBatch]) -> Position:
    cps = [b.checkpoint for b in batches if b.checkpoint is not None]
    assert cps
    return cps[-1]
