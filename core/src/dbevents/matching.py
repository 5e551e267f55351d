"""Which triggers a change matches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dbevents.envelope import build_event
from dbevents.values import Change, Event, Operation, Trigger


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
            if trigger.matcher_options and not all(
                self.matchers[name].matches(change, options)
                for name, options in trigger.matcher_options.items()
            ):
                continue
            out.append(trigger)
        return out

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
