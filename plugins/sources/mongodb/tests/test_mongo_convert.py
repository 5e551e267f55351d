"""BSON -> JSON: every rule of the type table, directly and through the wire."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import bson
import pytest
from bson import (
    DBRef,
    Decimal128,
    Int64,
    MaxKey,
    MinKey,
    ObjectId,
    Regex,
    Timestamp,
)
from bson.binary import Binary
from bson.code import Code
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.datetime_ms import DatetimeMS
from dbevents import SourceSettings
from dbevents_source_mongodb import MongoOptions, MongoSource, doc_id, to_json
from dbevents_source_mongodb.convert import iso_utc
from mongo_fake import FakeReplicaSet, flat, next_batches

OID = ObjectId("65f0c0ffee0000000000abcd")
UID = uuid.UUID("2f1c9d4e-8a3b-4c5d-9e6f-0a1b2c3d4e5f")

# One document holding every type of the table, and what it must become.
SAMPLE: dict[str, Any] = {
    "_id": OID,
    "s": "text",
    "b": True,
    "null": None,
    "i32": 7,
    "i64": Int64(2**40),
    "f": 1.5,
    "nan": float("nan"),
    "inf": float("inf"),
    "ninf": float("-inf"),
    "dec": Decimal128("1.10"),
    "dec_nan": Decimal128("NaN"),
    "when": datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC),
    "uuid": Binary.from_uuid(UID),
    "bin": Binary(b"\x00\x01\xfe\xff", 0),
    "bin_custom": Binary(b"abc", 0x80),
    "ts": Timestamp(1714564800, 3),
    "re": Regex("^ada", "im"),
    "min": MinKey(),
    "max": MaxKey(),
    "code": Code("function () { return 1; }"),
    "code_scope": Code("function () { return x; }", {"x": 1}),
    "ref": DBRef("users", OID, "app"),
    "ref_local": DBRef("users", 5),
    "nested": {"a": [1, {"b": OID}], "empty": {}},
    "arr": [Int64(1), "two", [3.0]],
}
EXPECTED: dict[str, Any] = {
    "_id": "65f0c0ffee0000000000abcd",
    "s": "text",
    "b": True,
    "null": None,
    "i32": 7,
    "i64": 1099511627776,
    "f": 1.5,
    "nan": "NaN",
    "inf": "Infinity",
    "ninf": "-Infinity",
    "dec": "1.10",
    "dec_nan": "NaN",
    "when": "2024-05-01T12:00:00.123Z",
    "uuid": "2f1c9d4e-8a3b-4c5d-9e6f-0a1b2c3d4e5f",
    "bin": "AAH+/w==",
    "bin_custom": "YWJj",
    "ts": {"t": 1714564800, "i": 3},
    "re": {"$regex": "^ada", "$options": "im"},
    "min": {"$minKey": 1},
    "max": {"$maxKey": 1},
    "code": {"$code": "function () { return 1; }"},
    "code_scope": {"$code": "function () { return x; }", "$scope": {"x": 1}},
    "ref": {"$ref": "users", "$id": "65f0c0ffee0000000000abcd", "$db": "app"},
    "ref_local": {"$ref": "users", "$id": 5},
    "nested": {"a": [1, {"b": "65f0c0ffee0000000000abcd"}], "empty": {}},
    "arr": [1, "two", [3.0]],
}


def _strict_json(value: Any) -> Any:
    """What a receiver parses: standard JSON, no NaN literals."""
    return json.loads(json.dumps(value, allow_nan=False))


def test_every_type_of_the_table() -> None:
    assert _strict_json(to_json(SAMPLE)) == EXPECTED


def test_the_same_after_a_bson_round_trip_with_the_sources_codec() -> None:
    # The options the source's client decodes with.
    opts: CodecOptions[dict[str, Any]] = CodecOptions(
        tz_aware=True, datetime_conversion=DatetimeConversion.DATETIME_AUTO)
    decoded = bson.decode(bson.encode(SAMPLE), codec_options=opts)
    assert _strict_json(to_json(decoded)) == EXPECTED


def test_int64_stays_a_number() -> None:
    value = to_json(Int64(9007199254740993))
    assert value == 9007199254740993 and type(value) is int


def test_dates() -> None:
    assert to_json(datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))) == \
        "2024-05-01T12:00:00.000Z"
    assert to_json(datetime(2024, 5, 1, 12, 0)) == "2024-05-01T12:00:00.000Z"  # naive: UTC
    assert to_json(DatetimeMS(253402300800000 + 1000)) == \
        {"$date": {"$numberLong": "253402300801000"}}  # after 9999-12-31
    assert iso_utc(datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)) == \
        "1969-12-31T23:59:59.999Z"


def test_binary_and_uuid() -> None:
    assert to_json(UID) == str(UID)  # a client decoding UUIDs itself
    assert to_json(b"\x01\x02") == "AQI="
    # Legacy UUID (subtype 3): byte order is the writer's; base64 keeps it exact.
    legacy = Binary(UID.bytes, 3)
    assert to_json(legacy) == base64.b64encode(UID.bytes).decode()


def test_regex_flags() -> None:
    assert to_json(Regex("a.b", "smxi")) == {"$regex": "a.b", "$options": "imsx"}
    assert to_json(Regex("y")) == {"$regex": "y", "$options": ""}


def test_floats() -> None:
    assert to_json(-0.0) == 0.0
    assert to_json(1e308) == 1e308
    assert math.isnan(float(Decimal128("NaN").to_decimal()))
    assert to_json(Decimal128("-Infinity")) == "-Infinity"
    assert to_json(Decimal128("1E+400")) == "1E+400"


@pytest.mark.parametrize(("value", "expected"), [
    (OID, "65f0c0ffee0000000000abcd"),
    ("user-1", "user-1"),
    (42, "42"),
    (Int64(2**40), "1099511627776"),
    (1.5, "1.5"),
    (Decimal128("9.99"), "9.99"),
    (Binary.from_uuid(UID),
     f'{{"$binary":{{"base64":"{base64.b64encode(UID.bytes).decode()}","subType":"04"}}}}'),
    ({"region": "eu", "n": 1}, '{"region":"eu","n":{"$numberInt":"1"}}'),
    (datetime(2024, 5, 1, tzinfo=UTC), '{"$date":{"$numberLong":"1714521600000"}}'),
    (True, "true"),
])
def test_doc_id(value: Any, expected: str) -> None:
    assert doc_id(value) == expected


def test_doc_id_of_a_decoded_uuid_matches_its_binary() -> None:
    assert doc_id(UID) == doc_id(Binary.from_uuid(UID))


async def test_types_through_the_wire(fake: FakeReplicaSet) -> None:
    """Encoded by the scripted server, decoded by pymongo as the source configures it."""
    source = MongoSource(SourceSettings(name="shop", url=fake.url(), options=MongoOptions()))
    await source.start()
    try:
        it = source.changes(None).__aiter__()
        await asyncio.wait_for(it.__anext__(), 10)
        fake.insert(SAMPLE)
        [change] = flat(await next_batches(it, 1))
        await it.aclose()  # type: ignore[attr-defined]
    finally:
        await source.close()
    assert change.doc_id == "65f0c0ffee0000000000abcd"
    assert _strict_json(change.doc) == EXPECTED


def test_the_reset_hint_names_a_command_that_works_here(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dbevents_source_mongodb.checks import reset_hint

    monkeypatch.setenv("UV", "/usr/bin/uv")
    assert "run `uv run dbevents mongodb reset-token app`" in reset_hint("app")
    monkeypatch.delenv("UV")
    assert "run `dbevents mongodb reset-token app`" in reset_hint("app")
