"""The values that flow through dbevents: frozen attrs classes, no behaviour."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

import attrs


class Operation(StrEnum):
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    TRUNCATE = "truncate"

    @property
    def event_type(self) -> str:
        return "DB_" + self.value.upper()


DEFAULT_OPERATIONS = frozenset({Operation.INSERT, Operation.UPDATE, Operation.DELETE})


class Status(StrEnum):
    PENDING = "pending"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    FAILED = "failed"


@attrs.frozen
class Position:
    """Where a source stands: an opaque string only the source understands.

    The store keeps it as the checkpoint; the source resumes from it after a restart.
    """

    value: str

    def __str__(self) -> str:
        return self.value


class RawJSON:
    """A JSON value exactly as the database wrote it (a json/jsonb column).

    Payloads embed ``text`` as it is, so numbers keep every digit and their
    spelling (12345678901234567.89, 1e400, -0): no float round trip, nothing
    turned into a string. ``value`` parses it for code that needs to look inside
    (numbers as ``Decimal``).
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    @property
    def value(self) -> Any:
        return json.loads(self.text, parse_float=Decimal, parse_constant=Decimal)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RawJSON) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"RawJSON({self.text!r})"


@attrs.frozen
class Change:
    """One row change as a source read it, before matching.

    ``key`` identifies the change uniquely and stably within its source (for
    example the commit LSN and the change's index in its transaction): replaying
    the same change must yield the same key, because event ids derive from it.
    """

    database: str  # the name of the [databases.NAME] section it came from
    db_type: str  # data.db: "sql-postgres", "sql-mysql", "mongodb", ...
    table: str  # data.col
    operation: Operation
    key: str
    time: datetime  # commit time, timezone-aware
    doc_id: str | None = None
    doc: Mapping[str, Any] | None = None
    # Further documented keys a source adds to `data` (e.g. "old").
    extra: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ChangeBatch:
    """Changes in commit order and, when the batch ends on a safe resume point,
    the position to checkpoint once they are stored.

    A batch inside a large transaction carries ``checkpoint=None``: its events
    can be stored early, but the position may only move at the commit.
    """

    changes: tuple[Change, ...]
    checkpoint: Position | None = None


@attrs.frozen
class Trigger:
    name: str
    url: str
    source: str = "database"
    databases: frozenset[str] | None = None  # None: every database
    tables: frozenset[str] | None = None  # None: every table / collection
    operations: frozenset[Operation] = DEFAULT_OPERATIONS
    retries: int = 3
    timeout: int = 5000  # milliseconds per attempt
    concurrency: int = 16  # deliveries of this trigger in flight at once
    # Retry n waits about base * factor**(n-1) ms, capped at backoff_max, +-25%
    # jitter: by default 1 s, 10 s, 60 s, a schedule that outlasts a short outage.
    backoff_base: int = 1000  # milliseconds
    backoff_max: int = 60000  # milliseconds; also caps a Retry-After
    backoff_factor: float = 10.0
    # Endpoint health: this many failed attempts in a row (receiver down: no
    # answer, 5xx, timeout), of at least two events, pause the trigger; 0: never.
    pause_after: int = 5
    probe_max: int = 10000  # milliseconds: the longest wait between two probes
    sink: str = "webhook"
    # Options owned by the sink and by matcher plugins, already validated.
    sink_options: Any = None
    matcher_options: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def max_attempts(self) -> int:
        return 1 + self.retries


@attrs.frozen
class Event:
    """One (change x matching trigger), as stored in the eventing DB."""

    id: str
    trigger: str
    database: str
    db_type: str
    table: str
    doc_id: str | None
    type: str  # DB_INSERT, ...
    payload: bytes  # the CloudEvents JSON, built once by the core
    status: Status = Status.PENDING
    attempts: int = 0
    seq: int = 0  # store-assigned enqueue order
    next_attempt_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    last_error: str | None = None


@attrs.frozen
class Outcome:
    """What one delivery attempt of one event came to, as the sink saw it."""

    ok: bool
    started_at: datetime
    duration_ms: float
    status_code: int | None = None
    response_body: str | None = None
    error: str | None = None  # "timeout", "connection refused: ...", "HTTP 500", ...
    retry_after: float | None = None  # seconds the receiver asked us to wait
    give_up: bool = False  # the sink knows retrying is pointless
    request_headers: Mapping[str, str] = attrs.field(factory=dict)  # masked
    batch_size: int = 1
    # Set when one request carried several events (a batch): the same id on each
    # of them, so the request body can be rebuilt from their payloads.
    request_id: str | None = None


@attrs.frozen
class Attempt:
    """One row of the invocation log."""

    event_id: str
    number: int
    started_at: datetime
    duration_ms: float
    ok: bool
    status_code: int | None = None
    response_body: str | None = None
    error: str | None = None
    request_headers: Mapping[str, str] = attrs.field(factory=dict)
    batch_size: int = 1
    # The request body is not stored twice: it is the event's own payload, or,
    # for a batch, the JSON array of the payloads of the events whose attempts
    # share ``request_id``, in ``batch_index`` order (see request_body()).
    request_id: str | None = None
    batch_index: int = 0


@attrs.frozen
class Finish:
    """The dispatcher's verdict on an event after an attempt."""

    event_id: str
    attempt: Attempt
    status: Status  # DELIVERED, FAILED, or PENDING (retry at next_attempt_at)
    next_attempt_at: datetime | None = None
