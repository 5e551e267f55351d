"""Several workers sharing one PostgreSQL store: stores in one process, worker
processes, a worker killed while holding claims, and LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dbevents.testing import make_event
from dbevents.values import Attempt, Event, Finish, Status
from dbevents_store_postgres import PostgresStore

OpenPg = Callable[..., Awaitable[PostgresStore]]
Exec = Callable[..., list[tuple[object, ...]]]

WORKER = Path(__file__).with_name("pg_store_worker.py")
TRIGGERS = {"x": 7, "y": 5}  # as in pg_store_worker.py


def backlog(rows: int, per_row: int) -> list[Event]:
    """Events of two triggers, each row's events spread over the whole backlog."""
    return [make_event(trigger=trigger, doc_id=f"r{r}", n=i)
            for i in range(per_row) for r in range(rows) for trigger in TRIGGERS]


def done(ev: Event, started: datetime) -> Finish:
    ms = (datetime.now(UTC) - started).total_seconds() * 1000
    return Finish(ev.id, Attempt(event_id=ev.id, number=ev.attempts + 1, started_at=started,
                                 duration_ms=ms, ok=True, status_code=200), Status.DELIVERED)


def assert_rows_in_order(pg_exec: Exec, schema: str) -> None:
    """From the invocation log: each event of a row was claimed only after the
    previous one of its row had been finished."""
    rows = pg_exec(
        f"SELECT e.trigger_name, e.doc_id, e.seq, a.started_at, a.duration_ms "
        f"FROM {schema}.events e JOIN {schema}.attempts a ON a.event_seq = e.seq "
        "ORDER BY e.trigger_name, e.doc_id, e.seq")
    previous: dict[tuple[object, object], datetime] = {}
    for trigger, doc_id, seq, started, ms in rows:
        assert isinstance(started, datetime) and isinstance(ms, float)
        row = (trigger, doc_id)
        if row in previous:
            assert started >= previous[row], f"event {seq} of row {row} overtook its predecessor"
        previous[row] = started + timedelta(milliseconds=ms)


async def test_two_stores_in_one_process_share_the_work(
        open_pg: OpenPg, pg_exec: Exec, pg_schema: str,
        check_heads: Callable[[], None]) -> None:
    first, second = await open_pg(), await open_pg()
    events = backlog(rows=20, per_row=10)
    for i in range(0, len(events), 100):
        await first.enqueue(events[i:i + 100], {})
    in_flight: dict[tuple[str, str | None], str] = {}
    claimed_by: dict[str, list[str]] = {"first": [], "second": []}

    async def work(name: str, store: PostgresStore) -> None:
        idle = 0
        while idle < 5:
            claimed = await store.claim(TRIGGERS, 30.0, datetime.now(UTC))
            started = datetime.now(UTC)
            if not claimed:
                idle += 1
                await asyncio.sleep(0.01)
                continue
            idle = 0
            for ev in claimed:
                row = (ev.trigger, ev.doc_id)
                assert row not in in_flight, f"{ev.id} claimed while {in_flight[row]} is in flight"
                in_flight[row] = ev.id
            claimed_by[name] += [ev.id for ev in claimed]
            await asyncio.sleep(0.005)
            finishes = [done(ev, started) for ev in claimed]
            for ev in claimed:
                del in_flight[(ev.trigger, ev.doc_id)]
            await store.finish(finishes)

    await asyncio.gather(work("first", first), work("second", second))
    everything = claimed_by["first"] + claimed_by["second"]
    assert len(everything) == len(set(everything)), "an event was handed out twice"
    assert sorted(everything) == sorted(e.id for e in events)
    assert claimed_by["first"] and claimed_by["second"], "one store did all the work"
    assert_rows_in_order(pg_exec, pg_schema)
    check_heads()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Worker processes started by a test; killed afterwards if still running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def start(processes: list[subprocess.Popen[str]], *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(WORKER), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ})
    processes.append(proc)
    return proc


async def ready(proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
    """The worker process, once its store is open (it says so)."""
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    assert json.loads(line) == {"ready": True}
    return proc


def claims_of(output: str) -> list[str]:
    return [eid for line in output.splitlines() if line.startswith('{"claimed"')
            for eid in json.loads(line)["claimed"]]


async def test_two_worker_processes_never_claim_one_event_twice(
        open_pg: OpenPg, pg_url: str, pg_exec: Exec, pg_schema: str,
        processes: list[subprocess.Popen[str]], check_heads: Callable[[], None]) -> None:
    store = await open_pg()  # creates the schema before the workers race for it
    events = backlog(rows=25, per_row=8)
    for i in range(0, len(events), 100):
        await store.enqueue(events[i:i + 100], {})
    workers = await asyncio.gather(*(ready(start(processes, pg_url, "drain"))
                                     for _ in range(2)))
    outputs = []
    for proc in workers:  # go
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
    for proc in workers:
        out, err = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 0, err
        outputs.append(claims_of(out))
    everything = outputs[0] + outputs[1]
    assert len(everything) == len(set(everything)), "an event was handed out twice"
    assert sorted(everything) == sorted(e.id for e in events)
    assert outputs[0] and outputs[1], "one process did all the work"
    stats = {s.trigger: s for s in await store.stats()}
    assert {t: s.delivered for t, s in stats.items()} == {"x": 200, "y": 200}
    assert_rows_in_order(pg_exec, pg_schema)
    check_heads()


async def test_a_killed_workers_claims_are_taken_over_after_the_lease(
        open_pg: OpenPg, pg_url: str, pg_exec: Exec, pg_schema: str,
        processes: list[subprocess.Popen[str]]) -> None:
    store = await open_pg()
    firsts = [make_event(trigger="x", doc_id=f"r{i}") for i in range(3)]
    behind = make_event(trigger="x", doc_id="r0")  # waits for firsts[0]
    await store.enqueue([*firsts, behind], {})
    lease = 10.0  # covers the print, the reads, a connection, SIGKILL, a claim: under load
    proc = await ready(start(processes, pg_url, "hang", str(lease)))
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    killed_claims = json.loads(line)["claimed"]
    assert sorted(killed_claims) == sorted(e.id for e in firsts)
    worker = pg_exec(f"SELECT DISTINCT worker FROM {pg_schema}.events "
                     "WHERE status = 'delivering'")
    assert len(worker) == 1 and f":{proc.pid}:" in str(worker[0][0])
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # The leases still run: nothing is handed out, not even the event behind.
    assert await store.claim({"x": 10}, 30.0, datetime.now(UTC)) == []
    due = await store.next_due()
    assert due is not None and 0 < (due - datetime.now(UTC)).total_seconds() <= lease

    deadline = time.monotonic() + lease + 5
    taken: list[Event] = []
    while not taken and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        taken = await store.claim({"x": 10}, 30.0, datetime.now(UTC))
    assert sorted(e.id for e in taken) == sorted(killed_claims)
    started = datetime.now(UTC)
    await store.finish([done(ev, started) for ev in taken])
    assert [e.id for e in await store.claim({"x": 10}, 30.0, datetime.now(UTC))] == [behind.id]


async def test_release_hands_back_only_the_stores_own_claims(open_pg: OpenPg) -> None:
    one, other = await open_pg(), await open_pg()
    ev = make_event()
    await one.enqueue([ev], {})
    assert len(await one.claim({"t": 1}, 1.0, datetime.now(UTC))) == 1
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert [e.id for e in await other.claim({"t": 1}, 30.0, later)] == [ev.id]
    await one.release([ev.id])  # too late: the other store took the claim over
    got = await one.get_event(ev.id)
    assert got is not None and got.status is Status.DELIVERING
    await other.release([ev.id])
    got = await one.get_event(ev.id)
    assert got is not None and got.status is Status.PENDING


# -- LISTEN/NOTIFY -----------------------------------------------------------------


class Waker:
    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        self.event.set()

    async def woken(self, within: float = 5.0) -> bool:
        try:
            await asyncio.wait_for(self.event.wait(), within)
        except TimeoutError:
            return False
        self.event.clear()
        return True


async def listening(store: PostgresStore) -> Waker:
    waker = Waker()
    store.subscribe(waker)
    await asyncio.wait_for(store._listener.connected.wait(), 10)
    await waker.woken(1.0)  # the wake-up every (re)connection gives
    return waker


async def test_an_enqueue_wakes_a_worker_elsewhere(open_pg: OpenPg) -> None:
    idle, busy = await open_pg(), await open_pg()
    waker = await listening(idle)
    ev = make_event()
    await busy.enqueue([ev], {})
    assert await waker.woken()
    # The woken worker finds the work at once.
    assert [e.id for e in await idle.claim({"t": 5}, 30.0, datetime.now(UTC))] == [ev.id]
    await busy.enqueue([ev], {})  # nothing new: nobody is woken for nothing
    assert not await waker.woken(0.5)
    await idle.release([ev.id])  # handed back: others may take it
    assert await waker.woken()


async def test_redeliver_from_the_cli_wakes_workers(open_pg: OpenPg) -> None:
    worker = await open_pg()
    ev = make_event()
    await worker.enqueue([ev], {})
    assert len(await worker.claim({"t": 1}, 30.0, datetime.now(UTC))) == 1
    await worker.finish([Finish(ev.id, Attempt(event_id=ev.id, number=1,
                                               started_at=datetime.now(UTC), duration_ms=1.0,
                                               ok=False, error="HTTP 500"), Status.FAILED)])
    waker = await listening(worker)
    admin = await open_pg(role="admin")
    assert await admin.redeliver(None, Status.FAILED, None) == 1
    assert await waker.woken()


async def test_the_cli_does_not_listen(open_pg: OpenPg) -> None:
    admin = await open_pg(role="admin")
    waker = Waker()
    admin.subscribe(waker)
    worker = await open_pg()
    await worker.enqueue([make_event()], {})
    assert not await waker.woken(0.5)
    assert waker.calls == 0


async def test_the_listener_reconnects(open_pg: OpenPg, pg_exec: Exec, pg_schema: str) -> None:
    idle, busy = await open_pg(), await open_pg()
    waker = await listening(idle)
    killed = pg_exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND query LIKE 'LISTEN%%' "
                     "AND query LIKE %s", (f"%{pg_schema}%",))
    assert killed == [(True,)]
    # Reconnected, it wakes once (it may have missed something) and listens again.
    assert await waker.woken(10.0)
    await asyncio.wait_for(idle._listener.connected.wait(), 10)
    await busy.enqueue([make_event()], {})
    assert await waker.woken()
