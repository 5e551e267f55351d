"""The blocking binlog reader, run in its own thread.

It asks the server for a binlog dump (the replica protocol, as mysql-replication
does) and reads the events itself: the per-event objects the library builds, and
its per-column row decoding, cost far more than the events do (see tables.py). The
library still parses the rare TABLE_MAP definitions it has not seen.

Transactions are handed to the event loop through a bounded Handoff as they commit.
A transaction larger than ``batch_size`` goes out in chunks without a checkpoint;
its commit carries the position. After a lost connection the reader reconnects with
backoff and resumes after the last complete transaction, so a partly read one is
read again with the same keys.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import attrs
import pymysql
import structlog
from dbevents import Change, Operation, SetupError, SourceUnavailable
from dbevents.backoff import Backoff
from dbevents.errors import CaptureLost
from dbevents.masking import mask_dsn

from dbevents_source_mysql import checks
from dbevents_source_mysql.handoff import Closed, Handoff
from dbevents_source_mysql.options import ConnectParams
from dbevents_source_mysql.packets import MAX_PAYLOAD, PacketStream
from dbevents_source_mysql.position import BinlogPosition
from dbevents_source_mysql.tables import TableCache

log = structlog.get_logger("dbevents.source.mysql")

DB_TYPE = "sql-mysql"

# Binlog event types (the subset this reader acts on).
QUERY = 0x02
ROTATE = 0x04
FORMAT_DESCRIPTION = 0x0F
XID = 0x10
HEARTBEAT = 0x1B
TABLE_MAP = 0x13
WRITE_V1, UPDATE_V1, DELETE_V1 = 0x17, 0x18, 0x19
WRITE_V2, UPDATE_V2, DELETE_V2 = 0x1E, 0x1F, 0x20
GTID = 0x21
XA_PREPARE = 0x26
MARIADB_GTID = 0xA2

_ROW_OPS = {WRITE_V1: Operation.INSERT, WRITE_V2: Operation.INSERT,
            UPDATE_V1: Operation.UPDATE, UPDATE_V2: Operation.UPDATE,
            DELETE_V1: Operation.DELETE, DELETE_V2: Operation.DELETE}
_DEFAULT_POST_HEADER = {QUERY: 13, TABLE_MAP: 8, WRITE_V1: 8, UPDATE_V1: 8, DELETE_V1: 8,
                        WRITE_V2: 10, UPDATE_V2: 10, DELETE_V2: 10}
_HEADER = struct.Struct("<IBIII")  # timestamp, type, server id, event size, next position
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ID_MASK = (1 << 48) - 1  # table ids are 6 bytes
_MISS = object()
_NO_EXTRA: Any = MappingProxyType({})
EMPTY_CHECKPOINT_EVERY = 1.0  # seconds between checkpoints of transactions we skip

_IDENT = r"(?:`(?:[^`]|``)+`|[^\s.`;()]+)"
_TRUNCATE = re.compile(
    rf"^\s*(?:/\*.*?\*/\s*)*TRUNCATE\s+(?:TABLE\s+)?(?P<a>{_IDENT})(?:\s*\.\s*(?P<b>{_IDENT}))?",
    re.IGNORECASE | re.DOTALL)


def _gtid_text(raw: Any) -> str | None:
    """A GTID as the server writes it, from what the event loop kept of it."""
    if raw is None:
        return None
    if len(raw) == 27:  # MariaDB: header from the server id on, seq_no u64, domain u32
        server_id, = struct.unpack_from("<I", raw, 0)
        seq, domain = struct.unpack_from("<QI", raw, 14)
        return f"{domain}-{server_id}-{seq}"
    sid, gno = raw[:16].hex(), int.from_bytes(raw[16:24], "little")  # MySQL: uuid:gno
    return f"{sid[:8]}-{sid[8:12]}-{sid[12:16]}-{sid[16:20]}-{sid[20:]}:{gno}"


def _unquote(ident: str) -> str:
    if ident.startswith("`"):
        return ident[1:-1].replace("``", "`")
    return ident


@attrs.frozen
class ReaderConfig:
    name: str  # the [databases.NAME] section
    url: str  # for messages only, always masked
    params: ConnectParams
    server_id: int
    schemas: tuple[str, ...]
    tables: frozenset[str] | None
    operations: frozenset[Operation]
    batch_size: int
    heartbeat: float
    reconnect_timeout: float
    connect_timeout: float
    # Capture is coordinated by a lease (SourceSettings.leased): another reader
    # with our server_id is the process that took the lease over.
    leased: bool = False


class BinlogReader:
    """Reads from ``start`` until stop(); publishes into ``handoff``."""

    def __init__(self, config: ReaderConfig, server: checks.ServerInfo,
                 start: BinlogPosition, handoff: Handoff,
                 conn: pymysql.connections.Connection[Any] | None = None) -> None:
        self.config = config
        self.server = server
        self.handoff = handoff
        self.resume = start  # after the last transaction published whole
        self.tables = TableCache(mariadb=server.mariadb, schemas=config.schemas,
                                 tables=config.tables, lookup=self._lookup)
        self.events = 0  # binlog events read, for status()
        self.reconnects = 0
        self._stop = threading.Event()
        # A connection already open (the one that found the start): used first.
        self._conn: pymysql.connections.Connection[Any] | None = conn
        self._ctl: pymysql.connections.Connection[Any] | None = None
        self._thread: threading.Thread | None = None
        self._streaming = False  # this connection delivered events (resets the backoff)

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"mysql-binlog-{self.config.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Make the thread end soon: wake any wait and break the blocking read."""
        self._stop.set()
        self.handoff.close()
        conn = self._conn
        sock = getattr(conn, "_sock", None) if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _main(self) -> None:
        try:
            self._run()
        except Closed:
            pass
        except BaseException as exc:
            if not self._stop.is_set():
                self.handoff.fail(exc)
        finally:
            self._close_conn()
            if self._ctl is not None:
                with contextlib.suppress(Exception):
                    self._ctl.close()
                self._ctl = None

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # -- connection and retries -------------------------------------------------------
    def _run(self) -> None:
        cfg = self.config
        failing_since: float | None = None
        backoff = Backoff(0.5, 30.0)
        while not self._stop.is_set():
            try:
                self._stream()
                return
            except (pymysql.err.MySQLError, OSError, SourceUnavailable) as exc:
                self._close_conn()
                if self._stop.is_set():
                    return
                code = exc.args[0] if isinstance(exc, pymysql.err.MySQLError) and exc.args \
                    else None
                if cfg.leased and checks.replaced(exc):
                    # Under a capture lease that reader is the new holder (this
                    # process was paused past its lease): reconnecting would
                    # end its dump in turn, so stop here; the engine goes back
                    # to standby, or takes the lease again if it is still ours.
                    raise CaptureLost(
                        f"{mask_dsn(cfg.url)}: another binlog reader with server_id "
                        f"{cfg.server_id} connected and the server ended this one's dump "
                        f"(the process that took the capture over, or a `dbevents check "
                        f"--connect`); stopped reading at {self.resume}") from None
                if checks.replaced(exc):
                    pass  # not a lost binlog: reconnect below, as after any drop
                elif code == checks.ER_MASTER_FATAL_READING_BINLOG:
                    detail = exc.args[1] if len(exc.args) > 1 else str(exc)
                    raise checks.purged_error(cfg.name, self.resume,
                                              f"the server says: {detail}") from None
                if code in (checks.ER_SPECIFIC_ACCESS_DENIED, checks.ER_ACCESS_DENIED):
                    raise SetupError(f"{mask_dsn(cfg.url)}: {exc.args[-1]}") from None
                now = time.monotonic()
                if self._streaming:
                    failing_since = None
                    backoff.reset()
                failing_since = failing_since or now
                if now - failing_since > cfg.reconnect_timeout:
                    raise SourceUnavailable(
                        f"{mask_dsn(cfg.url)}: binlog connection lost and not back after "
                        f"{cfg.reconnect_timeout:.0f}s: {exc}") from None
                self.reconnects += 1
                delay = backoff.next()
                log.warning("binlog connection lost; reconnecting", database=cfg.name,
                            url=mask_dsn(cfg.url), error=str(exc), retry_in=round(delay, 1),
                            resume=str(self.resume))
                self._stop.wait(delay)

    def _stream(self) -> None:
        cfg = self.config
        self._streaming = False
        self.tables.by_id.clear()
        if self._conn is None:
            self._conn = checks.connect(cfg.params, cfg.connect_timeout, cfg.url)
        conn = self._conn
        if self._stop.is_set():
            return
        checks.start_dump(conn, self.resume, cfg.server_id, blocking=True,
                          checksum=self.server.checksum, heartbeat=cfg.heartbeat)
        log.info("reading the binlog", database=cfg.name, url=mask_dsn(cfg.url),
                 position=str(self.resume), server_id=cfg.server_id)
        self._pump(conn)

    # -- the event loop -------------------------------------------------------------
    def _pump(self, conn: pymysql.connections.Connection[Any]) -> None:
        """Read events until the connection fails or stop() breaks it.

        Committed transactions collect in ``out`` and go to the handoff when the
        bytes received so far are used up (before the next blocking read) or when
        ``batch_size`` is reached; the transaction being read stays in ``txn``.
        This loop is the hot path: locals over attributes, no call per event that
        can be avoided, positions formatted only when handed over.
        """
        cfg = self.config
        stream = PacketStream(conn, cfg.heartbeat * 3)
        tables = self.tables
        by_id = tables.by_id
        header = _HEADER.unpack_from
        table_id = _U64.unpack_from
        u32 = _U32.unpack_from
        body_cache = tables.by_body
        publish = self.handoff.publish
        name, batch_size = cfg.name, cfg.batch_size
        ops = cfg.operations
        wanted = {etype for etype, op in _ROW_OPS.items() if not ops or op in ops}
        want_truncate = not ops or Operation.TRUNCATE in ops
        update = Operation.UPDATE
        checksum = 4 if self.server.checksum else 0
        post_header: tuple[int, ...] | None = None
        ph = dict(_DEFAULT_POST_HEADER)

        file = self.resume.file
        gtid: Any = None  # raw; formatted by _gtid_text when a checkpoint is made
        in_txn = False
        txn: list[Change] = []  # the transaction being read
        out: list[Change] = []  # committed, not yet handed over
        out_at: tuple[str, int, Any] | None = None  # (file, offset, gtid) after `out`
        published_at = time.monotonic()
        last_ts, when = -1, datetime.now(UTC)
        count = 0  # events since self.events was last updated

        def flush() -> None:
            nonlocal out, out_at, published_at
            if out_at is None:
                return
            if not out and time.monotonic() - published_at < EMPTY_CHECKPOINT_EVERY:
                return  # transactions of other tables only: move the checkpoint now and then
            position = BinlogPosition(out_at[0], out_at[1], _gtid_text(out_at[2]))
            publish(out, position.to_position())
            self.resume = position
            out, out_at = [], None
            published_at = time.monotonic()

        while True:
            # Walk the packets in the receive buffer in place: an event is read where
            # it lies, never copied out first.
            buf, pos = stream.buf, stream.pos
            size_buf = len(buf)
            while size_buf - pos >= 4:
                length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
                if length == MAX_PAYLOAD:  # an event of 16 MiB or more, in several packets
                    joined = stream.joined(pos)
                    if joined is None:
                        break
                    data, pos = joined
                    b, e = 0, len(data)
                else:
                    e = pos + 4 + length
                    if e > size_buf:
                        break
                    data, b = buf, pos + 4
                    pos = e
                count += 1
                first = data[b]
                if first:
                    if first == 0xFF:
                        pymysql.err.raise_mysql_exception(data[b:e])
                    if first == 0xFE and e - b < 9:
                        raise pymysql.err.OperationalError(2013, "the server ended the dump")
                    continue
                etype = data[b + 5]
                if etype == TABLE_MAP:
                    cached: Any = body_cache.get(data[b + 26:e - checksum], _MISS)
                    if cached is _MISS:
                        cached = tables.on_table_map(data, b, e - checksum, ph[TABLE_MAP],
                                                     bool(checksum), post_header)
                    by_id[table_id(data, b + 20)[0] & _ID_MASK] = cached
                elif etype in wanted:
                    table = by_id.get(table_id(data, b + 20)[0] & _ID_MASK)
                    if table is None:
                        continue
                    ts, _, _, size, next_pos = header(data, b + 1)
                    if ts != last_ts:
                        last_ts, when = ts, datetime.fromtimestamp(ts, UTC)
                    q = b + 20 + ph[etype]
                    if etype >= WRITE_V2:
                        q += int.from_bytes(data[b + 28:b + 30], "little") - 2
                    ncols = data[q]
                    if ncols < 251:
                        q += 1
                    else:
                        width = {252: 2, 253: 3, 254: 8}[ncols]
                        ncols = int.from_bytes(data[q + 1:q + 1 + width], "little")
                        q += 1 + width
                    nb = (ncols + 7) >> 3
                    decode = table.decoder(data[q:q + nb])
                    q += nb
                    end = e - checksum
                    prefix = f"{file}:{next_pos - size}:"
                    col, op = table.col, _ROW_OPS[etype]
                    i = 0
                    if op is update:
                        decode_after = table.decoder(data[q:q + nb])
                        q += nb
                        while q < end:
                            old, q, _ = decode(data, q)
                            new, q, doc_id = decode_after(data, q)
                            txn.append(Change(name, DB_TYPE, col, op, prefix + str(i), when,
                                              doc_id, new, {"old": old}))
                            i += 1
                    else:
                        while q < end:
                            row, q, doc_id = decode(data, q)
                            txn.append(Change(name, DB_TYPE, col, op, prefix + str(i), when,
                                              doc_id, row, _NO_EXTRA))
                            i += 1
                    if len(txn) >= batch_size:
                        # A big transaction goes out in chunks, without a checkpoint.
                        if out:
                            flush()
                        publish(txn, None)
                        txn = []
                elif etype == XID or etype == XA_PREPARE:  # noqa: SIM109 (the hot path)
                    out_at, in_txn, gtid = (file, u32(data, b + 14)[0], gtid), False, None
                    if txn:
                        out.extend(txn)
                        txn = []
                        if len(out) >= batch_size:
                            flush()
                elif etype == MARIADB_GTID:
                    gtid = data[b + 6:b + 33]  # the header's server id .. the flags
                    in_txn = not data[b + 32] & 1  # FL_STANDALONE: one statement, no COMMIT
                elif etype == GTID:
                    gtid = data[b + 21:b + 45]
                elif etype == QUERY:
                    ts, _, _, size, next_pos = header(data, b + 1)
                    schema_len = data[b + 28]
                    q = b + 20 + ph[QUERY] + int.from_bytes(data[b + 31:b + 33], "little")
                    query = data[q + schema_len + 1:e - checksum]
                    if query == b"BEGIN":
                        in_txn = True
                        continue
                    if in_txn and query != b"COMMIT" and query != b"ROLLBACK":
                        continue  # SAVEPOINT and the like, inside a transaction
                    if not in_txn and want_truncate:
                        # A statement of its own (DDL), maybe a TRUNCATE.
                        schema = data[q:q + schema_len].decode("utf-8", "surrogateescape")
                        truncated = self._truncated(query, schema)
                        if truncated is not None:
                            if ts != last_ts:
                                last_ts, when = ts, datetime.fromtimestamp(ts, UTC)
                            txn.append(Change(name, DB_TYPE, truncated, Operation.TRUNCATE,
                                              f"{file}:{next_pos - size}:0", when))
                    out_at, in_txn, gtid = (file, next_pos, gtid), False, None
                    if txn:
                        out.extend(txn)
                        txn = []
                elif etype == HEARTBEAT:
                    # The server has sent all it has, up to here: with no transaction
                    # open, a point between transactions. The checkpoint moves to it,
                    # so an idle reader ends where the binlog ends, past a rotation
                    # too (its lag in bytes is then 0, for the metrics).
                    at = header(data, b + 1)[4]
                    if (not in_txn and not txn and gtid is None and at >= 4
                            and data[b + 20:e - checksum] == file.encode()):
                        last = out_at or (self.resume.file, self.resume.pos)
                        if file != last[0] or at > last[1]:
                            out_at = (file, at, None)
                elif etype == ROTATE:
                    file = data[b + 28:e - checksum].decode()
                    if u32(data, b + 1)[0]:  # a timestamp: a real rotation, not the dump's first
                        by_id.clear()  # a new server run may reuse table ids
                elif etype == FORMAT_DESCRIPTION:
                    if data[e - 5] in (0, 1):  # checksum algorithm: off / CRC32
                        checksum = 4 if data[e - 5] == 1 else 0
                    post_header = tuple(data[b + 20 + 57:e - 5])
                    for t in _DEFAULT_POST_HEADER:
                        if t - 1 < len(post_header) and post_header[t - 1]:
                            ph[t] = post_header[t - 1]
            stream.pos = pos
            if count:
                self._streaming = True
                self.events += count
                count = 0
            flush()  # what arrived is used up: hand it over before waiting for more
            stream.fill()

    def _truncated(self, query: bytes, schema: str) -> str | None:
        """The table a TRUNCATE statement empties, as data.col; None when the
        statement is something else or the table is not watched."""
        head = query[:9].upper().lstrip()
        if not head.startswith(b"TRUNCATE") and not head.startswith(b"/*"):
            return None
        match = _TRUNCATE.match(query.decode("utf-8", "surrogateescape"))
        if match is None:
            return None
        if match.group("b"):
            schema, table = _unquote(match.group("a")), _unquote(match.group("b"))
        else:
            table = _unquote(match.group("a"))
        if schema not in self.tables.schemas:
            return None
        col = f"{schema}.{table}" if self.tables.qualify else table
        if self.config.tables is not None and col not in self.config.tables:
            return None
        return col

    def _lookup(self, schema: str, table: str, question: str) -> frozenset[str]:
        """Column facts the binlog lacks, from information_schema (rarely: once per
        table definition, for some column types on MariaDB)."""
        cfg = self.config
        ask = checks.json_columns if question == "json" else checks.fractional_columns
        try:
            if self._ctl is None:
                self._ctl = checks.connect(cfg.params, cfg.connect_timeout, cfg.url)
            return ask(self._ctl, schema, table)
        except Exception as exc:
            if self._ctl is not None:
                with contextlib.suppress(Exception):
                    self._ctl.close()
                self._ctl = None
            log.warning("cannot look up column details", question=question,
                        database=cfg.name, table=f"{schema}.{table}", error=str(exc))
            return frozenset()
