"""The ``postgres`` source: row changes from logical replication (pgoutput).

Positions. A change's key is ``<commit LSN>:<index in its transaction>``; the
commit LSN comes from BEGIN (pgoutput's final_lsn), so keys are known before the
commit arrives and a large transaction streams through in batches with
``checkpoint=None``. The batch that ends at a COMMIT carries the checkpoint: the
commit's end LSN, where a restart resumes (the server skips transactions that
committed before it). ``confirm()`` reports it to the server as the flush LSN,
which lets the slot free the WAL before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, ClassVar

import attrs
import psycopg
import structlog
from dbevents.backoff import Backoff
from dbevents.errors import SetupError, SourceUnavailable
from dbevents.hints import command
from dbevents.masking import mask_dsn
from dbevents.protocols import Problem, SourceSettings
from dbevents.values import Change, ChangeBatch, Operation, Position, RawJSON

from dbevents_source_postgres import catalog, checks
from dbevents_source_postgres.options import PostgresOptions, publication_name, slot_name
from dbevents_source_postgres.pgoutput import (
    PG_EPOCH,
    Decoder,
    Delete,
    InsertReader,
    Relation,
    Truncate,
    Update,
    format_lsn,
    parse_lsn,
    pg_time,
)
from dbevents_source_postgres.replication import (
    KEEPALIVE,
    XLOG_DATA,
    XLOG_HEADER,
    ConnectionLost,
    ReplicationStream,
    StreamError,
    parse_keepalive,
)
from dbevents_source_postgres.types import TypeRegistry

log = structlog.get_logger("dbevents.source.postgres")

DB_TYPE = "sql-postgres"
CAUGHT_UP_RECHECK = 0.5  # seconds before a probe looks again at a reader found behind

# SQLSTATE classes/codes that no reconnect will fix: a dropped slot or
# publication, an invalidated slot, lost privileges, bad credentials.
_SETUP_STATES = ("42704", "55000", "42501", "28", "3D000", "0A000")

_INSERT, _UPDATE, _DELETE = ord("I"), ord("U"), ord("D")
_OID = struct.Struct(">I")
_BEGIN, _COMMIT, _RELATION, _TRUNCATE = ord("B"), ord("C"), ord("R"), ord("T")


def _key_text(value: Any) -> str:
    if type(value) is str:
        return value
    if type(value) is int:
        return str(value)
    if isinstance(value, RawJSON):
        return value.text
    return json.dumps(value, ensure_ascii=False, default=_raw_value)


def _raw_value(value: Any) -> Any:
    if isinstance(value, RawJSON):
        return value.value
    raise TypeError(f"{type(value).__name__} in a key")


def doc_id(values: Mapping[str, Any], columns: tuple[str, ...]) -> str | None:
    """The primary key as a string: the value's text for a one-column key; for a
    composite key a JSON array of the values in key order, e.g. '[42,"EU"]'."""
    if not columns:
        return None
    if len(columns) == 1:
        value = values.get(columns[0])
        return None if value is None else _key_text(value)
    return json.dumps([values.get(c) for c in columns], ensure_ascii=False,
                      separators=(",", ":"), default=_raw_value)


@attrs.frozen
class _Table:
    """How the changes of one relation become Changes."""

    name: str  # "users" in public, "schema.table" elsewhere
    id_columns: tuple[str, ...]
    watched: bool
    # The key column when there is exactly one (the fast path).
    id_column: str | None = attrs.field(init=False, default=attrs.Factory(
        lambda self: self.id_columns[0] if len(self.id_columns) == 1 else None,
        takes_self=True))


_NO_EXTRA: Mapping[str, Any] = MappingProxyType({})


class PostgresSource:
    """Reads one PostgreSQL database through a logical replication slot."""

    db_type: ClassVar[str] = DB_TYPE
    Options = PostgresOptions
    # A previous session's walsender may hold the slot for a moment after we left.
    slot_release_wait: ClassVar[float] = 2.0

    def __init__(self, settings: SourceSettings) -> None:
        self.settings = settings
        self.options: PostgresOptions = settings.options or PostgresOptions()
        self.slot = slot_name(settings.name, self.options)
        self.publication = publication_name(settings.name, self.options)
        self._types = TypeRegistry()
        self._tables: dict[int, _Table] = {}
        # Per session: relation OID -> (table, generated Insert reader).
        self._inserts: dict[int, tuple[_Table, InsertReader]] = {}
        self._catalog: catalog.Conn | None = None
        self._stream: ReplicationStream | None = None
        self._confirmed = 0  # everything up to here is durable in the store
        self._slot_created = False  # start() made the slot: nothing older is kept
        self._yielded = 0  # the last checkpoint handed to the engine
        self._cannot_end_reader = False  # not allowed to end another slot reader
        # Tables no trigger watches (published because of publish_all or FOR ALL
        # TABLES) still count in the change index, but make no Change.
        self._watched = settings.tables
        ops = {Operation(o) for o in settings.operations} if settings.operations else set(
            Operation)
        self._ops = frozenset(ops)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        try:
            conn = await self._catalog_conn()
        except psycopg.Error as exc:
            raise SetupError(
                f"cannot connect to {mask_dsn(self.settings.url)} (database "
                f"{self.settings.name!r}): {_first_line(exc)}") from None
        try:
            _, self._slot_created = await checks.run(conn, self._plan())
        except psycopg.Error as exc:
            raise SetupError(f"checking {mask_dsn(self.settings.url)} failed: "
                             f"{_first_line(exc)}") from None
        log.info("postgres source ready", database=self.settings.name, slot=self.slot,
                 publication=self.publication, url=mask_dsn(self.settings.url))

    async def preflight(self) -> list[Problem]:
        """For `dbevents check --connect`: every check start() makes, each problem
        listed; creates no slot and no publication."""
        try:
            conn = await catalog.connect(self.settings.url, self.options.connect_timeout)
        except psycopg.Error as exc:
            return [Problem(f"cannot connect to {mask_dsn(self.settings.url)} (database "
                            f"{self.settings.name!r}): {_first_line(exc)}")]
        try:
            problems = await checks.preflight(conn, self._plan())
        except psycopg.Error as exc:
            problems = [f"checking {mask_dsn(self.settings.url)} failed: {_first_line(exc)}"]
        finally:
            await conn.close()
        return [Problem(p) for p in problems]

    def _plan(self) -> checks.Plan:
        return checks.Plan(
            database=self.settings.name, url=self.settings.url, slot=self.slot,
            publication=self.publication, tables=self.settings.tables,
            publish_all=self.options.publish_all,
            operations=frozenset(o.value for o in self._ops),
            connect_timeout=self.options.connect_timeout,
            slot_release_wait=self.slot_release_wait, leased=self.settings.leased)

    async def _refuse_new_slot(self, since: Position) -> None:
        """A checkpoint exists but the slot did not: PostgreSQL no longer holds the
        changes after the checkpoint. Say so instead of silently going on from now;
        the slot just made is dropped so the next start says so again."""
        with contextlib.suppress(psycopg.Error):
            conn = await self._catalog_conn()
            await conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
        self._slot_created = False
        raise SetupError(
            f"the replication slot {self.slot!r} of {self.settings.name!r} was missing although "
            f"dbevents had captured up to {since.value}: it was dropped (or the database was "
            "replaced), so PostgreSQL no longer has the changes made since, and they cannot "
            "be captured. To go on from now, accepting that gap, run "
            f"`{command(f'postgres reset-position {self.settings.name}')}` with dbevents "
            "stopped.")

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()
        conn, self._catalog = self._catalog, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def confirm(self, position: Position) -> None:
        lsn = parse_lsn(position.value)
        if lsn > self._confirmed:
            self._confirmed = lsn
        if self._stream is not None:
            self._stream.report(self._confirmed)

    @classmethod
    async def probe_status(cls, settings: SourceSettings) -> dict[str, Any]:
        """Slot facts for `dbevents status`, without starting a source."""
        slot = slot_name(settings.name, settings.options)
        conn = await catalog.connect(settings.url, 5)
        try:
            info = await catalog.slot_info(conn, slot)
            facts = _slot_status(slot, info)
            if info is not None and info.active:
                # The reader answers a keepalive within moments: a first look that
                # finds it behind is taken again before it counts.
                caught = await catalog.sender_caught_up(conn, slot)
                if caught is False:
                    await asyncio.sleep(CAUGHT_UP_RECHECK)
                    caught = await catalog.sender_caught_up(conn, slot)
                if caught is not None:
                    facts["caught_up"] = caught
            return facts
        finally:
            await conn.close()

    async def _catalog_conn(self) -> catalog.Conn:
        if self._catalog is None or self._catalog.closed or self._catalog.broken:
            self._catalog = await catalog.connect(self.settings.url, self.options.connect_timeout)
        return self._catalog

    # -- the stream --------------------------------------------------------------------
    async def changes(self, since: Position | None) -> AsyncIterator[ChangeBatch]:
        try:
            resume = parse_lsn(since.value) if since is not None else 0
        except ValueError:
            raise SetupError(f"the checkpoint {since} of {self.settings.name!r} is not a "
                             "PostgreSQL LSN; was the database's type changed?") from None
        if since is not None and self._slot_created:
            await self._refuse_new_slot(since)
        # From here on every checkpoint comes from this slot's own stream.
        self._slot_created = False
        # The store holds everything up to `since`; what an earlier iteration
        # handed out beyond it was not stored.
        self._confirmed = max(self._confirmed, resume)
        self._yielded = resume
        backoff = Backoff(0.25, 10.0)
        failing_since: float | None = None
        while True:
            try:
                stream = await self._open(resume)
            except (ConnectionLost, psycopg.OperationalError) as exc:
                failing_since = failing_since or time.monotonic()
                await self._backoff(exc, backoff, failing_since, resume)
                continue
            self._stream = stream
            try:
                async with contextlib.aclosing(self._session(stream, resume)) as batches:
                    async for batch in batches:
                        failing_since = None
                        backoff.reset()
                        if batch.checkpoint is not None:
                            resume = parse_lsn(batch.checkpoint.value)
                        yield batch
            except StreamError as exc:
                # The server ended the stream with an error mid-way.
                self._raise_if_setup(exc.sqlstate, exc)
                failing_since = failing_since or time.monotonic()
                await stream.close()
                await self._backoff(exc, backoff, failing_since, resume)
            except (ConnectionLost, psycopg.OperationalError) as exc:
                failing_since = failing_since or time.monotonic()
                await stream.close()
                await self._backoff(exc, backoff, failing_since, resume)
            finally:
                if self._stream is stream:
                    self._stream = None
                await stream.close()

    async def _backoff(self, exc: BaseException, backoff: Backoff, failing_since: float,
                       resume: int) -> None:
        waited = time.monotonic() - failing_since
        if waited > self.options.reconnect_for:
            raise SourceUnavailable(
                f"the replication stream of {self.settings.name!r} "
                f"({mask_dsn(self.settings.url)}) has been unavailable for {waited:.0f}s: "
                f"{_first_line(exc)}") from None
        delay = backoff.next()
        log.warning("replication stream unavailable; reconnecting", database=self.settings.name,
                    error=_first_line(exc), resume=format_lsn(resume), retry_in=round(delay, 2))
        await asyncio.sleep(delay)

    async def _open(self, resume: int) -> ReplicationStream:
        ended = False
        while True:
            try:
                stream = await ReplicationStream.open(
                    self.settings.url, self.slot, [self.publication], resume, self._confirmed,
                    status_interval=self.options.status_interval,
                    receive_timeout=self.options.receive_timeout,
                    connect_timeout=self.options.connect_timeout)
                break
            except psycopg.Error as exc:
                self._raise_if_setup(exc.sqlstate, exc)
                if isinstance(exc, psycopg.errors.ObjectInUse):
                    if not ended and await self._end_previous_reader():
                        ended = True
                        continue
                    raise ConnectionLost(_first_line(exc)) from None  # slot still held: retry
                raise
            except StreamError as exc:
                self._raise_if_setup(exc.sqlstate, exc)
                raise ConnectionLost(str(exc)) from None
        # The server starts at the slot's confirmed position when that is later.
        self._confirmed = max(self._confirmed, stream.slot_confirmed)
        log.info("replication stream started", database=self.settings.name, slot=self.slot,
                 start=format_lsn(max(resume, stream.slot_confirmed)))
        return stream

    async def _end_previous_reader(self) -> bool:
        """The slot is read by another session. While this process holds the
        capture lease that can only be a previous holder (paused, or gone
        without its connection closing), which the store fences: its walsender
        is ended, rather than left until the server's wal_sender_timeout drops
        it. True once the slot is free (or was ended and is about to be)."""
        held = self.settings.lease_held
        if held is None or not held() or self._cannot_end_reader:
            return False
        try:
            conn = await self._catalog_conn()
            cur = await conn.execute(
                "SELECT active_pid, pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE slot_name = %s AND active_pid IS NOT NULL", (self.slot,))
            row = await cur.fetchone()
        except psycopg.errors.InsufficientPrivilege as exc:
            # Neither the other session's role nor a member of pg_signal_backend.
            self._cannot_end_reader = True
            log.warning("cannot end the previous reader of the replication slot; waiting for "
                        "the server to drop it (wal_sender_timeout)", database=self.settings.name,
                        slot=self.slot, error=_first_line(exc))
            return False
        except psycopg.Error:
            return False  # the reconnect loop tries again
        if row is None or not row[1]:
            return True  # released meanwhile
        log.warning("replication slot held by a previous capture holder: its session ended",
                    database=self.settings.name, slot=self.slot, backend_pid=row[0])
        # The walsender exits at its next interrupt check: the slot is free
        # within moments.
        deadline = time.monotonic() + self.slot_release_wait
        while time.monotonic() < deadline:
            info = await catalog.slot_info(conn, self.slot)
            if info is None or not info.active:
                break
            await asyncio.sleep(0.05)
        return True

    def _raise_if_setup(self, sqlstate: str | None, exc: BaseException) -> None:
        if sqlstate and sqlstate.startswith(_SETUP_STATES):
            raise SetupError(
                f"reading the replication slot {self.slot!r} of {self.settings.name!r} "
                f"({mask_dsn(self.settings.url)}) failed: {_first_line(exc)}") from None

    async def _session(self, stream: ReplicationStream, resume: int
                       ) -> AsyncGenerator[ChangeBatch, None]:
        """Batches from one START_REPLICATION session. Transactions that end at or
        before ``resume`` are skipped: the store has them (the server skips them
        too; this guards against a slot that moved backwards after a crash).

        This loop is the source's hot path: transaction state lives in locals and
        row messages are decoded by direct calls, without the generic dispatch.
        """
        decoder = Decoder(self._types)
        insert_values, update, delete, decode = (
            decoder.insert_values, decoder.update, decoder.delete, decoder.decode)
        begin_fields, commit_end = decoder.begin_fields, decoder.commit_end
        read_available = stream.read_available
        inserts = self._inserts = {}
        unpack_oid = _OID.unpack_from
        tables = self._tables
        database = self.settings.name
        limit = self.options.batch_size
        emit_insert = Operation.INSERT in self._ops
        emit_truncate = Operation.TRUNCATE in self._ops
        batch: list[Change] = []
        checkpoint = 0  # end LSN of the last commit in `batch` (0: none)
        cut = 0  # where in `batch` that commit is
        in_txn = skip = False
        prefix = ""  # "<commit LSN>:" of every key in the open transaction
        when = PG_EPOCH  # its commit time
        index = emitted = 0
        while True:
            msgs = read_available()
            if not msgs:
                # Nothing more right now: hand over what is complete before waiting.
                if checkpoint and not in_txn:
                    self._yielded = checkpoint
                    yield ChangeBatch(tuple(batch), Position(format_lsn(checkpoint)))
                    batch, checkpoint = [], 0
                msgs = [await stream.read()]
            for buf in msgs:
                if buf[0] != XLOG_DATA:
                    if buf[0] == KEEPALIVE:
                        wal_end, reply = parse_keepalive(buf)
                        idle = not in_txn and not batch and not checkpoint
                        if not (idle and self._advance_idle(stream, wal_end)) and reply:
                            stream.report(self._confirmed)
                    continue
                tag = buf[XLOG_HEADER]
                if tag == _INSERT and in_txn:
                    if not skip:
                        # The relation OID follows the tag; its generated reader
                        # does the rest (or leaves the row to insert_values).
                        fast = inserts.get(unpack_oid(buf, XLOG_HEADER + 1)[0])
                        if fast is not None and (
                                values := fast[1](buf, XLOG_HEADER + 1)) is not None:
                            table = fast[0]
                        else:
                            oid, values = insert_values(buf, XLOG_HEADER + 1)
                            table = tables[oid]
                        if table.watched and emit_insert:
                            column = table.id_column
                            if column is not None:
                                ident = values.get(column)
                                if type(ident) is int:
                                    ident = str(ident)
                                elif ident is not None and type(ident) is not str:
                                    ident = _key_text(ident)
                            else:
                                ident = doc_id(values, table.id_columns)
                            batch.append(Change(database, DB_TYPE, table.name,
                                                Operation.INSERT, f"{prefix}{index}", when,
                                                ident, values, _NO_EXTRA))
                            emitted += 1
                    index += 1
                elif tag in (_UPDATE, _DELETE) and in_txn:
                    if not skip:
                        change = self._change(
                            update(buf, XLOG_HEADER + 1) if tag == _UPDATE
                            else delete(buf, XLOG_HEADER + 1), f"{prefix}{index}", when)
                        if change is not None:
                            batch.append(change)
                            emitted += 1
                    index += 1
                elif tag == _BEGIN:
                    final_lsn, micros = begin_fields(buf, XLOG_HEADER + 1)
                    in_txn = True
                    prefix = f"{final_lsn >> 32:X}/{final_lsn & 0xFFFFFFFF:X}:"
                    when = pg_time(micros)
                    skip = final_lsn < resume
                    index = emitted = 0
                elif tag == _COMMIT:
                    end_lsn = commit_end(buf, XLOG_HEADER + 1)
                    if emitted or checkpoint:
                        # The batch now ends here: a transaction with nothing for us
                        # moves the checkpoint of the one before it.
                        checkpoint = end_lsn
                        cut = len(batch)
                    else:
                        # Nothing for us in it, nothing held back: like a keepalive,
                        # a chance to let the slot move on.
                        self._advance_idle(stream, end_lsn)
                    in_txn = False
                    if checkpoint and len(batch) >= limit:
                        self._yielded = checkpoint
                        yield ChangeBatch(tuple(batch), Position(format_lsn(checkpoint)))
                        batch, checkpoint = [], 0
                    continue
                elif tag == _RELATION:
                    relation = decode(buf, XLOG_HEADER)
                    assert isinstance(relation, Relation)
                    await self._learn(decoder, relation)
                    continue
                elif tag == _TRUNCATE and in_txn:
                    truncate = decode(buf, XLOG_HEADER)
                    assert isinstance(truncate, Truncate)
                    for n, rel in enumerate(truncate.relations, index):
                        table = tables[rel.oid]
                        if not skip and table.watched and emit_truncate:
                            batch.append(Change(database, DB_TYPE, table.name,
                                                Operation.TRUNCATE, f"{prefix}{n}", when))
                            emitted += 1
                    index += len(truncate.relations)
                elif tag in (_INSERT, _UPDATE, _DELETE, _TRUNCATE):
                    raise StreamError(f"a {chr(tag)!r} message outside a transaction", "XX000")
                else:
                    continue  # Type, Origin, Message: nothing for us
                if len(batch) >= limit:
                    if checkpoint:
                        # Earlier transactions in the batch are complete: hand them
                        # over with their position first.
                        self._yielded = checkpoint
                        yield ChangeBatch(tuple(batch[:cut]), Position(format_lsn(checkpoint)))
                        batch, checkpoint = batch[cut:], 0
                    # Inside a transaction: store early, but the position only moves
                    # at its commit.
                    yield ChangeBatch(tuple(batch), None)
                    batch = []
            # A long catch-up never waits for the socket: give the loop a turn so
            # the standby status timer (and everything else) still runs.
            await asyncio.sleep(0)

    def _advance_idle(self, stream: ReplicationStream, lsn: int) -> bool:
        """Let the slot move past WAL that holds nothing for us.

        Safe when nothing is open or held back here and everything handed to the
        engine is confirmed: messages arrive in WAL order, so every transaction
        that committed before ``lsn`` was already read and stored, and one that
        commits later has a commit LSN >= ``lsn`` and is still sent after a
        restart. Without this an idle database (or one whose traffic is all in
        unwatched tables or other databases) would make the slot keep WAL for ever.
        """
        if self._confirmed >= self._yielded and lsn > self._confirmed:
            self._confirmed = lsn
            stream.report(lsn)
            return True
        return False

    def _change(self, msg: Update | Delete, key: str, when: datetime) -> Change | None:
        table = self._tables[msg.relation.oid]
        if not table.watched:
            return None
        extra: dict[str, Any] = {}
        if type(msg) is Update:
            if Operation.UPDATE not in self._ops:
                return None
            operation = Operation.UPDATE
            doc = msg.new
            unchanged = msg.unchanged
            if unchanged:
                unchanged = _fill_unchanged(doc, unchanged, msg.old)
                if unchanged:
                    extra["unchanged"] = list(unchanged)
            if msg.old is not None:
                extra["old"] = msg.old
            ident = doc_id(doc, table.id_columns)
            if ident is None and msg.old is not None:
                ident = doc_id(msg.old, table.id_columns)
        else:
            assert type(msg) is Delete
            if Operation.DELETE not in self._ops:
                return None
            operation = Operation.DELETE
            doc = msg.old  # the old row (or key) is the document: no "old" beside it
            ident = doc_id(doc, table.id_columns)
        return Change(self.settings.name, DB_TYPE, table.name, operation, key, when, ident, doc,
                      extra)

    async def _learn(self, decoder: Decoder, relation: Relation) -> None:
        """A Relation message: look up unknown column types and the row id columns."""
        asked: set[int] = set()
        oids = self._types.unknown(c.type_oid for c in relation.columns)
        while oids - asked:
            conn = await self._catalog_conn()
            todo = oids - asked
            asked |= todo
            oids = self._types.learn(await catalog.lookup_types(conn, todo))
        if asked:
            decoder.refresh(relation.oid)  # now with the converters looked up
        flagged = tuple(c.name for c in relation.columns if c.key)
        if relation.replica_identity == "d" and len(flagged) <= 1:
            id_columns = flagged  # the replica identity is the primary key (if any)
        else:
            # FULL flags every column, USING INDEX the index's; a composite key's
            # order is the key's, not the table's: ask the catalog.
            id_columns = await catalog.primary_key(await self._catalog_conn(), relation.oid)
            if not id_columns and relation.replica_identity in ("d", "i"):
                id_columns = flagged
        name = relation.name if relation.namespace == "public" else (
            f"{relation.namespace}.{relation.name}")
        watched = self._watched is None or name in self._watched
        table = self._tables[relation.oid] = _Table(name, id_columns, watched)
        self._inserts[relation.oid] = (table, decoder.insert_reader(relation.oid))


def _fill_unchanged(doc: dict[str, Any], unchanged: tuple[str, ...],
                    old: dict[str, Any] | None) -> tuple[str, ...]:
    """An unchanged TOASTed value is not sent in the new row; with REPLICA
    IDENTITY FULL the old row has it (it is the same value)."""
    if old is None:
        return unchanged
    rest = []
    for name in unchanged:
        if name in old:
            doc[name] = old[name]
        else:
            rest.append(name)
    return tuple(rest)


def _slot_status(slot: str, info: catalog.SlotInfo | None) -> dict[str, Any]:
    if info is None:
        return {"slot": slot, "slot_exists": False}
    return {"slot": slot, "slot_active": info.active, "lag_bytes": info.lag_bytes,
            "confirmed_lsn": info.confirmed_flush}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
