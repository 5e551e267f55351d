"""A decoder for pgoutput, PostgreSQL's built-in logical decoding output plugin.

Protocol version 1 ("Logical Replication Message Formats" in the PostgreSQL
docs): Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate
and Message. The decoder keeps the relation cache the Insert/Update/Delete
messages refer to (a Relation message arrives before a relation's first change
in a session and again after its schema changed) and turns tuple data into
typed dicts with the converters of ``types``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import attrs
from dbevents.values import RawJSON

from dbevents_source_postgres.types import INLINE, Converter, TypeRegistry

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">BQQq")
_U64 = struct.Struct(">Q")
_COLUMN = struct.Struct(">Ii")
_TRUNCATE = struct.Struct(">IB")
_MESSAGE = struct.Struct(">BQ")

# Tuple data column kinds.
_TEXT, _NULL, _UNCHANGED, _BINARY = ord("t"), ord("n"), ord("u"), ord("b")


class DecodeError(ValueError):
    """The bytes are not a pgoutput message this decoder understands."""


def format_lsn(lsn: int) -> str:
    """An LSN as PostgreSQL writes it: '16/B374D848'."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, sep, lo = text.partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


def pg_time(micros: int) -> datetime:
    """Microseconds since 2000-01-01 UTC (the protocol's clock) to a datetime."""
    return PG_EPOCH + timedelta(microseconds=micros)


# -- messages ----------------------------------------------------------------------


@attrs.frozen
class Column:
    name: str
    type_oid: int
    type_modifier: int
    key: bool  # part of the replica identity


@attrs.frozen
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]


@attrs.frozen
class TypeMessage:
    oid: int
    namespace: str
    name: str


@attrs.frozen
class Begin:
    final_lsn: int  # the LSN of the commit record
    commit_time: datetime
    xid: int


@attrs.frozen
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int  # where the transaction's commit record ends: the resume point
    commit_time: datetime


@attrs.frozen
class Origin:
    lsn: int
    name: str


# Row messages are the hot path: mutable attrs classes build fastest.
# A row is a dict: column name -> value. Columns whose TOASTed value was not sent
# (unchanged by an update) are absent from it and named in ``unchanged``. A value
# sent in binary format (only with the ``binary`` option) is the raw bytes.


@attrs.define
class Insert:
    relation: Relation
    new: dict[str, Any]


@attrs.define
class Update:
    relation: Relation
    # 'K': the old key (the key changed), 'O': the whole old row (REPLICA IDENTITY
    # FULL), None: no old row was sent.
    old_kind: str | None
    old: dict[str, Any] | None
    new: dict[str, Any]
    unchanged: tuple[str, ...] = ()


@attrs.define
class Delete:
    relation: Relation
    old_kind: str  # 'K' or 'O', as for Update
    old: dict[str, Any]


@attrs.frozen
class Truncate:
    relations: tuple[Relation, ...]
    cascade: bool
    restart_identity: bool


@attrs.frozen
class Message:
    """A pg_logical_emit_message() message (sent only with the messages option)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


PgMessage = (Begin | Commit | Origin | Relation | TypeMessage | Insert | Update | Delete
             | Truncate | Message)


# -- the decoder -------------------------------------------------------------------


RowReader = Callable[[bytes, int], "tuple[dict[str, Any], int] | None"]
InsertReader = Callable[[bytes, int], "dict[str, Any] | None"]


def compile_row(names: tuple[str, ...], converters: tuple[Converter | None, ...],
                label: str = "row", insert: bool = False) -> Callable[[bytes, int], Any]:
    """A straight-line reader for one relation's tuple data, generated once per
    Relation message (as attrs and dataclasses generate their methods): no loop,
    no per-column lookups, common conversions inlined (types.INLINE), the dict
    built in one go. It handles text and null columns and returns None on
    anything else (an unchanged TOAST value, binary format, a column count that
    differs), leaving that row to the generic loop.
    """
    n = len(names)
    lines = ["def read(buf, pos):"]
    if insert:
        # A whole Insert message body: relation OID, 'N', then the tuple.
        lines += ["    if buf[pos + 4] != 78:",
                  "        return None",
                  "    pos += 5"]
    lines += [f"    if buf[pos] * 256 + buf[pos + 1] != {n}:",
              "        return None",
              "    pos += 2"]
    namespace: dict[str, Any] = {"unpack": _U32.unpack_from, "RawJSON": RawJSON}
    for i, conv in enumerate(converters):
        value = [f"v{i} = buf[s:pos].decode()"]
        if conv is not None:
            namespace[f"c{i}"] = conv
            template = INLINE.get(conv)
            if template is None:
                value = [f"v{i} = c{i}(buf[s:pos].decode())"]
            elif "{t}" in template:
                value = ["t = buf[s:pos].decode()",
                         f"v{i} = " + template.format(t="t", b="buf[s:pos]", f=f"c{i}")]
            else:
                value = [f"v{i} = " + template.format(b="buf[s:pos]", f=f"c{i}")]
        lines += [
            "    if buf[pos] == 116:",  # 't'
            "        s = pos + 5",
            "        pos = s + unpack(buf, pos + 1)[0]",
            *(f"        {line}" for line in value),
            "    elif buf[pos] == 110:",  # 'n'
            "        pos += 1",
            f"        v{i} = None",
            "    else:",
            "        return None",
        ]
    row = "{" + ", ".join(f"{name!r}: v{i}" for i, name in enumerate(names)) + "}"
    lines.append(f"    return {row}" if insert else f"    return {row}, pos")
    exec(compile("\n".join(lines), f"<pgoutput {label}>", "exec"), namespace)
    return cast(Callable[[bytes, int], Any], namespace["read"])


class _Shape:
    """What decoding a relation's tuples needs, precomputed per Relation message."""

    __slots__ = ("columns", "insert", "key", "names", "read", "relation")

    def __init__(self, relation: Relation, converters: tuple[Converter | None, ...]) -> None:
        self.relation = relation
        self.names = tuple(c.name for c in relation.columns)
        self.key = tuple(c.key for c in relation.columns)
        self.columns = tuple(zip(self.names, converters, strict=True))
        label = f"{relation.namespace}.{relation.name}"
        self.read: RowReader = compile_row(self.names, converters, label)
        self.insert: InsertReader = compile_row(self.names, converters, label, insert=True)


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(0, pos)
    return buf[pos:end].decode(), end + 1


class Decoder:
    """Decodes one replication session's pgoutput messages, in order."""

    def __init__(self, types: TypeRegistry | None = None) -> None:
        self.types = types or TypeRegistry()
        self._shapes: dict[int, _Shape] = {}
        self._dispatch: dict[int, Callable[[bytes, int], PgMessage]] = {
            ord("B"): self._begin,
            ord("C"): self._commit,
            ord("O"): self._origin,
            ord("R"): self._relation,
            ord("Y"): self._type,
            ord("I"): self.insert,
            ord("U"): self.update,
            ord("D"): self.delete,
            ord("T"): self._truncate,
            ord("M"): self._message,
        }

    @property
    def relations(self) -> Mapping[int, Relation]:
        return {oid: s.relation for oid, s in self._shapes.items()}

    def decode(self, buf: bytes, pos: int = 0) -> PgMessage:
        """Decode the message starting at ``buf[pos]`` (its type byte)."""
        try:
            handler = self._dispatch[buf[pos]]
        except KeyError:
            raise DecodeError(f"unknown pgoutput message type {chr(buf[pos])!r}") from None
        except IndexError:
            raise DecodeError("empty pgoutput message") from None
        try:
            return handler(buf, pos + 1)
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, DecodeError):
                raise
            raise DecodeError(f"malformed {chr(buf[pos])!r} message: {exc}") from exc

    def refresh(self, oid: int) -> None:
        """Rebuild a relation's converters, e.g. after its types were looked up."""
        shape = self._shapes.get(oid)
        if shape is not None:
            self._add(shape.relation)

    def _add(self, relation: Relation) -> None:
        conv = tuple(self.types.converter(c.type_oid) for c in relation.columns)
        self._shapes[relation.oid] = _Shape(relation, conv)

    def _shape(self, oid: int) -> _Shape:
        try:
            return self._shapes[oid]
        except KeyError:
            raise DecodeError(f"change for relation {oid} before its Relation message") from None

    # -- transaction framing -----------------------------------------------------------
    # begin_fields() and commit_end() read what a consumer needs of every
    # transaction without building message objects (pos: the byte after the tag).

    @staticmethod
    def begin_fields(buf: bytes, pos: int) -> tuple[int, int]:
        """A Begin's final LSN and commit time (microseconds since 2000-01-01)."""
        final_lsn, ts, _ = _BEGIN.unpack_from(buf, pos)
        return final_lsn, ts

    @staticmethod
    def commit_end(buf: bytes, pos: int) -> int:
        """A Commit's end LSN."""
        return _COMMIT.unpack_from(buf, pos)[2]  # type: ignore[no-any-return]

    def _begin(self, buf: bytes, pos: int) -> Begin:
        final_lsn, ts, xid = _BEGIN.unpack_from(buf, pos)
        return Begin(final_lsn, pg_time(ts), xid)

    def _commit(self, buf: bytes, pos: int) -> Commit:
        flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(buf, pos)
        return Commit(flags, commit_lsn, end_lsn, pg_time(ts))

    def _origin(self, buf: bytes, pos: int) -> Origin:
        (lsn,) = _U64.unpack_from(buf, pos)
        name, _ = _string(buf, pos + 8)
        return Origin(lsn, name)

    # -- schema ------------------------------------------------------------------------
    def _relation(self, buf: bytes, pos: int) -> Relation:
        (oid,) = _U32.unpack_from(buf, pos)
        namespace, pos = _string(buf, pos + 4)
        name, pos = _string(buf, pos)
        identity = chr(buf[pos])
        (ncols,) = _U16.unpack_from(buf, pos + 1)
        pos += 3
        columns = []
        for _ in range(ncols):
            flags = buf[pos]
            colname, pos = _string(buf, pos + 1)
            type_oid, typmod = _COLUMN.unpack_from(buf, pos)
            pos += 8
            columns.append(Column(colname, type_oid, typmod, bool(flags & 1)))
        # pgoutput writes an empty namespace for pg_catalog.
        relation = Relation(oid, namespace or "pg_catalog", name, identity, tuple(columns))
        self._add(relation)
        return relation

    def _type(self, buf: bytes, pos: int) -> TypeMessage:
        (oid,) = _U32.unpack_from(buf, pos)
        namespace, pos = _string(buf, pos + 4)
        name, _ = _string(buf, pos)
        return TypeMessage(oid, namespace or "pg_catalog", name)

    # -- rows --------------------------------------------------------------------------
    # insert(), update() and delete() decode a message whose tag is known, from
    # the byte after the tag: the source calls them directly on its hot path.

    def _row(self, buf: bytes, pos: int, shape: _Shape) -> tuple[dict[str, Any], int]:
        """A whole row; an unchanged TOAST value ('u') is left out of it."""
        fast = shape.read(buf, pos)
        if fast is not None:
            return fast
        values: dict[str, Any] = {}
        pos += 2  # the column count: the relation's
        unpack = _U32.unpack_from
        for name, conv in shape.columns:
            kind = buf[pos]
            if kind == _TEXT:
                start = pos + 5
                pos = start + unpack(buf, pos + 1)[0]
                text = buf[start:pos].decode()
                values[name] = text if conv is None else conv(text)
            elif kind == _NULL:
                pos += 1
                values[name] = None
            elif kind == _UNCHANGED:
                pos += 1  # _row_unchanged tells which
            elif kind == _BINARY:
                start = pos + 5
                pos = start + unpack(buf, pos + 1)[0]
                values[name] = buf[start:pos]
            else:
                raise DecodeError(f"unknown tuple column kind {chr(kind)!r}")
        return values, pos

    def _row_unchanged(self, buf: bytes, pos: int, shape: _Shape
                       ) -> tuple[dict[str, Any], tuple[str, ...]]:
        values, _ = self._row(buf, pos, shape)
        if len(values) == len(shape.names):
            return values, ()
        # Some columns were left out: tell unchanged TOAST values ('u') apart.
        unchanged = []
        pos += 2
        for name in shape.names:
            kind = buf[pos]
            if kind in (_TEXT, _BINARY):
                pos += 5 + _U32.unpack_from(buf, pos + 1)[0]
            else:
                pos += 1
                if kind == _UNCHANGED:
                    unchanged.append(name)
        return values, tuple(unchanged)

    def _key(self, buf: bytes, pos: int, shape: _Shape) -> tuple[dict[str, Any], int]:
        """An old key ('K'): the replica identity columns; the others are sent as null."""
        values, pos = self._row(buf, pos, shape)
        return {n: values[n] for n, k in zip(shape.names, shape.key, strict=True)
                if k and n in values}, pos

    def insert_reader(self, oid: int) -> InsertReader:
        """For the hot path: the generated reader of one relation's Insert
        messages. Called like insert() it returns the new row, or None for a row
        it leaves to insert() (see compile_row)."""
        return self._shape(oid).insert

    def insert_values(self, buf: bytes, pos: int) -> tuple[int, dict[str, Any]]:
        """insert() without the message object: (relation OID, new row)."""
        (oid,) = _U32.unpack_from(buf, pos)
        shape = self._shapes.get(oid)
        if shape is not None and buf[pos + 4] == 0x4E:  # 'N'
            fast = shape.read(buf, pos + 5)
            if fast is not None:
                return oid, fast[0]
        return oid, self.insert(buf, pos).new

    def insert(self, buf: bytes, pos: int) -> Insert:
        (oid,) = _U32.unpack_from(buf, pos)
        shape = self._shapes.get(oid) or self._shape(oid)
        if buf[pos + 4] != 0x4E:  # 'N'
            raise DecodeError("Insert without a new tuple")
        return Insert(shape.relation, self._row(buf, pos + 5, shape)[0])

    def update(self, buf: bytes, pos: int) -> Update:
        (oid,) = _U32.unpack_from(buf, pos)
        shape = self._shapes.get(oid) or self._shape(oid)
        pos += 4
        kind = buf[pos]
        old = None
        old_kind = None
        if kind == 0x4B:  # 'K'
            old_kind = "K"
            old, pos = self._key(buf, pos + 1, shape)
            kind = buf[pos]
        elif kind == 0x4F:  # 'O'
            old_kind = "O"
            old, pos = self._row(buf, pos + 1, shape)
            kind = buf[pos]
        if kind != 0x4E:
            raise DecodeError(f"Update without a new tuple (got {chr(kind)!r})")
        new, unchanged = self._row_unchanged(buf, pos + 1, shape)
        return Update(shape.relation, old_kind, old, new, unchanged)

    def delete(self, buf: bytes, pos: int) -> Delete:
        (oid,) = _U32.unpack_from(buf, pos)
        shape = self._shapes.get(oid) or self._shape(oid)
        kind = buf[pos + 4]
        if kind == 0x4B:
            old, _ = self._key(buf, pos + 5, shape)
        elif kind == 0x4F:
            old, _ = self._row(buf, pos + 5, shape)
        else:
            raise DecodeError(f"Delete without an old tuple (got {chr(kind)!r})")
        return Delete(shape.relation, chr(kind), old)

    def _truncate(self, buf: bytes, pos: int) -> Truncate:
        count, options = _TRUNCATE.unpack_from(buf, pos)
        pos += 5
        relations = []
        for _ in range(count):
            (oid,) = _U32.unpack_from(buf, pos)
            pos += 4
            relations.append(self._shape(oid).relation)
        return Truncate(tuple(relations), bool(options & 1), bool(options & 2))

    def _message(self, buf: bytes, pos: int) -> Message:
        flags, lsn = _MESSAGE.unpack_from(buf, pos)
        prefix, pos = _string(buf, pos + 9)
        (size,) = _U32.unpack_from(buf, pos)
        return Message(bool(flags & 1), lsn, prefix, bytes(buf[pos + 4:pos + 4 + size]))
