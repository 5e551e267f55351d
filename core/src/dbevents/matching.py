"""Which triggers a change matches."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import structlog

from dbevents.envelope import build_event
from dbevents.values import Change, Event, Operation, Trigger

log = structlog.get_logger("dbevents.matching")

# A matcher that raises on every change of a busy table would flood the log:
# one warning per trigger and matcher in this many seconds, with the count since.
WARN_EVERY = 60.0


def trigger_matches(trigger: Trigger, database: str, table: str, operation: Operation) -> bool:
    return (
        (trigger.databases is None or database in trigger.databases)
        and (trigger.tables is None or table in trigger.tables)
        and operation in trigger.operations
    )


class TriggerMatcher:
    """Matches changes against triggers; the core test is cached per
    (database, table, operation) so a busy table costs one dict lookup."""

    def __init__(self, triggers: Sequence[Trigger], matchers: Mapping[str, Any] | None = None):
        self.triggers = tuple(triggers)
        self.matchers = dict(matchers or {})
        self._cache: dict[tuple[str, str, Operation], tuple[Trigger, ...]] = {}
        # (trigger, matcher) -> (when last warned, errors not logged since)
        self._warned: dict[tuple[str, str], tuple[float | None, int]] = {}

    def candidates(self, database: str, table: str, operation: Operation) -> tuple[Trigger, ...]:
        key = (database, table, operation)
        found = self._cache.get(key)
        if found is None:
            found = tuple(t for t in self.triggers
                          if trigger_matches(t, database, table, operation))
            self._cache[key] = found
        return found

    def match(self, change: Change) -> list[Trigger]:
        out = []
        for trigger in self.candidates(change.database, change.table, change.operation):
            if trigger.matcher_options and not self._keeps(trigger, change):
                continue
            out.append(trigger)
        return out

    def _keeps(self, trigger: Trigger, change: Change) -> bool:
        for name, options in trigger.matcher_options.items():
            try:
                if not self.matchers[name].matches(change, options):
                    return False
            except Exception as exc:
                # One odd row must not stop capture: the change does not match.
                self._warn(trigger, name, change, exc)
                return False
        return True

    def _warn(self, trigger: Trigger, matcher: str, change: Change, exc: Exception) -> None:
        key = (trigger.name, matcher)
        now = time.monotonic()
        last, dropped = self._warned.get(key, (None, 0))
        if last is not None and now - last < WARN_EVERY:
            self._warned[key] = (last, dropped + 1)
            return
        self._warned[key] = (now, 0)
        log.warning("matcher_error", trigger=trigger.name, matcher=matcher,
                    error=f"{type(exc).__name__}: {exc}", database=change.database,
                    table=change.table, doc_id=change.doc_id,
                    also_failed_since_last_warning=dropped)

    def events(self, changes: Iterable[Change], source_id: str) -> list[Event]:
        return [build_event(c, t, source_id) for c in changes for t in self.match(c)]

    def tables_for(self, database: str) -> frozenset[str] | None:
        """The tables triggers watch in ``database``; None if some trigger takes all."""
        tables: set[str] = set()
        for t in self.triggers:
            if t.databases is not None and database not in t.databases:
                continue
            if t.tables is None:
                return None
            tables |= t.tables
        return frozenset(tables)

    def operations_for(self, database: str) -> frozenset[str]:
        ops: set[str] = set()
        for t in self.triggers:
            if t.databases is None or database in t.databases:
                ops |= {o.value for o in t.operations}
        return frozenset(ops)
