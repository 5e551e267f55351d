"""Converting between the core's values and PostgreSQL rows."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from dbevents.masking import mask_headers
from dbevents.values import Attempt, Event, Status

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
FINISHED = (Status.DELIVERED, Status.FAILED)
# The exact text of the partial indexes' WHERE, so the planner matches them.
ACTIVE_SQL = "status IN ('pending', 'delivering')"


def utc(moment: datetime | None) -> datetime | None:
    """Timestamps come back in the session's time zone; the core works in UTC."""
    return None if moment is None else moment.astimezone(UTC)


def event_from_row(row: tuple[Any, ...]) -> Event:
    (seq, id_, trigger, database, db_type, table, doc_id, type_, status, attempts,
     next_attempt_at, created_at, updated_at, last_error, payload) = row
    return Event(id=id_, trigger=trigger, database=database, db_type=db_type, table=table,
                 doc_id=doc_id, type=type_, payload=bytes(payload), status=Status(status),
                 attempts=attempts, seq=seq, next_attempt_at=utc(next_attempt_at),
                 created_at=utc(created_at), updated_at=utc(updated_at),
                 last_error=last_error)


def attempt_from_row(event_id: str, row: tuple[Any, ...]) -> Attempt:
    (number, started_at, duration_ms, ok, status_code, body, error, headers,
     batch_size, request_id, batch_index) = row
    return Attempt(event_id=event_id, number=number, started_at=started_at.astimezone(UTC),
                   duration_ms=duration_ms, ok=ok, status_code=status_code,
                   response_body=body, error=error, request_headers=dict(headers),
                   batch_size=batch_size,
                   request_id=request_id,
                   batch_index=batch_index)


def clean_headers(headers: Mapping[str, str]) -> dict[str, str | None]:
    # Sinks mask secrets already; masking again keeps them out of the database
    # whatever a third-party sink does.
    if not headers:
        return {}
    return {clean_text(k) or "": clean_text(str(v)) for k, v in mask_headers(headers).items()}


def truncate_body(body: str | None) -> str | None:
    if body is None:
        return None
    raw = clean_text(body).encode("utf-8")  # type: ignore[union-attr]
    if len(raw) <= MAX_BODY:
        return raw.decode("utf-8")
    # "ignore" drops a character cut in half at the boundary.
    return raw[:MAX_BODY].decode("utf-8", "ignore") + TRUNCATED_MARK.format(size=len(raw))


def clean_text(text: str | None) -> str | None:
    """Text PostgreSQL accepts: it has no NUL character and no lone surrogates.
    Either would fail the insert, and so every retry of it."""
    if text is None:
        return None
    if "\0" in text:
        text = text.replace("\0", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text
