"""The shapes plugins fill in: sources, stores, sinks and matchers.

A plugin class may declare ``Options``: an attrs class whose fields are the
config keys it adds (database keys for a source, trigger keys for a sink or a
matcher). The core validates those keys against it and hands the plugin an
instance, so plugins never parse raw TOML.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeVar, runtime_checkable

import attrs

from dbevents.values import (
    Attempt,
    Change,
    ChangeBatch,
    Event,
    Finish,
    Operation,
    Outcome,
    Position,
    Status,
    Trigger,
)

if TYPE_CHECKING:
    from dbevents.config import Config
    from dbevents.plugins import Plugins


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
    # Capture is coordinated by a lease in the store (several processes configured
    # for this database, one capturing at a time): a reader the source finds
    # still attached (a replication slot held by a previous holder that is still
    # going away) is waited for, not refused as a second configuration. Default
    # False: the source may refuse it at start().
    leased: bool = False
    # The store's checkpoint for this database, given to ``probe_status`` by the
    # callers that read the store (`dbevents status`, the admin metrics), so a
    # source whose reader position lives only in the store can measure its lag.
    checkpoint: Position | None = None
    # With ``leased``: True while this process holds the source's capture lease,
    # judged from its own clock and never later than the store would let the
    # lease run out (False once a pause outlasted it). A source reading for the
    # holder may then end a reader it finds attached, which can only be a
    # previous holder's, fenced by the store, instead of waiting for the
    # database to drop it. None: never end another reader.
    lease_held: Callable[[], bool] | None = None


@runtime_checkable
class Source(Protocol):
    """Reads changes from one database, in commit order."""

    db_type: ClassVar[str]  # the `data.db` value, e.g. "sql-postgres"
    # Optional capabilities (``Options``, ``operations``, ``probe_status``,
    # ``initial_position``) are declared below, each with its default.

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


# -- optional capabilities ------------------------------------------------------
# What the core reads from a plugin class beyond its protocol. Each is read only
# through the function here, which gives the default when a plugin leaves it out.

StatusProbe = Callable[[SourceSettings], Awaitable[Mapping[str, Any]]]
InitialPosition = Callable[[], Awaitable[Position | None]]
TargetValidator = Callable[[str, Any], None]


def options_class(plugin: object) -> type | None:
    """``Options``: an attrs class whose fields are the config keys the plugin
    adds (see the module docstring). Default: none, the plugin adds no keys."""
    cls = getattr(plugin, "Options", None)
    return cls if isinstance(cls, type) and attrs.has(cls) else None


_O = TypeVar("_O")


def sink_options(trigger: Trigger, cls: type[_O]) -> _O:
    """A trigger's sink options as the sink's ``Options`` instance: the parsed one
    from the config, the defaults when the trigger sets none, or built from a
    plain mapping (a Trigger made in code)."""
    opts = trigger.sink_options
    if opts is None:
        return cls()
    if isinstance(opts, cls):
        return opts
    if isinstance(opts, Mapping):
        return cls(**opts)
    raise TypeError(f"trigger {trigger.name!r}: sink_options is a {type(opts).__name__}, "
                    f"expected {cls.__name__}")


def source_operations(source: object) -> frozenset[Operation]:
    """``operations``: a class attribute, the frozenset of operations the source
    can emit. Default: all of them. A trigger asking a source for one it cannot
    emit is a config error rather than a trigger that never fires."""
    ops = getattr(source, "operations", None)
    return frozenset(Operation) if ops is None else frozenset(ops)


def status_probe(source: object) -> StatusProbe | None:
    """``probe_status``: an async classmethod ``probe_status(settings:
    SourceSettings) -> Mapping[str, Any]`` giving facts for `dbevents status`
    (e.g. {"lag_bytes": 123}). It runs in a separate process from the worker,
    without ``start()``: it connects for itself and must not consume changes.
    ``settings.config_dir`` is the config file's folder, against which relative
    paths in the URL resolve; ``settings.checkpoint`` is the store's checkpoint
    when the caller has read it (else None). Default: none; `dbevents status`
    then shows the checkpoint alone.

    Every fact is shown by `dbevents status`; these keys also feed metrics
    (see ``LAG_FACTS``)."""
    probe: StatusProbe | None = getattr(source, "probe_status", None)
    return probe


# The probe facts other plugins read (the admin plugin's lag metrics), by key:
LAG_FACTS = {
    "lag_bytes": "int: bytes of the database's log between the checkpoint (or the "
                 "position confirmed to the database) and the log's end",
    "caught_up": "bool: nothing committed in the database waits to be captured "
                 "(when absent, lag_bytes == 0 means caught up)",
    "lag_seconds": "float: how long the oldest change not yet captured has waited, "
                   "measured by the database's clock (when the source can tell it)",
}


def initial_position(source: object) -> InitialPosition | None:
    """``initial_position``: ``async def initial_position() -> Position | None`` on
    the instance, for a source whose start without a checkpoint depends on when
    it is asked ("the end of the binlog now"). The engine stores it as the first
    checkpoint before it reports running, so no change made from then on can fall
    before a later "now". Default: none, the start does not depend on the time."""
    found: InitialPosition | None = getattr(source, "initial_position", None)
    return found


def target_validator(sink: object) -> TargetValidator | None:
    """``validate_target``: a classmethod ``validate_target(url, options) -> None``
    on a sink, called when the config loads for every trigger using the sink, with
    the trigger's ``url`` and its ``Options`` instance (or None). It raises
    ValueError with a message saying what is wrong; the launcher reports it at
    ``triggers[N].url`` and exits 2. Default: none, any URL is accepted."""
    check: TargetValidator | None = getattr(sink, "validate_target", None)
    return check


# The trigger and database keys the core reads itself; a plugin's Options may not
# declare them.
TRIGGER_KEYS = ("name", "source", "databases", "tables", "operations", "url", "retries",
                "timeout", "concurrency", "backoff_base", "backoff_max", "backoff_factor",
                "pause_after", "probe_max", "sink")
DATABASE_KEYS = ("type", "url")

# Who opens a store: "worker", a process that captures and delivers; "admin", a CLI
# command looking at the log while a worker may be running (it must not take over
# a worker's claims or checkpoints).
StoreRole = Literal["worker", "admin"]
STORE_ROLES: tuple[StoreRole, ...] = ("worker", "admin")


@attrs.frozen
class StoreSettings:
    url: str
    config_dir: Path = Path(".")
    role: StoreRole = attrs.field(default="worker", validator=attrs.validators.in_(STORE_ROLES))


@attrs.frozen
class EventFilter:
    status: Status | None = None
    trigger: str | None = None
    database: str | None = None
    limit: int = 100
    # The events one batch request carried, in their order in it.
    request_id: str | None = None
    table: str | None = None
    doc_id: str | None = None
    # created_at within [since, until)
    since: datetime | None = None
    until: datetime | None = None
    # Paging, newest first: only events whose seq is below this one.
    before_seq: int | None = None


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
    async def purge(self, before: datetime, statuses: Sequence[Status],
                    trigger: str | None = None) -> int:
        """Delete events last updated before ``before`` whose status is in
        ``statuses`` (only delivered and failed are ever purged), of ``trigger``
        only when given, with their attempts. Returns how many events went."""
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

    Work that can be done once (compiling an expression) belongs in an attrs
    validator of ``Options``: it runs when the config loads, and a ValueError it
    raises is a config error at ``triggers[N].KEY`` naming the trigger (exit 2).
    ``matches`` should not raise; if it does, the change does not match that
    trigger and a warning names the trigger, the matcher and the error (at most
    one a minute per trigger and matcher, with the count of the others), so one
    odd row never stops capture.
    """

    def matches(self, change: Change, options: Any) -> bool: ...


# -- Optional: preflight, for `dbevents check --connect` --------------------------


@attrs.frozen
class Problem:
    """One thing to change before dbevents can use a database or the store: what
    is wrong and how to fix it, in one message (URLs masked)."""

    message: str


@runtime_checkable
class Preflight(Protocol):
    """Optional on a source or a store (read with getattr).

    ``preflight()`` runs every startup check ``start()`` / ``open()`` would, changes
    nothing (creates no slot, publication, schema or file; captures nothing) and
    returns every problem found at once, not only the first; an unreachable
    server is a problem too. An empty list: ready. Default, for a plugin without
    it: `check --connect` reports the part as not checked, and does not fail.
    """

    async def preflight(self) -> list[Problem]: ...


# -- Optional: event ids by prefix, for `dbevents events show 2b9f` -------------------


@runtime_checkable
class FindsEventIds(Protocol):
    """Optional on a store (read with getattr). Default, for a store without it:
    the CLI takes event ids whole."""

    async def find_event_ids(self, prefix: str, limit: int) -> list[str]:
        """Up to ``limit`` ids of stored events that start with ``prefix``, sorted."""
        ...
class ObserverContext(Protocol):
    """What an observer is handed when the engine makes it."""

    @property
    def config(self) -> Config: ...

    @property
    def plugins(self) -> Plugins: ...


# The moments an observer may define, in the order a change meets them.
OBSERVER_MOMENTS = ("captured", "stored", "attempted", "finished", "source_state")


@runtime_checkable
class Observer(Protocol):
    """Watches the engine of a `dbevents run` (e.g. to export metrics).

    Registered with ``register_observers``; the engine makes one instance per
    class, ``cls(context)``. Every moment is optional: define only those you
    want; one left out costs nothing. They are called synchronously on the
    engine's event loop, once per batch or per request (never per event), so
    they must be cheap and must not block: no I/O, no awaiting. One that raises
    is logged once and does not stop capture or delivery.

    An instance whose ``active`` attribute is False is dropped (e.g. a metrics
    observer whose service is not configured). Default: active.
    """

    def __init__(self, context: ObserverContext) -> None: ...

    def captured(self, database: str, changes: Sequence[Change], events: Sequence[Event],
                 lag_seconds: float) -> None:
        """Changes read from ``database`` and the events they matched, stored and
        confirmed; ``lag_seconds``: now minus the commit time of the last."""

    def stored(self, database: str, new_events: int, checkpoint: Position | None) -> None:
        """The batch is committed to the store: ``new_events`` were not there yet."""

    def attempted(self, trigger: Trigger, events: Sequence[Event],
                  outcomes: Sequence[Outcome]) -> None:
        """One attempt at delivering ``events`` (one outcome each; events of one
        request share theirs). ``dbevents.commit_time(event)`` is when the change
        behind an event was committed, for a commit-to-delivery latency."""

    def finished(self, trigger: Trigger, finishes: Sequence[Finish]) -> None:
        """The verdicts on those events: delivered, failed, or pending a retry."""

    def source_state(self, database: str, streaming: bool, error: str | None) -> None:
        """Capture from ``database`` started (streaming) or stopped (with why);
        the engine restarts it from the checkpoint after a backoff."""


def observer_active(observer: object) -> bool:
    """``active``: False drops the observer for this run. Default: True."""
    return bool(getattr(observer, "active", True))


# -- Optional: capture leases, for a warm standby ---------------------------------


@attrs.frozen
class CaptureLease:
    """Who holds the capture of a source, as the store has it."""

    source: str
    holder: str
    token: int
    expires_at: datetime
    live: bool  # expires_at is still ahead by the store's own clock


@runtime_checkable
class LeasesCapture(Protocol):
    """Optional on a store (read with getattr), shared by several processes.

    Several processes configured with one database take turns: the one holding
    a source's lease captures it, the others deliver and wait. Default, for a
    store without it (SQLite: one process): every process captures every
    source, as it always has.

    The fence: once ``acquire_capture`` returned a token for ``source``, every
    ``enqueue``/``enqueue_held`` of this store instance that moves ``source``'s
    checkpoint or stores its events checks, in the same transaction, that the
    lease still carries that token, and raises CaptureLost (storing nothing)
    when another holder took it over. Expiry alone does not fence: a lease that
    ran out with nobody taking it is still this holder's to write with.
    """

    async def acquire_capture(self, source: str, holder: str, ttl: float) -> int | None:
        """Take ``source``'s lease for ``ttl`` seconds when it is free, expired
        or already ``holder``'s: a fencing token larger than every earlier one.
        None while another holder's lease is live. Expiry is judged by the
        store's clock, so the workers' clocks do not matter."""
        ...

    async def renew_capture(self, source: str, holder: str, token: int, ttl: float) -> bool:
        """Move the lease's expiry to ``ttl`` seconds from now; False when the
        lease is no longer (``holder``, ``token``): capture must stop at once."""
        ...

    async def release_capture(self, source: str, holder: str, token: int) -> None:
        """Let the lease expire now (a clean shutdown), so a standby takes over
        at its next try instead of after ``ttl``. Tokens never go back."""

    async def capture_leases(self) -> list[CaptureLease]:
        """Every source's lease, for `dbevents status`."""
        ...


def capture_leasing(store: object) -> LeasesCapture | None:
    """The store's capture leases, or None: this process captures every source."""
    return store if isinstance(store, LeasesCapture) else None


# -- Optional: paused triggers, for `dbevents status` ------------------------------


@runtime_checkable
class PausesTriggers(Protocol):
    """Optional on a store (read with getattr). The dispatcher pauses a trigger
    whose receiver is down and records it here, so `dbevents status` in another
    process can show it. Default, for a store without it: the pause is only in
    the running process's log."""

    async def set_trigger_paused(self, trigger: str, since: datetime | None) -> None:
        """Record ``trigger`` as paused since ``since``; None: no longer paused."""

    async def paused_triggers(self) -> dict[str, datetime]:
        """Every trigger recorded as paused, with since when."""
        ...


def trigger_pauses(store: object) -> PausesTriggers | None:
    """The store's pause record, or None when it keeps none."""
    return store if isinstance(store, PausesTriggers) else None


# -- Optional: per-worker in-flight counts, for `dbevents status` -------------------


@runtime_checkable
class CountsInFlight(Protocol):
    """Optional on a store shared by several processes (read with getattr).
    Default, for a store without it: `dbevents status` shows no workers, and
    the engine names itself (its capture-lease holder) on its own."""

    # The name this store instance leases events under (``claim``,
    # ``enqueue_held``, ``renew``). The engine uses it as its capture-lease
    # holder too, so a process has one name wherever `dbevents status` shows it.
    worker_id: str

    async def in_flight(self) -> dict[str, int]:
        """Per worker name: how many events it holds leased now (delivering,
        the lease not run out by the store's clock). Workers holding none are
        left out."""
        ...


def in_flight_counts(store: object) -> CountsInFlight | None:
    """The store's per-worker in-flight counts, or None when it keeps none."""
    return store if isinstance(store, CountsInFlight) else None


class ServiceContext(Protocol):
    """What a service is handed: the open store, the config, the plugins."""

    @property
    def store(self) -> Store: ...

    @property
    def config(self) -> Config: ...

    @property
    def plugins(self) -> Plugins: ...

    def wake(self) -> None:
        """Tell this process's dispatcher that work is due (after a redeliver)."""

    def observer(self, name: str) -> Observer | None:
        """This process's instance of the observer registered as ``name``: how a
        service reads what its plugin's observer saw. None when it is not active
        or no engine runs here (`dbevents console`)."""


@runtime_checkable
class Service(Protocol):
    """Runs beside the engine (e.g. an HTTP server), configured by the top-level
    table of its registered name. ``Options`` (attrs) are that table's keys; the
    service runs only when the config has the table. ``start`` is called after
    the store opens (raise SetupError with the fix), ``close`` on shutdown."""

    def __init__(self, options: Any, context: ServiceContext) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


__all__ = [
    "DATABASE_KEYS",
    "LAG_FACTS",
    "OBSERVER_MOMENTS",
    "STORE_ROLES",
    "TRIGGER_KEYS",
    "CaptureLease",
    "ChangeBatch",
    "CountsInFlight",
    "EventFilter",
    "FindsEventIds",
    "LeasesCapture",
    "Matcher",
    "Observer",
    "ObserverContext",
    "PausesTriggers",
    "Preflight",
    "Problem",
    "Service",
    "ServiceContext",
    "Sink",
    "Source",
    "SourceSettings",
    "StatusProbe",
    "Store",
    "StoreRole",
    "StoreSettings",
    "TriggerStats",
    "capture_leasing",
    "in_flight_counts",
    "initial_position",
    "observer_active",
    "options_class",
    "source_operations",
    "status_probe",
    "target_validator",
]
