"""Column types to JSON: every type the source documents, read back from a real
binlog, plus the server's own rendering as an oracle for the packed formats."""

from __future__ import annotations

import base64
import json
import random
import struct
from decimal import Decimal
from typing import Any

import pytest
from dbevents import Operation, RawJSON, SetupError
from dbevents.envelope import dumps
from dbevents_source_mysql.convert import float32, jsonable, reader_for
from pymysqlreplication.column import Column
from pymysqlreplication.constants import FIELD_TYPE

TYPES = """
CREATE TABLE t (
  id INT PRIMARY KEY,
  ti TINYINT, tiu TINYINT UNSIGNED, si SMALLINT, siu SMALLINT UNSIGNED,
  mi MEDIUMINT, miu MEDIUMINT UNSIGNED, i INT, iu INT UNSIGNED,
  bi BIGINT, biu BIGINT UNSIGNED,
  dec1 DECIMAL(10,2), dec2 DECIMAL(65,30), dec0 DECIMAL(5,0),
  f FLOAT, d DOUBLE,
  c CHAR(10), vc VARCHAR(300), tx TEXT, ltx LONGTEXT,
  dt DATE, dtm DATETIME, dtm6 DATETIME(6), dtm1 DATETIME(1),
  ts TIMESTAMP(6) NULL, ts0 TIMESTAMP NULL,
  tm TIME, tm2 TIME(2), tm6 TIME(6),
  y YEAR,
  j JSON,
  e ENUM('small','medium','large'),
  st SET('a','b','c'),
  b1 BIT(1), b10 BIT(10), b64 BIT(64),
  bl BLOB, bn BINARY(4), vb VARBINARY(20)
)"""

COLUMNS = ("id, ti, tiu, si, siu, mi, miu, i, iu, bi, biu, dec1, dec2, dec0, f, d, c, vc, tx, "
           "ltx, dt, dtm, dtm6, dtm1, ts, ts0, tm, tm2, tm6, y, j, e, st, b1, b10, b64, bl, "
           "bn, vb")

MAXED = (
    "(1, 127, 255, 32767, 65535, 8388607, 16777215, 2147483647, 4294967295, "
    "9223372036854775807, 18446744073709551615, 12345678.90, "
    "'12345678901234567890123456789012345.123456789012345678901234567890', 99999, "
    "1.1, 3.141592653589793, 'héllo', 'emoji 😀 ok', 'text 𝄞 ∑', REPEAT('x', 70000), "
    "'2024-02-29', '2024-01-31 23:59:59', '2024-01-31 23:59:59.123456', "
    "'1999-12-31 00:00:00.5', '2024-06-01 12:00:00.000001', '2038-01-19 05:14:07', "
    "'838:59:59', '-12:34:56.78', '-00:00:00.000001', 2155, "
    "'{\"k\": [1, 2.5, \"x\", null, true], \"n\": {\"s\": \"😀\"}}', 'medium', 'a,c', "
    "b'1', b'1000000001', 0xFFFFFFFFFFFFFFFF, X'00FF10', X'0102', X'00')"
)
MINIMAL = (
    "(2, -128, 0, -32768, 0, -8388608, 0, -2147483648, 0, -9223372036854775808, 0, "
    "-0.05, '-0.000000000000000000000000000001', -7, -0.5, -1e-300, '', '', '', '', "
    "'1000-01-01', '1000-01-01 00:00:00', '9999-12-31 23:59:59.999999', "
    "'2000-01-01 00:00:00.0', '1970-01-01 02:00:01', '1970-01-01 02:00:01', "
    "'-838:59:59', '00:00:00', '00:00:00.000000', 1901, '[]', 'small', '', b'0', b'0', "
    "0, '', X'', '')"
)

EXPECTED_MAXED: dict[str, Any] = {
    "id": 1, "ti": 127, "tiu": 255, "si": 32767, "siu": 65535, "mi": 8388607,
    "miu": 16777215, "i": 2147483647, "iu": 4294967295, "bi": 9223372036854775807,
    "biu": 18446744073709551615, "dec1": "12345678.90",
    "dec2": "12345678901234567890123456789012345.123456789012345678901234567890",
    "dec0": "99999", "f": 1.1, "d": 3.141592653589793, "c": "héllo", "vc": "emoji 😀 ok",
    "tx": "text 𝄞 ∑", "ltx": "x" * 70000, "dt": "2024-02-29", "dtm": "2024-01-31T23:59:59",
    "dtm6": "2024-01-31T23:59:59.123456", "dtm1": "1999-12-31T00:00:00.5",
    # Written at time_zone '+02:00': TIMESTAMP arrives in UTC.
    "ts": "2024-06-01T10:00:00.000001Z", "ts0": "2038-01-19T03:14:07Z",
    "tm": "838:59:59", "tm2": "-12:34:56.78", "tm6": "-00:00:00.000001", "y": 2155,
    "j": RawJSON('{"k": [1, 2.5, "x", null, true], "n": {"s": "😀"}}'), "e": "medium",
    "st": ["a", "c"],
    "b1": 1, "b10": 513, "b64": 18446744073709551615,
    "bl": base64.b64encode(b"\x00\xff\x10").decode(),
    "bn": base64.b64encode(b"\x01\x02\x00\x00").decode(),  # BINARY(4) keeps its padding
    "vb": base64.b64encode(b"\x00").decode(),
}
EXPECTED_MINIMAL: dict[str, Any] = {
    "id": 2, "ti": -128, "tiu": 0, "si": -32768, "siu": 0, "mi": -8388608, "miu": 0,
    "i": -2147483648, "iu": 0, "bi": -9223372036854775808, "biu": 0, "dec1": "-0.05",
    "dec2": "-0.000000000000000000000000000001", "dec0": "-7", "f": -0.5, "d": -1e-300,
    "c": "", "vc": "", "tx": "", "ltx": "", "dt": "1000-01-01", "dtm": "1000-01-01T00:00:00",
    "dtm6": "9999-12-31T23:59:59.999999", "dtm1": "2000-01-01T00:00:00.0",
    "ts": "1970-01-01T00:00:01.000000Z", "ts0": "1970-01-01T00:00:01Z",
    "tm": "-838:59:59", "tm2": "00:00:00.00", "tm6": "00:00:00.000000", "y": 1901,
    "j": RawJSON("[]"),
    "e": "small", "st": [], "b1": 0, "b10": 0, "b64": 0, "bl": "", "bn": "AAAAAA==",
    "vb": "",
}


async def test_every_type_as_json(mysql_env: Any, reading: Any) -> None:
    mysql_env.execute(TYPES)
    r = await reading(mysql_env.make_source())
    conn = mysql_env.server.connect(mysql_env.database)
    try:
        with conn.cursor() as cur:
            cur.execute("SET time_zone = '+02:00'")
            cur.execute(f"INSERT INTO t ({COLUMNS}) VALUES {MAXED}, {MINIMAL}")
            cur.execute("INSERT INTO t (id) VALUES (3)")
    finally:
        conn.close()
    changes = [c for c in await r.wait_for(3) if c.table == "t"]
    assert [c.doc_id for c in changes] == ["1", "2", "3"]
    assert all(c.operation is Operation.INSERT for c in changes)
    assert dict(changes[0].doc or {}) == EXPECTED_MAXED
    assert dict(changes[1].doc or {}) == EXPECTED_MINIMAL
    assert dict(changes[2].doc or {}) == {name: (3 if name == "id" else None)
                                          for name in COLUMNS.split(", ")}
    # JSON-ready: the envelope's encoder needs no fallback, and numbers stay exact.
    for c in changes:
        text = json.dumps(c.doc, ensure_ascii=False, default=lambda v: json.loads(v.text))
        assert json.loads(dumps(c.doc)) == json.loads(text)
    assert '"biu":18446744073709551615' in dumps(changes[0].doc).decode()


async def test_json_numbers_arrive_exactly_as_written(mysql_env: Any, reading: Any) -> None:
    """MariaDB's JSON column is text: it reaches the payload as written, every digit
    and spelling kept (no float round trip, no number turned into a string)."""
    written = ('{"amount": 12345678901234567.89, "rate": 0.30000000000000001, '
               '"n": 1e400, "z": -0}')
    mysql_env.execute("CREATE TABLE m (id INT PRIMARY KEY, j JSON)")
    r = await reading(mysql_env.make_source())
    mysql_env.execute("INSERT INTO m VALUES (1, %s)", (written,))
    (change,) = [c for c in await r.wait_for(1) if c.table == "m"]
    assert dumps(change.doc).decode() == '{"id":1,"j":' + written + "}"
    assert change.doc["j"].value["amount"] == Decimal("12345678901234567.89")


def test_mysql_binary_json_decimal_stays_a_number() -> None:
    """A DECIMAL inside MySQL's binary JSON keeps every digit, as a number."""
    value = jsonable({"price": Decimal("12345678901234567.89"), "tiny": Decimal("-0")})
    assert dumps(value) == b'{"price":12345678901234567.89,"tiny":-0}'


async def test_every_type_in_updates_and_deletes(mysql_env: Any, reading: Any) -> None:
    """The row before an update and the deleted row are decoded from their own
    images in the rows events: every type must come out right there too."""
    mysql_env.execute(TYPES)
    mysql_env.execute("SET time_zone = '+02:00'")
    mysql_env.execute(f"INSERT INTO t ({COLUMNS}) VALUES {MAXED}, {MINIMAL}")
    mysql_env.execute("INSERT INTO t (id) VALUES (3)")
    mysql_env.execute("SET time_zone = '+00:00'")
    (file, offset, *_), = mysql_env.execute("SHOW MASTER STATUS")
    r = await reading(mysql_env.make_source(start=f"{file}:{offset}"))  # after the inserts
    mysql_env.execute("UPDATE t SET vc = 'changed' ORDER BY id")
    mysql_env.execute("DELETE FROM t ORDER BY id")
    changes = [c for c in await r.wait_for(6) if c.table == "t"]
    nulls = {name: (3 if name == "id" else None) for name in COLUMNS.split(", ")}
    before = [EXPECTED_MAXED, EXPECTED_MINIMAL, nulls]
    after = [{**row, "vc": "changed"} for row in before]
    assert [(c.operation, c.doc_id) for c in changes] == [
        *((Operation.UPDATE, str(i)) for i in (1, 2, 3)),
        *((Operation.DELETE, str(i)) for i in (1, 2, 3))]
    updates, deletes = changes[:3], changes[3:]
    assert [dict(c.doc or {}) for c in updates] == after
    assert [dict(c.extra) for c in updates] == [{"old": row} for row in before]
    assert [dict(c.doc or {}) for c in deletes] == after
    assert all(not c.extra for c in deletes)


async def test_packed_formats_match_the_servers_rendering(mysql_env: Any, reading: Any) -> None:
    """DECIMAL, TIME(n), DATETIME(n) and FLOAT, random values: what the source
    decodes from the binlog equals what the server prints for the same rows."""
    mysql_env.execute(
        "CREATE TABLE p (id INT PRIMARY KEY, d1 DECIMAL(30,10), d2 DECIMAL(9,9), "
        "d3 DECIMAL(18,0), t0 TIME, t3 TIME(3), t5 TIME(5), dt2 DATETIME(2), "
        "dt4 DATETIME(4), f FLOAT)")
    rnd = random.Random(7)
    rows = []
    for k in range(200):
        sign = rnd.choice(["", "-"])
        d1 = f"{sign}{rnd.randrange(10**20)}.{rnd.randrange(10**10):010d}"
        d2 = f"{rnd.choice(['', '-'])}0.{rnd.randrange(10**9):09d}"
        d3 = f"{rnd.choice(['', '-'])}{rnd.randrange(10**18)}"

        def t(fsp: int) -> str:
            frac = f".{rnd.randrange(10**fsp):0{fsp}d}" if fsp else ""
            return (f"{rnd.choice(['', '-'])}{rnd.randrange(839):02d}:{rnd.randrange(60):02d}:"
                    f"{rnd.randrange(60):02d}{frac}")

        def dt(fsp: int) -> str:
            return (f"{rnd.randrange(1000, 10000)}-{rnd.randrange(1, 13):02d}-"
                    f"{rnd.randrange(1, 29):02d} {rnd.randrange(24):02d}:{rnd.randrange(60):02d}:"
                    f"{rnd.randrange(60):02d}.{rnd.randrange(10**fsp):0{fsp}d}")

        f = struct.unpack("<f", struct.pack("<f", rnd.uniform(-1e6, 1e6)))[0]
        rows.append((k, d1, d2, d3, t(0), t(3), t(5), dt(2), dt(4), f))
    r = await reading(mysql_env.make_source())
    one = "(" + ", ".join(["%s"] * 10) + ")"
    mysql_env.execute("INSERT INTO p VALUES " + ", ".join([one] * len(rows)),
                      [v for row in rows for v in row])
    changes = await r.wait_for(200)
    shown = mysql_env.execute(
        "SELECT id, CAST(d1 AS CHAR), CAST(d2 AS CHAR), CAST(d3 AS CHAR), CAST(t0 AS CHAR), "
        "CAST(t3 AS CHAR), CAST(t5 AS CHAR), CAST(dt2 AS CHAR), CAST(dt4 AS CHAR) "
        "FROM p ORDER BY id")
    got = {c.doc["id"]: c.doc for c in changes if c.doc}
    assert len(got) == 200
    for row in shown:
        doc = got[row[0]]
        assert [doc["d1"], doc["d2"], doc["d3"]] == list(row[1:4])
        assert Decimal(doc["d1"]) == Decimal(rows[row[0]][1])
        assert [doc["t0"], doc["t3"], doc["t5"]] == list(row[4:7])
        assert [doc["dt2"], doc["dt4"]] == [v.replace(" ", "T") for v in row[7:9]]
        # FLOAT: the same 4-byte float, written as briefly as it can be.
        written = rows[row[0]][9]
        assert struct.pack("<f", doc["f"]) == struct.pack("<f", written)
        assert len(repr(doc["f"])) <= len(repr(written))


def _column(type_: int, **attrs: Any) -> Column:
    return Column(type=type_, name="c", unsigned=False, is_primary=False,
                  character_set_name=None, **attrs)


def test_mysql_binary_json() -> None:
    """MySQL 8 stores JSON in a binary format (MariaDB stores text): objects, arrays,
    strings and numbers arrive as JSON values with text keys."""
    # {"a": 1, "s": "x"}: small object, 2 members, inline INT16 and a STRING.
    body = (struct.pack("<HH", 2, 23)
            + struct.pack("<HH", 18, 1) + struct.pack("<HH", 19, 1)  # keys "a", "s"
            + bytes([0x05]) + struct.pack("<H", 1)                   # INT16 1, inline
            + bytes([0x0C]) + struct.pack("<H", 20)                  # STRING at 20
            + b"a" + b"s" + bytes([2]) + b"xy")
    raw = bytes([0x00]) + body
    read = reader_for(_column(FIELD_TYPE.JSON, length_size=4))
    value, end = read(struct.pack("<I", len(raw)) + raw, 0)
    assert value == {"a": 1, "s": "xy"}
    assert end == 4 + len(raw)
    # [true, null, 2.5]: small array with literals and a DOUBLE
    arr = (struct.pack("<HH", 3, 21) + bytes([0x04]) + struct.pack("<H", 1)
           + bytes([0x04]) + struct.pack("<H", 0) + bytes([0x0B]) + struct.pack("<H", 13)
           + struct.pack("<d", 2.5))
    raw = bytes([0x02]) + arr
    value, _ = read(struct.pack("<I", len(raw)) + raw, 0)
    assert value == [True, None, 2.5]


@pytest.mark.parametrize(("value", "expected"), [
    (1.1, 1.1), (-0.5, -0.5), (3.4028234663852886e38, 3.4028235e38), (1e-45, 1e-45),
    (16777217.0, 16777216.0), (0.1, 0.1),
])
def test_float_is_the_shortest_decimal_of_the_stored_float(value: float,
                                                            expected: float) -> None:
    raw = struct.pack("<f", value)
    assert float32(raw) == expected
    assert struct.pack("<f", float32(raw)) == raw


async def test_old_temporal_formats(private_env: Any, reading: Any) -> None:
    """Tables from before MySQL 5.6 / MariaDB 10.1 formats: whole-second DATETIME,
    TIME and TIMESTAMP decode; MariaDB's old fractional format is refused by name."""
    server = private_env.server
    server.execute("SET GLOBAL mysql56_temporal_format = OFF")
    try:
        private_env.execute("CREATE TABLE old0 (id INT PRIMARY KEY, d DATETIME, t TIME, "
                            "ts TIMESTAMP NULL)")
        private_env.execute("CREATE TABLE old3 (id INT PRIMARY KEY, d DATETIME(3))")
    finally:
        server.execute("SET GLOBAL mysql56_temporal_format = ON")
    r = await reading(private_env.make_source())
    private_env.execute("SET time_zone = '+00:00'")
    private_env.execute("INSERT INTO old0 VALUES (1, '2024-01-02 03:04:05', '-12:34:56', "
                        "'2024-01-02 03:04:05'), (2, '0000-00-00 00:00:00', '838:59:59', NULL)")
    changes = await r.wait_for(2)
    assert [c.doc for c in changes] == [
        {"id": 1, "d": "2024-01-02T03:04:05", "t": "-12:34:56", "ts": "2024-01-02T03:04:05Z"},
        {"id": 2, "d": None, "t": "838:59:59", "ts": None},
    ]
    private_env.execute("INSERT INTO old3 VALUES (1, '2024-01-02 03:04:05.678')")
    with pytest.raises(SetupError, match=r"old3: the column\(s\) d use MariaDB's old format"):
        await r.wait_for(3)
