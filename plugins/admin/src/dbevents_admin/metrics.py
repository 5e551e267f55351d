"""Metrics and readiness: an observer that counts what the engine does, in its
own prometheus-client registry, and the polled facts beside it (queue depth by
status from the store, replication lag from each source's status probe)."""

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


class AdminMetrics:
    """The [admin] service's observer (registered as "admin"): active only in a
    `dbevents run` whose config has the [admin] table."""

    def __init__(self, context: ObserverContext) -> None:
        self.active = "admin" in context.config.services
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
                                 "Now minus the commit time of the last change captured, "
                                 "when it was captured.", ["database"], registry=r)
        self.lag_bytes = Gauge("dbevents_source_lag_bytes",
                               "Bytes of log the database keeps beyond the confirmed "
                               "position (from the source's status probe).",
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
        self.lag_seconds.labels(database).set(lag_seconds)

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
        for name, db in ctx.config.databases.items():
            state = self.sources.setdefault(name, SourceState())
            probe = status_probe(ctx.plugins.get("source", db.type))
            if probe is None:
                continue
            settings = SourceSettings(name=name, url=db.url, options=db.options,
                                      config_dir=ctx.config.dir)
            try:
                facts: Mapping[str, Any] = await asyncio.wait_for(probe(settings),
                                                                  PROBE_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                state.probe_error = f"status probe failed: {str(exc) or type(exc).__name__}"
                continue
            state.probe_error = None
            lag = facts.get("lag_bytes")
            if isinstance(lag, int):
                self.lag_bytes.labels(name).set(lag)

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
