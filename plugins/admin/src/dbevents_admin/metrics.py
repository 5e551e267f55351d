"""Metrics and readiness: an observer that counts what the engine does, in its
own prometheus-client registry, and the polled facts beside it (queue depth by
status from the store, replication lag from each source's status probe).

How far behind a source is, in seconds, is worked out when /metrics is read:
capture is known complete up to the later of the commit time of the last change
captured and the last moment the source's probe found it caught up; the lag is
now minus that, so it grows while capture is stuck, and it is 0 while the probe
finds nothing waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import structlog
from dbevents import Change, Event, Finish, Outcome, Position, Status, Trigger, commit_time
from dbevents.protocols import ObserverContext, ServiceContext, SourceSettings, status_probe
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.process_collector import ProcessCollector

log = structlog.get_logger("dbevents.admin")

PROBE_EVERY = 5.0  # seconds between source status probes (each opens a connection)
PROBE_TIMEOUT = 10.0
# Commit to 2xx: from a few milliseconds (streaming) to hours (a long outage).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 300.0, 1800.0, 3600.0)


def caught_up(facts: Mapping[str, Any]) -> bool:
    """The probe found nothing waiting: its ``caught_up`` fact, else no bytes of
    log beyond the checkpoint (dbevents.protocols.LAG_FACTS)."""
    said = facts.get("caught_up")
    if isinstance(said, bool):
        return said
    lag = facts.get("lag_bytes")
    return isinstance(lag, int) and not isinstance(lag, bool) and lag == 0


def status_class(outcome: Outcome) -> str:
    """2xx/3xx/4xx/5xx by the HTTP status, else timeout or error."""
    if outcome.status_code is not None:
        return f"{outcome.status_code // 100}xx"
    if outcome.error and "timeout" in outcome.error.lower():
        return "timeout"
    return "error"


@attrs.define
class SourceState:
    streaming: bool = False
    reason: str = "capture has not started"
    probe_error: str | None = None
    probed: bool = False  # the source has a status probe, and it was asked
    facts: Mapping[str, Any] | None = None  # the last probe's answer (None: it failed)
    probed_at: float = 0.0
    # Capture is complete up to the later of these (seconds since the epoch).
    last_commit: float | None = None  # commit time of the last change captured
    caught_up_at: float | None = None  # when a probe last found nothing waiting
    captured_lag: float | None = None  # the lag when the last change was captured


class AdminMetrics:
    """The [admin] service's observer (registered as "admin"): active only in a
    `dbevents run` whose config has the [admin] table."""

    def __init__(self, context: ObserverContext, engine: bool = True) -> None:
        self.active = "admin" in context.config.services
        # With an engine, capture has run since now: a source never yet found
        # caught up is behind by at least the time since. Without one (console)
        # nothing says since when, and its lag is left out until a probe tells.
        self.since: float | None = time.time() if engine else None
        self.sources: dict[str, SourceState] = {name: SourceState()
                                                for name in context.config.databases}
        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        self.changes = Counter("dbevents_changes_captured", "Changes read from a database.",
                               ["database"], registry=r)
        self.matched = Counter("dbevents_events_captured",
                               "Events the captured changes matched (one per trigger).",
                               ["database"], registry=r)
        self.stored_ = Counter("dbevents_events_stored",
                               "Events newly committed to the eventing DB.",
                               ["database"], registry=r)
        self.requests = Counter("dbevents_deliveries",
                                "Delivery requests (one per POST or batch), by outcome.",
                                ["trigger", "outcome"], registry=r)
        self.attempts = Counter("dbevents_attempts",
                                "Attempts logged (one per event per try), by status class.",
                                ["trigger", "status_class"], registry=r)
        self.finished_ = Counter("dbevents_events_finished",
                                 "Events that ended delivered or failed.",
                                 ["trigger", "status"], registry=r)
        self.latency = Histogram("dbevents_delivery_latency_seconds",
                                 "From the commit in the database to the 2xx answer.",
                                 ["trigger"], buckets=LATENCY_BUCKETS, registry=r)
        self.lag_seconds = Gauge("dbevents_source_lag_seconds",
                                 "How long the oldest change not yet captured has waited: "
                                 "0 when the source's probe finds it caught up, else now "
                                 "minus the last moment capture was known complete.",
                                 ["database"], registry=r)
        self.lag_bytes = Gauge("dbevents_source_lag_bytes",
                               "Bytes of the database's log between the checkpoint and "
                               "its end (from the source's status probe).",
                               ["database"], registry=r)
        self.streaming = Gauge("dbevents_source_streaming",
                               "1 while capture from the database runs.", ["database"],
                               registry=r)
        self.queue = Gauge("dbevents_queue_events", "Events in the eventing DB by status.",
                           ["trigger", "status"], registry=r)
        for name in self.sources:
            self.streaming.labels(name).set(0)

    # -- the engine's moments (on its event loop: cheap, no I/O) ------------------
    def captured(self, database: str, changes: Sequence[Change], events: Sequence[Event],
                 lag_seconds: float) -> None:
        self.changes.labels(database).inc(len(changes))
        self.matched.labels(database).inc(len(events))
        state = self.sources.setdefault(database, SourceState())
        state.captured_lag = lag_seconds
        if changes:
            committed = changes[-1].time.timestamp()
            if state.last_commit is None or committed > state.last_commit:
                state.last_commit = committed

    def stored(self, database: str, new_events: int, checkpoint: Position | None) -> None:
        self.stored_.labels(database).inc(new_events)

    def attempted(self, trigger: Trigger, events: Sequence[Event],
                  outcomes: Sequence[Outcome]) -> None:
        name = trigger.name
        seen: set[int] = set()
        now = time.time()
        for event, outcome in zip(events, outcomes, strict=True):
            if id(outcome) not in seen:  # events of one request share its outcome
                seen.add(id(outcome))
                self.requests.labels(name, "ok" if outcome.ok else "error").inc()
            self.attempts.labels(name, status_class(outcome)).inc()
            if outcome.ok:
                committed = commit_time(event)
                if committed is not None:
                    self.latency.labels(name).observe(max(0.0, now - committed.timestamp()))

    def finished(self, trigger: Trigger, finishes: Sequence[Finish]) -> None:
        delivered = failed = 0
        for f in finishes:
            if f.status is Status.DELIVERED:
                delivered += 1
            elif f.status is Status.FAILED:
                failed += 1
        if delivered:
            self.finished_.labels(trigger.name, "delivered").inc(delivered)
        if failed:
            self.finished_.labels(trigger.name, "failed").inc(failed)

    def source_state(self, database: str, streaming: bool, error: str | None) -> None:
        state = self.sources.setdefault(database, SourceState())
        state.streaming, state.reason = streaming, error or ("" if streaming else "stopped")
        self.streaming.labels(database).set(1 if streaming else 0)

    # -- polled, off the hot path -------------------------------------------------------
    async def refresh_queue(self, ctx: ServiceContext) -> None:
        for s in await ctx.store.stats():
            for status in Status:
                self.queue.labels(s.trigger, status.value).set(getattr(s, status.value))

    async def probe_sources(self, ctx: ServiceContext) -> None:
        """Ask each source's status probe for its lag; a probe that fails marks the
        source not ready (the database may be down while the source reconnects)."""
        try:  # the checkpoints let a source measure its lag (MySQL keeps none itself)
            checkpoints = await asyncio.wait_for(ctx.store.checkpoints(), PROBE_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("checkpoints not read for the lag metrics",
                        error=str(exc) or type(exc).__name__)
            checkpoints = {}
        for name, db in ctx.config.databases.items():
            state = self.sources.setdefault(name, SourceState())
            probe = status_probe(ctx.plugins.get("source", db.type))
            if probe is None:
                continue
            settings = SourceSettings(name=name, url=db.url, options=db.options,
                                      config_dir=ctx.config.dir,
                                      checkpoint=checkpoints.get(name))
            state.probed = True
            asked = time.time()  # what the probe finds holds from no earlier than this
            try:
                facts: Mapping[str, Any] = await asyncio.wait_for(probe(settings),
                                                                  PROBE_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                state.probe_error = f"status probe failed: {str(exc) or type(exc).__name__}"
                state.facts = None
                continue
            state.probe_error = None
            state.facts, state.probed_at = facts, asked
            if caught_up(facts):
                state.caught_up_at = state.probed_at
            lag = facts.get("lag_bytes")
            if isinstance(lag, int) and not isinstance(lag, bool):
                self.lag_bytes.labels(name).set(lag)

    def refresh_lag(self, now: float | None = None) -> None:
        """Set each source's lag in seconds for this moment (see the module doc)."""
        now = time.time() if now is None else now
        for name, state in self.sources.items():
            lag = self.source_lag(state, now)
            if lag is not None:
                self.lag_seconds.labels(name).set(lag)

    def source_lag(self, state: SourceState, now: float) -> float | None:
        facts = state.facts
        if facts is not None:
            if caught_up(facts):
                return 0.0
            told = facts.get("lag_seconds")
            if isinstance(told, int | float) and not isinstance(told, bool):
                return max(0.0, float(told) + now - state.probed_at)
        elif not state.probed:
            # No probe to tell an idle source from a stuck one: the lag as it was
            # when the last change was captured.
            return state.captured_lag
        known = max((t for t in (state.last_commit, state.caught_up_at) if t is not None),
                    default=self.since)
        return None if known is None else max(0.0, now - known)

    async def poll(self, ctx: ServiceContext) -> None:
        while True:
            try:
                await self.probe_sources(ctx)
                await self.refresh_queue(ctx)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("metrics poll failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(PROBE_EVERY)

    def not_ready(self) -> dict[str, str]:
        """Each database that is not streaming, with why."""
        out = {}
        for name, state in self.sources.items():
            if not state.streaming:
                out[name] = state.reason
            elif state.probe_error:
                out[name] = state.probe_error
        return out
