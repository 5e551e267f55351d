"""Startup checks and the few queries the source makes besides reading the binlog.

Each failed check raises SetupError saying which server setting or privilege to
change, and how. They run on a plain connection, in a worker thread.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from typing import Any

import attrs
import pymysql
from dbevents import SetupError, SourceUnavailable
from dbevents.hints import command
from dbevents.masking import mask_dsn

from dbevents_source_mysql.options import ConnectParams
from dbevents_source_mysql.position import BinlogPosition

ER_ACCESS_DENIED = 1045
ER_DBACCESS_DENIED = 1044
ER_SPECIFIC_ACCESS_DENIED = 1227
ER_TABLEACCESS_DENIED = 1142
ER_COLUMNACCESS_DENIED = 1143
ER_MASTER_FATAL_READING_BINLOG = 1236  # purged / missing binlog file, bad position
ER_SLAVE_SAME_ID = 4052  # MariaDB: a reader with this server_id connected after us
ER_PARSE_ERROR = 1064
COM_BINLOG_DUMP = 0x12
BINLOG_DUMP_NON_BLOCK = 0x01

_JSON_VALID = re.compile(r"json_valid\(\s*`((?:[^`]|``)+)`\s*\)", re.IGNORECASE)
_VARIABLES = ("log_bin", "binlog_format", "binlog_row_image", "binlog_row_metadata",
              "server_id", "binlog_checksum", "log_bin_compress",
              "binlog_transaction_compression", "binlog_row_value_options", "version")


@attrs.frozen
class ServerInfo:
    mariadb: bool
    version: str
    server_id: int
    checksum: bool
    log_bin: bool = True


def connect(params: ConnectParams, connect_timeout: float, url: str,
            **more: Any) -> pymysql.connections.Connection[Any]:
    """A connection; SetupError when refused for credentials, SourceUnavailable when
    the server cannot be reached."""
    try:
        return pymysql.connect(**params.pymysql_kwargs(connect_timeout, **more))
    except pymysql.err.OperationalError as exc:
        code = exc.args[0] if exc.args else 0
        if code in (ER_ACCESS_DENIED, ER_DBACCESS_DENIED):
            raise SetupError(f"{mask_dsn(url)}: the server refused the login: "
                             f"{exc.args[1] if len(exc.args) > 1 else exc}") from None
        raise SourceUnavailable(f"cannot connect to {mask_dsn(url)}: {exc}") from None


def _query(conn: pymysql.connections.Connection[Any], sql: str,
           args: Any = None) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return list(cur.fetchall())


def variables(conn: pymysql.connections.Connection[Any]) -> dict[str, str]:
    names = ", ".join(f"'{n}'" for n in _VARIABLES)
    rows = _query(conn, f"SHOW GLOBAL VARIABLES WHERE Variable_name IN ({names})")
    return {str(k).lower(): str(v) for k, v in rows}


def _user(conn: pymysql.connections.Connection[Any]) -> str:
    (user,), = _query(conn, "SELECT CURRENT_USER()")
    name, _, host = str(user).rpartition("@")
    return f"'{name}'@'{host}'"


def check_server(conn: pymysql.connections.Connection[Any], *, schemas: tuple[str, ...],
                 server_id: int, server_id_set: bool,
                 tables: frozenset[str] | None = None) -> ServerInfo:
    """Every check that does not need the binlog position; returns facts for the
    reader. SetupError lists every problem found, not only the first."""
    info, problems = server_problems(conn, schemas=schemas, server_id=server_id,
                                     server_id_set=server_id_set, tables=tables)
    if problems:
        raise setup_error(problems)
    return info


def setup_error(problems: list[str]) -> SetupError:
    if len(problems) == 1:
        return SetupError(problems[0])
    return SetupError(f"{len(problems)} problems:\n- " + "\n- ".join(problems))


def server_problems(conn: pymysql.connections.Connection[Any], *, schemas: tuple[str, ...],
                    server_id: int, server_id_set: bool,
                    tables: frozenset[str] | None = None) -> tuple[ServerInfo, list[str]]:
    """The server facts, and every setting or privilege to change (each message
    says how), in the order an operator fixes them."""
    v = variables(conn)
    problems: list[str] = []
    mariadb = "mariadb" in v.get("version", "").lower()
    cnf = "the server's config ([mysqld] in my.cnf) and restart it"
    log_bin = v.get("log_bin", "OFF").upper() in ("ON", "1")
    if not log_bin:
        problems.append(
            f"the binary log is off (log_bin=OFF): set log_bin (e.g. log_bin=mysql-bin) "
            f"and a server_id in {cnf}")
    fmt = v.get("binlog_format", "").upper()
    if fmt != "ROW":
        problems.append(
            f"binlog_format is {fmt or 'unknown'}, not ROW: set binlog_format=ROW in "
            f"{cnf} (or SET GLOBAL binlog_format='ROW'; sessions opened before keep "
            f"the old format)")
    image = v.get("binlog_row_image", "").upper()
    if image != "FULL":
        problems.append(
            f"binlog_row_image is {image or 'unknown'}, not FULL (updates and deletes "
            f"would lack columns): set binlog_row_image=FULL in {cnf} (or SET GLOBAL "
            f"binlog_row_image='FULL')")
    if "binlog_row_metadata" not in v:
        problems.append(
            f"this server ({v.get('version', '?')}) has no binlog_row_metadata setting: "
            f"it needs MySQL 8.0.14+ or MariaDB 10.5+ (column names travel in the binlog "
            f"only from those versions on)")
    elif (meta := v["binlog_row_metadata"].upper()) != "FULL":
        problems.append(
            f"binlog_row_metadata is {meta}, not FULL (without it column names arrive as "
            f"UNKNOWN_COL0, UNKNOWN_COL1..): set binlog_row_metadata=FULL in {cnf} "
            f"(or SET GLOBAL binlog_row_metadata='FULL')")
    if v.get("log_bin_compress", "OFF").upper() in ("ON", "1"):
        problems.append("log_bin_compress is ON: compressed row events cannot be "
                        f"decoded; set log_bin_compress=OFF in {cnf}")
    if v.get("binlog_transaction_compression", "OFF").upper() in ("ON", "1"):
        problems.append("binlog_transaction_compression is ON: compressed transactions "
                        f"cannot be decoded; set it OFF in {cnf}")
    if "PARTIAL_JSON" in v.get("binlog_row_value_options", "").upper():
        problems.append("binlog_row_value_options=PARTIAL_JSON writes JSON updates as "
                        f"diffs without the full document; set it to '' in {cnf}")
    own_id = int(v.get("server_id", "0") or 0)
    if server_id == own_id:
        hint = ("set a different `server_id` in [databases.NAME]" if server_id_set else
                "set `server_id` in [databases.NAME] to a number no server or replica uses")
        problems.append(f"the reader's server_id {server_id} is the server's own "
                        f"server_id: {hint}")
    user = _user(conn)
    monitor = "BINLOG MONITOR" if mariadb else "REPLICATION CLIENT"
    try:
        if log_bin:  # without a binlog there is nothing to list (and it is an error)
            _query(conn, "SHOW BINARY LOGS")
    except pymysql.err.OperationalError as exc:
        if not exc.args or exc.args[0] != ER_SPECIFIC_ACCESS_DENIED:
            raise
        problems.append(
            f"the user {user} lacks the {monitor} privilege (needed to list the "
            f"binlog files and positions): GRANT {monitor} ON *.* TO {user}")
    for schema in schemas:
        rows = _query(conn, "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
                      (schema,))
        if not rows:
            problems.append(
                f"the database `{schema}` does not exist or the user {user} has no "
                f"privilege on it: create it, or GRANT SELECT ON `{schema}`.* TO {user} "
                f"(SELECT lets the source read column metadata); check `schemas` and "
                f"the URL")
            continue
        try:
            check_select(conn, user, schema, _watched_tables(conn, schema, schemas, tables))
        except SetupError as exc:
            problems.append(str(exc))
    checksum = v.get("binlog_checksum", "NONE").upper() not in ("NONE", "")
    info = ServerInfo(mariadb=mariadb, version=v.get("version", ""), server_id=own_id,
                      checksum=checksum, log_bin=log_bin)
    return info, problems


def _watched_tables(conn: pymysql.connections.Connection[Any], schema: str,
                    schemas: tuple[str, ...], tables: frozenset[str] | None) -> list[str]:
    """The tables of ``schema`` the source may read, as far as the user can see them
    (any privilege on a table makes it visible, INSERT alone included)."""
    rows = _query(conn, "SELECT TABLE_NAME FROM information_schema.TABLES "
                        "WHERE TABLE_SCHEMA = %s AND TABLE_TYPE = 'BASE TABLE'", (schema,))
    names = [str(r[0]) for r in rows]
    if tables is None:
        return names
    qualify = len(schemas) > 1  # data.col is "schema.table" then, as in the filter
    return [n for n in names if (f"{schema}.{n}" if qualify else n) in tables]


_SELECT_CHUNK = 50  # tables per probe: well under the 61 tables a join may hold


def check_select(conn: pymysql.connections.Connection[Any], user: str, schema: str,
                 tables: list[str]) -> None:
    """SELECT on every watched table, tested by selecting from them (LIMIT 0 reads
    no row). Seeing the database proves nothing (any privilege, INSERT alone,
    shows it), and asking the server covers roles and column grants without
    parsing grants. A database with no table yet has nothing to test."""
    for i in range(0, len(tables), _SELECT_CHUNK):
        names = ", ".join(f"{_ident(schema)}.{_ident(t)}"
                          for t in tables[i:i + _SELECT_CHUNK])
        try:
            _query(conn, f"SELECT * FROM {names} LIMIT 0")
        except pymysql.err.MySQLError as exc:
            if exc.args and exc.args[0] in (ER_TABLEACCESS_DENIED, ER_COLUMNACCESS_DENIED):
                raise SetupError(
                    f"the user {user} lacks the SELECT privilege on tables of `{schema}` "
                    f"({exc.args[1]}): GRANT SELECT ON {_ident(schema)}.* TO {user} "
                    f"(the source reads the watched tables' column metadata)") from None
            raise


def _ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def check_replication(conn: pymysql.connections.Connection[Any], server_id: int) -> None:
    """REPLICATION SLAVE, tested by asking for a binlog dump that ends at once
    (non-blocking, from the current end): no grant parsing, roles included."""
    user = _user(conn)
    end = current_position(conn)
    try:
        start_dump(conn, end, server_id, blocking=False, checksum=True)
        while True:
            packet = conn._read_packet()
            if packet.is_eof_packet():
                break
    except pymysql.err.OperationalError as exc:
        if exc.args and exc.args[0] in (ER_SPECIFIC_ACCESS_DENIED, ER_ACCESS_DENIED):
            raise SetupError(
                f"the user {user} lacks the REPLICATION SLAVE privilege (needed to read "
                f"the binlog): GRANT REPLICATION SLAVE ON *.* TO {user}") from None
        raise


def start_dump(conn: pymysql.connections.Connection[Any], start: BinlogPosition,
               server_id: int, *, blocking: bool, checksum: bool,
               heartbeat: float | None = None) -> None:
    """Ask the server to stream its binlog from ``start`` (COM_BINLOG_DUMP)."""
    with conn.cursor() as cur:
        if checksum:
            # We verify nothing, but must say we understand checksummed events.
            cur.execute("SET @master_binlog_checksum = @@global.binlog_checksum")
        if heartbeat:
            cur.execute("SET @master_heartbeat_period = %s", (int(heartbeat * 1e9),))
        # MariaDB: we understand GTID events (else it rewrites them as BEGIN queries).
        cur.execute("SET @mariadb_slave_capability = 4")
    name = start.file.encode()
    flags = 0 if blocking else BINLOG_DUMP_NON_BLOCK
    payload = struct.pack("<BIHI", COM_BINLOG_DUMP, start.pos, flags, server_id) + name
    conn._next_seq_id = 0
    conn.write_packet(payload)


def current_position(conn: pymysql.connections.Connection[Any]) -> BinlogPosition:
    """The end of the binlog: where a source that starts "at the end" begins."""
    try:
        rows = _query(conn, "SHOW BINARY LOG STATUS")  # MySQL 8.2+
    except pymysql.err.ProgrammingError as exc:
        if not exc.args or exc.args[0] != ER_PARSE_ERROR:
            raise
        rows = _query(conn, "SHOW MASTER STATUS")
    if not rows:
        raise SetupError("the server reports no binlog position (is log_bin on?)")
    return BinlogPosition(str(rows[0][0]), int(rows[0][1]))


def binlog_files(conn: pymysql.connections.Connection[Any]) -> dict[str, int]:
    """Binlog files still on the server, oldest first, with their sizes."""
    return {str(r[0]): int(r[1]) for r in _query(conn, "SHOW BINARY LOGS")}


def bytes_between(files: Mapping[str, int], start: BinlogPosition,
                  end: BinlogPosition) -> int | None:
    """Bytes of binlog from ``start`` to ``end``, across the files between them
    (``files``: SHOW BINARY LOGS, oldest first, with sizes). None when ``start``'s
    file is no longer on the server."""
    names = list(files)
    if start.file not in files or end.file not in files:
        return None
    first, last = names.index(start.file), names.index(end.file)
    if first == last:
        return max(0, end.pos - start.pos)
    if first > last:
        return 0  # read after a rotation the end query did not see yet
    between = sum(files[n] for n in names[first + 1:last])
    return max(0, files[start.file] - start.pos) + between + end.pos


def earliest_position(conn: pymysql.connections.Connection[Any]) -> BinlogPosition:
    files = binlog_files(conn)
    if not files:
        raise SetupError("the server lists no binlog files (is log_bin on?)")
    return BinlogPosition(next(iter(files)), 4)


def replaced(exc: BaseException) -> bool:
    """The server ended our binlog dump because another reader registered with
    the same server_id (it keeps the newest): MariaDB says so with its own code,
    MySQL with the fatal-reading code and these words."""
    if not isinstance(exc, pymysql.err.MySQLError) or not exc.args:
        return False
    code, text = exc.args[0], str(exc.args[-1])
    return code == ER_SLAVE_SAME_ID or (
        code == ER_MASTER_FATAL_READING_BINLOG and "same server_uuid/server_id" in text)


def purged_error(name: str, position: BinlogPosition, detail: str) -> SetupError:
    return SetupError(
        f"cannot resume database {name!r} at {position}: {detail}. The changes between "
        f"that checkpoint and the oldest binlog still on the server are lost to dbevents. "
        f"Keep binlogs longer (binlog_expire_logs_seconds / expire_logs_days), then move "
        f"the checkpoint with the worker stopped: `{command(f'mysql reset-position {name}')}` "
        f"(the current end of the binlog) or "
        f"`{command(f'mysql reset-position {name} --to earliest')}`"
    )


def check_resume(conn: pymysql.connections.Connection[Any], name: str,
                 position: BinlogPosition) -> None:
    """The checkpointed binlog file must still exist and reach the position."""
    files = binlog_files(conn)
    size = files.get(position.file)
    if size is None:
        oldest = next(iter(files), "none")
        raise purged_error(name, position,
                           f"the binlog file {position.file} is no longer on the server "
                           f"(purged; the oldest is {oldest})")
    if position.pos > size:
        raise purged_error(name, position,
                           f"{position.file} is only {size} bytes long (was the binlog "
                           f"reset or the server replaced?)")


def json_columns(conn: pymysql.connections.Connection[Any], schema: str,
                 table: str) -> frozenset[str]:
    """MariaDB stores JSON as LONGTEXT with a json_valid() CHECK constraint: the
    columns that have one, as the table is now."""
    rows = _query(
        conn,
        "SELECT CONSTRAINT_NAME, CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS "
        "WHERE CONSTRAINT_SCHEMA = %s AND TABLE_NAME = %s", (schema, table))
    out = set()
    for _name, clause in rows:
        match = _JSON_VALID.fullmatch(str(clause).strip())
        if match:
            out.add(match.group(1).replace("``", "`"))
    return frozenset(out)


def fractional_columns(conn: pymysql.connections.Connection[Any], schema: str,
                       table: str) -> frozenset[str]:
    """Temporal columns declared with fractional seconds, as the table is now."""
    rows = _query(
        conn,
        "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s "
        "AND TABLE_NAME = %s AND DATETIME_PRECISION > 0", (schema, table))
    return frozenset(str(r[0]) for r in rows)
