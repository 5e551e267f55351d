"""BSON values -> JSON-ready Python values, one documented rule per type.

The rules (also in the README's type table):

========================  ==============================================================
BSON                      JSON
========================  ==============================================================
ObjectId                  its 24-hex string, ``"65f0c0ffee..."``
string, bool, null        as is
Int32, Int64              number
Double                    number; NaN, Infinity, -Infinity as the strings ``"NaN"``,
                          ``"Infinity"``, ``"-Infinity"`` (JSON has no such numbers)
Decimal128                string, exactly as stored: ``"1.10"``, ``"NaN"``
Date                      ISO 8601 in UTC with milliseconds, ``"2024-05-01T12:00:00.123Z"``;
                          a date outside Python's years 1-9999 as
                          ``{"$date": {"$numberLong": "<ms since epoch>"}}``
Binary subtype 4 (UUID)   the UUID string, ``"2f1c...-..."``
other Binary              base64 string (subtype 3, the legacy UUID, too: its byte
                          order depends on the driver that wrote it)
Timestamp                 ``{"t": seconds, "i": increment}``
Regular expression        ``{"$regex": pattern, "$options": "imsx"}``
MinKey / MaxKey           ``{"$minKey": 1}`` / ``{"$maxKey": 1}``
JavaScript code           ``{"$code": source}``, plus ``"$scope": {...}`` when it has one
DBRef                     ``{"$ref": collection, "$id": id, "$db": database}`` (``$db``
                          only when set; extra fields kept)
document, array           object, array, converted recursively
========================  ==============================================================
"""

from __future__ import annotations

import base64
import json
import math
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from bson import json_util
from bson.binary import Binary
from bson.code import Code
from bson.datetime_ms import DatetimeMS
from bson.dbref import DBRef
from bson.decimal128 import Decimal128
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.objectid import ObjectId
from bson.regex import Regex
from bson.timestamp import Timestamp

UUID_SUBTYPE = 4

# Python re flags -> the BSON option letters, in the order BSON requires.
_REGEX_FLAGS = ((re.IGNORECASE, "i"), (re.LOCALE, "l"), (re.MULTILINE, "m"),
                (re.DOTALL, "s"), (re.UNICODE, "u"), (re.VERBOSE, "x"))

_CANONICAL = json_util.CANONICAL_JSON_OPTIONS


def iso_utc(value: datetime) -> str:
    """ISO 8601 in UTC with milliseconds (BSON dates have millisecond precision)."""
    if value.tzinfo is None:  # pymongo without tz_aware hands out naive UTC
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _regex_options(flags: int | str) -> str:
    if isinstance(flags, str):
        return "".join(sorted(flags))
    return "".join(letter for flag, letter in _REGEX_FLAGS if flags & flag)


def to_json(value: Any) -> Any:
    """Convert one decoded BSON value (document, array or scalar) for JSON."""
    # Order matters: Code before str (a str subclass), bool before int, Binary
    # before bytes, the BSON classes before the generic mappings and sequences.
    if isinstance(value, Code):  # before str: Code is a str subclass
        out: dict[str, Any] = {"$code": str(value)}
        if value.scope is not None:
            out["$scope"] = to_json(value.scope)
        return out
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):  # Int64 is an int subclass
        return int(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, DatetimeMS):
        return {"$date": {"$numberLong": str(int(value))}}
    if isinstance(value, Decimal128):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Binary):  # before bytes: Binary is a bytes subclass
        if value.subtype == UUID_SUBTYPE and len(value) == 16:
            return str(value.as_uuid())
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Timestamp):
        return {"t": value.time, "i": value.inc}
    if isinstance(value, Regex):
        return {"$regex": value.pattern, "$options": _regex_options(value.flags)}
    if isinstance(value, MinKey):
        return {"$minKey": 1}
    if isinstance(value, MaxKey):
        return {"$maxKey": 1}
    if isinstance(value, DBRef):
        return to_json(value.as_doc())
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return _canonical_or_str(value)


def _canonical_or_str(value: Any) -> Any:
    # A type this table does not name: canonical extended JSON when bson knows
    # it, so nothing is silently lost; else its text.
    try:
        return json.loads(canonical(value))
    except (TypeError, ValueError):
        return str(value)


def doc_id(value: Any) -> str:
    """``_id`` as the event's ``docId`` string.

    ObjectId: its 24-hex form. String: as is. Number (Int32, Int64, Double,
    Decimal128): its decimal text. Anything else (a document, a UUID, a date...):
    canonical extended JSON, e.g. ``{"$binary": {"base64": "...", "subType": "04"}}``,
    so equal ids always give equal strings.
    """
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, Code):  # a str subclass that is not a plain string
        return canonical(value)
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float | Decimal128):
        return str(value)
    if isinstance(value, uuid.UUID):  # the same string as the Binary it came from
        return canonical(Binary.from_uuid(value))
    return canonical(value)


def canonical(value: Any) -> str:
    """Compact canonical extended JSON of any BSON value."""
    return json_util.dumps(value, json_options=_CANONICAL, separators=(",", ":"))
