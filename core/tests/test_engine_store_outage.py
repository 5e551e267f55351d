"""The eventing DB goes away while the engine runs: capture pauses (nothing is
confirmed to the source, so the database keeps every change) and resumes when
the store is back, with every change stored exactly once and delivered."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from dbevents.config import Config, DatabaseConfig, EventingConfig
from dbevents.engine import Engine
from dbevents.envelope import event_id
from dbevents.errors import StoreUnavailable
from dbevents.protocols import StoreSettings
from dbevents.testing import DELIVERIES, MemorySource, MemoryStore, database, isolated_plugins
from dbevents.testing import reset as reset_memory
from dbevents.testing.memory import STORES, MemorySourceOptions
from dbevents.values import Operation, Position, Status, Trigger

TRIGGERS = (
    Trigger(name="all", url="http://x", sink="memory"),
    Trigger(name="inserts", url="http://x", sink="memory",
            operations=frozenset({Operation.INSERT})),
)


class OutageStore(MemoryStore):
    """A MemoryStore that is unreachable while ``down``: every call raises, as a
    lost connection would. With ``commit_then_fail`` the first enqueue of the
    outage is written and its reply lost, so the engine retries a write the
    store already holds."""

    down = False
    commit_then_fail = False
    refused: Counter[str]

    def _gate(self, op: str) -> None:
        if self.down:
            self.refused[op] += 1
            raise StoreUnavailable("eventing DB unreachable")

    async def enqueue(self, events: Any, checkpoints: Any) -> int:
        if self.down and self.commit_then_fail and not self.refused["enqueue"]:
            await super().enqueue(events, checkpoints)
        self._gate("enqueue")
        return await super().enqueue(events, checkpoints)

    async def enqueue_held(self, events: Any, checkpoints: Any, lease_seconds: float) -> Any:
        if self.down and self.commit_then_fail and not self.refused["enqueue"]:
            await super().enqueue_held(events, checkpoints, lease_seconds)
        self._gate("enqueue")
        return await super().enqueue_held(events, checkpoints, lease_seconds)

    async def renew(self, event_ids: Any, lease_seconds: float) -> Any:
        self._gate("renew")
        return await super().renew(event_ids, lease_seconds)

    async def checkpoint(self, source: str) -> Any:
        self._gate("checkpoint")
        return await super().checkpoint(source)

    async def claim(self, limits: Any, lease_seconds: float, now: Any) -> Any:
        self._gate("claim")
        return await super().claim(limits, lease_seconds, now)

    async def finish(self, results: Any) -> None:
        self._gate("finish")
        await super().finish(results)

    async def release(self, event_ids: Any) -> None:
        self._gate("release")
        await super().release(event_ids)

    async def next_due(self) -> Any:
        self._gate("next_due")
        return await super().next_due()

    async def purge(self, before: Any, statuses: Any) -> int:
        self._gate("purge")
        return await super().purge(before, statuses)


@pytest.fixture(autouse=True)
def _clean() -> None:
    reset_memory()


def commit(first: int, sizes: list[int]) -> int:
    """Transactions of the given sizes on table "users"; rows cycle through
    insert/update/delete over a few docIds. Returns the next row number."""
    db = database("db")
    n = first
    for size in sizes:
        db.commit(*[("users", ("insert", "update", "delete")[i % 3], str(i % 4), {"n": i})
                    for i in range(n, n + size)])
        n += size
    return n


def expected() -> set[tuple[str, str]]:
    """(trigger, event id) for every change committed so far and each trigger it matches."""
    out = set()
    for txn, rows in enumerate(database("db").transactions):
        for i, (_, op, _, _) in enumerate(rows):
            for trig in TRIGGERS:
                if op in trig.operations:
                    out.add((trig.name, event_id("app", f"{txn}:{i}", trig.name)))
    return out


def stored() -> list[tuple[str, str]]:
    state = STORES.get("s")
    return [] if state is None else [(e.trigger, e.id) for e in state.events.values()]


async def until(cond: Callable[[], bool], what: str) -> None:
    # Generous: the engine's store retries back off (0.5 s, 1 s, 2 s...).
    try:
        async with asyncio.timeout(20):
            while not cond():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


def settled() -> bool:
    want = expected()
    state = STORES.get("s")
    return (state is not None and set(stored()) == want
            and all(e.status is Status.DELIVERED for e in state.events.values())
            and {(t, i) for t, i, _ in DELIVERIES} == want)


@pytest.mark.parametrize("commit_then_fail", [False, True],
                         ids=["refused", "reply-lost"])
async def test_capture_pauses_during_a_store_outage_and_resumes(commit_then_fail: bool) -> None:
    store = OutageStore(StoreSettings(url="memory://s"))
    store.refused = Counter()
    store.commit_then_fail = commit_then_fail
    config = Config(
        eventing=EventingConfig(store="memory://s", source_id="test"),
        databases={"app": DatabaseConfig("app", "memory", "memory://db",
                                         MemorySourceOptions(chunk=2))},
        triggers=TRIGGERS,
    )
    engine = Engine(config, isolated_plugins(), store=store)
    source = engine.sources["app"]
    assert isinstance(source, MemorySource)
    db = database("db")
    task = asyncio.create_task(engine.run())
    try:
        n = commit(0, [3, 1, 4])
        await until(lambda: settled() and db.confirmed == 3, "the first changes are delivered")
        confirmed_before = list(source.confirmed)
        stored_before = stored()

        store.down = True
        n = commit(n, [2, 5, 1, 3])
        # Capture has read the new changes and tried to store them more than once.
        await until(lambda: store.refused["enqueue"] >= 2, "capture retries the store")
        # Nothing of it was confirmed: the database still holds every new change.
        assert source.confirmed == confirmed_before
        assert db.confirmed == 3
        if commit_then_fail:
            # The write whose reply was lost is in the store, and only that one.
            assert stored_before == stored()[:len(stored_before)]
            assert len(stored()) > len(stored_before)
        else:
            assert stored() == stored_before

        store.down = False
        await until(lambda: settled() and db.confirmed == len(db.transactions),
                    "every change is stored and delivered after the outage")
        assert source.confirmed[-1] == Position(str(len(db.transactions)))
        assert await store.checkpoint("app") == Position(str(len(db.transactions)))
    finally:
        engine.stop()
        await asyncio.wait_for(task, 10)

    # Exactly once: each change has one event per matching trigger, no duplicate.
    ids = stored()
    assert len(ids) == len(set(ids)) == len(expected())
    # Every result was recorded before the outage or after it, so none is sent twice.
    assert set(Counter(eid for _, eid, _ in DELIVERIES).values()) == {1}
    assert n == db.change_count() == 19
    assert len(expected()) == 19 + sum(1 for rows in db.transactions
                                       for _, op, _, _ in rows if op is Operation.INSERT)
