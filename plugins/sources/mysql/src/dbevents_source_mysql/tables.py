"""Table definitions from TABLE_MAP events, parsed once per definition.

Every transaction repeats a TABLE_MAP event before its rows. The library parses
each one from scratch (Column objects, optional metadata, charset lookups) and
builds the row dict through per-column lookups: that is where its time goes for
small transactions. Here the event body after the table id is the cache key: the
same bytes describe the same table, so a cache hit costs one dict lookup, and an
ALTER TABLE produces different bytes (new columns, names, types) and so a fresh
parse: the cache cannot go stale. A miss is parsed by the library's TableMapEvent;
rows are then decoded by readers compiled once per definition (convert.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
from dbevents import SetupError
from pymysql.protocol import MysqlPacket
from pymysqlreplication.constants import FIELD_TYPE
from pymysqlreplication.packet import BinLogPacketWrapper
from pymysqlreplication.row_event import TableMapEvent

from dbevents_source_mysql.convert import INLINE_NAMESPACE, Reader, inline_snippet, reader_for

MAX_CACHED = 4096  # table definitions kept; a busy server has far fewer

# (schema, table, question) -> column names, from information_schema; questions:
# "json" (MariaDB's JSON, stored as text) and "fraction" (temporal columns with
# fractional seconds).
ColumnLookup = Callable[[str, str, str], frozenset[str]]
_OLD_TEMPORAL = (FIELD_TYPE.TIMESTAMP, FIELD_TYPE.TIME, FIELD_TYPE.DATETIME)


# decode(data, pos) -> (row, position after the row, doc id)
RowDecode = Callable[[bytes, int], tuple[dict[str, Any], int, str | None]]


@attrs.frozen
class TableDef:
    """One definition of a watched table, with its compiled row decoders."""

    schema: str
    name: str
    col: str  # data.col: "table", or "schema.table" when several schemas are watched
    names: tuple[str, ...]
    readers: tuple[Reader, ...]
    snippets: tuple[str | None, ...]
    nullable: tuple[bool, ...]
    primary_key: tuple[int, ...]
    _decoders: dict[bytes, RowDecode] = attrs.field(factory=dict, eq=False, repr=False)

    def decoder(self, present: bytes) -> RowDecode:
        """The decoder for rows carrying the columns flagged in ``present`` (all of
        them with binlog_row_image=FULL), compiled once per bitmap."""
        found = self._decoders.get(present)
        if found is None:
            found = self._decoders[present] = compile_decoder(self, present)
        return found


def compile_decoder(table: TableDef, present: bytes) -> RowDecode:
    """A function decoding one row image of ``table``, written out column by column:
    no loop, no per-column call for the common types, the doc id computed on the way.

    The generated source contains only fixed snippets and numbers; column names and
    readers are passed in the function's namespace, never pasted into the code.
    """
    cols = [i for i in range(len(table.names)) if present[i >> 3] >> (i & 7) & 1]
    null_bytes = (len(cols) + 7) >> 3
    lines = ["def decode(data, pos):"]
    if null_bytes == 1:
        lines.append("    nulls = data[pos]; pos += 1")
    else:
        lines.append(f"    nulls = _from(data[pos:pos + {null_bytes}], 'little'); "
                     f"pos += {null_bytes}")
    namespace: dict[str, Any] = {"_from": int.from_bytes, "_dumps": _dump_key,
                                 **INLINE_NAMESPACE}
    for j, i in enumerate(cols):
        namespace[f"r{i}"] = table.readers[i]
        namespace[f"n{i}"] = table.names[i]
        read = (table.snippets[i] or f"{{v}}, pos = r{i}(data, pos)").format(v=f"v{j}")
        if table.nullable[i]:
            lines += [f"    if nulls & {1 << j}:", f"        v{j} = None", "    else:",
                      f"        {read}"]
        else:
            lines.append(f"    {read}")
    fields = ", ".join(f"n{i}: v{j}" for j, i in enumerate(cols))
    where = {i: j for j, i in enumerate(cols)}
    pk = [where[i] for i in table.primary_key if i in where]
    if len(pk) != len(table.primary_key) or not pk:
        doc_id = "None"
    elif len(pk) == 1:
        doc_id = f"None if v{pk[0]} is None else str(v{pk[0]})"
    else:
        doc_id = "_dumps([" + ", ".join(f"v{j}" for j in pk) + "])"
    lines.append(f"    return {{{fields}}}, pos, {doc_id}")
    exec(compile("\n".join(lines), f"<row decoder {table.schema}.{table.name}>", "exec"),
         namespace)
    decode: RowDecode = namespace["decode"]
    return decode


def _dump_key(values: list[Any]) -> str:
    return json.dumps(values, separators=(",", ":"), ensure_ascii=False)


class _Dialect:
    """What the library's event classes ask of their "control connection": the
    server flavour and a charset. The source never lets them query the server."""

    charset = "utf8mb4"

    def __init__(self, dbms: str) -> None:
        self.dbms = dbms

    def _get_dbms(self) -> str:
        return self.dbms


class TableCache:
    """table id -> definition for the current binlog, and definition bytes ->
    parsed definition across the whole run."""

    def __init__(self, *, mariadb: bool, schemas: tuple[str, ...],
                 tables: frozenset[str] | None, lookup: ColumnLookup) -> None:
        self.mariadb = mariadb
        self.schemas = frozenset(schemas)
        self.qualify = len(schemas) > 1
        self.tables = tables
        self.lookup = lookup
        self._dialect = _Dialect("mariadb" if mariadb else "mysql")
        self.by_body: dict[bytes, TableDef | None] = {}
        self.by_id: dict[int, TableDef | None] = {}
        self.parsed = 0  # definitions parsed (cache misses), for tests and status

    def on_table_map(self, data: bytes, start: int, end: int, post_header: int,
                     use_checksum: bool, post_header_lengths: tuple[int, ...] | None
                     ) -> TableDef | None:
        """A definition not in ``by_body`` yet: parse and keep it. The event's packet
        is ``data[start:]`` (OK byte, 19-byte header, body up to ``end``, before any
        checksum); the key is the body after the table id. (The reader looks the key
        up in ``by_body`` itself, and maps the table id.)"""
        payload = data[start:end + (4 if use_checksum else 0)]
        table = self._parse(payload, 20, post_header, use_checksum, post_header_lengths)
        if len(self.by_body) >= MAX_CACHED:
            self.by_body.clear()
        self.by_body[data[start + 26:end]] = table
        return table

    def _parse(self, data: bytes, body: int, post_header: int,
               use_checksum: bool, post_header_lengths: tuple[int, ...] | None
               ) -> TableDef | None:
        # Schema and table names sit right after the post-header; an unwatched table
        # is never parsed further.
        p = body + post_header
        schema = data[p + 1:p + 1 + data[p]].decode("utf-8", "surrogateescape")
        p += 2 + data[p]
        name = data[p + 1:p + 1 + data[p]].decode("utf-8", "surrogateescape")
        if schema not in self.schemas:
            return None
        col = f"{schema}.{name}" if self.qualify else name
        if self.tables is not None and col not in self.tables:
            return None
        self.parsed += 1
        wrapper = BinLogPacketWrapper(
            MysqlPacket(data, "utf8"), {}, self._dialect, (0, 0, 0), use_checksum,
            frozenset([TableMapEvent]), None, None, None, None, False, False, False,
            True, False, False, post_header_lengths,
        )
        event = wrapper.event
        assert isinstance(event, TableMapEvent)
        columns = event.columns
        meta = event.optional_metadata
        json_text: frozenset[str] = frozenset()
        if self.mariadb and any(c.type == FIELD_TYPE.BLOB and c.character_set_name != "binary"
                                for c in columns):
            json_text = self.lookup(schema, name, "json")
        if self.mariadb and any(c.type in _OLD_TEMPORAL for c in columns):
            # MariaDB's pre-10.1 DATETIME(n)/TIME(n)/TIMESTAMP(n) format logs the same
            # type code as the whole-second one, with a different width: refuse it
            # rather than decode garbage.
            old = sorted(c.name for c in columns if c.type in _OLD_TEMPORAL
                         and c.name in self.lookup(schema, name, "fraction"))
            if old:
                raise SetupError(
                    f"{schema}.{name}: the column(s) {', '.join(old)} use MariaDB's old "
                    f"format for fractional seconds, which the binlog does not describe: "
                    f"rebuild the table with SET GLOBAL mysql56_temporal_format=ON (the "
                    f"default) and ALTER TABLE `{schema}`.`{name}` FORCE")
        names = []
        readers = []
        snippets = []
        for i, c in enumerate(columns):
            cname = c.name if c.name else f"UNKNOWN_COL{i}"
            names.append(cname)
            readers.append(reader_for(c, is_json_text=cname in json_text,
                                      where=f"{schema}.{name}.{cname}"))
            snippets.append(None if cname in json_text else inline_snippet(c))
        nulls = event.null_bitmask
        nullable = tuple(bool(nulls[i >> 3] >> (i & 7) & 1) for i in range(len(columns)))
        pk = list(meta.simple_primary_key_list or [])
        pk += [i for i in sorted(meta.primary_keys_with_prefix or {}) if i not in pk]
        return TableDef(schema=schema, name=name, col=col, names=tuple(names),
                        readers=tuple(readers), snippets=tuple(snippets), nullable=nullable,
                        primary_key=tuple(pk))
