"""The ``mysql`` source: MySQL 8 / MariaDB 10.5+ row binlog."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import pymysql
import structlog
from dbevents import (
    ChangeBatch,
    Operation,
    Position,
    Problem,
    SetupError,
    SourceSettings,
    SourceUnavailable,
)
from dbevents.hints import command
from dbevents.masking import mask_dsn

from dbevents_source_mysql import checks
from dbevents_source_mysql.handoff import Handoff
from dbevents_source_mysql.options import (
    MysqlOptions,
    default_server_id,
    parse_url,
    watched_schemas,
)
from dbevents_source_mysql.position import BinlogPosition
from dbevents_source_mysql.reader import DB_TYPE, BinlogReader, ReaderConfig

log = structlog.get_logger("dbevents.source.mysql")

STOP_WAIT = 10.0  # seconds close() waits for a reader thread


class MysqlSource:
    """Reads the row binlog like a replica would.

    Positions are ``FILE:OFFSET`` of the event after a transaction's commit (plus
    ``gtid=...`` when the server has GTIDs). Change keys are ``FILE:OFFSET:ROW``: the
    rows event's own offset and the row's index in it, the same on every replay.
    """

    db_type: ClassVar[str] = DB_TYPE
    Options = MysqlOptions

    def __init__(self, settings: SourceSettings) -> None:
        self.settings = settings
        self.options: MysqlOptions = settings.options or MysqlOptions()
        self.params = parse_url(settings.url)
        self.schemas = watched_schemas(self.options, self.params)
        self.server_id = self.options.server_id or default_server_id(settings.name,
                                                                     self.schemas)
        ops = frozenset(Operation(o) for o in settings.operations
                        if o in Operation._value2member_map_)
        self.config = ReaderConfig(
            name=settings.name, url=settings.url, params=self.params,
            server_id=self.server_id, schemas=self.schemas, tables=settings.tables,
            operations=ops, batch_size=self.options.batch_size,
            heartbeat=self.options.heartbeat,
            reconnect_timeout=self.options.reconnect_timeout,
            connect_timeout=self.options.connect_timeout, leased=settings.leased,
        )
        self.server: checks.ServerInfo | None = None
        self.confirmed: Position | None = None
        self._readers: set[BinlogReader] = set()

    # -- the Source protocol ------------------------------------------------------
    async def start(self) -> None:
        """Connect and check the server settings and privileges (SetupError names
        what to change)."""
        self.server = await asyncio.to_thread(self._check)
        log.info("mysql source ready", database=self.settings.name,
                 url=mask_dsn(self.settings.url), server=self.server.version,
                 schemas=list(self.schemas), server_id=self.server_id)

    def _check(self) -> checks.ServerInfo:
        conn = self._connect()
        try:
            info = checks.check_server(conn, schemas=self.schemas, server_id=self.server_id,
                                       server_id_set=self.options.server_id is not None,
                                       tables=self.settings.tables)
            # Where to begin is checked by changes(): only it knows the checkpoint.
            checks.check_replication(conn, self.server_id)
            return info
        finally:
            conn.close()

    async def preflight(self) -> list[Problem]:
        """For `dbevents check --connect`: every check start() makes, each problem
        listed (not only the first); reads only."""
        return [Problem(p) for p in await asyncio.to_thread(self._preflight)]

    def _preflight(self) -> list[str]:
        try:
            conn = self._connect()
        except (SetupError, SourceUnavailable) as exc:
            return [str(exc)]
        try:
            info, problems = checks.server_problems(
                conn, schemas=self.schemas, server_id=self.server_id,
                server_id_set=self.options.server_id is not None, tables=self.settings.tables)
            # The dump probe needs a binlog, and a reader id that is not the server's.
            if info.log_bin and info.server_id != self.server_id:
                try:
                    checks.check_replication(conn, self.server_id)
                except SetupError as exc:
                    problems.append(str(exc))
            return problems
        except pymysql.err.MySQLError as exc:
            return [f"checking {mask_dsn(self.settings.url)} failed: {exc}"]
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    async def changes(self, since: Position | None) -> AsyncIterator[ChangeBatch]:
        """From the checkpoint ``since``; with none, from the ``start`` option, whose
        position is yielded first (an empty batch) so the store keeps it at once."""
        if self.server is None:
            await self.start()
        assert self.server is not None
        start, conn = await asyncio.to_thread(self._resume_point, since)
        handoff = Handoff(asyncio.get_running_loop(), self.options.batch_size)
        reader = BinlogReader(self.config, self.server, start, handoff, conn)
        self._readers.add(reader)
        reader.start()
        try:
            if since is None:
                yield ChangeBatch((), start.to_position())
            while True:
                yield await handoff.get()
        finally:
            self._readers.discard(reader)
            reader.stop()
            await asyncio.to_thread(reader.join, STOP_WAIT)

    async def initial_position(self) -> Position | None:
        """With ``start = "end"``: the end of the binlog now, for the engine to
        store before it reports running (other starts do not move with time)."""
        if self.options.start != "end":
            return None

        def read() -> Position:
            conn = self._connect()
            try:
                return checks.current_position(conn).to_position()
            finally:
                conn.close()

        return await asyncio.to_thread(read)

    def _resume_point(self, since: Position | None) -> tuple[BinlogPosition, Any]:
        """Where to start, checked against the server's binlog files; and the
        connection used, which the reader goes on to use for the dump."""
        conn = self._connect()
        try:
            if since is not None:
                try:
                    position = BinlogPosition.from_position(since)
                except ValueError:
                    raise SetupError(
                        f"the checkpoint of database {self.settings.name!r} is "
                        f"{since.value!r}, not a MySQL binlog position (did this section "
                        f"change type?); set a new one with the worker stopped: "
                        f"`{command(f'mysql reset-position {self.settings.name}')}`") from None
            elif self.options.start == "end":
                position = checks.current_position(conn)
            elif self.options.start == "earliest":
                position = checks.earliest_position(conn)
            else:
                position = BinlogPosition.parse(self.options.start)
            checks.check_resume(conn, self.settings.name, position)
            return position, conn
        except BaseException:
            conn.close()
            raise

    async def confirm(self, position: Position) -> None:
        """Bookkeeping only. A PostgreSQL slot or a MongoDB resume token lives in the
        database; MySQL keeps no per-reader state at all: binlog files are kept or
        purged by the server's own expiry settings, whatever any reader has read. The
        store's checkpoint is therefore the one memory of where to resume, and it is
        already durable when this is called."""
        self.confirmed = position

    async def close(self) -> None:
        readers = list(self._readers)
        self._readers.clear()
        for reader in readers:
            reader.stop()
        for reader in readers:
            await asyncio.to_thread(reader.join, STOP_WAIT)

    async def reader_stats(self) -> Mapping[str, Any]:
        """Counters of this running reader, for tests and debugging (the core reads
        `probe_status`, not this)."""
        out: dict[str, Any] = {
            "server_id": self.server_id,
            "confirmed": str(self.confirmed) if self.confirmed else None,
        }
        for reader in self._readers:
            out.update(read=str(reader.resume), events_read=reader.events,
                       reconnects=reader.reconnects, table_definitions=reader.tables.parsed)
        return out

    @classmethod
    async def probe_status(cls, settings: SourceSettings) -> dict[str, Any]:
        """For `dbevents status` and the metrics: the server's binlog end, the
        oldest file kept (a checkpoint must not fall behind it) and, given the
        store's checkpoint, the bytes of binlog between it and the end."""
        opts: MysqlOptions = settings.options or MysqlOptions()
        url = settings.url
        params = parse_url(url)
        checkpoint: BinlogPosition | None = None
        if settings.checkpoint is not None:
            with contextlib.suppress(ValueError):  # another type's: the reader says so
                checkpoint = BinlogPosition.from_position(settings.checkpoint)

        def probe() -> dict[str, Any]:
            conn = checks.connect(params, opts.connect_timeout, url)
            try:
                # The end first: every file up to it is then in the listing.
                end = checks.current_position(conn)
                files = checks.binlog_files(conn)
            finally:
                with contextlib.suppress(Exception):
                    conn.close()
            facts: dict[str, Any] = {"server_position": str(end),
                                     "oldest_binlog": next(iter(files), None),
                                     "binlog_bytes": sum(files.values())}
            if checkpoint is not None:
                behind = checks.bytes_between(files, checkpoint, end)
                if behind is None:  # its file was purged: capture cannot resume
                    facts["caught_up"] = False
                else:
                    facts["lag_bytes"] = behind
                    facts["caught_up"] = behind == 0
            return facts

        return await asyncio.to_thread(probe)

    # -- helpers ------------------------------------------------------------------------
    def _connect(self) -> Any:
        return checks.connect(self.params, self.options.connect_timeout, self.settings.url)
