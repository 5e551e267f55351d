"""The shapes plugins fill in: sources, stores, sinks and matchers.

A plugin class may declare ``Options``: an attrs class whose fields are the
config keys it adds (database keys for a source, trigger keys for a sink or a
matcher). The core validates those keys against it and hands the plugin an
instance, so plugins never parse raw TOML.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import attrs

from dbevents.values import (
    Attempt,
    Change,
    ChangeBatch,
    Event,
    Finish,
    Outcome,
    Position,
    Status,
    Trigger,
)


@attrs.frozen
class SourceSettings:
    name: str  # the [databases.NAME] key
    url: str
    options: Any  # an instance of the source's Options class (or None)
    # Tables some trigger needs; None when a trigger watches every table.
    tables: frozenset[str] | None = None
    # Operations some trigger needs (a source may skip reading the others).
    operations: frozenset[str] = frozenset()
    config_dir: Path = Path(".")


@runtime_checkable
class Source(Protocol):
    """Reads changes from one database, in commit order."""

    db_type: ClassVar[str]  # the `data.db` value, e.g. "sql-postgres"
    # Optional: the operations this source can emit (read with getattr; a source
    # without it is taken to emit all of them). A trigger asking a source for one
    # it cannot emit is a config error rather than a trigger that never fires.

    def __init__(self, settings: SourceSettings) -> None: ...

    async def start(self) -> None:
        """Connect and run the startup checks. Raise SetupError with the fix."""

    def changes(self, since: Position | None) -> AsyncIterator[ChangeBatch]:
        """Yield batches from ``since`` (the store's checkpoint) on, for ever.

        Reconnecting after a dropped connection is the source's job; it raises
        SourceUnavailable only when it gives up for now.
        """
        ...

    async def confirm(self, position: Position) -> None:
        """Everything up to ``position`` is durable in the store: the database may
        forget it (flush LSN, resume token...)."""

    async def close(self) -> None: ...

    async def status(self) -> Mapping[str, Any]:
        """Optional facts for `dbevents status`, e.g. {"lag_bytes": 123}."""
        ...

    # Optional (read with getattr): ``async def initial_position() -> Position |
    # None``, for a source whose start without a checkpoint depends on when it is
    # asked ("the end of the binlog now"). The engine stores it as the first
    # checkpoint before it reports running, so no change made from then on can
    # fall before a later "now". None: the start does not depend on the time.


@attrs.frozen
class StoreSettings:
    url: str
    config_dir: Path = Path(".")
    # "worker": this process captures and delivers; "admin": a CLI command looking
    # at the log while a worker may be running.
    role: str = "worker"


@attrs.frozen
class EventFilter:
    status: Status | None = None
    trigger: str | None = None
    database: str | None = None
    limit: int = 100
    # The events one batch request carried, in their order in it.
    request_id: str | None = None


@attrs.frozen
class TriggerStats:
    trigger: str
    pending: int = 0
    delivering: int = 0
    delivered: int = 0
    failed: int = 0


@runtime_checkable
class Store(Protocol):
    """The eventing DB: event log, invocation log, checkpoints, and the durable
    queue. What this process just stored it delivers from memory (enqueue_held);
    the queue side (claim, next_due) serves only what is not in memory: events
    from before a restart, retries that come due, redeliveries, expired leases,
    work other workers share."""

    def __init__(self, settings: StoreSettings) -> None: ...

    async def open(self) -> None:
        """Connect, create or migrate the schema. Raise SetupError on a store that
        cannot be used (unreachable, read-only, corrupt, newer schema)."""

    async def close(self) -> None: ...

    async def instance_id(self) -> str:
        """This installation's id (the CloudEvents `source`), created once."""
        ...

    async def checkpoint(self, source: str) -> Position | None: ...

    async def enqueue(self, events: Sequence[Event], checkpoints: Mapping[str, Position]) -> int:
        """Store events and move checkpoints in ONE transaction. Events whose id
        is already stored are skipped. Returns how many were new."""
        ...

    async def enqueue_held(self, events: Sequence[Event], checkpoints: Mapping[str, Position],
                           lease_seconds: float) -> list[Event]:
        """``enqueue``, and in the same transaction hold the new events for this
        process to deliver from memory: stored delivering, leased to this worker
        for ``lease_seconds`` as a claim would. Returns the held events as stored
        (``seq`` set, delivering), oldest first.

        Not held, and not returned: an event already stored (a replay after a
        crash keeps whatever state the store has; a claim picks it up when due),
        and a new event of a row with an earlier active event that is pending or
        held by another worker: it is stored pending behind that event. So an
        event is held only when every earlier active event of its row is held by
        this process too, and the dispatcher can keep the row's order in memory.
        """
        ...

    async def renew(self, event_ids: Sequence[str], lease_seconds: float) -> list[str]:
        """Extend this worker's leases on ``event_ids`` to ``lease_seconds`` from
        now (events waiting in memory behind a slow receiver). Returns the ids it
        no longer holds (finished, or taken over by another worker)."""
        ...

    async def claim(
        self, limits: Mapping[str, int], lease_seconds: float, now: datetime
    ) -> list[Event]:
        """Hand out due events, at most ``limits[trigger]`` per trigger, marking
        them delivering with a lease, oldest first.

        Per-row order: an event is not handed out while an earlier event of the
        same trigger and row is pending or delivering. Expired leases count as due.
        """
        ...

    async def finish(self, results: Sequence[Finish]) -> None:
        """Record attempts and new statuses, in one transaction."""

    async def release(self, event_ids: Sequence[str]) -> None:
        """Give this worker's claims back unattempted (on shutdown): pending
        again, due now. Claims another worker holds are left alone."""

    async def next_due(self) -> datetime | None:
        """When the next claim could hand something out: the earliest due time of
        an event that is first in its row, or a lease expiry (None: nothing)."""
        ...

    def subscribe(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` (on the event loop) when another process enqueued or
        redelivered work. A store that cannot tell may do nothing."""

    # The log, for the CLI.
    async def list_events(self, flt: EventFilter) -> list[Event]: ...
    async def get_event(self, event_id: str) -> Event | None: ...
    async def attempts(self, event_id: str) -> list[Attempt]: ...
    async def redeliver(
        self, ids: Sequence[str] | None, status: Status | None, trigger: str | None
    ) -> int: ...
    async def purge(self, before: datetime, statuses: Sequence[Status]) -> int:
        """Delete events last updated before ``before`` whose status is in
        ``statuses`` (only delivered and failed are ever purged), with their
        attempts. Returns how many events went."""
        ...
    async def stats(self) -> list[TriggerStats]: ...
    async def checkpoints(self) -> dict[str, Position]: ...


@runtime_checkable
class Sink(Protocol):
    """Delivers events. One instance serves every trigger that names it."""

    def __init__(self) -> None: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def batch_size(self, trigger: Trigger) -> int:
        """How many events of ``trigger`` one delivery may carry."""
        ...

    async def deliver(self, trigger: Trigger, events: Sequence[Event]) -> Sequence[Outcome]:
        """Try once; one Outcome per event, in order. Never raises for a failed
        delivery: a failure is an Outcome with ok=False."""
        ...


@runtime_checkable
class Matcher(Protocol):
    """Adds trigger keys that narrow which changes match (e.g. a row filter).

    ``Options`` names the keys; ``matches`` is called only for triggers that set
    at least one of them, after the core's databases/tables/operations test.
    """

    def matches(self, change: Change, options: Any) -> bool: ...


__all__ = [
    "ChangeBatch",
    "EventFilter",
    "Matcher",
    "Sink",
    "Source",
    "SourceSettings",
    "Store",
    "StoreSettings",
    "TriggerStats",
]
