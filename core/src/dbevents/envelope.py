"""The CloudEvents envelope and the stable event id."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from dbevents.values import Change, Event, Trigger

# Fixed namespace: the same change and trigger give the same id on every machine.
NAMESPACE = uuid.UUID("6f1c1c0e-8a3f-5b7e-9d2a-3c4b5d6e7f80")


def event_id(database: str, change_key: str, trigger: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{database}\x00{change_key}\x00{trigger}"))


def iso_time(t: datetime) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2019-10-19T12:40:50.053Z."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    t = t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _default(value: Any) -> Any:
    # Sources should hand over JSON-ready values; this is a safety net for the
    # common Python types so one odd value never stops the pipeline.
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


_encoder = json.JSONEncoder(default=_default, ensure_ascii=False, separators=(",", ":"))


def dumps(obj: Any) -> bytes:
    return _encoder.encode(obj).encode("utf-8")


def payload(change: Change, id_: str, source_id: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "db": change.db_type,
        "col": change.table,
        "docId": change.doc_id,
        "doc": change.doc,
    }
    if change.extra:
        data.update(change.extra)
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
    return Event(
        id=id_,
        trigger=trigger.name,
        database=change.database,
        db_type=change.db_type,
        table=change.table,
        doc_id=change.doc_id,
        type=change.operation.event_type,
        payload=dumps(payload(change, id_, source_id)),
    )
