"""Warm standby: three `dbevents run` processes on one config, one PostgreSQL
eventing DB and one receiver. One holds the capture lease of the source, the
others stand by and deliver. When the holder is killed (-9) a standby takes
over from the stored checkpoint; a holder paused past its lease (SIGSTOP) and
then resumed is fenced: it stores and confirms nothing it read after the pause.
Throughout, every change is delivered, the log holds one event per change, no
event id twice, and each row's events arrive in order. The kill -9 test runs
twice: under a writer of its own, and under pgbench's TPC-B-like script (scale
1, REPLICA IDENTITY FULL): there, each table's events count pgbench's
transactions, and each row's updates, first receipts in order, form a chain
(every `old` the previous `doc`) ending at the row as it is now."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.e2e import Dbevents, cli, events
from tests.test_e2e_crash import writer
from testsupport import pgbench
from testsupport.receiver import Reply, ThreadedReceiver
from testsupport.servers import PostgresServer

LEASE = 3.0  # seconds: [eventing] capture_lease
# A standby tries every LEASE/3; the holder's lease runs out LEASE after its
# last renewal. Slack for process start-up and a loaded machine.
TAKEOVER_BOUND = LEASE + LEASE / 3 + 10.0

CONFIG = """
[eventing]
store = "{store}"
capture_lease = "{lease}s"

[databases.app]
type = "postgres"
url = "{source}"

[[triggers]]
name = "everything"
url = "{hooks}/all"
concurrency = 8
"""

PGBENCH_UPDATED = ("pgbench_accounts", "pgbench_tellers", "pgbench_branches")


def write_configs(postgres_server: PostgresServer, tmp_path: Path, receiver: ThreadedReceiver,
                  db: str, store_db: str, trigger: str = "") -> list[Path]:
    """Three configs alike (a log file each); ``trigger``: more TOML lines for
    the trigger."""
    receiver.script("/all", Reply(delay=(0.0, 0.01)))
    configs = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        config = tmp_path / name / "dbevents.toml"
        config.write_text(CONFIG.format(store=postgres_server.dsn(store_db), lease=LEASE,
                                        source=postgres_server.dsn(db),
                                        hooks=receiver.url("").rstrip("/")) + trigger)
        configs.append(config)
    return configs


@pytest.fixture
def setup(postgres_server: PostgresServer, tmp_path: Path,
          receiver: ThreadedReceiver) -> Iterator[tuple[list[Path], Any]]:
    """Three configs alike (a log file each), the source table, a connection."""
    db = postgres_server.create_database(f"standby_{uuid.uuid4().hex[:8]}")
    store_db = postgres_server.create_database(f"standby_ev_{uuid.uuid4().hex[:8]}")
    postgres_server.execute(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);"
        "ALTER TABLE items REPLICA IDENTITY FULL", dbname=db)
    configs = write_configs(postgres_server, tmp_path, receiver, db, store_db)
    conn = postgres_server.connect(db)
    try:
        yield configs, conn
    finally:
        conn.close()
        postgres_server.drop_database(db)
        postgres_server.drop_database(store_db)


@pytest.fixture
def pgbench_setup(postgres_server: PostgresServer, tmp_path: Path,
                  receiver: ThreadedReceiver) -> Iterator[tuple[list[Path], str]]:
    """As `setup`, on a source database `pgbench -i -s 1` filled (before any
    capture: the load is not captured); the trigger watches pgbench's four
    tables, the three updated ones with REPLICA IDENTITY FULL (each update
    carries the old row). Yields the configs and the source database's name."""
    db = postgres_server.create_database(f"standby_pgb_{uuid.uuid4().hex[:8]}")
    store_db = postgres_server.create_database(f"standby_ev_{uuid.uuid4().hex[:8]}")
    try:
        pgbench.init(postgres_server, db, scale=1)
        postgres_server.execute(";".join(f"ALTER TABLE {t} REPLICA IDENTITY FULL"
                                         for t in PGBENCH_UPDATED), dbname=db)
        # A killed holder's claimed events, and so their rows' later events,
        # wait until the claims' leases run out: 2 x the trigger's timeout +
        # 30 s. At scale 1 pgbench_branches has one row and pgbench_history no
        # key (one row to dbevents): every event of the two waits. A timeout
        # of 2 s instead of 5 s keeps that wait 6 s shorter.
        trigger = f"tables = {json.dumps(list(pgbench.TABLES))}\ntimeout = 2000\n"
        yield write_configs(postgres_server, tmp_path, receiver, db, store_db, trigger), db
    finally:
        postgres_server.drop_database(db)
        postgres_server.drop_database(store_db)


def transaction_on(conn: Any) -> Callable[[], Any]:
    @contextmanager
    def transaction() -> Iterator[Callable[[str, tuple[Any, ...]], None]]:
        with conn.transaction():
            yield lambda sql, params: conn.execute(sql, params) and None
    return transaction


def has(run: Dbevents, event: str) -> bool:
    return any(line.get("event") == event for line in run.lines())


def wait_for_holder(runs: list[Dbevents], timeout: float) -> Dbevents:
    """The process that logs "capture lease acquired" (from its next line on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in runs:
            if run.proc is not None and run.proc.poll() is None and has(
                    run, "capture lease acquired"):
                return run
        time.sleep(0.05)
    raise AssertionError(f"no takeover within {timeout:.0f}s:\n"
                         + "\n".join(r.text(complete=False)[-2000:] for r in runs))


def start_all(configs: list[Path]) -> list[Dbevents]:
    holder = Dbevents(configs[0]).start()
    holder.wait_for_log("capture lease acquired")
    runs = [holder]
    for config in configs[1:]:
        run = Dbevents(config).start()
        runs.append(run)
        run.wait_for_log("standby: another process captures this source")
    return runs


def stop_all(runs: list[Dbevents]) -> None:
    """Every process stopped first (none left running when one fails), then
    each must have exited cleanly."""
    codes = [run.stop() for run in runs]
    for code, run in zip(codes, runs, strict=True):
        assert code == 0, run.text(complete=False)[-4000:]


def check_delivery(receiver: ThreadedReceiver, config: Path, log: list[tuple[str, int]]) -> None:
    """Every change delivered; one event per change in the log, none twice, all
    delivered; each row's changes received (first receipts) in commit order."""
    want = set(log)

    def received() -> set[tuple[str, int]]:
        return {(r.json()["type"].removeprefix("DB_").lower(), abs(r.json()["data"]["doc"]["v"]))
                for r in receiver.requests("/all")}

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not received() >= want:
        time.sleep(0.2)
    assert received() == want, "every change delivered"
    rows = events(config)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(log), "one event per change, no id twice"
    # Redeliveries of an attempt in flight at a kill are allowed, same content only;
    # each row's first receipts follow its changes' order (v grows with it).
    bodies: dict[str, object] = {}
    per_row: dict[str, list[int]] = {}
    for r in receiver.requests("/all"):
        body = r.json()
        if body["id"] in bodies:
            assert bodies[body["id"]] == body
            continue
        bodies[body["id"]] = body
        per_row.setdefault(str(body["data"]["docId"]), []).append(abs(body["data"]["doc"]["v"]))
    for row, vs in per_row.items():
        assert vs == sorted(vs), f"row {row} out of order: {vs}"


def lsn(text: str) -> int:
    high, low = text.split("/")
    return int(high, 16) << 32 | int(low, 16)


def logged_after(run: Dbevents, offset: int) -> list[dict[str, Any]]:
    """The JSON lines ``run`` logged after ``offset`` bytes of its log file."""
    with run.log.open("rb") as f:
        f.seek(offset)
        data = f.read()
    data = data[: data.rfind(b"\n") + 1]
    return [json.loads(x) for x in data.decode().splitlines() if x.startswith("{")]


def pause_until_taken_over(old: Dbevents, standbys: list[Dbevents],
                           then: str | None = None) -> tuple[Dbevents, int]:
    """SIGSTOP ``old`` until a standby holds the lease (and, with ``then``, has
    logged that line), let changes go on for a second, SIGCONT; the new holder
    and the size of ``old``'s log at the resume."""
    assert old.proc is not None
    os.kill(old.proc.pid, signal.SIGSTOP)
    try:
        new = wait_for_holder(standbys, TAKEOVER_BOUND)
        if then is not None:
            new.wait_for_log(then)
        # Changes go on while the old holder is paused: its stream has them
        # waiting when it resumes.
        time.sleep(1.0)
    finally:
        resumed_at = old.log.stat().st_size
        os.kill(old.proc.pid, signal.SIGCONT)
    return new, resumed_at


def check_fenced(old: Dbevents, new: Dbevents, resumed_at: int,
                 order: Callable[[str], Any]) -> None:
    """Nothing the old holder read after its pause was stored (and so
    confirmed: confirm follows a committed store write). A write it committed
    before the takeover may be logged after the resume (its reply read late, or
    its line written at the end of an event-loop pass); that lies at or before
    where the new holder began. ``order``: a logged position as a sortable key."""
    since = order(new.wait_for_log("capture starting")["since"])
    late = [x for x in logged_after(old, resumed_at) if x.get("event") == "captured"]
    assert all(x["checkpoint"] and order(x["checkpoint"]) <= since for x in late), late


def wait_delivered(config: Path, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = events(config)
        if len(rows) == count and {r["status"] for r in rows} == {"delivered"}:
            return
        time.sleep(0.5)
    raise AssertionError("events not all delivered")


def test_a_standby_takes_over_from_a_killed_holder(setup: tuple[list[Path], Any],
                                                   receiver: ThreadedReceiver) -> None:
    configs, conn = setup
    runs: list[Dbevents] = []
    log: list[tuple[str, int]] = []
    done = threading.Event()
    thread = threading.Thread(target=writer, args=(transaction_on(conn), 1200, log, done))
    try:
        runs = start_all(configs)
        thread.start()
        while len(receiver.requests("/all")) < 100:
            time.sleep(0.05)
        runs[0].kill()
        new = wait_for_holder(runs[1:], TAKEOVER_BOUND)
        line = new.wait_for_log("capture lease acquired")
        assert line["token"] == 2
        shown = json.loads(cli(configs[1], "status", "--json").stdout)["sources"]["app"]
        assert (shown["holder"], shown["lease_token"]) == (line["holder"], 2)
        thread.join()
        wait_delivered(configs[0], len(log))
        check_delivery(receiver, configs[0], log)
    finally:
        done.wait(60)
        stop_all(runs[1:])


def check_pgbench_delivery(receiver: ThreadedReceiver, config: Path,
                           want: dict[tuple[str, str], int]
                           ) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every change delivered (events per table and type as counted), one
    event per change in the log, no id twice; for each row, its updates'
    first receipts form a chain: each one's `old` is the previous one's `doc`.
    Returns the chains, per (table, docId), of the updates' `data`."""
    total = sum(want.values())

    def first_receipts() -> dict[str, dict[str, Any]]:
        bodies: dict[str, dict[str, Any]] = {}
        for r in receiver.requests("/all"):
            body = r.json()
            if body["id"] in bodies:
                # A redelivery of an attempt in flight at the kill: same content.
                assert bodies[body["id"]] == body
                continue
            bodies[body["id"]] = body
        return bodies

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(first_receipts()) < total:
        time.sleep(0.5)
    wait_delivered(config, total)
    bodies = first_receipts()
    got = Counter((b["data"]["col"], b["type"]) for b in bodies.values())
    assert got == want, "every change delivered, once"
    ids = [r["id"] for r in events(config)]
    assert len(ids) == len(set(ids)) == total, "one event per change, no id twice"
    assert set(ids) == set(bodies)
    chains: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for body in bodies.values():  # first receipts, in receipt order
        if body["type"] == "DB_UPDATE":
            chains.setdefault((body["data"]["col"], body["data"]["docId"]), []).append(
                body["data"])
    assert {col for col, _ in chains} == set(PGBENCH_UPDATED)
    for row, chain in chains.items():
        for i in range(1, len(chain)):
            assert chain[i]["old"] == chain[i - 1]["doc"], (
                f"{row}: update {i} does not follow update {i - 1}:\n"
                f"{chain[i - 1]}\n{chain[i]}")
    return chains


def test_a_standby_takes_over_from_a_killed_holder_while_pgbench_writes(
        pgbench_setup: tuple[list[Path], str], receiver: ThreadedReceiver,
        postgres_server: PostgresServer) -> None:
    configs, db = pgbench_setup
    runs: list[Dbevents] = []
    clients, per_client = 2, 200
    bench: subprocess.Popen[str] | None = None
    try:
        runs = start_all(configs)
        # Rate-limited (-R, all clients together) so the writes go on through
        # the takeover rather than ending before the kill.
        bench = pgbench.start(postgres_server, db, "-c", str(clients), "-j", str(clients),
                              "-t", str(per_client), "-R", "40")
        deadline = time.monotonic() + 60
        while len(receiver.requests("/all")) < 100:
            assert time.monotonic() < deadline, "no events from pgbench's writes"
            time.sleep(0.05)
        runs[0].kill()
        new = wait_for_holder(runs[1:], TAKEOVER_BOUND)
        assert new.wait_for_log("capture lease acquired")["token"] == 2
        result = pgbench.wait(bench, timeout=120)
        # The count is exact from pgbench itself: -t runs a fixed number of
        # transactions per client, pgbench.wait fails on any failed one, and
        # each committed TPC-B transaction updates one account, one teller and
        # one branch and inserts one history row. (The table counters of
        # pg_stat_user_tables would also count rows of aborted transactions.)
        assert result.transactions == clients * per_client
        n = result.transactions
        assert postgres_server.execute("SELECT count(*) FROM pgbench_history",
                                       dbname=db) == [(n,)]
        want = {("pgbench_accounts", "DB_UPDATE"): n, ("pgbench_tellers", "DB_UPDATE"): n,
                ("pgbench_branches", "DB_UPDATE"): n, ("pgbench_history", "DB_INSERT"): n}
        chains = check_pgbench_delivery(receiver, configs[0], want)
        # Each chain ends at the row as it is now.
        for (table, doc_id), chain in chains.items():
            key = {"pgbench_accounts": "aid", "pgbench_tellers": "tid",
                   "pgbench_branches": "bid"}[table]
            assert postgres_server.execute(
                f"SELECT to_jsonb(t) FROM {table} t WHERE {key} = %s", (int(doc_id),),
                dbname=db) == [(chain[-1]["doc"],)], (table, doc_id)
    finally:
        if bench is not None and bench.poll() is None:
            bench.kill()
            bench.wait()
        stop_all([run for run in runs if run.proc is not None and run.proc.poll() is None])


def test_a_paused_holder_is_fenced_when_it_resumes(setup: tuple[list[Path], Any],
                                                   receiver: ThreadedReceiver) -> None:
    configs, conn = setup
    runs: list[Dbevents] = []
    log: list[tuple[str, int]] = []
    done = threading.Event()
    thread = threading.Thread(target=writer, args=(transaction_on(conn), 1200, log, done))
    old: Dbevents | None = None
    try:
        runs = start_all(configs)
        old = runs[0]
        assert old.proc is not None
        thread.start()
        while len(receiver.requests("/all")) < 100:
            time.sleep(0.05)
        new, resumed_at = pause_until_taken_over(old, runs[1:])
        lost = old.wait_for_log("capture lease lost; capture stopped", timeout=60)
        assert lost["token"] == 1
        thread.join()
        wait_delivered(configs[0], len(log))
        check_delivery(receiver, configs[0], log)
        assert new.wait_for_log("capture lease acquired")["token"] == 2
        check_fenced(old, new, resumed_at, lsn)
        # It stays up, as a standby that delivers.
        assert old.proc.poll() is None
    finally:
        done.wait(60)
        stop_all(runs)


def test_a_takeover_ends_the_walsender_a_paused_holder_leaves(
        setup: tuple[list[Path], Any], receiver: ThreadedReceiver,
        postgres_server: PostgresServer) -> None:
    """The source server would keep a silent walsender for 10 minutes
    (wal_sender_timeout): the new holder, which holds the lease, ends it and
    streams at once, while the old holder is still paused."""
    configs, conn = setup
    db = conn.info.dbname
    conn.execute(f'ALTER DATABASE "{db}" SET wal_sender_timeout = \'10min\'')
    # Walsenders of this database (logical replication connects to it) take it.
    with psycopg.connect(postgres_server.dsn(db), autocommit=True,
                         replication="database") as rep:
        assert rep.execute(b"SHOW wal_sender_timeout").fetchone() == ("10min",)
    runs: list[Dbevents] = []
    log: list[tuple[str, int]] = []
    done = threading.Event()
    thread = threading.Thread(target=writer, args=(transaction_on(conn), 1200, log, done))
    old: Dbevents | None = None
    try:
        runs = start_all(configs)
        old = runs[0]
        assert old.proc is not None
        thread.start()
        while len(receiver.requests("/all")) < 100:
            time.sleep(0.05)
        (walsender,) = conn.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'dbevents_app'"
        ).fetchone()
        assert walsender is not None
        os.kill(old.proc.pid, signal.SIGSTOP)
        new = wait_for_holder(runs[1:], TAKEOVER_BOUND)
        ended = new.wait_for_log(
            "replication slot held by a previous capture holder: its session ended",
            timeout=TAKEOVER_BOUND)
        assert (ended["slot"], ended["backend_pid"]) == ("dbevents_app", walsender)
        new.wait_for_log("replication stream started", timeout=TAKEOVER_BOUND)
        # Every change is captured (one event each in the log) by the new
        # holder while the old one stays paused: its walsender is gone, not
        # waiting out the timeout.
        thread.join()
        deadline = time.monotonic() + 60
        while len(events(configs[1])) < len(log):
            assert time.monotonic() < deadline, "not every change was captured"
            time.sleep(0.5)
        assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                            (walsender,)).fetchone() == (0,)
        (holder,) = conn.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'dbevents_app'"
        ).fetchone()
        assert holder is not None and holder != walsender
        # Resumed, the old holder delivers what it held in memory (rather than
        # the others waiting out its delivery leases) and captures nothing more.
        os.kill(old.proc.pid, signal.SIGCONT)
        wait_delivered(configs[0], len(log))
        check_delivery(receiver, configs[0], log)
        assert old.proc.poll() is None
    finally:
        done.wait(60)
        if old is not None and old.proc is not None:
            os.kill(old.proc.pid, signal.SIGCONT)
        stop_all(runs)
