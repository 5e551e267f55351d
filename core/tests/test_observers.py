"""Observers: a plugin's observer is told, per batch and per request, what the
engine captured, stored, attempted and finished, and whether each source is
streaming; an observer that raises breaks neither capture nor delivery."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pytest
from dbevents import commit_time
from dbevents.config import Config, DatabaseConfig, EventingConfig
from dbevents.plugins import module_from
from dbevents.protocols import Observer, ObserverContext
from dbevents.testing import database, isolated_plugins, reset, running
from dbevents.testing.memory import DELIVERIES, MemorySinkOptions
from dbevents.values import Change, Event, Finish, Outcome, Position, Status, Trigger


class Recorder:
    """Defines every moment; keeps what it was told."""

    def __init__(self, context: ObserverContext) -> None:
        self.databases = sorted(context.config.databases)
        self.captured_: list[tuple[str, int, int, float]] = []
        self.stored_: list[tuple[str, int, Position | None]] = []
        self.attempts: list[tuple[str, list[bool]]] = []
        self.finished_: list[tuple[str, list[Status]]] = []
        self.states: list[tuple[str, bool]] = []
        self.commit_times: list[datetime | None] = []

    def captured(self, database: str, changes: Sequence[Change], events: Sequence[Event],
                 lag_seconds: float) -> None:
        self.captured_.append((database, len(changes), len(events), lag_seconds))

    def stored(self, database: str, new_events: int, checkpoint: Position | None) -> None:
        self.stored_.append((database, new_events, checkpoint))

    def attempted(self, trigger: Trigger, events: Sequence[Event],
                  outcomes: Sequence[Outcome]) -> None:
        self.attempts.append((trigger.name, [o.ok for o in outcomes]))
        self.commit_times += [commit_time(e) for e in events]

    def finished(self, trigger: Trigger, finishes: Sequence[Finish]) -> None:
        self.finished_.append((trigger.name, [f.status for f in finishes]))

    def source_state(self, database: str, streaming: bool, error: str | None) -> None:
        self.states.append((database, streaming))


class Broken:
    """Defines one moment, and raises in it."""

    calls = 0

    def __init__(self, context: ObserverContext) -> None:
        pass

    def attempted(self, trigger: Trigger, events: Sequence[Event],
                  outcomes: Sequence[Outcome]) -> None:
        Broken.calls += 1
        raise RuntimeError("observer bug")


class Idle:
    active = False

    def __init__(self, context: ObserverContext) -> None:
        pass


@pytest.fixture(autouse=True)
def _clean() -> None:
    reset()
    Broken.calls = 0


def plugins() -> Any:
    def register(register: Any) -> None:
        register("recorder", Recorder)
        register("broken", Broken)
        register("idle", Idle)
    return isolated_plugins(("obs", module_from("obs", register_observers=register)))


async def test_observers_see_every_moment_and_a_failing_one_is_harmless() -> None:
    db = database("db")
    for i in range(3):
        db.commit(("users", "insert", str(i), {"id": i}))
    cfg = Config(
        eventing=EventingConfig(store="memory://o", source_id="x"),
        databases={"app": DatabaseConfig("app", "memory", "memory://db")},
        triggers=(Trigger(name="t", url="http://x", sink="memory", retries=1, backoff_base=1,
                          sink_options=MemorySinkOptions(fail_first=1)),),
    )
    found = plugins()
    assert found.problems() == []
    async with running(cfg, found) as engine:
        recorder = engine.observers.get("recorder")
        assert isinstance(recorder, Recorder) and isinstance(recorder, Observer)
        assert engine.observers.get("idle") is None  # active = False: dropped
        while engine.dispatcher.delivered < 3:
            await asyncio.sleep(0.02)
    assert len(DELIVERIES) == 3  # the broken observer stopped nothing
    assert Broken.calls == 6  # called on every attempt, though it raised the first time
    assert recorder.databases == ["app"]
    assert recorder.states[0] == ("app", True)
    assert sum(n for db_, n, _, _ in recorder.captured_ if db_ == "app") == 3
    assert sum(e for _, _, e, _ in recorder.captured_) == 3
    assert all(lag >= 0 for *_, lag in recorder.captured_)
    assert sum(n for _, n, _ in recorder.stored_) == 3 and recorder.stored_[-1][2] is not None
    oks = [ok for _, batch in recorder.attempts for ok in batch]
    assert sorted(oks) == [False] * 3 + [True] * 3
    statuses = [s for _, batch in recorder.finished_ for s in batch]
    assert sorted(statuses) == sorted([Status.PENDING] * 3 + [Status.DELIVERED] * 3)
    # The commit time read from each payload is the database's commit time.
    assert set(recorder.commit_times) <= {t.replace(microsecond=t.microsecond // 1000 * 1000)
                                          for t in db.times}
    assert None not in recorder.commit_times
