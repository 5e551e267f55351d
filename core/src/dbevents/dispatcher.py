"""The dispatcher: delivers events from memory, hands them to sinks, and
records each attempt's verdict.

What the engine just stored it hands over in memory (``hand``): the store
holds those events leased to this worker (``Store.enqueue_held``), so they are
never read back. The store is asked (``claim``) only for what is not in memory:
events left from before a restart, retries that come due, redeliveries, expired
leases, work other workers share. A crash loses only in-memory copies of what
is in the store, leased: a restart (or another worker, once the lease ran out)
claims them back.

Per-row order lives in lanes: of each (trigger, row) only one event is queued or
in flight; the row's later events in memory wait behind it in its lane. An
event the store holds for us is one whose earlier active events the store also
holds for us, so the lane has them all. When an event goes back to the store (a
retry, a release), the rest of its lane goes back too, behind it, and so does
an event of that row whose enqueue may have committed before the put-back did
(``_back``): it was held while its row was still ours. Claims then hand the row
out again in order, head first.

Leases of events waiting in memory are renewed in batches (``renew``) every
third of a lease: a lane behind a slow receiver can wait longer than any lease
sized up front, and on a shared PostgreSQL store an expired lease is another
worker's to take.

Verdicts are recorded by the finisher in large batches (one store transaction
for many attempts); the store does the writing off the event loop.
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

from dbevents.backoff import Backoff, scheduled
from dbevents.observers import NONE, Observers
from dbevents.protocols import Sink, Store, trigger_pauses
from dbevents.values import Attempt, Event, Finish, Outcome, Status, Trigger

log = structlog.get_logger("dbevents.dispatcher")

Row = tuple[str, str | None]  # (trigger, doc_id): the unit of per-row order
_FREE: deque[Event] = deque()  # lanes.get default: the row has nothing in memory

LEASE_MARGIN = 30.0  # seconds beyond the longest attempt a claim stays ours
STOP_GRACE = 5.0  # seconds a stopping dispatcher keeps trying to record results


def backoff_delay(trigger: Trigger, attempt: int, retry_after: float | None,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    About backoff_base x backoff_factor^(n-1), +-25%, capped at backoff_max (by
    default 1 s, 10 s, 60 s: a schedule that outlasts a short outage); a
    receiver's Retry-After wins, capped at backoff_max so one receiver cannot
    park an event for a day.
    """
    cap = trigger.backoff_max / 1000.0
    if retry_after is not None:
        return max(0.0, min(retry_after, cap))
    return scheduled(attempt, trigger.backoff_base / 1000.0, cap, trigger.backoff_factor, rng)


def looks_down(o: Outcome) -> bool:
    """A failure that says the receiver itself is down (no answer, a reset, a
    timeout, a 5xx), not that it refused this one event."""
    return not o.ok and not o.give_up and (o.status_code is None or o.status_code >= 500)


def verdicts(trigger: Trigger, events: Sequence[Event], outcomes: Sequence[Outcome],
             now: datetime, paused: bool = False) -> list[Finish]:
    """The verdict on each event after its attempt: delivered, failed for good, or
    pending until a backoff. Events of one POST share its outcome, so the decision
    is made once per outcome and attempt number (and a batch retries together).

    ``paused``: the trigger's receiver is down. A failure that says so ends no
    event failed: it waits, due at once, for the trigger to resume."""
    decided: dict[tuple[str | int, int], tuple[Status, datetime | None]] = {}
    finishes = []
    # An event's place in its request: the events of one request share the
    # request_id the sink reports; an outcome without one is a request of its own.
    index: dict[str, int] = {}
    for i, (event, o) in enumerate(zip(events, outcomes, strict=True)):
        number = event.attempts + 1
        request: str | int
        if o.request_id is None:
            position, request = 0, i
        else:
            request = o.request_id
            position = index.get(request, 0)
            index[request] = position + 1
        key = (request, number)
        verdict_ = decided.get(key)
        if verdict_ is None:
            if o.ok:
                verdict_ = (Status.DELIVERED, None)
            elif paused and looks_down(o):
                verdict_ = (Status.PENDING, now)
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


class _Health:
    """What the last attempts of one trigger say about its receiver."""

    __slots__ = ("last_error", "seen", "since", "streak")

    def __init__(self) -> None:
        self.streak = 0  # failed attempts in a row that look like a down receiver
        self.seen: set[str] = set()  # events among them (two are enough)
        self.last_error: str | None = None
        self.since = 0.0  # monotonic time the trigger paused


class Dispatcher:
    HOLD_LIMIT = 20_000  # events held in memory (queued, in lanes, in flight, unrecorded)

    observers: Observers = NONE  # the engine sets its own
    def __init__(self, store: Store, triggers: Sequence[Trigger], sinks: Mapping[str, Sink],
                 finish_batch: int = 2000) -> None:
        self.store = store
        self.triggers = {t.name: t for t in triggers}
        self.sinks = sinks
        self.finish_batch = finish_batch
        self._waiter: asyncio.Future[None] | None = None
        self._woken = False
        self._holding = False  # results wait for an unavailable store
        self._give_up_at = 0.0
        # In memory until its verdict is recorded: queued, in a lane, in flight.
        self._held: dict[str, Event] = {}
        # Per (trigger, row): the row's events in memory behind the one queued or
        # in flight (a row is in _lanes exactly while one of its events is; None
        # while nothing waits behind it, so that most rows cost no deque).
        self._lanes: dict[Row, deque[Event] | None] = {}
        # Rows with events put back in the store: seq -> the epoch its write
        # returned at (None: not yet). See hand().
        self._back: dict[Row, dict[int, int | None]] = {}
        self._back_ids: dict[str, tuple[Row, int]] = {}
        self._epoch = 0  # store writes that put events back, returned
        self._tickets: dict[int, int] = {}  # enqueues in progress, by the epoch they began at
        # The store may have due work that is not in memory; when not, _due_at
        # is when it next will (a retry, a lease running out).
        self._may_have = True
        self._told = 0  # times told so (a claim in progress must not clear it)
        self._due_at: datetime | None = None
        self._spilling = False  # memory was full: the engine stores, claims deliver
        # Rows with events waiting in the store behind one of ours: when ours is
        # done, theirs is due, so the store is asked again.
        self._stored_rows: set[Row] = set()
        self._renewed = time.monotonic()
        # Per trigger: claimed events not yet attempted or being attempted. Held
        # events do not count: a backlog in memory must not keep retries that
        # came due from being claimed (they queue behind it, bounded by HOLD_LIMIT).
        self._inflight: dict[str, int] = {t: 0 for t in self.triggers}
        self._claimed: set[str] = set()
        self._queued: dict[str, deque[Event]] = {t: deque() for t in self.triggers}
        self._workers: dict[str, int] = {t: 0 for t in self.triggers}
        self._tasks: set[asyncio.Task[None]] = set()
        self._task_events: dict[asyncio.Task[None], list[Event]] = {}  # being sent
        self._done: list[Finish] = []  # verdicts not yet recorded in the store
        self._releases: list[str] = []  # events to give back to the store
        self._done_ready = asyncio.Event()
        self._stopping = False
        # Claimed events may wait in the queue for one round of attempts before
        # their own: the lease covers both (and renewals cover longer waits).
        self.lease_seconds = 2 * max((t.timeout / 1000.0 for t in triggers), default=5.0) \
            + LEASE_MARGIN
        self._batch = {t.name: max(1, sinks[t.sink].batch_size(t)) for t in triggers}
        self._concurrency = {t.name: max(1, t.concurrency) for t in triggers}
        # One round in flight and one queued; claim again once half of it is free.
        self._capacity = {name: 2 * self._concurrency[name] * size
                          for name, size in self._batch.items()}
        self._refill = {name: cap // 2 for name, cap in self._capacity.items()}
        # Endpoint health: a trigger whose receiver is down pauses (its events
        # wait, unattempted) and one probe at a time tests the receiver.
        self._health = {t.name: _Health() for t in triggers}
        self._paused: dict[str, datetime] = {}
        self._probers: dict[str, asyncio.Task[None]] = {}
        self._pause_writes: dict[str, asyncio.Task[None]] = {}
        self.delivered = 0
        self.failed = 0

    def wake(self) -> None:
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def notify(self) -> None:
        """The store has work that is not in memory (another process's, or events
        stored without a hold): claim it."""
        self._may_have = True
        self._told += 1
        self.wake()

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

    # -- from the engine: events just stored, held for us ----------------------
    def room(self) -> bool:
        """Whether the engine should store its next events held for delivery from
        memory. No while memory is full, and then until claims have caught up
        with what was stored meanwhile: new events must not overtake them."""
        if len(self._held) >= self.HOLD_LIMIT:
            self._spilling = True
        return not self._spilling and not self._stopping

    def stored_behind(self, events: Sequence[Event], release: bool = False) -> None:
        """Events the store has but did not hold for us (their row had a pending
        event, or they were stored already): the store is asked for them.
        ``release``: any of them held for us but not in memory (stored by a write
        whose reply was lost) is handed back, due now."""
        self._stored_rows.update((ev.trigger, ev.doc_id) for ev in events)
        if release:
            self._releases.extend(ev.id for ev in events if ev.id not in self._held)
            self._done_ready.set()
        self.notify()

    def in_memory(self) -> int:
        """Events held in memory: queued, in lanes, in flight, results unrecorded."""
        return len(self._held)

    def ticket(self) -> int:
        """Taken before an enqueue_held call, given back with hand() (or untick)."""
        t = self._epoch
        self._tickets[t] = self._tickets.get(t, 0) + 1
        return t

    def untick(self, ticket: int) -> None:
        n = self._tickets.get(ticket, 0) - 1
        if n > 0:
            self._tickets[ticket] = n
        else:
            self._tickets.pop(ticket, None)

    def hand(self, events: Sequence[Event], ticket: int) -> None:
        """Events the store holds for us (enqueue_held), oldest first.

        An event put back in the store (a retry, a release) makes its row's
        later events wait behind it there. The store holds a new event only when
        its row has no pending event, so an event enqueued after the put-back
        returned is never held behind it; one whose enqueue began before may have
        committed first, so it goes back too. The ticket says which it was.
        """
        if self._back:
            oldest = min(self._tickets, default=self._epoch)
            for row in list(self._back):
                marks = self._back[row]
                for seq in [q for q, at in marks.items() if at is not None and at <= oldest]:
                    del marks[seq]
                if not marks:
                    del self._back[row]
        if not events:
            return
        if self._stopping:  # too late for memory: back to the store, due now
            self._releases.extend(ev.id for ev in events)
            self._done_ready.set()
            return
        back = self._back
        keep: list[Event] = []
        for ev in events:
            row_marks = back.get((ev.trigger, ev.doc_id)) if back else None
            if row_marks and any(seq < ev.seq and (at is None or ticket < at)
                                 for seq, at in row_marks.items()):
                self._releases.append(ev.id)
                self._stored_rows.add((ev.trigger, ev.doc_id))
            else:
                keep.append(ev)
        if len(keep) < len(events):
            self._done_ready.set()
        self._take(keep)

    def _take(self, events: list[Event], claimed: bool = False) -> None:
        """Into memory: each event queued if its row has nothing in memory, else
        into the row's lane."""
        lanes, held, queued = self._lanes, self._held, self._queued
        started: dict[str, int] = {}
        for ev in events:
            if ev.id in held:
                continue  # already ours (a lease that ran out, claimed back)
            name = ev.trigger
            held[ev.id] = ev
            row = (name, ev.doc_id)
            lane = lanes.get(row, _FREE)
            if lane is _FREE:
                lanes[row] = None
                queued[name].append(ev)
                started[name] = started.get(name, 0) + 1
            elif lane is None:
                lanes[row] = deque((ev,))
            else:
                lane.append(ev)
            if claimed:
                self._claimed.add(ev.id)
                self._inflight[name] += 1
        for name in started:
            self._start_workers(name)

    def _start_workers(self, name: str) -> None:
        if name in self._paused:
            return  # only the probe sends
        trigger = self.triggers[name]
        sink = self.sinks[trigger.sink]
        queue = self._queued[name]
        wanted = min(self._concurrency[name], -(-len(queue) // self._batch[name]))
        for _ in range(wanted - self._workers[name]):
            self._workers[name] += 1
            task = asyncio.create_task(self._worker(trigger, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- the claim loop: what is not in memory --------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await self._forget_old_pauses()
        finisher = asyncio.create_task(self._finisher(), name="dbevents-finisher")
        try:
            await self._claim_loop(stop)
        finally:
            self._stopping = True
            for prober in self._probers.values():
                prober.cancel()
            await asyncio.gather(*self._probers.values(), return_exceptions=True)
            await self._drain()
            # Nobody delivers these triggers now: they are no longer paused.
            for name in list(self._paused):
                self._record_pause(name, None)
            await asyncio.gather(*self._pause_writes.values(), return_exceptions=True)
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
                timeout: float | None = None
                if time.monotonic() - self._renewed > self.lease_seconds / 3:
                    await self._renew()
                if self._due_at is not None and self._due_at <= _now():
                    self._may_have, self._due_at = True, None
                limits = {name: cap - self._inflight[name]
                          for name, cap in self._capacity.items()
                          if cap - self._inflight[name] >= self._refill[name]
                          and name not in self._paused}
                if self._holding:
                    # Results are waiting for the store: claiming now could hand
                    # out again (expired leases) events whose outcome we hold.
                    limits = {}
                    timeout = 1.0
                elif len(self._done) >= self.finish_batch or not self._may_have:
                    # The store records results slower than they come (the
                    # finisher wakes us), or it has nothing due that memory lacks.
                    limits = {}
                if limits:
                    told = self._told
                    try:
                        events = await self.store.claim(limits, self.lease_seconds, _now())
                    except Exception as exc:  # the store may come back; keep the loop alive
                        log.warning("claim failed; delivery paused", error=str(exc))
                        events, timeout = [], 1.0
                    if events:
                        # Claimed: later events of their rows may be in the store.
                        self._stored_rows.update((ev.trigger, ev.doc_id) for ev in events)
                        self._take(events, claimed=True)
                    if not timeout and sum(limits.values()) > len(events):
                        # Everything due is out: until the next retry or lease
                        # expiry, or a wake-up, the store has nothing for us.
                        # Unless told otherwise meanwhile: then claim again.
                        if self._told == told:
                            self._may_have = self._spilling = False
                        self._due_at = None
                        due = await self._next_due()
                        # A retry recorded meanwhile set its own due time.
                        if due is not None and (self._due_at is None or due < self._due_at):
                            self._due_at = due
                    elif events:
                        continue  # more may be due right away
                if timeout is None and self._due_at is not None:
                    # Floor: a due time already past means the claim raced a
                    # finish; a wake-up will come, don't spin meanwhile.
                    timeout = max(0.05, (self._due_at - _now()).total_seconds())
                if self._held:
                    left = self.lease_seconds / 3 - (time.monotonic() - self._renewed)
                    timeout = max(0.05, min(timeout if timeout is not None else left, left))
                await self._sleep(timeout)
        finally:
            stop_wait.cancel()

    async def _next_due(self) -> datetime | None:
        try:
            return await self.store.next_due()
        except Exception:
            return _now() + timedelta(seconds=1)

    async def _renew(self) -> None:
        """Extend the leases of everything in memory, in one call."""
        self._renewed = time.monotonic()
        if not self._held:
            return
        try:
            lost = await self.store.renew(list(self._held), self.lease_seconds)
        except Exception as exc:  # tried again next time; a lease is longer than that
            log.warning("renewing leases failed", error=str(exc))
            return
        waiting = {ev.id for q in self._queued.values() for ev in q}
        waiting.update(ev.id for lane in self._lanes.values() for ev in lane or ())
        gone = [eid for eid in lost if eid in waiting and eid in self._held]
        if not gone:
            return
        # Taken over by another worker (our lease ran out): not ours to send;
        # the rest of their rows goes back behind them.
        log.warning("leases taken over; those events are left to their new holder",
                    events=len(gone))
        self._epoch += 1
        gone_set = set(gone)
        for name, queue in self._queued.items():
            self._queued[name] = deque(ev for ev in queue if ev.id not in gone_set)
        for eid in gone:
            ev = self._held.get(eid)
            if ev is not None:
                self._put_back_row(ev, drop=True, at=self._epoch)

    def _put_back_row(self, ev: Event, drop: bool, at: int | None = None) -> None:
        """``ev`` leaves memory for the store (``drop``: it is no longer ours at
        all; else its verdict is on its way). The rest of its row's lane is
        released behind it, and the row is marked (see hand()) until the store
        write that put ``ev`` back has returned (``at``: the epoch it did)."""
        row = (ev.trigger, ev.doc_id)
        lane = self._lanes.pop(row, None)
        self._stored_rows.add(row)
        self._back.setdefault(row, {})[ev.seq] = at
        if at is None:
            self._back_ids[ev.id] = (row, ev.seq)
        if drop:
            self._held.pop(ev.id, None)
            self._unclaim(ev)
        for e in lane or ():
            if e.id == ev.id:
                continue
            self._held.pop(e.id, None)
            self._unclaim(e)
            self._releases.append(e.id)
        self._done_ready.set()

    def _unclaim(self, ev: Event) -> None:
        if self._claimed and ev.id in self._claimed:
            self._claimed.discard(ev.id)
            self._inflight[ev.trigger] -= 1

    # -- sending ------------------------------------------------------------------
    async def _worker(self, trigger: Trigger, sink: Sink) -> None:
        """Sends the trigger's queued events, a chunk at a time, until none are left."""
        name, size = trigger.name, self._batch[trigger.name]
        task = asyncio.current_task()
        assert task is not None
        try:
            while not self._stopping and name not in self._paused:
                queue = self._queued[name]
                if not queue:
                    break
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
        paused = self._health_after(trigger, events, outcomes)
        finishes = verdicts(trigger, events, outcomes, now, paused)
        self.observers.delivered(trigger, events, outcomes, finishes)
        name = trigger.name
        self._done.extend(finishes)
        self._done_ready.set()
        # The row's next event in memory may go now: the verdict is known, and
        # the store records it before (or with) anything later of the row. A
        # retry goes back to the store, and the rest of its lane behind it.
        lanes, queue = self._lanes, self._queued[name]
        for ev, f in zip(events, finishes, strict=True):
            row = (name, ev.doc_id)
            if f.status is Status.PENDING:
                self._put_back_row(ev, drop=False)
                continue
            lane = lanes.get(row)
            if lane:
                queue.append(lane.popleft())  # the row stays taken, by its next event
            else:
                lanes.pop(row, None)
        if self._claimed:
            for ev in events:
                self._unclaim(ev)
        inflight = self._inflight[name]
        if queue:
            self._start_workers(name)
        if self._capacity[name] - inflight >= self._refill[name] and self._may_have:
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

    # -- endpoint health: pause a trigger whose receiver is down ----------------
    def _health_after(self, trigger: Trigger, events: Sequence[Event],
                      outcomes: Sequence[Outcome]) -> bool:
        """Take in one delivery's outcomes (a request counts once); pause or
        resume the trigger. Returns whether it was paused when the attempt
        ended: a failure then ends no event failed (see verdicts)."""
        name = trigger.name
        was = name in self._paused
        if trigger.pause_after == 0:
            return False
        h = self._health[name]
        requests: set[str] = set()
        for ev, o in zip(events, outcomes, strict=True):
            request = o.request_id or ev.id
            if request in requests:
                continue
            requests.add(request)
            if looks_down(o):
                h.streak += 1
                if len(h.seen) < 2:
                    h.seen.add(ev.id)
                h.last_error = o.error or f"HTTP {o.status_code}"
                continue
            h.streak = 0
            h.seen.clear()
            if o.ok and name in self._paused:
                self._resume(trigger)
        # Two events at least: one event the receiver refuses again and again is
        # that event's problem, and it fails after 1 + retries attempts.
        if name not in self._paused and h.streak >= trigger.pause_after and len(h.seen) >= 2:
            self._pause(trigger)
        return was

    def _pause(self, trigger: Trigger) -> None:
        name = trigger.name
        h = self._health[name]
        h.since = time.monotonic()
        self._paused[name] = _now()
        log.warning("trigger paused", trigger=name, failures=h.streak, error=h.last_error,
                    probe_max_ms=trigger.probe_max)
        self._record_pause(name, self._paused[name])
        self._probers[name] = asyncio.create_task(
            self._probe(trigger, self.sinks[trigger.sink]), name=f"dbevents-probe-{name}")

    def _resume(self, trigger: Trigger) -> None:
        name = trigger.name
        self._paused.pop(name, None)
        h = self._health[name]
        prober = self._probers.pop(name, None)
        if prober is not None and prober is not asyncio.current_task():
            prober.cancel()  # a probe in flight is shielded: it finishes
        log.info("trigger resumed", trigger=name,
                 paused_s=round(time.monotonic() - h.since, 1))
        self._record_pause(name, None)
        self._start_workers(name)
        self.notify()  # its retries and the events stored meanwhile

    async def _probe(self, trigger: Trigger, sink: Sink) -> None:
        """While paused: one event at a time, on a doubling wait up to probe_max,
        the oldest waiting in memory, else one claimed from the store."""
        name = trigger.name
        first = max(0.05, trigger.backoff_base / 1000.0)
        backoff = Backoff(first, max(first, trigger.probe_max / 1000.0))
        while name in self._paused and not self._stopping:
            await backoff.sleep()
            queue = self._queued[name]
            if not queue:
                try:
                    claimed = await self.store.claim({name: 1}, self.lease_seconds, _now())
                except Exception as exc:  # the store may come back; probe again later
                    log.warning("claim for a probe failed", trigger=name, error=str(exc))
                    continue
                if claimed:
                    self._stored_rows.update((ev.trigger, ev.doc_id) for ev in claimed)
                    self._take(claimed, claimed=True)
            if not queue or name not in self._paused:
                continue
            task = asyncio.create_task(self._send(trigger, sink, [queue.popleft()]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            await asyncio.shield(task)  # a resume cancels this loop, not the attempt

    async def _send(self, trigger: Trigger, sink: Sink, chunk: list[Event]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task_events[task] = chunk
        try:
            await self._deliver(trigger, sink, chunk)
        finally:
            self._task_events.pop(task, None)

    def _record_pause(self, name: str, since: datetime | None) -> None:
        """In the store, for `dbevents status`; off the hot path, in order."""
        pauses = trigger_pauses(self.store)
        if pauses is None:
            return
        before = self._pause_writes.get(name)

        async def write() -> None:
            if before is not None:
                await asyncio.gather(before, return_exceptions=True)
            try:
                await pauses.set_trigger_paused(name, since)
            except Exception as exc:  # only `status` misses it
                log.warning("recording a trigger's pause failed", trigger=name, error=str(exc))

        self._pause_writes[name] = asyncio.create_task(write())

    async def _forget_old_pauses(self) -> None:
        """A process that died paused left its record: this one starts unpaused."""
        pauses = trigger_pauses(self.store)
        if pauses is None:
            return
        with contextlib.suppress(Exception):
            for name in await pauses.paused_triggers():
                if name in self.triggers:
                    await pauses.set_trigger_paused(name, None)

    # -- finishing: one store transaction for many attempts -------------------
    async def _finisher(self) -> None:
        while True:
            await self._done_ready.wait()
            self._done_ready.clear()
            while self._done or self._releases:
                if self._releases:
                    ids, self._releases = self._releases, []
                    await self._release(ids)
                if self._done:
                    batch = self._done[: self.finish_batch]
                    self._done = self._done[self.finish_batch:]
                    await self._finish(batch)
            if self._stopping and not self._tasks and not self._done:
                return

    async def _release(self, ids: list[str]) -> None:
        try:
            await self.store.release(ids)
        except Exception as exc:  # their leases run out instead; a claim takes them
            log.warning("handing events back failed; they wait for their leases",
                        error=str(exc), events=len(ids))
            return
        self.notify()

    async def _finish(self, batch: list[Finish]) -> None:
        backoff = Backoff(0.5, 10.0)
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
                await backoff.sleep()
        self._epoch += 1
        held, back_ids, stored_rows = self._held, self._back_ids, self._stored_rows
        for f in batch:
            ev = held.pop(f.event_id, None)
            if f.status is not Status.PENDING and ev is not None and stored_rows:
                row = (ev.trigger, ev.doc_id)
                if row in stored_rows:
                    # The row's next event in the store is its head now.
                    stored_rows.discard(row)
                    self._may_have = True
                    self._told += 1
            if f.status is Status.DELIVERED:
                self.delivered += 1
            elif f.status is Status.FAILED:
                self.failed += 1
            else:
                # A retry is due at its own time: claim it then.
                at = f.next_attempt_at or _now()
                if self._due_at is None or at < self._due_at:
                    self._due_at = at
            mark = back_ids.pop(f.event_id, None) if back_ids else None
            if mark is not None:
                marks = self._back.get(mark[0])
                if marks is not None and mark[1] in marks:
                    marks[mark[1]] = self._epoch
        self.wake()

    async def _drain(self, grace: float | None = None) -> None:
        """On stop: hand back what is in memory but not sent (pending, due now),
        and let attempts in flight finish, bounded by the longest timeout."""
        queued = [ev for queue in self._queued.values() for ev in queue]
        queued += [ev for lane in self._lanes.values() for ev in lane or ()]
        for queue in self._queued.values():
            queue.clear()
        for ev in queued:
            self._unclaim(ev)
            self._held.pop(ev.id, None)
        self._lanes.clear()
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
