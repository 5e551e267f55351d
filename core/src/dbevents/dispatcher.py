"""The dispatcher: claims due events from the store, hands them to sinks, and
records each attempt's verdict.

Per-row order comes from the store (it only hands out the oldest unfinished
event of each trigger and row); the dispatcher adds the per-trigger concurrency
limit, batching, backoff, and batched finishing. It never sleeps when work is
ready: enqueue and finish wake it, and a timer wakes it for the next retry.

Each trigger has up to ``concurrency`` worker tasks that take claimed events from
the trigger's queue, one POST (or batch) at a time. The claim loop keeps that
queue topped up a round ahead, in claims of at least half the trigger's capacity
when busy, so a store round trip is paid per many events, not per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import structlog

from dbevents.observers import NONE, Observers
from dbevents.protocols import Sink, Store
from dbevents.values import Attempt, Event, Finish, Outcome, Status, Trigger

log = structlog.get_logger("dbevents.dispatcher")

LEASE_MARGIN = 30.0  # seconds beyond the longest attempt a claim stays ours
RECHECK = 0.5  # seconds between next-retry look-ups while deliveries are in flight
STOP_GRACE = 5.0  # seconds a stopping dispatcher keeps trying to record results


def backoff_delay(trigger: Trigger, attempt: int, retry_after: float | None,
                  rng: random.Random = random._inst) -> float:  # type: ignore[attr-defined]
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    Exponential with full jitter; a receiver's Retry-After wins, capped at
    backoff_max so one receiver cannot park an event for a day.
    """
    cap = trigger.backoff_max / 1000.0
    if retry_after is not None:
        return max(0.0, min(retry_after, cap))
    ceiling = min(cap, trigger.backoff_base / 1000.0 * (2 ** (attempt - 1)))
    return rng.uniform(0, ceiling)


def verdict(trigger: Trigger, event: Event, outcome: Outcome, now: datetime) -> Finish:
    return verdicts(trigger, [event], [outcome], now)[0]


def verdicts(trigger: Trigger, events: Sequence[Event], outcomes: Sequence[Outcome],
             now: datetime) -> list[Finish]:
    """The verdict on each event after its attempt: delivered, failed for good, or
    pending until a backoff. Events of one POST share its outcome, so the decision
    is made once per outcome and attempt number (and a batch retries together)."""
    decided: dict[tuple[int, int], tuple[Status, datetime | None]] = {}
    finishes = []
    # An event's place in its request (the events of one request share its Outcome).
    index: dict[int, int] = {}
    for event, o in zip(events, outcomes, strict=True):
        number = event.attempts + 1
        if o.request_id is None:
            position = 0
        else:
            position = index.get(id(o), 0)
            index[id(o)] = position + 1
        key = (id(o), number)
        verdict_ = decided.get(key)
        if verdict_ is None:
            if o.ok:
                verdict_ = (Status.DELIVERED, None)
            elif o.give_up or number >= trigger.max_attempts:
                verdict_ = (Status.FAILED, None)
            else:
                delay = backoff_delay(trigger, number, o.retry_after)
                verdict_ = (Status.PENDING, now + timedelta(seconds=delay))
            decided[key] = verdict_
        # Positional: the fields in their declared order (cheaper than keywords).
        attempt = Attempt(event.id, number, o.started_at, o.duration_ms, o.ok, o.status_code,
                          o.response_body, o.error, o.request_headers, o.batch_size,
                          o.request_id, position)
        finishes.append(Finish(event.id, attempt, *verdict_))
    return finishes


class Dispatcher:
    observers: Observers = NONE  # the engine sets its own
    def __init__(self, store: Store, triggers: Sequence[Trigger], sinks: Mapping[str, Sink],
                 finish_batch: int = 2000) -> None:
        self.store = store
        self.triggers = {t.name: t for t in triggers}
        self.sinks = sinks
        self.finish_batch = finish_batch
        self._waiter: asyncio.Future[None] | None = None
        self._woken = False
        self._due_asked = 0.0
        self._inflight_ids: set[str] = set()
        self._holding = False  # results wait for an unavailable store
        self._give_up_at = 0.0
        # Claimed and not yet finished (queued or being sent), per trigger.
        self._inflight: dict[str, int] = {t: 0 for t in self.triggers}
        self._queued: dict[str, deque[Event]] = {t: deque() for t in self.triggers}
        self._workers: dict[str, int] = {t: 0 for t in self.triggers}
        self._tasks: set[asyncio.Task[None]] = set()
        self._task_events: dict[asyncio.Task[None], list[Event]] = {}  # being sent
        self._done: list[Finish] = []  # verdicts not yet recorded in the store
        self._done_ready = asyncio.Event()
        self._stopping = False
        # Claimed events may wait in the queue for one round of attempts before
        # their own: the lease covers both.
        self.lease_seconds = 2 * max((t.timeout / 1000.0 for t in triggers), default=5.0) \
            + LEASE_MARGIN
        self._batch = {t.name: max(1, sinks[t.sink].batch_size(t)) for t in triggers}
        self._concurrency = {t.name: max(1, t.concurrency) for t in triggers}
        # One round in flight and one queued; claim again once half of it is free.
        self._capacity = {name: 2 * self._concurrency[name] * size
                          for name, size in self._batch.items()}
        self._refill = {name: cap // 2 for name, cap in self._capacity.items()}
        self.delivered = 0
        self.failed = 0

    def wake(self) -> None:
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _sleep(self, seconds: float | None) -> None:
        """Until wake() or ``seconds``; a future, not a task per pass (cheap when busy)."""
        if self._woken:
            return
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(seconds, self.wake) if seconds is not None else None
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    # -- the claim loop ----------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        finisher = asyncio.create_task(self._finisher(), name="dbevents-finisher")
        try:
            await self._claim_loop(stop)
        finally:
            self._stopping = True
            await self._drain()
            # Results the store cannot take are given up after a while: stopping
            # must not hang on a dead store (those events are delivered again).
            self._give_up_at = time.monotonic() + STOP_GRACE
            self._done_ready.set()
            await finisher

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        stop_wait = asyncio.ensure_future(stop.wait())
        stop_wait.add_done_callback(lambda _: self.wake())
        try:
            while not stop.is_set():
                self._woken = False
                limits = {name: cap - self._inflight[name]
                          for name, cap in self._capacity.items()
                          if cap - self._inflight[name] >= self._refill[name]}
                timeout: float | None = None
                if self._holding:
                    # Results are waiting for the store: claiming now could hand
                    # out again (expired leases) events whose outcome we hold.
                    limits = {}
                    timeout = 1.0
                elif len(self._done) >= self.finish_batch:
                    # The store records results slower than they come: no more
                    # work until it catches up (the finisher wakes us), so the
                    # results held in memory stay bounded.
                    limits = {}
                if limits:
                    try:
                        events = await self.store.claim(limits, self.lease_seconds, _now())
                    except Exception as exc:  # the store may come back; keep the loop alive
                        log.warning("claim failed; delivery paused", error=str(exc))
                        events, timeout = [], 1.0
                    # An event still in flight here (its lease ran out while its
                    # result was held) is not sent again.
                    events = [ev for ev in events if ev.id not in self._inflight_ids]
                    if events:
                        self._start(events)
                    if not timeout and sum(limits.values()) > len(events):
                        # Everything due is out; sleep until the next retry is due.
                        # While deliveries are in flight their results wake us, so
                        # the store is asked at most every RECHECK seconds.
                        if self._tasks and time.monotonic() - self._due_asked < RECHECK:
                            timeout = RECHECK
                        else:
                            self._due_asked = time.monotonic()
                            due = await self._next_due()
                            if due is not None:
                                # Floor: a due time already past means the claim raced
                                # a finish; a wake-up will come, don't spin meanwhile.
                                timeout = max(0.05, (due - _now()).total_seconds())
                    elif events:
                        continue  # more may be due right away
                await self._sleep(timeout)
        finally:
            stop_wait.cancel()

    async def _next_due(self) -> datetime | None:
        try:
            return await self.store.next_due()
        except Exception:
            return _now() + timedelta(seconds=1)

    def _start(self, events: list[Event]) -> None:
        by_trigger: dict[str, list[Event]] = {}
        for ev in events:
            by_trigger.setdefault(ev.trigger, []).append(ev)
        for name, evs in by_trigger.items():
            trigger = self.triggers[name]
            sink = self.sinks[trigger.sink]
            self._inflight[name] += len(evs)
            self._inflight_ids.update(ev.id for ev in evs)
            queue = self._queued[name]
            queue.extend(evs)
            wanted = min(self._concurrency[name], -(-len(queue) // self._batch[name]))
            for _ in range(wanted - self._workers[name]):
                self._workers[name] += 1
                task = asyncio.create_task(self._worker(trigger, sink))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _worker(self, trigger: Trigger, sink: Sink) -> None:
        """Sends the trigger's queued events, a chunk at a time, until none are left."""
        name, size = trigger.name, self._batch[trigger.name]
        queue = self._queued[name]
        task = asyncio.current_task()
        assert task is not None
        try:
            while queue and not self._stopping:
                chunk = [queue.popleft() for _ in range(min(size, len(queue)))]
                self._task_events[task] = chunk
                await self._deliver(trigger, sink, chunk)
                del self._task_events[task]
        finally:
            self._workers[name] -= 1

    async def _deliver(self, trigger: Trigger, sink: Sink, events: list[Event]) -> None:
        try:
            outcomes = await sink.deliver(trigger, events)
            if len(outcomes) != len(events):
                raise RuntimeError(f"sink returned {len(outcomes)} outcomes for {len(events)}")
        except Exception as exc:  # a sink bug must not lose the event: retry it
            log.exception("sink raised; treating as a failed attempt", trigger=trigger.name)
            now = _now()
            outcomes = [Outcome(ok=False, started_at=now, duration_ms=0.0,
                                error=f"sink error: {type(exc).__name__}: {exc}")] * len(events)
        now = _now()
        finishes = verdicts(trigger, events, outcomes, now)
        self.observers.delivered(trigger, events, outcomes, finishes)
        name = trigger.name
        self._done.extend(finishes)
        self._done_ready.set()
        # The trigger has room again as soon as the attempt is over, not only once
        # its result is recorded: the store keeps the row's next event back until
        # then anyway (per-row order), and an event whose result is still held is
        # never sent twice (_inflight_ids).
        inflight = self._inflight[name] = self._inflight[name] - len(events)
        if self._capacity[name] - inflight >= self._refill[name]:
            self.wake()
        # One line per POST: the unit of work a user follows.
        first, out = finishes[0], outcomes[0]
        line = log.warning if first.status is Status.FAILED else log.info
        line(
            "delivery",
            trigger=trigger.name,
            event_id=first.event_id if len(events) == 1 else None,
            events=len(events),
            attempt=first.attempt.number,
            outcome=first.status.value,
            status_code=out.status_code,
            error=out.error,
            duration_ms=round(out.duration_ms, 1),
            **({"retry_at": first.next_attempt_at.isoformat()} if first.next_attempt_at else {}),
        )

    # -- finishing: one store transaction for many attempts -------------------
    async def _finisher(self) -> None:
        while True:
            await self._done_ready.wait()
            self._done_ready.clear()
            while self._done:
                batch, self._done = self._done[: self.finish_batch], self._done[self.finish_batch:]
                await self._finish(batch)
            if self._stopping and not self._tasks and not self._done:
                return

    async def _finish(self, batch: list[Finish]) -> None:
        delay = 0.5
        while True:
            try:
                await self.store.finish(batch)
                self._holding = False
                break
            except Exception as exc:  # hold the results until the store is back
                self._holding = True
                if self._give_up_at and time.monotonic() > self._give_up_at:
                    log.error("stopping without recording results; those events will be "
                              "delivered again", error=str(exc), events=len(batch))
                    return
                log.warning("recording results failed; held until the store is back",
                            error=str(exc), held=len(batch))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        for f in batch:
            self._inflight_ids.discard(f.event_id)
            if f.status is Status.DELIVERED:
                self.delivered += 1
            elif f.status is Status.FAILED:
                self.failed += 1
            else:
                # A retry is now due at its own time: the next pass asks the
                # store when, instead of waiting out RECHECK.
                self._due_asked = 0.0
        self.wake()

    async def _drain(self, grace: float | None = None) -> None:
        """On stop: hand back what was claimed but not sent, and let attempts in
        flight finish, bounded by the longest timeout."""
        queued = [ev for queue in self._queued.values() for ev in queue]
        for name, queue in self._queued.items():
            self._inflight[name] -= len(queue)
            queue.clear()
        self._inflight_ids.difference_update(ev.id for ev in queued)
        if queued:
            with contextlib.suppress(Exception):  # else their leases run out
                await self.store.release([ev.id for ev in queued])
        if grace is None:
            grace = max((t.timeout / 1000.0 for t in self.triggers.values()), default=5.0) + 1.0
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            unfinished = [ev.id for task in pending for ev in self._task_events.get(task, [])]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                log.warning("attempts cut short by shutdown; handed back", events=len(unfinished))
                with contextlib.suppress(Exception):  # else their leases run out
                    await self.store.release(unfinished)


def _now() -> datetime:
    return datetime.now(UTC)
