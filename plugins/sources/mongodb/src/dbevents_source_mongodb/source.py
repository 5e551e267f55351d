"""The MongoDB source: one database-level change stream, read with pymongo's
asyncio client.

Positions are resume tokens. Every batch carries the token of its last event as
its checkpoint, so a restart resumes right after what the store holds. MongoDB
keeps no per-reader state (nothing like a replication slot), so ``confirm`` has
nothing to tell the server: the store's checkpoint alone is the reader's state.

How far behind a checkpoint is, the status probe asks the server itself: it opens
a change stream after the checkpoint and looks at the first change there (none:
caught up; else its cluster time against the server's). The token stays opaque
and the stored checkpoint format unchanged; and an idle database is not "behind"
however old its last change is.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

import attrs
import structlog
from bson.codec_options import DatetimeConversion
from bson.timestamp import Timestamp
from dbevents import (
    Change,
    ChangeBatch,
    Operation,
    Position,
    Problem,
    SetupError,
    SourceSettings,
    SourceUnavailable,
)
from dbevents.backoff import Backoff
from dbevents.masking import mask_dsn
from pymongo import AsyncMongoClient
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.errors import ConfigurationError, OperationFailure, PyMongoError

from dbevents_source_mongodb import checks
from dbevents_source_mongodb.convert import iso_utc
from dbevents_source_mongodb.decode import (
    DB_TYPE,
    LIFECYCLE,
    SERVER_OPERATIONS,
    Token,
    describe,
    event_time,
    position_token,
    to_change,
    token_position,
)
from dbevents_source_mongodb.options import MongoOptions

log = structlog.get_logger("dbevents.source.mongodb")

MAX_AWAIT_MS = 1000  # how long one getMore waits on the server for new changes
BACKOFF_FIRST = 0.5  # seconds before the first reconnect; doubles up to BACKOFF_MAX
BACKOFF_MAX = 30.0
MAX_FAILURES = 8  # reconnects in a row before giving up to the engine (~90 s)
DEFAULT_SELECTION_TIMEOUT_MS = 10000
PROBE_AWAIT_MS = 200  # how long the status probe's one getMore waits for a change


def masked(url: str) -> str:
    """The URL without its password (multi-host URLs included)."""
    return mask_dsn(url)


@attrs.frozen
class _Idle:
    """A getMore came back empty; ``token`` is the server's postBatchResumeToken."""

    token: Token | None


_END = object()  # the stream closed itself (after an invalidate event)

_Item = Mapping[str, Any] | _Idle | Exception | object


class MongoSource:
    """Reads one MongoDB database's change stream (see the package README)."""

    db_type: ClassVar[str] = DB_TYPE
    # A dropped collection emits nothing per document, and MongoDB has no TRUNCATE.
    operations: ClassVar[frozenset[Operation]] = frozenset(
        {Operation.INSERT, Operation.UPDATE, Operation.DELETE})
    Options = MongoOptions

    def __init__(self, settings: SourceSettings) -> None:
        self.settings = settings
        self.options: MongoOptions = settings.options or MongoOptions()
        self.where = masked(settings.url)
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self._database = ""
        self._token: Token | None = None  # the last position read
        self._checkpointed: Token | None = None  # the last one handed over as a checkpoint
        self._progressed = False
        self._last_checkpoint = 0.0
        self.reconnects = 0
        self.last_event_time: datetime | None = None

    # -- startup -------------------------------------------------------------
    async def start(self) -> None:
        client = self._make_client()
        self._client = client
        try:
            hello = await client.admin.command("hello")
        except PyMongoError as exc:
            raise checks.connect_error(exc, self.where) from None
        problem = checks.topology_error(hello, self.where)
        if problem is not None:
            raise problem
        self._database = self._database_name(client)
        await self._check_database(client, hello)
        log.info("mongodb source ready", database=self.settings.name, db=self._database,
                 url=self.where, collections=self._collections(),
                 full_document=self.options.full_document,
                 full_document_before_change=self.options.full_document_before_change)

    async def preflight(self) -> list[Problem]:
        """For `dbevents check --connect`: start()'s checks (reachable, a replica
        set, the database, pre- and post-images), which only read; then close."""
        try:
            await self.start()
        except SetupError as exc:
            return [Problem(str(exc))]
        finally:
            await self.close()
        return []

    def _make_client(self) -> AsyncMongoClient[dict[str, Any]]:
        # tz_aware: times are UTC-aware; DATETIME_AUTO: a date beyond year 9999
        # decodes as DatetimeMS instead of failing the whole stream.
        kwargs: dict[str, Any] = {"tz_aware": True, "appname": "dbevents",
                                  "datetime_conversion": DatetimeConversion.DATETIME_AUTO}
        if "serverselectiontimeoutms=" not in self.settings.url.lower():
            kwargs["serverSelectionTimeoutMS"] = DEFAULT_SELECTION_TIMEOUT_MS
        try:
            return AsyncMongoClient(self.settings.url, **kwargs)
        except (ConfigurationError, ValueError, TypeError) as exc:
            raise SetupError(f"invalid MongoDB URL {self.where}: {exc}") from None

    @classmethod
    async def probe_status(cls, settings: SourceSettings) -> dict[str, Any]:
        """For `dbevents status` and the metrics, given the store's checkpoint:
        whether a change waits after it (``caught_up``) and, if one does, how long
        it has waited by the server's clock (``lag_seconds``). Reads only: a change
        stream opened and closed, nothing consumed."""
        source = cls(settings)
        client = source._make_client()
        try:
            try:
                pong = await client.admin.command("ping")
            except PyMongoError as exc:
                raise checks.connect_error(exc, source.where) from None
            now = server_time(pong)
            facts: dict[str, Any] = {"server_time": iso_utc(now.as_datetime())}
            if settings.checkpoint is None:
                return facts
            try:
                token = position_token(settings.checkpoint, settings.name)
            except SetupError:
                return facts  # another type's checkpoint: the reader says so
            try:
                stream = await client[source._database_name(client)].watch(
                    source.pipeline(), start_after=token, max_await_time_ms=PROBE_AWAIT_MS,
                    batch_size=1, comment="dbevents status")
                async with stream:
                    waiting = await stream.try_next()
            except OperationFailure as exc:  # e.g. the checkpoint fell off the oplog
                facts.update(caught_up=False, resume=str(exc).splitlines()[0])
                return facts
            if waiting is None:
                facts.update(caught_up=True, lag_seconds=0.0)
                return facts
            facts["caught_up"] = False
            facts["oldest_waiting"] = iso_utc(event_time(waiting))
            committed = waiting.get("clusterTime")
            if isinstance(committed, Timestamp):
                facts["lag_seconds"] = float(max(0, now.time - committed.time))
            return facts
        finally:
            await client.close()

    def _database_name(self, client: AsyncMongoClient[dict[str, Any]]) -> str:
        if self.options.database:
            return self.options.database
        try:
            return client.get_default_database().name
        except ConfigurationError:
            raise SetupError(
                f"no MongoDB database to watch for {self.settings.name!r}: put it in the "
                f"URL path (mongodb://host/app?replicaSet=rs0) or set database = \"app\""
            ) from None

    async def _check_database(self, client: AsyncMongoClient[dict[str, Any]],
                              hello: Mapping[str, Any]) -> None:
        try:
            names = await client.list_database_names()
        except OperationFailure as exc:
            if exc.code != checks.UNAUTHORIZED:
                raise checks.connect_error(exc, self.where) from None
            names = None  # a user without listDatabases: the stream itself will tell
        except PyMongoError as exc:
            raise checks.connect_error(exc, self.where) from None
        if names is not None:
            problem = checks.database_error(self._database, names, self.where)
            if problem is not None:
                raise problem
        try:
            infos = await (await client[self._database].list_collections()).to_list()
        except OperationFailure as exc:
            if exc.code != checks.UNAUTHORIZED:
                raise checks.connect_error(exc, self.where) from None
            log.info("cannot list collections; skipping the collection checks",
                     database=self.settings.name)
            return
        except PyMongoError as exc:
            raise checks.connect_error(exc, self.where) from None
        present = {str(i.get("name")) for i in infos}
        absent = sorted(set(self.options.collections or ()) - present)
        if absent:
            log.warning("watched collections do not exist (yet)", database=self.settings.name,
                        collections=absent)
        if self.options.wants_images:
            missing = checks.collections_without_images(infos, self.options.collections)
            problem = checks.images_error(hello, self.options, missing, self.settings.name)
            if problem is not None:
                raise problem
            if missing:
                log.warning("collections record no pre-/post-images; their events carry "
                            "none", database=self.settings.name, collections=missing,
                            enable=checks.collmod_command(missing[0]))

    # -- the stream ----------------------------------------------------------
    def _collections(self) -> list[str] | None:
        """The collections to read: the configured ones, narrowed to those some
        trigger needs."""
        names: set[str] | None = None
        if self.options.collections is not None:
            names = set(self.options.collections)
        if self.settings.tables is not None:
            names = set(self.settings.tables) if names is None else names & self.settings.tables
        return None if names is None else sorted(names)

    def pipeline(self) -> list[dict[str, Any]]:
        """The stages after $changeStream: filter on the server what nobody needs.
        Collection and database events always pass, to be logged and to restart."""
        match: list[dict[str, Any]] = []
        collections = self._collections()
        if collections is not None:
            match.append({"$or": [{"ns.coll": {"$in": collections}},
                                  {"ns.coll": {"$exists": False}}]})
        wanted = {str(op) for op in self.settings.operations}
        if wanted and not set(SERVER_OPERATIONS) <= wanted:
            kinds = [k for op in sorted(wanted) for k in SERVER_OPERATIONS.get(op, ())]
            match.append({"operationType": {"$in": [*kinds, *LIFECYCLE]}})
        if not match:
            return []
        return [{"$match": match[0] if len(match) == 1 else {"$and": match}}]

    async def _watch(self, token: Token | None,
                     start_time: datetime | None = None) -> AsyncChangeStream[dict[str, Any]]:
        """A change stream after ``token``; else from ``start_time``; else from now."""
        assert self._client is not None, "start() first"
        kwargs: dict[str, Any] = {
            "full_document": self.options.full_document,
            "max_await_time_ms": MAX_AWAIT_MS,
            "batch_size": self.options.batch_size,
            "comment": "dbevents",
        }
        if self.options.full_document_before_change != "off":
            kwargs["full_document_before_change"] = self.options.full_document_before_change
        if token is not None:
            # startAfter, unlike resumeAfter, also accepts an invalidate event's token.
            kwargs["start_after"] = token
        elif start_time is not None:
            kwargs["start_at_operation_time"] = Timestamp(int(start_time.timestamp()), 0)
        return await self._client[self._database].watch(self.pipeline(), **kwargs)

    def changes(self, since: Position | None) -> AsyncIterator[ChangeBatch]:
        return self._changes(since)

    async def _changes(self, since: Position | None) -> AsyncIterator[ChangeBatch]:
        self._token = position_token(since, self.settings.name) if since else None
        self._checkpointed = self._token
        backoff = Backoff(BACKOFF_FIRST, BACKOFF_MAX)
        while True:
            self._progressed = False
            try:
                async for batch in self._one_stream():
                    yield batch
                continue  # invalidated: the next stream starts after the invalidate
            except OperationFailure as exc:
                fatal = checks.stream_error(exc, self.settings.name, self.where, self.options)
                if fatal is not None:
                    log.error("change stream cannot go on", database=self.settings.name,
                              error=str(fatal))
                    raise fatal from None
                error: PyMongoError = exc
            except PyMongoError as exc:
                error = exc
            if self._progressed:
                backoff.reset()
            if backoff.tries >= MAX_FAILURES:
                raise SourceUnavailable(
                    f"MongoDB at {self.where} failed {MAX_FAILURES} reconnects in a row: "
                    f"{error}") from error
            self.reconnects += 1
            delay = backoff.next()
            log.warning("change stream failed; reconnecting", database=self.settings.name,
                        error=str(error), retry_in=delay, attempt=backoff.tries)
            await asyncio.sleep(delay)

    async def _one_stream(self) -> AsyncIterator[ChangeBatch]:
        """One change stream from ``self._token``, until it ends (invalidate) or fails.

        A pump task reads ahead into a bounded queue so that a batch is whatever has
        arrived, handed over as soon as anything arrives, and no more than
        ``batch_size`` events ever wait in memory.
        """
        stream = await self._watch(self._token, self.options.start_time)
        queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=self.options.batch_size)
        pump = asyncio.create_task(_pump(stream, queue), name=f"mongodb-{self.settings.name}")
        try:
            if self._token is None and stream.resume_token is not None:
                # A first run from "now": make the starting point durable at once, so
                # a crash before the first change cannot move "now" later.
                self._token = stream.resume_token
                yield self._batch([])
            while True:
                items = [await queue.get()]
                while len(items) < self.options.batch_size and not queue.empty():
                    items.append(queue.get_nowait())
                batch, ended, error = self._take(items)
                if batch is not None:
                    yield batch
                if error is not None:
                    raise error
                if ended:
                    return
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            with contextlib.suppress(PyMongoError):
                await stream.close()

    def _take(self, items: list[_Item]) -> tuple[ChangeBatch | None, bool, Exception | None]:
        """Turn queued items into one batch; also report an end or an error that
        follows them (the items before it are still handed over)."""
        changes: list[Change] = []
        moved = False
        for item in items:
            if isinstance(item, Exception):
                return self._maybe_batch(changes, moved), False, item
            if item is _END:
                return self._maybe_batch(changes, moved), True, None
            self._progressed = True
            if isinstance(item, _Idle):
                if item.token is not None:
                    self._token = item.token
                continue
            assert isinstance(item, Mapping)
            self._token = item["_id"]
            moved = True
            change = to_change(item, self.settings.name)
            if change is not None:
                changes.append(change)
                self.last_event_time = change.time
            else:
                self._log_event(item)
        return self._maybe_batch(changes, moved), False, None

    def _maybe_batch(self, changes: list[Change], moved: bool) -> ChangeBatch | None:
        if moved:
            return self._batch(changes)
        # Nothing was read, but the server's high-water mark moved: checkpoint it now
        # and then, so an idle stream's token stays inside the oplog window.
        due = time.monotonic() - self._last_checkpoint >= self.options.idle_checkpoint
        if due and self._token != self._checkpointed:
            return self._batch(changes)
        return None

    def _batch(self, changes: list[Change]) -> ChangeBatch:
        assert self._token is not None
        self._last_checkpoint = time.monotonic()
        self._checkpointed = self._token
        return ChangeBatch(tuple(changes), token_position(self._token))

    def _log_event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("operationType")
        fields = {"database": self.settings.name, **describe(event)}
        if kind == "drop":
            log.warning("collection dropped: its documents emit no delete events", **fields)
        elif kind == "dropDatabase":
            log.warning("database dropped: its documents emit no delete events", **fields)
        elif kind == "rename":
            log.warning("collection renamed: later changes arrive under the new name",
                        **fields)
        elif kind == "invalidate":
            log.warning("change stream invalidated; restarting it after the invalidate "
                        "event", **fields)
        else:
            log.info("change event ignored", **fields)

    async def initial_position(self) -> Position | None:
        """With ``start_at = "now"``: the resume token of now, for the engine to
        store before it reports running (a start time does not move)."""
        if self.options.start_time is not None:
            return None
        return await self.current_position()

    async def current_position(self) -> Position:
        """The position of "now": the resume token a stream opened now starts from."""
        async with await self._watch(None, None) as stream:
            token = stream.resume_token
            if token is None:  # a server that reports no postBatchResumeToken
                await stream.try_next()
                token = stream.resume_token
        if token is None:
            raise SetupError(f"MongoDB at {self.where} reports no resume token for now")
        return token_position(token)

    # -- the rest of the contract ------------------------------------------------
    async def confirm(self, position: Position) -> None:
        # Nothing to release on the server: the oplog is not held for readers.
        pass

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def reader_stats(self) -> Mapping[str, Any]:
        """Counters of this running reader, for tests and debugging (the core reads
        `probe_status`, not this)."""
        return {
            "reconnects": self.reconnects,
            "last_event_time": iso_utc(self.last_event_time) if self.last_event_time else None,
        }


def server_time(reply: Mapping[str, Any]) -> Timestamp:
    """The server's logical time from a command's reply (``operationTime``, else
    ``$clusterTime``); this machine's clock when the server gives neither."""
    found = reply.get("operationTime")
    if not isinstance(found, Timestamp):
        cluster = reply.get("$clusterTime")
        found = cluster.get("clusterTime") if isinstance(cluster, Mapping) else None
    if isinstance(found, Timestamp):
        return found
    return Timestamp(int(datetime.now(UTC).timestamp()), 0)


async def _pump(stream: AsyncChangeStream[dict[str, Any]], queue: asyncio.Queue[_Item]) -> None:
    """Read the stream into ``queue`` (it blocks when full: that bounds memory)."""
    try:
        while stream.alive:
            event = await stream.try_next()
            if event is not None:
                await queue.put(event)
            elif stream.alive:
                await queue.put(_Idle(stream.resume_token))
        await queue.put(_END)
    except Exception as exc:  # handed over in order, after the events before it
        await queue.put(exc)
