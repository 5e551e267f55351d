"""The copy-both replication stream, over psycopg's low-level ``pgconn``.

psycopg 3 has no replication API, but from 3.3 on ``execute("START_REPLICATION
...")`` leaves a ``replication="database"`` connection in copy-both mode; from
there this module talks libpq directly: non-blocking ``get_copy_data`` /
``put_copy_data`` / ``flush``, with the socket registered on the asyncio loop.

Framing inside the CopyData messages ("Streaming Replication Protocol"):
``w`` XLogData (start LSN, WAL end, send time, then one pgoutput message), ``k``
primary keepalive (WAL end, send time, reply requested) from the server, and
``r`` standby status update (write, flush, apply LSNs, time, reply requested)
from us.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dbevents_source_postgres.pgoutput import PG_EPOCH, format_lsn, parse_lsn

log = structlog.get_logger("dbevents.source.postgres")

XLOG_DATA = ord("w")
KEEPALIVE = ord("k")
XLOG_HEADER = 25  # 'w' + data start + WAL end + send time: the pgoutput message follows

_KEEPALIVE = struct.Struct(">QqB")
_STATUS = struct.Struct(">cQQQqB")

# Text output of the values pgoutput sends is shaped by the walsender's session
# settings; pinning them makes the converters in types.py exact.
OUTPUT_SETTINGS = {
    "DateStyle": "ISO",
    "IntervalStyle": "iso_8601",
    "TimeZone": "UTC",
    "extra_float_digits": "1",
    "bytea_output": "hex",
}


class ConnectionLost(Exception):
    """The stream broke (network, server restart, terminated walsender): reconnect."""


class StreamError(Exception):
    """The server ended the stream with an error; ``sqlstate`` says which."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def replication_conninfo(url: str, application_name: str = "dbevents") -> str:
    """The user's URL as a logical replication connection with pinned output settings."""
    params = conninfo_to_dict(url)
    pinned = " ".join(f"-c {k}={v}" for k, v in OUTPUT_SETTINGS.items())
    options = f"{params.get('options') or ''} {pinned}".strip()
    extra: dict[str, Any] = {"replication": "database", "options": options,
                             "client_encoding": "UTF8"}
    if not params.get("application_name"):
        extra["application_name"] = application_name
    return make_conninfo(url, **extra)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def start_command(slot: str, publications: Sequence[str], start_lsn: int) -> str:
    names = ",".join(quote_ident(p) for p in publications)
    return (f"START_REPLICATION SLOT {quote_ident(slot)} LOGICAL {format_lsn(start_lsn)} "
            f"(proto_version '1', publication_names {quote_literal(names)})")


def parse_keepalive(buf: bytes) -> tuple[int, bool]:
    """A primary keepalive: (the server's WAL end, whether it wants a reply now)."""
    wal_end, _sent, reply = _KEEPALIVE.unpack_from(buf, 1)
    return wal_end, bool(reply)


def _now_micros() -> int:
    return int((datetime.now(UTC) - PG_EPOCH).total_seconds() * 1_000_000)


def status_message(flush: int, reply: bool = False) -> bytes:
    # write = flush = apply: logical slots only use flush (the slot's
    # confirmed_flush_lsn); reporting a write position ahead of it would also stop
    # the "caught up" keepalives that let an idle slot advance (see source.py).
    return _STATUS.pack(b"r", flush, flush, flush, _now_micros(), 1 if reply else 0)


async def _within_sender_timeout(conn: psycopg.AsyncConnection[Any],
                                 status_interval: float) -> float:
    """The status interval, shortened to a third of this walsender's
    wal_sender_timeout when that is shorter. While the engine stores a batch
    nothing reads the socket, so the server's keepalive requests go unanswered
    and the periodic status update alone keeps the session alive."""
    cur = await conn.execute(
        b"SELECT setting FROM pg_settings WHERE name = 'wal_sender_timeout'")
    row = await cur.fetchone()
    timeout_ms = int(row[0]) if row and row[0] else 0  # 0: no timeout
    if timeout_ms > 0:
        return min(status_interval, timeout_ms / 3000)
    return status_interval


class ReplicationStream:
    """One START_REPLICATION session. ``read()`` returns CopyData payloads in
    order; a background task sends a standby status update every
    ``status_interval`` seconds (with a reply request, so a silent server is
    noticed), whether or not anyone is reading."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], status_interval: float,
                 receive_timeout: float) -> None:
        self._conn = conn
        self._pgconn = conn.pgconn
        self._fd = self._pgconn.socket
        self._loop = asyncio.get_running_loop()
        self._status_interval = status_interval
        self._receive_timeout = receive_timeout
        self._flush = 0
        self.slot_confirmed = 0  # the slot's confirmed_flush_lsn when the stream started
        self._broken: str | None = None
        self._closed = False
        self._writer = False
        self._timer = asyncio.create_task(self._periodic_status(), name="pg-standby-status")

    @classmethod
    async def open(cls, url: str, slot: str, publications: Sequence[str], start_lsn: int,
                   confirmed_lsn: int, status_interval: float = 10.0,
                   receive_timeout: float = 60.0, connect_timeout: float = 10.0
                   ) -> ReplicationStream:
        """Start streaming from ``start_lsn``, reporting ``confirmed_lsn`` (what is
        durable downstream, which may be less) as the flush position."""
        conn = await psycopg.AsyncConnection.connect(
            # libpq reads 0 as "wait for ever": never round a short timeout down to it.
            replication_conninfo(url), autocommit=True,
            connect_timeout=max(1, round(connect_timeout)))
        try:
            # Simple-protocol SQL is allowed on a logical replication connection
            # before START_REPLICATION (no parameters: the extended protocol is not).
            cur = await conn.execute(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                f" WHERE slot_name = {quote_literal(slot)}".encode())
            row = await cur.fetchone()
            if row is None:
                raise StreamError(f"replication slot {slot!r} does not exist", "42704")
            slot_confirmed = parse_lsn(row[0]) if row[0] else 0
            status_interval = await _within_sender_timeout(conn, status_interval)
            cur = await conn.execute(start_command(slot, publications, start_lsn).encode())
            if cur.pgresult is None or cur.pgresult.status != pq.ExecStatus.COPY_BOTH:
                raise StreamError("START_REPLICATION did not enter copy-both mode", None)
            conn.pgconn.nonblocking = 1
        except BaseException:
            await conn.close()
            raise
        stream = cls(conn, status_interval, receive_timeout)
        stream.slot_confirmed = slot_confirmed
        # Never report less than the slot already confirmed, so its position
        # cannot appear to move backwards.
        stream._flush = max(confirmed_lsn, slot_confirmed)
        return stream

    # -- reading -----------------------------------------------------------------------
    def read_nowait(self) -> bytes | None:
        """The next CopyData payload if one is already here (buffered, or readable
        from the socket without waiting), else None."""
        pg = self._pgconn
        try:
            n, data = pg.get_copy_data(1)
            if n == 0:
                pg.consume_input()
                n, data = pg.get_copy_data(1)
        except psycopg.OperationalError as exc:
            raise ConnectionLost(str(exc).strip()) from None
        if n > 0:
            return bytes(data)
        if n == -1:
            self._copy_ended()
        if self._broken:
            raise ConnectionLost(self._broken)
        return None

    def read_available(self, limit: int = 1000) -> list[bytes]:
        """Up to ``limit`` CopyData payloads that are already here, without waiting
        (one call per burst instead of one per message: this is the hot path)."""
        pg = self._pgconn
        out: list[bytes] = []
        append = out.append
        try:
            while len(out) < limit:
                n, data = pg.get_copy_data(1)
                if n > 0:
                    append(bytes(data))
                    continue
                if n == 0:
                    pg.consume_input()
                    n, data = pg.get_copy_data(1)
                    if n > 0:
                        append(bytes(data))
                        continue
                if n == -1:
                    self._copy_ended()
                break
        except psycopg.OperationalError as exc:
            if out:
                return out  # hand over what arrived; the next call raises again
            raise ConnectionLost(str(exc).strip()) from None
        if not out and self._broken:
            raise ConnectionLost(self._broken)
        return out

    async def read(self) -> bytes:
        """The next CopyData payload, waiting for it."""
        while True:
            msg = self.read_nowait()
            if msg is not None:
                return msg
            await self._readable()

    async def _readable(self) -> None:
        ready = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self._loop.add_reader(self._fd, wake)
        try:
            # Not asyncio.wait_for: before Python 3.12 it returns normally when
            # the socket turns readable just as the task is cancelled, and the
            # cancellation is lost: the reader went on streaming after capture
            # stopped, nobody waited for it, and its session kept the slot.
            async with asyncio.timeout(self._receive_timeout):
                await ready
        except TimeoutError:
            raise ConnectionLost(
                f"no message from the server in {self._receive_timeout:g}s") from None
        finally:
            self._loop.remove_reader(self._fd)

    def _copy_ended(self) -> None:
        # The server left copy mode: the result says why (usually an error).
        res = self._pgconn.get_result()
        message, sqlstate = "the server ended the replication stream", None
        if res is not None and res.status == pq.ExecStatus.FATAL_ERROR:
            raw = res.error_message or b""
            message = raw.decode(errors="replace").strip() or message
            state = res.error_field(pq.DiagnosticField.SQLSTATE)
            sqlstate = state.decode() if state else None
        if sqlstate is None or sqlstate.startswith(("57", "08")):
            # Shutdown, admin termination, connection failure: worth reconnecting.
            raise ConnectionLost(message)
        raise StreamError(message, sqlstate)

    # -- feedback ----------------------------------------------------------------------
    def report(self, flush: int, reply: bool = False) -> None:
        """Tell the server everything up to ``flush`` may be forgotten (and send
        it now). Never moves backwards."""
        if flush > self._flush:
            self._flush = flush
        self._send(status_message(self._flush, reply))

    def _send(self, data: bytes) -> None:
        if self._closed or self._broken:
            return
        pg = self._pgconn
        try:
            # In non-blocking mode 0 means "buffer full": skip it, the next update
            # carries the same (or newer) positions.
            if pg.put_copy_data(data) == 1 and pg.flush() == 1 and not self._writer:
                self._writer = True
                self._loop.add_writer(self._fd, self._flush_more)
        except psycopg.OperationalError as exc:
            self._broken = str(exc).strip() or "sending to the server failed"

    def _flush_more(self) -> None:
        try:
            done = self._pgconn.flush() == 0
        except psycopg.OperationalError as exc:
            self._broken = str(exc).strip() or "sending to the server failed"
            done = True
        if done:
            self._writer = False
            self._loop.remove_writer(self._fd)

    async def _periodic_status(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._status_interval)
            self.report(self._flush, reply=True)

    # -- closing -----------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._timer.cancel()
        if self._writer:
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._fd)
        with contextlib.suppress(Exception):
            await self._conn.close()
        # Not a suppressed `await self._timer`: that also swallowed a
        # cancellation of the task closing the stream (a reader stopped just as
        # its stream broke went on reconnecting). The session is closed first,
        # so being cancelled here leaves nothing open.
        await asyncio.wait({self._timer})
