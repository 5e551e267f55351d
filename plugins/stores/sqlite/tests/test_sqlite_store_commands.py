"""The `dbevents events ...` commands on a real SQLite eventing DB: each command
runs as its own process (as a user runs it) on a config file naming the store,
and the file is read back through the store afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
from dbevents.protocols import EventFilter, StoreSettings
from dbevents.testing import make_event
from dbevents.values import Attempt, Event, Finish, Position, Status
from dbevents_store_sqlite import SqliteStore

ORDERS, USERS = "orders-hook", "users-hook"


@attrs.frozen
class Seeded:
    """The events put in the file, in enqueue order (the list shows them reversed)."""

    delivered_a: Event  # ORDERS, shop
    failed_a: Event  # ORDERS, shop
    failed_b: Event  # USERS, crm
    delivered_b: Event  # USERS, shop
    pending_a: Event  # ORDERS, crm: never attempted


def _attempt(ev: Event, number: int, ok: bool) -> Attempt:
    return Attempt(event_id=ev.id, number=number, started_at=datetime.now(UTC), duration_ms=8.0,
                   ok=ok, status_code=200 if ok else 503,
                   response_body="accepted" if ok else "busy",
                   error=None if ok else "HTTP 503",
                   request_headers={"content-type": "application/json",
                                    "authorization": "Bearer s3cret"})


async def _seed(url: str) -> Seeded:
    """Through the store's own API, as a worker would have left the file."""
    s = Seeded(
        delivered_a=make_event(ORDERS, doc_id="o1", n=1, database="shop", table="orders"),
        failed_a=make_event(ORDERS, doc_id="o2", n=2, database="shop", table="orders"),
        failed_b=make_event(USERS, doc_id="u1", n=3, database="crm", table="users"),
        delivered_b=make_event(USERS, doc_id="u2", n=4, database="shop", table="users"),
        pending_a=make_event(ORDERS, doc_id="o3", n=5, database="crm", table="orders"),
    )
    store = SqliteStore(StoreSettings(url=url))
    await store.open()
    try:
        finished = [s.delivered_a, s.failed_a, s.failed_b, s.delivered_b]
        await store.enqueue(finished, {"shop": Position("42")})
        claimed = await store.claim({ORDERS: 10, USERS: 10}, 30.0, datetime.now(UTC))
        assert {e.id for e in claimed} == {e.id for e in finished}
        await store.finish([
            Finish(s.delivered_a.id, _attempt(s.delivered_a, 1, True), Status.DELIVERED),
            Finish(s.failed_a.id, _attempt(s.failed_a, 3, False), Status.FAILED),
            Finish(s.failed_b.id, _attempt(s.failed_b, 3, False), Status.FAILED),
            Finish(s.delivered_b.id, _attempt(s.delivered_b, 1, True), Status.DELIVERED),
        ])
        # Enqueued after the claim so it stays pending, never attempted.
        await store.enqueue([s.pending_a], {})
    finally:
        await store.close()
    return s


async def _read(url: str) -> tuple[dict[str, Event], dict[str, int]]:
    """Every event in the file by id, and how many attempts each has on record."""
    store = SqliteStore(StoreSettings(url=url, role="admin"))
    await store.open()
    try:
        evs = {e.id: e for e in await store.list_events(EventFilter(limit=1000))}
        return evs, {eid: len(await store.attempts(eid)) for eid in evs}
    finally:
        await store.close()


def _state(url: str) -> tuple[dict[str, Event], dict[str, int]]:
    return asyncio.run(_read(url))


class Cli:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.env = {k: v for k, v in os.environ.items() if k != "DBEVENTS_CONFIG"}
        # Only this plugin, found through its entry point as in an installation.
        self.env["DBEVENTS_PLUGINS"] = "store-sqlite"

    def __call__(self, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "dbevents.cli", "--config", str(self.config),
             "--log-format", "json", *args],
            capture_output=True, text=True, timeout=120, env=self.env)
        assert proc.returncode == code, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def ids(self, *args: str) -> list[str]:
        out = self("events", "list", "--json", *args).stdout
        return [json.loads(line)["id"] for line in out.splitlines()]

    def logs(self, proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
        return [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Cli, str, Seeded]:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    config = tmp_path / "dbevents.toml"
    config.write_text(f'[eventing]\nstore = "{url}"\n')
    return Cli(config), url, asyncio.run(_seed(url))


def test_list_filters_and_limit(setup: tuple[Cli, str, Seeded]) -> None:
    cli, _, s = setup
    assert cli.ids() == [s.pending_a.id, s.delivered_b.id, s.failed_b.id, s.failed_a.id,
                         s.delivered_a.id]
    assert cli.ids("--trigger", ORDERS) == [s.pending_a.id, s.failed_a.id, s.delivered_a.id]
    assert cli.ids("--trigger", ORDERS, "--limit", "2") == [s.pending_a.id, s.failed_a.id]
    assert cli.ids("--database", "crm") == [s.pending_a.id, s.failed_b.id]
    assert cli.ids("--status", "failed") == [s.failed_b.id, s.failed_a.id]
    assert cli.ids("--status", "delivered", "--database", "shop", "--trigger", USERS) == \
        [s.delivered_b.id]
    assert cli.ids("--trigger", "nosuch") == []

    # The table form: a header, then one line per event with its status and attempts.
    lines = cli("events", "list", "--status", "failed", "--trigger", USERS).stdout.splitlines()
    assert lines[0].split() == ["ID", "TRIGGER", "TYPE", "STATUS", "ATT", "TABLE", "DOCID"]
    assert lines[1].split() == [s.failed_b.id, USERS, "DB_INSERT", "failed", "3", "users", "u1"]
    assert len(lines) == 2

    row = json.loads(cli("events", "list", "--json", "--trigger", USERS, "--status",
                         "failed").stdout)
    assert (row["database"], row["table"], row["docId"], row["attempts"], row["last_error"]) \
        == ("crm", "users", "u1", 3, "HTTP 503")


def test_show(setup: tuple[Cli, str, Seeded]) -> None:
    cli, _, s = setup
    shown = json.loads(cli("events", "show", s.failed_a.id).stdout)
    assert (shown["id"], shown["trigger"], shown["database"], shown["status"],
            shown["attempts"], shown["last_error"]) == \
        (s.failed_a.id, ORDERS, "shop", "failed", 3, "HTTP 503")
    assert shown["payload"] == json.loads(s.failed_a.payload)
    [attempt] = shown["attempts_log"]
    assert (attempt["number"], attempt["ok"], attempt["status_code"], attempt["error"],
            attempt["response_body"]) == (3, False, 503, "HTTP 503", "busy")
    assert attempt["request_headers"] == {"content-type": "application/json",
                                          "authorization": "***"}
    assert "s3cret" not in cli("events", "show", s.failed_a.id).stdout

    assert json.loads(cli("events", "show", s.pending_a.id).stdout)["attempts_log"] == []
    missing = cli("events", "show", "no-such-id", code=1)
    assert "no event with id no-such-id" in missing.stderr


def test_redeliver_failed_of_one_trigger(setup: tuple[Cli, str, Seeded]) -> None:
    cli, url, s = setup
    proc = cli("events", "redeliver", "--status", "failed", "--trigger", ORDERS)
    assert proc.stdout == "1 event(s) queued for redelivery\n"
    [line] = [entry for entry in cli.logs(proc) if entry["event"] == "redeliver"]
    assert (line["level"], line["events"], line["status"], line["trigger"]) == \
        ("info", 1, "failed", ORDERS)

    evs, attempts = _state(url)
    again = evs[s.failed_a.id]
    assert (again.status, again.attempts) == (Status.PENDING, 0)
    assert attempts[s.failed_a.id] == 1  # the history of earlier attempts is kept
    # The other trigger's failed event is not touched.
    other = evs[s.failed_b.id]
    assert (other.status, other.attempts, other.last_error) == (Status.FAILED, 3, "HTTP 503")
    assert evs[s.delivered_a.id].status is Status.DELIVERED
    assert cli.ids("--status", "failed") == [s.failed_b.id]

    # By id; an unknown id makes the command exit 1 after redelivering the rest.
    proc = cli("events", "redeliver", s.delivered_b.id, "no-such-id", code=1)
    assert proc.stdout == "1 event(s) queued for redelivery\n"
    [line] = [entry for entry in cli.logs(proc) if entry["event"] == "redeliver"]
    assert (line["events"], line["ids"]) == (1, 2)
    assert _state(url)[0][s.delivered_b.id].status is Status.PENDING

    usage = cli("events", "redeliver", code=2)
    assert "give event ids, or --status failed" in usage.stderr


def _age(url: str, event_ids: list[str], by: timedelta) -> None:
    """Move events' last update back in time: what a file holds after ``by`` has
    passed (the store writes the clock's time; purge compares against it)."""
    path = url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        conn.executemany("UPDATE events SET updated_at = updated_at - ? WHERE id = ?",
                         [(by // timedelta(microseconds=1), eid) for eid in event_ids])
    conn.close()


def _attempt_rows(url: str) -> int:
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        n = int(conn.execute("SELECT count(*) FROM attempts").fetchone()[0])
    conn.close()
    return n


def test_purge(setup: tuple[Cli, str, Seeded]) -> None:
    cli, url, s = setup
    everything = set(_state(url)[0])
    assert _attempt_rows(url) == 4

    # Nothing is old enough yet.
    assert cli("events", "purge", "--older-than", "7d").stdout == "0 event(s) purged\n"
    assert set(_state(url)[0]) == everything

    _age(url, [s.delivered_a.id, s.failed_b.id, s.pending_a.id], timedelta(days=10))
    # Old delivered only: the old failed event and the young delivered one stay.
    out = cli("events", "purge", "--older-than", "7d", "--status", "delivered").stdout
    assert out == "1 event(s) purged\n"
    evs, _ = _state(url)
    assert set(evs) == everything - {s.delivered_a.id}
    assert _attempt_rows(url) == 3  # its attempt went with it

    # Both statuses by default; a pending event is never purged, however old.
    assert cli("events", "purge", "--older-than", "7d").stdout == "1 event(s) purged\n"
    assert set(_state(url)[0]) == {s.failed_a.id, s.delivered_b.id, s.pending_a.id}

    # Everything finished, of any age, with --status given twice.
    out = cli("events", "purge", "--older-than", "0s", "--status", "failed",
              "--status", "delivered").stdout
    assert out == "2 event(s) purged\n"
    evs, _ = _state(url)
    assert set(evs) == {s.pending_a.id} and evs[s.pending_a.id].status is Status.PENDING
    assert _attempt_rows(url) == 0
    assert cli.ids() == [s.pending_a.id]

    bad = cli("events", "purge", "--older-than", "soon", code=2)
    assert "--older-than" in bad.stderr
    cli("events", "purge", code=2)  # --older-than is required
    assert set(_state(url)[0]) == {s.pending_a.id}


async def _seed_batch(url: str) -> tuple[Event, Event, Event]:
    """Two events sent together in one request, a third alone."""
    first, second = (make_event(ORDERS, doc_id=f"b{i}", n=i) for i in range(2))
    alone = make_event(ORDERS, doc_id="solo", n=9)
    store = SqliteStore(StoreSettings(url=url))
    await store.open()
    try:
        await store.enqueue([first, second, alone], {})
        await store.claim({ORDERS: 10}, 30.0, datetime.now(UTC))
        await store.finish([
            Finish(second.id, attrs.evolve(_attempt(second, 1, True), batch_size=2,
                                           request_id="req-1", batch_index=0),
                   Status.DELIVERED),
            Finish(first.id, attrs.evolve(_attempt(first, 1, True), batch_size=2,
                                          request_id="req-1", batch_index=1),
                   Status.DELIVERED),
            Finish(alone.id, _attempt(alone, 1, True), Status.DELIVERED),
        ])
    finally:
        await store.close()
    return first, second, alone


def test_show_body_prints_the_exact_request(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    config = tmp_path / "dbevents.toml"
    config.write_text(f'[eventing]\nstore = "{url}"\n')
    cli = Cli(config)
    first, second, alone = asyncio.run(_seed_batch(url))

    # A batch: the array of both payloads, in the order they were sent, whichever
    # of its events is asked about.
    sent = b"[" + second.payload + b"," + first.payload + b"]"
    for ev in (first, second):
        assert cli("events", "show", ev.id, "--body", "1").stdout.encode() == sent + b"\n"
    shown = json.loads(cli("events", "show", first.id).stdout)
    assert [(a["request_id"], a["batch_index"], a["batch_size"])
            for a in shown["attempts_log"]] == [("req-1", 1, 2)]
    # One event per request: its own payload.
    assert cli("events", "show", alone.id, "--body", "1").stdout.encode() == alone.payload + b"\n"

    missing = cli("events", "show", alone.id, "--body", "2", code=1)
    assert f"event {alone.id} has no attempt 2" in missing.stderr
    # Once part of the batch is purged the body cannot be rebuilt, and it says so.
    with sqlite3.connect(tmp_path / "events.db") as raw:
        raw.execute("DELETE FROM events WHERE id = ?", (second.id,))
    gone = cli("events", "show", first.id, "--body", "1", code=1)
    assert "batch of 2 events, of which only 1 are still in the event log" in gone.stderr
