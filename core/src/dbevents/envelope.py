"""The CloudEvents envelope and the stable event id."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, cast

import structlog

from dbevents.values import Attempt, Change, Event, Operation, RawJSON, Trigger

log = structlog.get_logger("dbevents.envelope")

# Fixed namespace: the same change and trigger give the same id on every machine.
NAMESPACE = uuid.UUID("6f1c1c0e-8a3f-5b7e-9d2a-3c4b5d6e7f80")


def event_id(database: str, change_key: str, trigger: str) -> str:
    """str(uuid.uuid5(NAMESPACE, ...)), without the UUID object in between (one
    per event): the same SHA-1 bytes, version and variant bits, spelling."""
    digest = bytearray(hashlib.sha1(
        _NAMESPACE_BYTES + f"{database}\x00{change_key}\x00{trigger}".encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_NAMESPACE_BYTES = NAMESPACE.bytes


def iso_time(t: datetime) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2019-10-19T12:40:50.053Z."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    elif t.tzinfo is not UTC:
        t = t.astimezone(UTC)
    # isoformat: "...50.053+00:00" (milliseconds truncated, as before).
    return t.isoformat(timespec="milliseconds")[:-6] + "Z"


# A RawJSON value is written as a placeholder string the encoder cannot produce
# from real data (it carries a per-process nonce), then replaced by the raw text:
# the stdlib encoder has no way to emit text as it is.
_NONCE = uuid.uuid4().hex
_raw = threading.local()
_PLACEHOLDER = re.compile(r'"\\u0000' + _NONCE + r'(\d+)\\u0000"')


def _default(value: Any) -> Any:
    # Sources should hand over JSON-ready values; this is a safety net for the
    # common Python types so one odd value never stops the pipeline.
    if isinstance(value, RawJSON):
        found: list[str] = _raw.found
        found.append(value.text)
        return f"\x00{_NONCE}{len(found) - 1}\x00"
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


_encoder = json.JSONEncoder(default=_default, ensure_ascii=False, allow_nan=False,
                            separators=(",", ":"))
_ascii_encoder = json.JSONEncoder(default=_default, ensure_ascii=True, allow_nan=False,
                                  separators=(",", ":"))


def dumps(obj: Any) -> bytes:
    """Valid JSON whatever the database handed over: strings that are not valid
    UTF-8 (lone surrogates from a json column's escapes) are written as JSON
    \\u escapes, and NaN/Infinity (not JSON) as the strings "NaN", "Infinity"."""
    return _dumps(obj)[0]


def _dumps(obj: Any) -> tuple[bytes, bool]:
    """dumps(), and whether it had to escape everything beyond ASCII."""
    _raw.found = found = cast(list[str], [])
    try:
        text = _encoder.encode(obj)
        if found:
            text = _PLACEHOLDER.sub(lambda m: found[int(m.group(1))], text)
        return text.encode("utf-8"), False
    except (UnicodeEncodeError, ValueError):
        found.clear()
        text = _ascii_encoder.encode(_finite(obj))
        if found:
            text = _PLACEHOLDER.sub(lambda m: _ascii(found[int(m.group(1))]), text)
        return text.encode("ascii"), True


def _ascii(raw: str) -> str:
    """JSON text with every non-ASCII character as a \\u escape (valid anywhere a
    JSON text may hold one: inside strings)."""
    def esc(m: re.Match[str]) -> str:
        code = ord(m.group(0))
        if code < 0x10000:
            return f"\\u{code:04x}"
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return re.sub(r"[^\x00-\x7f]", esc, raw)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _data(change: Change) -> dict[str, Any]:
    data: dict[str, Any] = {
        "db": change.db_type,
        "col": change.table,
        "docId": change.doc_id,
        "doc": change.doc,
    }
    if change.extra:
        data.update(change.extra)
    return data


def payload(change: Change, id_: str, source_id: str) -> dict[str, Any]:
    data = _data(change)
    return {
        "specversion": "1.0",
        "id": id_,
        "type": change.operation.event_type,
        "source": source_id,
        "time": iso_time(change.time),
        "data": data,
    }


def build_event(change: Change, trigger: Trigger, source_id: str) -> Event:
    id_ = event_id(change.database, change.key, trigger.name)
    try:
        body = _envelope(change, id_, source_id)
    except Exception as exc:
        # One row that cannot be encoded must not stop capture for good (the
        # replay would fail the same way): send the event without its row,
        # saying why, and log it.
        reason = f"{type(exc).__name__}: {exc}"
        log.error("row could not be encoded; sent without doc", event_id=id_,
                  database=change.database, table=change.table, doc_id=change.doc_id,
                  error=reason)
        broken = payload(change, id_, source_id)
        broken["data"] = {"db": change.db_type, "col": change.table, "docId": change.doc_id,
                          "doc": None, "error": f"the row could not be encoded: {reason}"}
        body = dumps(broken)
    type_ = _TYPES[change.operation][0]
    # Positional: the fields in their declared order (one Event per event).
    return Event(id_, trigger.name, change.database, change.db_type, change.table,
                 change.doc_id, type_, body)


# The envelope around `data` as dumps(payload(...)) writes it, byte for byte: its
# other members are ASCII (the source id aside, encoded once per source id), so
# only `data` is encoded per event.
_sources: dict[str, tuple[bytes, bytes]] = {}
_TYPES = {op: (op.event_type, op.event_type.encode()) for op in Operation}


def _envelope(change: Change, id_: str, source_id: str) -> bytes:
    data = _data(change)
    body, escaped = _dumps(data)
    source = _sources.get(source_id)
    if source is None:
        if len(_sources) > 64:
            _sources.clear()
        source = _sources[source_id] = (dumps(source_id), _ascii_encoder.encode(
            source_id).encode("ascii"))
    head = (b'{"specversion":"1.0","id":"' + id_.encode() + b'","type":"'
            + _TYPES[change.operation][1] + b'","source":' + source[escaped]
            + b',"time":"' + iso_time(change.time).encode() + b'","data":')
    return head + body + b"}"


def batch_body(payloads: Sequence[bytes]) -> bytes:
    """Several events in one request: a JSON array of their CloudEvents (the
    structured batch format, ``application/cloudevents-batch+json``)."""
    return b"[" + b",".join(payloads) + b"]"


def request_body(event: Event, attempt: Attempt, members: Sequence[Event]) -> bytes | None:
    """The exact body ``attempt`` of ``event`` sent: the event's payload, or for a
    batch the array of ``members`` (the events sharing its request id, in their
    order in it). None when some of them are no longer stored (purged)."""
    if attempt.request_id is None:
        return event.payload
    if len(members) != attempt.batch_size:
        return None
    return batch_body([m.payload for m in members])
