"""The pgoutput decoder and the type converters, on hand-built messages."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest
from dbevents import RawJSON
from dbevents_source_postgres.pgoutput import (
    Begin,
    Column,
    Commit,
    DecodeError,
    Decoder,
    Delete,
    Insert,
    Message,
    Origin,
    Relation,
    Truncate,
    TypeMessage,
    Update,
    compile_row,
    format_lsn,
    parse_lsn,
)
from dbevents_source_postgres.types import (
    TypeInfo,
    TypeRegistry,
    parse_array,
    to_bytea,
    to_float,
    to_timestamp,
    to_timestamptz,
    to_timetz,
)

INT4, INT8, TEXT, JSONB, NUMERIC, TSTZ = 23, 20, 25, 3802, 1700, 1184


def s(text: str) -> bytes:
    return text.encode() + b"\0"


def relation_msg(oid: int, namespace: str, name: str, identity: str,
                 columns: list[tuple[str, int, bool]]) -> bytes:
    out = b"R" + struct.pack(">I", oid) + s(namespace) + s(name) + identity.encode()
    out += struct.pack(">H", len(columns))
    for col, type_oid, key in columns:
        out += bytes([1 if key else 0]) + s(col) + struct.pack(">Ii", type_oid, -1)
    return out


def tuple_data(*values: str | bytes | None) -> bytes:
    """str: text value; None: null; b"u": unchanged TOAST; other bytes: binary."""
    out = struct.pack(">H", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v == b"u":
            out += b"u"
        elif isinstance(v, bytes):
            out += b"b" + struct.pack(">I", len(v)) + v
        else:
            raw = v.encode()
            out += b"t" + struct.pack(">I", len(raw)) + raw
    return out


def pg_micros(t: datetime) -> int:
    return int((t - datetime(2000, 1, 1, tzinfo=UTC)).total_seconds() * 1_000_000)


@pytest.fixture
def decoder() -> Decoder:
    d = Decoder()
    d.decode(relation_msg(100, "public", "users", "d",
                          [("id", INT4, True), ("name", TEXT, False), ("tags", JSONB, False)]))
    return d


def test_lsns() -> None:
    assert format_lsn(0x16_B374D848) == "16/B374D848"
    assert parse_lsn("16/B374D848") == 0x16_B374D848
    assert parse_lsn(format_lsn(0)) == 0
    with pytest.raises(ValueError):
        parse_lsn("nonsense")


def test_begin_commit_origin(decoder: Decoder) -> None:
    when = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    begin = decoder.decode(b"B" + struct.pack(">QqI", 0x1_0000_0010, pg_micros(when), 42))
    assert begin == Begin(final_lsn=0x1_0000_0010, commit_time=when, xid=42)
    commit = decoder.decode(b"C" + struct.pack(">BQQq", 0, 0x1_0000_0010, 0x1_0000_0040,
                                               pg_micros(when)))
    assert commit == Commit(flags=0, commit_lsn=0x1_0000_0010, end_lsn=0x1_0000_0040,
                            commit_time=when)
    origin = decoder.decode(b"O" + struct.pack(">Q", 77) + s("upstream"))
    assert origin == Origin(lsn=77, name="upstream")


def test_relation_and_type_messages(decoder: Decoder) -> None:
    rel = decoder.relations[100]
    assert (rel.namespace, rel.name, rel.replica_identity) == ("public", "users", "d")
    assert rel.columns[0] == Column("id", INT4, -1, True)
    assert [c.key for c in rel.columns] == [True, False, False]
    typ = decoder.decode(b"Y" + struct.pack(">I", 16500) + s("public") + s("mood"))
    assert typ == TypeMessage(16500, "public", "mood")
    # pg_catalog is sent as an empty namespace.
    catalog = decoder.decode(relation_msg(101, "", "pg_thing", "n", []))
    assert isinstance(catalog, Relation) and catalog.namespace == "pg_catalog"


def test_insert_with_text_null_and_typed_values(decoder: Decoder) -> None:
    msg = decoder.decode(b"I" + struct.pack(">I", 100) + b"N"
                         + tuple_data("7", None, '{"a": [1]}'))
    assert isinstance(msg, Insert)
    assert msg.relation.name == "users"
    assert msg.new == {"id": 7, "name": None, "tags": RawJSON('{"a": [1]}')}
    oid, values = decoder.insert_values(b"I" + struct.pack(">I", 100) + b"N"
                                        + tuple_data("8", "ann", "[]"), 1)
    assert (oid, values) == (100, {"id": 8, "name": "ann", "tags": RawJSON("[]")})


def test_binary_values_come_as_bytes(decoder: Decoder) -> None:
    msg = decoder.decode(b"I" + struct.pack(">I", 100) + b"N"
                         + tuple_data("1", b"\x00\x01raw", None))
    assert isinstance(msg, Insert) and msg.new == {"id": 1, "name": b"\x00\x01raw", "tags": None}


def test_update_forms(decoder: Decoder) -> None:
    head = b"U" + struct.pack(">I", 100)
    plain = decoder.decode(head + b"N" + tuple_data("1", "a", b"u"))
    assert isinstance(plain, Update)
    assert (plain.old_kind, plain.old, plain.new) == (None, None, {"id": 1, "name": "a"})
    assert plain.unchanged == ("tags",)
    # 'K': the old key; the other columns of that tuple are sent as nulls.
    rekey = decoder.decode(head + b"K" + tuple_data("1", None, None) + b"N"
                           + tuple_data("2", "a", "{}"))
    assert isinstance(rekey, Update)
    assert (rekey.old_kind, rekey.old, rekey.new) == ("K", {"id": 1},
                                                      {"id": 2, "name": "a", "tags": RawJSON("{}")})
    full = decoder.decode(head + b"O" + tuple_data("1", "a", "{}") + b"N"
                          + tuple_data("1", "b", b"u"))
    assert isinstance(full, Update)
    assert full.old == {"id": 1, "name": "a", "tags": RawJSON("{}")}
    assert full.new == {"id": 1, "name": "b"} and full.unchanged == ("tags",)


def test_delete_forms(decoder: Decoder) -> None:
    head = b"D" + struct.pack(">I", 100)
    key = decoder.decode(head + b"K" + tuple_data("3", None, None))
    assert key == Delete(decoder.relations[100], "K", {"id": 3})
    full = decoder.decode(head + b"O" + tuple_data("3", "c", None))
    assert isinstance(full, Delete) and full.old == {"id": 3, "name": "c", "tags": None}


def test_truncate_and_message(decoder: Decoder) -> None:
    decoder.decode(relation_msg(200, "sales", "orders", "d", [("id", INT8, True)]))
    trunc = decoder.decode(b"T" + struct.pack(">IB", 2, 3) + struct.pack(">II", 100, 200))
    assert isinstance(trunc, Truncate)
    assert [r.name for r in trunc.relations] == ["users", "orders"]
    assert trunc.cascade and trunc.restart_identity
    msg = decoder.decode(b"M" + struct.pack(">BQ", 1, 99) + s("dbevents")
                         + struct.pack(">I", 3) + b"hey")
    assert msg == Message(True, 99, "dbevents", b"hey")


def test_a_relation_message_mid_stream_changes_the_shape(decoder: Decoder) -> None:
    decoder.decode(relation_msg(100, "public", "users", "f",
                                [("id", INT8, True), ("score", NUMERIC, True)]))
    msg = decoder.decode(b"I" + struct.pack(">I", 100) + b"N" + tuple_data("1", "2.50"))
    assert isinstance(msg, Insert) and msg.new == {"id": 1, "score": "2.50"}
    assert msg.relation.replica_identity == "f"


def test_malformed_messages(decoder: Decoder) -> None:
    with pytest.raises(DecodeError, match="unknown pgoutput message type 'Z'"):
        decoder.decode(b"Z")
    with pytest.raises(DecodeError, match="empty"):
        decoder.decode(b"")
    with pytest.raises(DecodeError, match="before its Relation"):
        decoder.decode(b"I" + struct.pack(">I", 999) + b"N" + tuple_data("1"))
    with pytest.raises(DecodeError, match="malformed 'B'"):
        decoder.decode(b"B" + b"\0\0")
    with pytest.raises(DecodeError, match="unknown tuple column kind 'x'"):
        decoder.decode(b"I" + struct.pack(">I", 100) + b"N" + struct.pack(">H", 3) + b"x")
    with pytest.raises(DecodeError, match="without a new tuple"):
        decoder.decode(b"I" + struct.pack(">I", 100) + b"X")


def test_generated_readers_handle_any_column_name() -> None:
    names = ('we"ird', "it's", "new\nline", "x")
    read = compile_row(names, (None, None, None, int))
    values, pos = read(b"..." + tuple_data("a", "b", None, "5"), 3) or ({}, 0)
    assert values == {'we"ird': "a", "it's": "b", "new\nline": None, "x": 5}
    assert pos == 3 + len(tuple_data("a", "b", None, "5"))
    # Anything but text and null: left to the generic loop.
    assert read(tuple_data("a", b"u", None, "5"), 0) is None
    assert read(tuple_data("a", "b"), 0) is None  # another column count


# -- types ---------------------------------------------------------------------------


def test_array_literals() -> None:
    assert parse_array("{}") == []
    assert parse_array("{1,2,NULL}") == ["1", "2", None]
    assert parse_array('{"a,b","c\\"d",NULL,"NULL"," x ","back\\\\slash"}') == \
        ["a,b", 'c"d', None, "NULL", " x ", "back\\slash"]
    assert parse_array("{{1,2},{3,4}}") == [["1", "2"], ["3", "4"]]
    assert parse_array("[0:1]={7,8}") == ["7", "8"]
    assert parse_array("{(0,0),(1,1);(2,2),(3,3)}", ";") == ["(0,0),(1,1)", "(2,2),(3,3)"]
    with pytest.raises(ValueError):
        parse_array('{"open')
    with pytest.raises(ValueError):
        parse_array("not an array")


def test_scalar_converters() -> None:
    assert to_float("1.5") == 1.5
    assert [to_float(t) for t in ("NaN", "Infinity", "-Infinity")] == \
        ["NaN", "Infinity", "-Infinity"]
    assert to_timestamp("2024-01-02 03:04:05") == "2024-01-02T03:04:05"
    assert to_timestamp("infinity") == "infinity"
    assert to_timestamptz("2024-01-02 03:04:05.5+00") == "2024-01-02T03:04:05.5+00:00"
    assert to_timestamptz("-infinity") == "-infinity"
    assert to_timestamptz("0044-03-15 12:00:00+00 BC") == "0044-03-15 12:00:00+00 BC"
    assert to_timestamptz("12345-01-01 00:00:00+00") == "12345-01-01T00:00:00+00:00"
    assert to_timetz("03:04:05-07") == "03:04:05-07:00"
    assert to_timetz("03:04:05+05:30") == "03:04:05+05:30"
    assert to_bytea("\\x00ff") == "AP8="
    assert to_bytea("a\\\\b\\001") == "YVxiAQ=="  # the escape format, should it appear


def test_inlined_converters_match_the_functions() -> None:
    converters = (to_float, to_timestamp, to_timestamptz)
    read = compile_row(("f", "ts", "tz"), converters)
    for texts in (("2.5", "2024-01-02 03:04:05", "2024-01-02 03:04:05+00"),
                  ("NaN", "infinity", "-infinity"),
                  ("-Infinity", "0001-01-01 00:00:00 BC", "0001-01-01 00:00:00+00 BC")):
        got = read(tuple_data(*texts), 0)
        assert got is not None
        assert list(got[0].values()) == [f(t) for f, t in zip(converters, texts, strict=True)]


def test_registry_learns_domains_arrays_and_enums() -> None:
    reg = TypeRegistry()
    assert reg.converter(INT4) is not None and reg.converter(TEXT) is None
    assert reg.unknown([INT4, 16500, 16501, 16502]) == {16500, 16501, 16502}
    missing = reg.learn([
        TypeInfo(16500, "e", "E", 0, 0),  # an enum
        TypeInfo(16501, "b", "A", 16500, 0),  # its array type
        TypeInfo(16502, "d", "N", 0, 16503),  # a domain over a type not looked up yet
    ])
    assert missing == {16503}
    assert reg.converter(16500) is None
    enum_array = reg.converter(16501)
    assert enum_array is not None and enum_array("{sad,happy}") == ["sad", "happy"]
    assert reg.converter(16502) is None  # text until its base type is known
    assert reg.learn([TypeInfo(16503, "d", "N", 0, INT8)]) == set()
    domain = reg.converter(16502)
    assert domain is not None and domain("12") == 12
    assert reg.unknown([16500, 16502, 16503]) == set()
