"""Converting between the core's values and SQLite rows."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from dbevents.masking import MASK, is_secret_header
from dbevents.values import Attempt, Event, Status

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

# Response bodies are kept up to this many bytes (UTF-8) in the invocation log;
# a longer one keeps its first 64 KiB and ends with TRUNCATED_MARK.
MAX_BODY = 64 * 1024
TRUNCATED_MARK = "\n[dbevents: truncated, {size} bytes in all]"

EVENT_COLUMNS = ("seq, id, trigger_name, database_name, db_type, table_name, doc_id, "
                 "event_type, status, attempts, next_attempt_at, created_at, updated_at, "
                 "last_error, payload")
ATTEMPT_COLUMNS = ("a.number, a.started_at, a.duration_ms, a.ok, a.status_code, "
                   "a.response_body, a.error, a.request_headers, a.batch_size, "
                   "a.request_id, a.batch_index")

ACTIVE = (Status.PENDING, Status.DELIVERING)
_STATUS = {s.value: s for s in Status}  # a dict lookup is cheaper than Status(value)


def to_us(moment: datetime) -> int:
    """Microseconds since the epoch; a naive datetime is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // _US


def from_us(us: int | None) -> datetime | None:
    return None if us is None else _from_us(us)


# Events enqueued together share their times, so a claim converts few distinct values.
@functools.lru_cache(maxsize=4096)
def _from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def now_us() -> int:
    return to_us(datetime.now(UTC))


def event_from_row(row: tuple[Any, ...]) -> Event:
    (seq, id_, trigger, database, db_type, table, doc_id, type_, status, attempts,
     next_attempt_at, created_at, updated_at, last_error, payload) = row
    return Event(id=id_, trigger=trigger, database=database, db_type=db_type, table=table,
                 doc_id=doc_id, type=type_, payload=bytes(payload), status=_STATUS[status],
                 attempts=attempts, seq=seq, next_attempt_at=from_us(next_attempt_at),
                 created_at=from_us(created_at), updated_at=from_us(updated_at),
                 last_error=last_error)


def attempt_from_row(event_id: str, row: tuple[Any, ...]) -> Attempt:
    (number, started_at, duration_ms, ok, status_code, body, error, headers,
     batch_size, request_id, batch_index) = row
    started = from_us(started_at)
    assert started is not None
    return Attempt(event_id=event_id, number=number, started_at=started,
                   duration_ms=duration_ms, ok=bool(ok), status_code=status_code,
                   response_body=body, error=error, request_headers=json.loads(headers),
                   batch_size=batch_size, request_id=request_id, batch_index=batch_index)


Encoded = tuple[dict[int, str], dict[int, str | None], dict[int, str | None]]


def encoded() -> Encoded:
    """What attempt_row already encoded, by object: headers, bodies, errors."""
    return {}, {}, {}


def attempt_row(seq: int | str, attempt: Attempt,
                done: Encoded | None = None) -> tuple[Any, ...]:
    """The attempts table's row (``seq``: the event's, or its id where the
    statement looks the seq up). ``done`` (one per transaction) keeps what was
    already encoded: the events of one request share its Outcome's headers,
    response body and error objects, so a batch of 100 encodes them once (each
    object stays alive, and so keeps its id, while the caller holds the results)."""
    headers_done, bodies_done, errors_done = done if done is not None else encoded()
    headers, body, error = attempt.request_headers, attempt.response_body, attempt.error
    headers_text = headers_done.get(id(headers))
    if headers_text is None:
        headers_text = headers_done[id(headers)] = headers_json(headers)
    if body is not None:
        if id(body) not in bodies_done:
            bodies_done[id(body)] = truncate_body(body)
        body = bodies_done[id(body)]
    if error is not None:
        if id(error) not in errors_done:
            errors_done[id(error)] = clean_text(error)
        error = errors_done[id(error)]
    return (seq, attempt.number, to_us(attempt.started_at), float(attempt.duration_ms),
            int(attempt.ok), attempt.status_code, error, headers_text, attempt.batch_size,
            body, attempt.request_id, attempt.batch_index)


def headers_json(headers: Mapping[str, str]) -> str:
    # Sinks mask secrets already; masking again keeps them off disk whatever a
    # third-party sink does.
    if not headers:
        return "{}"
    return json.dumps({k: MASK if _secret(k) else v for k, v in headers.items()},
                      separators=(",", ":"))


# The same few header names come with every attempt.
_secret = functools.lru_cache(maxsize=4096)(is_secret_header)


def truncate_body(body: str | None) -> str | None:
    if body is None:
        return None
    # "replace": a lone surrogate would make the insert, and so every retry of
    # the finish, fail.
    raw = body.encode("utf-8", "replace")
    if len(raw) <= MAX_BODY:
        return raw.decode("utf-8")
    # "ignore" drops a character cut in half at the boundary.
    return raw[:MAX_BODY].decode("utf-8", "ignore") + TRUNCATED_MARK.format(size=len(raw))


def clean_text(text: str | None) -> str | None:
    return None if text is None else text.encode("utf-8", "replace").decode("utf-8")
