"""Every documented type, through a real server: insert, update and delete
payloads, REPLICA IDENTITY DEFAULT vs FULL, unchanged TOAST values, TRUNCATE."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import psycopg
from dbevents import Operation, RawJSON
from dbevents.envelope import dumps

if TYPE_CHECKING:
    from plugins.sources.postgres.tests.conftest import PgEnv

SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
CREATE TABLE everything (
    id bigint PRIMARY KEY,
    i2 smallint, i4 integer, i8 bigint,
    num numeric(30, 9), num_nan numeric,
    f4 real, f8 double precision, f8_nan double precision, f8_inf double precision,
    f8_ninf double precision,
    flag boolean,
    txt text, vc varchar(10), ch char(5),
    u uuid,
    d date, d_inf date,
    t time, ttz timetz, ttz_half timetz,
    ts timestamp, ts_inf timestamp, ts_bc timestamp, tstz timestamptz,
    iv interval, iv_neg interval,
    js json, jsb jsonb,
    ints integer[], texts text[], grid integer[], lower_bound integer[],
    nums numeric[], stamps timestamptz[], docs jsonb[], flags boolean[], floats float8[],
    blobs bytea[],
    bin bytea,
    feeling mood, feelings mood[],
    pos positive,
    addr inet, pt point,
    "Odd ""name"", too" text
);
"""

ROW = """
INSERT INTO everything VALUES (
    1,
    32767, -2147483648, 9223372036854775807,
    '12345678901234567890.123456789', 'NaN',
    0.1, 1.5, 'NaN', 'Infinity', '-Infinity',
    true,
    E'h\\u00e9llo "quoted", \\\\ back\\nslash', 'varchar', 'ab',
    'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11',
    '2024-02-29', 'infinity',
    '13:14:15.5', '13:14:15+02', '13:14:15+05:30',
    '2024-02-29 13:14:15.123456', '-infinity', '0044-03-15 12:00:00 BC',
    '2024-02-29 13:14:15.5+02',
    '1 year 2 months 3 days 04:05:06.5', '-1 day',
    '{"a": [1, 2.5, null], "b": "x"}', '{"nested": {"k": true}}',
    '{1,2,NULL}', ARRAY['a,b', 'c"d', NULL, 'NULL', ' lead', 'back\\slash', '{}'],
    '{{1,2},{3,4}}', '[0:1]={7,8}',
    '{1.50,NaN}', ARRAY['2024-01-01 00:00:00+00'::timestamptz],
    ARRAY['{"k": 1}'::jsonb, '[]'::jsonb], '{t,f}', '{1.5,NaN,-Infinity}',
    ARRAY['\\x01ff'::bytea],
    '\\x00ff10',
    'happy', '{sad,happy}',
    7,
    '192.168.0.1/24', '(1,2)',
    'odd'
)
"""

EXPECTED: dict[str, Any] = {
    "id": 1,
    "i2": 32767, "i4": -2147483648, "i8": 9223372036854775807,
    "num": "12345678901234567890.123456789", "num_nan": "NaN",
    "f4": 0.1, "f8": 1.5, "f8_nan": "NaN", "f8_inf": "Infinity", "f8_ninf": "-Infinity",
    "flag": True,
    "txt": 'h\u00e9llo "quoted", \\ back\nslash', "vc": "varchar", "ch": "ab   ",
    "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "d": "2024-02-29", "d_inf": "infinity",
    "t": "13:14:15.5", "ttz": "13:14:15+02:00", "ttz_half": "13:14:15+05:30",
    "ts": "2024-02-29T13:14:15.123456", "ts_inf": "-infinity",
    "ts_bc": "0044-03-15 12:00:00 BC",
    "tstz": "2024-02-29T11:14:15.5+00:00",
    "iv": "P1Y2M3DT4H5M6.5S", "iv_neg": "P-1D",
    # json keeps the text as written; jsonb as the server normalizes it.
    "js": RawJSON('{"a": [1, 2.5, null], "b": "x"}'), "jsb": RawJSON('{"nested": {"k": true}}'),
    "ints": [1, 2, None],
    "texts": ["a,b", 'c"d', None, "NULL", " lead", "back\\slash", "{}"],
    "grid": [[1, 2], [3, 4]], "lower_bound": [7, 8],
    "nums": ["1.50", "NaN"], "stamps": ["2024-01-01T00:00:00+00:00"],
    "docs": [RawJSON('{"k": 1}'), RawJSON("[]")], "flags": [True, False],
    "floats": [1.5, "NaN", "-Infinity"],
    "blobs": [base64.b64encode(b"\x01\xff").decode()],
    "bin": base64.b64encode(b"\x00\xff\x10").decode(),
    "feeling": "happy", "feelings": ["sad", "happy"],
    "pos": 7,
    "addr": "192.168.0.1/24", "pt": "(1,2)",
    'Odd "name", too': "odd",
}


async def test_every_type_on_insert_update_delete(pg: PgEnv) -> None:
    pg.execute(SCHEMA)
    source = await pg.started(tables=["everything"])
    pg.execute(ROW)
    pg.execute("INSERT INTO everything (id) VALUES (2)")  # every other column NULL
    pg.execute("UPDATE everything SET txt = 'changed', i4 = 5 WHERE id = 1")
    pg.execute("DELETE FROM everything WHERE id = 1")
    changes = await pg.reader(source).until(4)

    insert, nulls, update, delete = changes
    assert insert.operation is Operation.INSERT
    assert insert.table == "everything" and insert.db_type == "sql-postgres"
    assert insert.database == pg.dbname
    assert insert.doc == EXPECTED
    assert insert.doc_id == "1"
    assert insert.extra == {}
    assert nulls.doc == {name: (2 if name == "id" else None) for name in EXPECTED}

    assert update.operation is Operation.UPDATE
    assert update.doc == {**EXPECTED, "txt": "changed", "i4": 5}
    assert update.extra == {}  # DEFAULT identity, key unchanged: no old row
    assert delete.operation is Operation.DELETE
    assert delete.doc == {"id": 1}  # DEFAULT identity: the key only
    assert delete.extra == {}  # the seed's delete payload: the old row is the doc
    assert delete.doc_id == "1"
    # The commit timestamps, timezone-aware and in commit order.
    assert all(c.time.tzinfo is not None for c in changes)
    assert [c.time for c in changes] == sorted(c.time for c in changes)


async def test_every_type_in_old_rows_with_replica_identity_full(pg: PgEnv) -> None:
    """The old row of an update and the deleted row come from the WAL's old tuple,
    not from the new one: every type must decode there too, NULLs included."""
    pg.execute(SCHEMA)
    pg.execute("ALTER TABLE everything REPLICA IDENTITY FULL")
    source = await pg.started(tables=["everything"])
    pg.execute(ROW)
    pg.execute("INSERT INTO everything (id) VALUES (2)")
    pg.execute("UPDATE everything SET txt = 'changed', i4 = 5 WHERE id = 1")
    pg.execute("UPDATE everything SET vc = 'set' WHERE id = 2")
    pg.execute("DELETE FROM everything WHERE id = 1")
    pg.execute("DELETE FROM everything WHERE id = 2")
    changes = await pg.reader(source).until(6)

    nulls = {name: (2 if name == "id" else None) for name in EXPECTED}
    _, _, update, update_nulls, delete, delete_nulls = changes
    assert update.operation is Operation.UPDATE
    assert update.doc == {**EXPECTED, "txt": "changed", "i4": 5}
    assert update.extra == {"old": EXPECTED}
    assert update_nulls.doc == {**nulls, "vc": "set"}
    assert update_nulls.extra == {"old": nulls}
    assert delete.operation is Operation.DELETE and delete.doc_id == "1"
    assert delete.doc == {**EXPECTED, "txt": "changed", "i4": 5}
    assert delete.extra == {}
    assert delete_nulls.doc == {**nulls, "vc": "set"} and delete_nulls.doc_id == "2"


async def test_time_is_the_commit_timestamp(pg: PgEnv) -> None:
    """Bounded by the server's clock just before COMMIT and just after it; the
    transaction's start (and its statements') lie well before the lower bound."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    source = await pg.started(tables=["t"])
    with psycopg.connect(pg.url, autocommit=True) as conn:
        with conn.transaction():
            started = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
            conn.execute("INSERT INTO t VALUES (1)")
            conn.execute("INSERT INTO t VALUES (2)")
            conn.execute("SELECT pg_sleep(0.3)")
            before = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        after = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
    changes = await pg.reader(source).until(2)
    assert before - started >= timedelta(seconds=0.3)
    for change in changes:
        assert before <= change.time <= after, (before, change.time, after)
    assert changes[0].time == changes[1].time  # one commit, one time


async def test_replica_identity_full_gives_old_rows(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE acct (id int PRIMARY KEY, owner text, balance numeric)")
    pg.execute("ALTER TABLE acct REPLICA IDENTITY FULL")
    source = await pg.started(tables=["acct"])
    pg.execute("INSERT INTO acct VALUES (1, 'ada', 10.50)")
    pg.execute("UPDATE acct SET balance = 20 WHERE id = 1")
    pg.execute("UPDATE acct SET id = 2 WHERE id = 1")
    pg.execute("DELETE FROM acct WHERE id = 2")
    _, update, rekey, delete = await pg.reader(source).until(4)
    assert update.doc == {"id": 1, "owner": "ada", "balance": "20"}
    assert update.extra == {"old": {"id": 1, "owner": "ada", "balance": "10.50"}}
    assert rekey.doc_id == "2"
    assert rekey.extra == {"old": {"id": 1, "owner": "ada", "balance": "20"}}
    assert delete.doc == {"id": 2, "owner": "ada", "balance": "20"}
    assert delete.extra == {}
    assert delete.doc_id == "2"


async def test_replica_identity_default_gives_the_old_key_when_it_changes(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE acct (id int PRIMARY KEY, owner text)")
    source = await pg.started(tables=["acct"])
    pg.execute("INSERT INTO acct VALUES (1, 'ada')")
    pg.execute("UPDATE acct SET id = 2 WHERE id = 1")
    _, rekey = await pg.reader(source).until(2)
    assert rekey.doc == {"id": 2, "owner": "ada"}
    assert rekey.extra == {"old": {"id": 1}}
    assert rekey.doc_id == "2"


async def test_unchanged_toast_values_are_left_out_and_listed(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE docs (id int PRIMARY KEY, title text, body text)")
    pg.execute("ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL")  # always TOASTed
    pg.execute("CREATE TABLE full_docs (id int PRIMARY KEY, title text, body text)")
    pg.execute("ALTER TABLE full_docs ALTER COLUMN body SET STORAGE EXTERNAL")
    pg.execute("ALTER TABLE full_docs REPLICA IDENTITY FULL")
    source = await pg.started(tables=["docs", "full_docs"])
    body = "x" * 20000
    for table in ("docs", "full_docs"):
        pg.execute(f"INSERT INTO {table} VALUES (1, 'draft', %s)", (body,))
        pg.execute(f"UPDATE {table} SET title = 'final' WHERE id = 1")
    ins, upd, full_ins, full_upd = await pg.reader(source).until(4)
    assert ins.doc == {"id": 1, "title": "draft", "body": body}
    # pgoutput does not send a TOASTed value an update left alone: no placeholder.
    assert upd.doc == {"id": 1, "title": "final"}
    assert upd.extra == {"unchanged": ["body"]}
    # With REPLICA IDENTITY FULL the old row carries it, so the new row is whole.
    assert full_upd.doc == {"id": 1, "title": "final", "body": body}
    assert "unchanged" not in full_upd.extra
    assert full_upd.extra["old"] == {"id": 1, "title": "draft", "body": body}
    assert full_ins.doc_id == "1"


async def test_composite_keys_schemas_and_tables_without_a_key(pg: PgEnv) -> None:
    pg.execute("CREATE SCHEMA sales")
    pg.execute("CREATE TABLE sales.lines (order_id int, line text, qty int,"
               " PRIMARY KEY (line, order_id))")  # key order differs from column order
    pg.execute("CREATE TABLE notes (body text)")  # no key at all
    pg.execute("ALTER TABLE notes REPLICA IDENTITY FULL")
    pg.execute("CREATE TABLE tagged (code text NOT NULL, v int)")
    pg.execute("CREATE UNIQUE INDEX tagged_code ON tagged (code)")
    pg.execute("ALTER TABLE tagged REPLICA IDENTITY USING INDEX tagged_code")
    source = await pg.started(tables=["sales.lines", "notes", "tagged"])
    pg.execute("INSERT INTO sales.lines VALUES (7, 'a,\"b\"', 2)")
    pg.execute("INSERT INTO notes VALUES ('hello')")
    pg.execute("INSERT INTO tagged VALUES ('X1', 1)")
    pg.execute("DELETE FROM tagged")
    line, note, tag, untag = await pg.reader(source).until(4)
    assert line.table == "sales.lines"
    assert line.doc_id == '["a,\\"b\\"",7]'  # a JSON array, in key order
    assert note.table == "notes" and note.doc_id is None
    assert tag.doc_id == "X1"  # the replica identity index stands in for the key
    assert untag.doc == {"code": "X1"} and untag.doc_id == "X1"


async def test_truncate_is_one_change_per_table(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE a (id int PRIMARY KEY)")
    pg.execute("CREATE TABLE b (id int PRIMARY KEY)")
    source = await pg.started(tables=["a", "b"])
    pg.execute("INSERT INTO a VALUES (1)")
    pg.execute("TRUNCATE a, b")
    insert, *truncates = await pg.reader(source).until(3)
    assert insert.operation is Operation.INSERT
    assert sorted(c.table for c in truncates) == ["a", "b"]
    assert all(c.operation is Operation.TRUNCATE and c.doc_id is None and c.doc is None
               for c in truncates)
    assert len({c.key for c in truncates}) == 2
    assert truncates[0].key.split(":")[0] == truncates[1].key.split(":")[0]


async def test_operations_no_trigger_needs_are_skipped_but_keep_their_index(
        pg: PgEnv) -> None:
    pg.execute("CREATE TABLE a (id int PRIMARY KEY)")
    source = await pg.started(tables=["a"], operations=["insert", "delete"])
    pg.execute("BEGIN; INSERT INTO a VALUES (1); UPDATE a SET id = 2; DELETE FROM a; COMMIT")
    pg.execute("TRUNCATE a")
    pg.execute("INSERT INTO a VALUES (3)")
    changes = await pg.reader(source).until(3)
    assert [c.operation for c in changes] == [Operation.INSERT, Operation.DELETE,
                                             Operation.INSERT]
    # The skipped update still counts: keys are the same whatever the triggers.
    assert [c.key.split(":")[1] for c in changes] == ["0", "2", "0"]


async def test_schema_changes_mid_stream(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE evolving (id int PRIMARY KEY, a text)")
    source = await pg.started(tables=["evolving"])
    pg.execute("INSERT INTO evolving VALUES (1, 'one')")
    pg.execute("ALTER TABLE evolving ADD COLUMN b jsonb, ALTER COLUMN a TYPE int USING 7")
    pg.execute("""INSERT INTO evolving VALUES (2, 8, '{"x": 1}')""")
    pg.execute("ALTER TABLE evolving DROP COLUMN b")
    pg.execute("INSERT INTO evolving VALUES (3, 9)")
    first, second, third = await pg.reader(source).until(3)
    assert first.doc == {"id": 1, "a": "one"}
    assert second.doc == {"id": 2, "a": 8, "b": RawJSON('{"x": 1}')}
    assert third.doc == {"id": 3, "a": 9}


async def test_partitioned_tables_come_under_their_own_name(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE events (id int, day date, PRIMARY KEY (id, day))"
               " PARTITION BY RANGE (day)")
    pg.execute("CREATE TABLE events_2024 PARTITION OF events"
               " FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    source = await pg.started(tables=["events"])
    pg.execute("INSERT INTO events VALUES (1, '2024-05-06')")
    [change] = await pg.reader(source).until(1)
    assert change.table == "events" and change.doc_id == '[1,"2024-05-06"]'


async def test_json_numbers_arrive_exactly_as_the_server_wrote_them(pg: PgEnv) -> None:
    """No float round trip: every digit, 1e400 and -0 kept, no number a string."""
    pg.execute("CREATE TABLE m (id int PRIMARY KEY, j json, jb jsonb, arr jsonb[])")
    source = await pg.started(tables=["m"])
    pg.execute("""INSERT INTO m VALUES (1,
        '{"amount": 12345678901234567.89, "rate": 0.30000000000000001}',
        '{"n": 1e400, "z": -0, "big": 123456789012345678901234567890}',
        ARRAY['{"x": 0.1000000000000000055511151231257827}'::jsonb])""")
    (change,) = await pg.reader(source).until(1)
    server_text = pg.execute("SELECT j::text, jb::text, arr[1]::text FROM m")[0]

    body = json.loads(dumps(change.doc), parse_float=Decimal, parse_int=Decimal)
    assert dumps(change.doc["j"]).decode() == server_text[0]  # json: the text as written
    assert dumps(change.doc["jb"]).decode() == server_text[1]  # jsonb: as the server prints it
    assert dumps(change.doc["arr"]).decode() == f"[{server_text[2]}]"
    assert body["j"] == {"amount": Decimal("12345678901234567.89"),
                         "rate": Decimal("0.30000000000000001")}
    assert body["jb"]["n"] == Decimal("1e400") and body["jb"]["z"] == 0
    assert body["jb"]["big"] == Decimal("123456789012345678901234567890")
    assert body["arr"] == [{"x": Decimal("0.1000000000000000055511151231257827")}]
    # The payload is strict JSON (no Infinity, no NaN) and nothing became a string.
    json.loads(dumps(change.doc), parse_constant=_refuse)


def _refuse(name: str) -> None:
    raise AssertionError(f"{name} in a payload")
