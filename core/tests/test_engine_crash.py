"""The engine's guarantees under crashes, with the in-memory plugins.

A crash is injected at the k-th step the engine takes through a plugin (before
and after every store write, confirm, claim, delivery and finish). From that
instant every plugin call fails, as if the process had died, so the durable
state is exactly what it was at the crash. Then a new engine starts on the same
database and store. Afterwards: every change was delivered to every matching
trigger at least once, the store holds exactly the expected event ids, and
every event ended delivered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import attrs
from dbevents.config import Config, DatabaseConfig, EventingConfig
from dbevents.engine import Engine
from dbevents.envelope import event_id
from dbevents.protocols import StoreSettings
from dbevents.testing import DELIVERIES, MemorySink, MemoryStore, database, isolated_plugins, reset
from dbevents.testing.memory import STORES, MemorySinkOptions, MemorySourceOptions
from dbevents.values import Operation, Status, Trigger
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


class Crash(Exception):
    """The process died: from the first one on, every plugin call raises it, so
    whatever the engine does to recover, nothing durable happens after it."""


@attrs.define
class Crasher:
    at: int | None  # crash at this step number (1-based); None: never
    steps: int = 0
    dead: bool = False
    where: str = ""

    def point(self, name: str) -> None:
        if self.dead:
            raise Crash(name)
        self.steps += 1
        if self.at is not None and self.steps == self.at:
            self.dead = True
            self.where = name
            raise Crash(name)


class CrashingStore(MemoryStore):
    crasher: Crasher

    async def enqueue(self, events: Any, checkpoints: Any) -> int:
        self.crasher.point("enqueue:before")
        n = await super().enqueue(events, checkpoints)
        self.crasher.point("enqueue:after")
        return n

    async def enqueue_held(self, events: Any, checkpoints: Any, lease_seconds: float) -> Any:
        self.crasher.point("enqueue:before")
        held = await super().enqueue_held(events, checkpoints, lease_seconds)
        self.crasher.point("enqueue:after")
        return held

    async def renew(self, event_ids: Any, lease_seconds: float) -> Any:
        self.crasher.point("renew")
        return await super().renew(event_ids, lease_seconds)

    async def claim(self, limits: Any, lease_seconds: float, now: Any) -> Any:
        self.crasher.point("claim:before")
        out = await super().claim(limits, lease_seconds, now)
        self.crasher.point("claim:after")
        return out

    async def finish(self, results: Any) -> None:
        self.crasher.point("finish:before")
        await super().finish(results)
        self.crasher.point("finish:after")

    async def checkpoint(self, source: str) -> Any:
        self.crasher.point("checkpoint")
        return await super().checkpoint(source)

    async def release(self, event_ids: Any) -> None:
        self.crasher.point("release")
        await super().release(event_ids)


class CrashingSink(MemorySink):
    crasher: Crasher

    async def deliver(self, trigger: Trigger, events: Sequence[Any]) -> Any:
        self.crasher.point("deliver:before")
        out = await super().deliver(trigger, events)
        self.crasher.point("deliver:after")
        return out


TRIGGERS = (
    Trigger(name="all", url="http://x", sink="memory", retries=10, backoff_base=1,
            backoff_max=5,
            sink_options=MemorySinkOptions(fail_first=1, batch_size=3)),
    Trigger(name="users-only", url="http://x", sink="memory", tables=frozenset({"users"}),
            operations=frozenset({Operation.INSERT, Operation.UPDATE}), concurrency=2,
            sink_options=MemorySinkOptions(delay_ms=2, jitter=True)),
)


def make_config(chunk: int) -> Config:
    return Config(
        eventing=EventingConfig(store="memory://s", source_id="test"),
        databases={"app": DatabaseConfig("app", "memory", "memory://db",
                                         MemorySourceOptions(chunk=chunk))},
        triggers=TRIGGERS,
    )


def write(txns: list[int], start: int) -> int:
    """Commit transactions of the given sizes; rows cycle insert/update/delete."""
    db = database("db")
    n = start
    for size in txns:
        rows = []
        for _ in range(size):
            table = "users" if n % 3 else "orders"
            op = ("insert", "update", "delete")[n % 3]
            rows.append((table, op, str(n % 7), {"n": n}))
            n += 1
        db.commit(*rows)
    return n


def expected_ids() -> set[tuple[str, str]]:
    db = database("db")
    out = set()
    for t, rows in enumerate(db.transactions):
        for i, (table, op, _doc_id, _) in enumerate(rows):
            for trig in TRIGGERS:
                if (trig.tables is None or table in trig.tables) and op in trig.operations:
                    out.add((trig.name, event_id("app", f"{t}:{i}", trig.name)))
    return out


async def run_once(crasher: Crasher, chunk: int, more: list[int], until_done: bool) -> None:
    plugins = isolated_plugins()
    store = CrashingStore(StoreSettings(url="memory://s"))
    store.crasher = crasher
    sink = CrashingSink()
    sink.crasher = crasher
    engine = Engine(make_config(chunk), plugins, store=store, sinks={"memory": sink})
    task = asyncio.create_task(engine.run())
    written = False
    deadline = asyncio.get_running_loop().time() + 20
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.002)
        if not written:
            write(more, database("db").change_count())
            written = True
        if crasher.dead or task.done():
            break
        if until_done and done():
            break
    else:
        raise AssertionError("the engine did not finish in time")
    if crasher.dead:
        # The process is gone. Its leftovers may still run for a moment, but every
        # plugin call they make raises, so they change nothing durable.
        task.cancel()
        await asyncio.wait([task], timeout=0.01)
    else:
        engine.stop()
        await asyncio.wait_for(task, 10)


def done() -> bool:
    state = STORES.get("s")
    want = expected_ids()
    if state is None or len(state.events) < len(want):
        return False
    return all(e.status is Status.DELIVERED for e in state.events.values())


async def scenario(crash_points: list[int], chunk: int, txns: list[int]) -> list[str]:
    reset()
    write(txns[:2], 0)
    wheres = []
    for k in crash_points:
        crasher = Crasher(at=k)
        await run_once(crasher, chunk, txns[2:4], until_done=True)
        wheres.append(crasher.where or "-")
    await run_once(Crasher(at=None), chunk, txns[4:], until_done=True)
    check()
    return wheres


def check() -> None:
    want = expected_ids()
    state = STORES["s"]
    stored = {(e.trigger, e.id) for e in state.events.values()}
    assert stored == want, "the store must hold exactly one event per change and trigger"
    delivered = {(t, i) for t, i, _ in DELIVERIES}
    assert delivered == want, "every event is delivered at least once"
    assert all(e.status is Status.DELIVERED for e in state.events.values())
    # Per-row order: for each trigger and row, first deliveries follow commit order.
    first: dict[str, int] = {}
    for pos, (_, eid, _) in enumerate(DELIVERIES):
        first.setdefault(eid, pos)
    seqs = {e.id: e.seq for e in state.events.values()}
    rows: dict[tuple[str, str | None], list[tuple[int, int]]] = {}
    for e in state.events.values():
        rows.setdefault((e.trigger, e.doc_id), []).append((seqs[e.id], first[e.id]))
    for row, pairs in rows.items():
        pairs.sort()
        assert [p for _, p in pairs] == sorted(p for _, p in pairs), f"row {row} out of order"


def test_no_crash_baseline() -> None:
    asyncio.run(scenario([], chunk=2, txns=[3, 1, 5, 2, 4]))


def test_crash_at_every_step() -> None:
    """Exhaustive: one crash at step k, for every step of the whole run."""
    seen = set()
    k = 1
    while True:
        wheres = asyncio.run(scenario([k], chunk=2, txns=[3, 1, 5, 2, 4]))
        if wheres == ["-"]:
            break  # k is past the last step: every step has been crashed at
        seen.add(wheres[0])
        k += 1
    assert {"enqueue:before", "enqueue:after", "claim:before", "claim:after",
            "deliver:before", "deliver:after", "finish:before", "finish:after"} <= seen


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    crash_points=st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=4),
    chunk=st.integers(min_value=1, max_value=4),
    txns=st.lists(st.integers(min_value=1, max_value=6), min_size=4, max_size=8),
)
def test_repeated_crashes(crash_points: list[int], chunk: int, txns: list[int]) -> None:
    asyncio.run(scenario(crash_points, chunk, txns))
