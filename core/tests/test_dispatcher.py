"""Dispatcher semantics with the in-memory store and sink."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
from dbevents.dispatcher import STOP_GRACE, Dispatcher, backoff_delay, verdicts
from dbevents.protocols import StoreSettings
from dbevents.testing import DELIVERIES, MemorySink, MemoryStore, make_event, reset
from dbevents.testing.memory import MemorySinkOptions
from dbevents.values import Event, Outcome, Status, Trigger
from structlog.testing import capture_logs


@pytest.fixture(autouse=True)
def _clean() -> None:
    reset()


def test_the_default_schedule_spans_an_outage_with_jitter_and_a_cap() -> None:
    t = Trigger(name="t", url="http://x")  # defaults: 1 s x 10^(n-1), at most 60 s
    rng = random.Random(1)
    for attempt, about in [(1, 1.0), (2, 10.0), (3, 60.0), (4, 60.0)]:
        delays = [backoff_delay(t, attempt, None, rng) for _ in range(200)]
        assert all(0.75 * about <= d <= min(60.0, 1.25 * about) for d in delays), attempt
        assert len(set(delays)) > 100  # jittered, not one instant for all
    doubling = Trigger(name="t", url="http://x", backoff_base=1000, backoff_max=5000,
                       backoff_factor=2)
    for attempt, about in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (10, 5.0)]:
        delays = [backoff_delay(doubling, attempt, None, rng) for _ in range(200)]
        assert all(0.75 * about <= d <= min(5.0, 1.25 * about) for d in delays), attempt
    t = doubling
    assert backoff_delay(t, 1, 3.0) == 3.0  # Retry-After wins...
    assert backoff_delay(t, 1, 3600.0) == 5.0  # ...capped at backoff_max


async def run_until(triggers: list[Trigger], n_events: int, settle: float = 0.0,
                    docs: int | None = None) -> MemoryStore:
    store = MemoryStore(StoreSettings(url="memory://d"))
    await store.open()
    evs = [make_event(trigger=t.name, doc_id=str(i % (docs or n_events)), n=i)
           for t in triggers for i in range(n_events)]
    await store.enqueue(evs, {})
    d = Dispatcher(store, triggers, {"memory": MemorySink()})
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    for _ in range(2000):
        await asyncio.sleep(0.005)
        if all(e.status in (Status.DELIVERED, Status.FAILED) for e in store.s.events.values()):
            break
    await asyncio.sleep(settle)
    stop.set()
    await asyncio.wait_for(task, 5)
    return store


async def test_always_failing_makes_exactly_one_plus_retries_attempts() -> None:
    # pause_after = 0: a receiver failing everything is not taken for one that is down.
    ts = [Trigger(name=f"r{r}", url="http://x", sink="memory", retries=r, backoff_base=1,
                  backoff_max=2, pause_after=0, sink_options=MemorySinkOptions(always_fail=True))
          for r in (0, 1, 3)]
    store = await run_until(ts, 2, settle=0.05)
    for ev in store.s.events.values():
        r = int(ev.trigger[1:])
        assert ev.status is Status.FAILED and ev.attempts == 1 + r
        assert [a.number for a in store.s.attempts[ev.id]] == list(range(1, r + 2))
        assert ev.last_error == "HTTP 500"


async def test_fail_twice_then_deliver() -> None:
    t = Trigger(name="t", url="http://x", sink="memory", backoff_base=1, backoff_max=2,
                sink_options=MemorySinkOptions(fail_first=2))
    store = await run_until([t], 3)
    for ev in store.s.events.values():
        assert ev.status is Status.DELIVERED and ev.attempts == 3
        assert [a.ok for a in store.s.attempts[ev.id]] == [False, False, True]


async def test_retry_waits_for_backoff() -> None:
    t = Trigger(name="t", url="http://x", sink="memory", backoff_base=100, backoff_max=100,
                sink_options=MemorySinkOptions(fail_first=1))
    store = await run_until([t], 1)
    [ev] = store.s.events.values()
    a1, a2 = store.s.attempts[ev.id]
    gap = (a2.started_at - a1.started_at).total_seconds()
    assert 0 <= gap <= 0.45  # the 75..100 ms wait (100 ms, +-25%, capped) plus scheduling


async def test_per_row_order_under_concurrency_and_random_delays() -> None:
    t = Trigger(name="t", url="http://x", sink="memory", concurrency=8,
                sink_options=MemorySinkOptions(delay_ms=5, jitter=True))
    store = await run_until([t], 120, docs=6)
    seq = {e.id: e.seq for e in store.s.events.values()}
    by_row: dict[str | None, list[int]] = {}
    for _, eid, _ in DELIVERIES:
        by_row.setdefault(store.s.events[eid].doc_id, []).append(seq[eid])
    assert len(by_row) == 6
    for row in by_row.values():
        assert row == sorted(row)


async def test_concurrency_limit_is_respected() -> None:
    t = Trigger(name="t", url="http://x", sink="memory", concurrency=3,
                sink_options=MemorySinkOptions(delay_ms=20))
    peak = 0
    sink = MemorySink()
    inner = sink.deliver
    live = 0

    async def counting(trigger, events):  # type: ignore[no-untyped-def]
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        try:
            return await inner(trigger, events)
        finally:
            live -= 1

    sink.deliver = counting  # type: ignore[method-assign]
    store = MemoryStore(StoreSettings(url="memory://c"))
    await store.enqueue([make_event(doc_id=str(i)) for i in range(20)], {})
    d = Dispatcher(store, [t], {"memory": sink})
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    while d.delivered < 20:
        await asyncio.sleep(0.01)
    stop.set()
    await task
    assert peak == 3


async def test_stop_lets_in_flight_attempts_finish() -> None:
    t = Trigger(name="t", url="http://x", sink="memory",
                sink_options=MemorySinkOptions(delay_ms=200))
    store = MemoryStore(StoreSettings(url="memory://s"))
    [ev] = [make_event()]
    await store.enqueue([ev], {})
    d = Dispatcher(store, [t], {"memory": MemorySink()})
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    await asyncio.sleep(0.05)
    assert store.s.events[ev.id].status is Status.DELIVERING
    stop.set()
    await asyncio.wait_for(task, 5)
    assert store.s.events[ev.id].status is Status.DELIVERED


async def test_stop_with_an_attempt_that_never_finishes_is_bounded_and_loses_nothing() -> None:
    # An hour-long attempt: it is still in flight however slow the machine is.
    # One worker: the claim takes two events, one sent and one queued behind it.
    hung = Trigger(name="t", url="http://x", sink="memory", concurrency=1, timeout=300,
                   sink_options=MemorySinkOptions(delay_ms=3_600_000))
    store = MemoryStore(StoreSettings(url="memory://hung"))
    evs = [make_event(doc_id=str(i), n=i) for i in range(3)]
    await store.enqueue(evs, {})
    d = Dispatcher(store, [hung], {"memory": MemorySink()})
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    for _ in range(1000):
        if sum(e.status is Status.DELIVERING for e in store.s.events.values()) == 2:
            break
        await asyncio.sleep(0.005)
    assert [e.status for e in store.s.events.values()].count(Status.DELIVERING) == 2

    grace = hung.timeout / 1000 + 1.0  # _drain's wait: the longest timeout plus 1 s
    started = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, grace + STOP_GRACE)
    took = time.monotonic() - started
    # It waited for the attempt (the grace), then gave up on it rather than hang.
    assert grace - 0.05 <= took < grace + 2.0, took

    # Both claimed events were handed back at once: pending, no lease, no
    # attempt recorded (the hung one was cut short, never answered).
    for ev in evs:
        assert store.s.events[ev.id].status is Status.PENDING
        assert store.s.events[ev.id].attempts == 0
    assert store.s.leases == {} and store.s.attempts == {} and DELIVERIES == []

    # Nothing lost: a dispatcher with a working receiver delivers all three,
    # without waiting for a lease to run out (the store is not reopened).
    ok = attrs.evolve(hung, sink_options=MemorySinkOptions())
    d2 = Dispatcher(store, [ok], {"memory": MemorySink()})
    stop2 = asyncio.Event()
    task2 = asyncio.create_task(d2.run(stop2))
    try:
        for _ in range(1000):
            if d2.delivered == 3:
                break
            await asyncio.sleep(0.005)
    finally:
        stop2.set()
        await asyncio.wait_for(task2, 10)
    assert sorted(eid for _, eid, _ in DELIVERIES) == sorted(ev.id for ev in evs)
    assert all(e.status is Status.DELIVERED and e.attempts == 1
               for e in store.s.events.values())


async def test_wakes_without_polling_when_work_arrives() -> None:
    t = Trigger(name="t", url="http://x", sink="memory")
    store = MemoryStore(StoreSettings(url="memory://w"))
    d = Dispatcher(store, [t], {"memory": MemorySink()})
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    await asyncio.sleep(0.05)  # idle: nothing pending, so no timer is armed
    assert await store.next_due() is None
    await store.enqueue([make_event()], {})
    d.notify()  # only the wake-up can start this delivery

    async def delivered() -> None:
        while d.delivered < 1:
            await asyncio.sleep(0.001)

    await asyncio.wait_for(delivered(), 5)
    stop.set()
    await task


def test_a_batch_is_grouped_by_the_request_the_sink_reports() -> None:
    # Equal but distinct Outcome objects: one request, so one retry time and
    # places 0, 1, 2 in it; a second request is decided on its own.
    t = Trigger(name="t", url="http://x", backoff_base=60_000, backoff_max=600_000)
    now = datetime.now(UTC)
    evs = [make_event(trigger="t", doc_id=str(i), n=i) for i in range(4)]
    outs = [Outcome(ok=False, started_at=now, duration_ms=1.0, request_id="a", batch_size=3)
            for _ in range(3)]
    outs.append(Outcome(ok=False, started_at=now, duration_ms=1.0, request_id="b"))
    fs = verdicts(t, evs, outs, now)
    assert [f.attempt.batch_index for f in fs] == [0, 1, 2, 0]
    assert len({f.next_attempt_at for f in fs[:3]}) == 1
    assert all(f.status is Status.PENDING for f in fs)


class CountingStore(MemoryStore):
    """A MemoryStore that counts the claims made of it."""

    claims = 0

    async def claim(self, limits: Any, lease_seconds: float, now: Any) -> Any:
        self.claims += 1
        return await super().claim(limits, lease_seconds, now)


async def feed(d: Dispatcher, store: MemoryStore, evs: list[Any], size: int) -> None:
    """What the engine does: store a batch held for this process, hand it over."""
    for i in range(0, len(evs), size):
        ticket = d.ticket()
        try:
            d.hand(await store.enqueue_held(evs[i:i + size], {}, d.lease_seconds), ticket)
        finally:
            d.untick(ticket)
        await asyncio.sleep(0.002)


async def test_held_events_go_out_from_memory_without_claims() -> None:
    t = Trigger(name="t", url="http://x", sink="memory", concurrency=4,
                sink_options=MemorySinkOptions(delay_ms=2, jitter=True))
    store = CountingStore(StoreSettings(url="memory://h"))
    await store.open()
    d = Dispatcher(store, [t], {"memory": MemorySink()})
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    await asyncio.sleep(0.02)
    at_start = store.claims  # the look for work left from before a restart
    evs = [make_event(doc_id=str(i % 10), n=i) for i in range(200)]
    await feed(d, store, evs, 25)
    while d.delivered < 200:
        await asyncio.sleep(0.005)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert store.claims == at_start
    assert all(e.status is Status.DELIVERED for e in store.s.events.values())
    seq = {e.id: e.seq for e in store.s.events.values()}
    by_row: dict[str | None, list[int]] = {}
    for _, eid, _ in DELIVERIES:
        by_row.setdefault(store.s.events[eid].doc_id, []).append(seq[eid])
    assert len(by_row) == 10 and all(row == sorted(row) for row in by_row.values())


async def test_a_retry_from_memory_keeps_its_row_in_order() -> None:
    # Every event fails once: its retry goes back to the store and comes due
    # while later events of its row, held in memory, must wait behind it.
    t = Trigger(name="t", url="http://x", sink="memory", concurrency=4, backoff_base=5,
                backoff_max=10, sink_options=MemorySinkOptions(fail_first=1, delay_ms=2,
                                                               jitter=True))
    store = MemoryStore(StoreSettings(url="memory://r"))
    await store.open()
    d = Dispatcher(store, [t], {"memory": MemorySink()})
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    evs = [make_event(doc_id=str(i % 3), n=i) for i in range(60)]
    await feed(d, store, evs, 7)
    for _ in range(2000):
        if all(e.status is Status.DELIVERED for e in store.s.events.values()):
            break
        await asyncio.sleep(0.005)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert all(e.status is Status.DELIVERED and e.attempts == 2 for e in store.s.events.values())
    seq = {e.id: e.seq for e in store.s.events.values()}
    by_row: dict[str | None, list[int]] = {}
    for _, eid, _ in DELIVERIES:
        by_row.setdefault(store.s.events[eid].doc_id, []).append(seq[eid])
    assert len(DELIVERIES) == 60
    assert all(row == sorted(row) for row in by_row.values())


async def test_an_event_enqueued_before_a_retry_was_recorded_waits_behind_it() -> None:
    # The store held a2 while a1 was still in flight; a1's retry then went back.
    # a2's enqueue began before that write returned, so a2 goes back too.
    t = Trigger(name="t", url="http://x", sink="memory", backoff_base=60_000,
                backoff_max=60_000, sink_options=MemorySinkOptions(fail_first=1))
    store = MemoryStore(StoreSettings(url="memory://m"))
    await store.open()
    d = Dispatcher(store, [t], {"memory": MemorySink()})
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    a1, a2 = make_event(doc_id="a"), make_event(doc_id="a")
    ticket = d.ticket()
    first = d.ticket()
    d.hand(await store.enqueue_held([a1], {}, d.lease_seconds), first)
    d.untick(first)
    held = await store.enqueue_held([a2], {}, d.lease_seconds)
    assert [e.id for e in held] == [a2.id]  # a1 was still delivering when a2 was stored
    while store.s.events[a1.id].status is not Status.PENDING:
        await asyncio.sleep(0.002)
    d.hand(held, ticket)
    d.untick(ticket)
    for _ in range(200):
        if store.s.events[a2.id].status is Status.PENDING:
            break
        await asyncio.sleep(0.005)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert store.s.events[a2.id].status is Status.PENDING  # back in the store, behind a1
    assert [eid for _, eid, _ in DELIVERIES] == []  # a1 failed once; a2 was never sent


async def test_leases_of_events_waiting_in_memory_are_renewed() -> None:
    # One row behind a slow receiver: its events wait in memory far longer than
    # a lease; renewals keep every one of them leased, and each goes out once.
    t = Trigger(name="t", url="http://x", sink="memory", concurrency=1,
                sink_options=MemorySinkOptions(delay_ms=60))
    store = MemoryStore(StoreSettings(url="memory://l"))
    await store.open()
    d = Dispatcher(store, [t], {"memory": MemorySink()})
    d.lease_seconds = 0.3  # renewed every 0.1 s
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    evs = [make_event(doc_id="a", n=i) for i in range(10)]
    await feed(d, store, evs, 10)
    await asyncio.sleep(0.45)  # past the first leases
    waiting = [e for e in store.s.events.values() if e.status is Status.DELIVERING]
    assert waiting, "some events still wait in memory"
    now = datetime.now(UTC)
    assert all(store.s.leases[e.id] > now for e in waiting)
    while d.delivered < 10:
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert [eid for _, eid, _ in DELIVERIES] == [e.id for e in evs]


async def test_an_event_no_longer_held_is_left_to_the_store_with_its_row() -> None:
    # The store stops holding a waiting event for us (as when another worker
    # took its expired lease over): renew reports it, the dispatcher drops it
    # and hands the rest of its row back; claims then deliver the row in order.
    t = Trigger(name="t", url="http://x", sink="memory", concurrency=1,
                sink_options=MemorySinkOptions(delay_ms=100))
    store = CountingStore(StoreSettings(url="memory://g"))
    await store.open()
    d = Dispatcher(store, [t], {"memory": MemorySink()})
    d.lease_seconds = 0.3
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    evs = [make_event(doc_id="a", n=i) for i in range(6)]
    await asyncio.sleep(0.02)
    at_start = store.claims
    await feed(d, store, evs, 6)
    await asyncio.sleep(0.01)
    await store.release([evs[2].id])  # no longer ours: pending in the store
    for _ in range(1000):
        if d.delivered >= 6:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert [eid for _, eid, _ in DELIVERIES] == [e.id for e in evs]
    assert all(e.status is Status.DELIVERED for e in store.s.events.values())
    assert store.claims > at_start  # the rest of the row came back through claims


class SwitchSink(MemorySink):
    """A receiver that is down (every attempt a 503) until ``up`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.up = False
        self.sent: list[str] = []

    async def deliver(self, trigger: Trigger, events: Sequence[Event]) -> list[Outcome]:
        self.sent.extend(ev.id for ev in events)
        now = datetime.now(UTC)
        if self.up:
            return [Outcome(ok=True, started_at=now, duration_ms=0.1, status_code=200)
                    for _ in events]
        return [Outcome(ok=False, started_at=now, duration_ms=0.1, status_code=503,
                        error="HTTP 503") for _ in events]


async def outage(store: MemoryStore, sink: SwitchSink, events: list[Event],
                 down_for: float) -> int:
    """Deliver ``events`` (trigger "t", pause_after 3) while ``sink`` is down until
    the trigger pauses, then ``down_for`` seconds more; checks nothing failed
    meanwhile, brings the sink up and waits for every event to be delivered.
    Returns the attempts made while paused."""
    t = Trigger(name="t", url="http://x", sink="memory", retries=1, backoff_base=20,
                backoff_max=40, pause_after=3, probe_max=40)
    await store.open()
    await store.enqueue(events, {})
    d = Dispatcher(store, [t], {"memory": sink})
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    for _ in range(500):
        if "t" in await store.paused_triggers():
            break
        await asyncio.sleep(0.01)
    assert "t" in await store.paused_triggers(), "never paused"
    sent_at_pause = len(sink.sent)
    await asyncio.sleep(down_for)
    while_paused = len(sink.sent) - sent_at_pause
    assert not [e for e in store.s.events.values() if e.status is Status.FAILED]
    sink.up = True
    for _ in range(1000):
        if all(e.status is Status.DELIVERED for e in store.s.events.values()):
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert all(e.status is Status.DELIVERED for e in store.s.events.values())
    return while_paused


async def test_a_down_receiver_pauses_the_trigger_and_nothing_fails() -> None:
    store = MemoryStore(StoreSettings(url="memory://paused"))
    sink = SwitchSink()
    evs = [make_event(trigger="t", doc_id=str(i % 4), n=i) for i in range(12)]
    with capture_logs() as logs:
        # ~25 probe intervals while paused: one attempt each, at most.
        while_paused = await outage(store, sink, evs, down_for=1.0)
    assert while_paused <= 30  # probes, not every event's every retry
    assert await store.paused_triggers() == {}
    said = [e["event"] for e in logs]
    assert said.count("trigger paused") == 1 and said.count("trigger resumed") == 1
    # Per row, every event delivered in the order it was stored.
    delivered = [ev_id for ev_id in sink.sent
                 if store.s.attempts[ev_id][-1].ok]
    by_row: dict[str | None, list[int]] = {}
    for ev in sorted(store.s.events.values(), key=lambda e: e.seq):
        by_row.setdefault(ev.doc_id, []).append(ev.seq)
    seq = {e.id: e.seq for e in store.s.events.values()}
    for row, seqs in by_row.items():
        order = [seq[i] for i in dict.fromkeys(delivered)
                 if store.s.events[i].doc_id == row]
        assert order == seqs, row


async def test_one_event_failing_alone_does_not_pause() -> None:
    t = Trigger(name="t", url="http://x", sink="memory", retries=3, backoff_base=1,
                backoff_max=2, pause_after=2, sink_options=MemorySinkOptions(always_fail=True))
    store = await run_until([t], 1, settle=0.05)
    [ev] = store.s.events.values()
    assert ev.status is Status.FAILED and ev.attempts == 4
    assert await store.paused_triggers() == {}


class SwitchBatchSink(SwitchSink):
    """The same, five events per request (one outcome per request's events)."""

    def batch_size(self, trigger: Trigger) -> int:
        return 5

    async def deliver(self, trigger: Trigger, events: Sequence[Event]) -> list[Outcome]:
        outcomes = await super().deliver(trigger, events)
        request = str(len(self.sent))
        return [attrs.evolve(o, request_id=request, batch_size=len(events)) for o in outcomes]


async def test_batch_mode_pauses_too_and_nothing_fails() -> None:
    store = MemoryStore(StoreSettings(url="memory://paused-batch"))
    evs = [make_event(trigger="t", doc_id=str(i), n=i) for i in range(40)]
    await outage(store, SwitchBatchSink(), evs, down_for=0.5)
