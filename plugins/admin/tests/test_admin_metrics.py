"""/metrics, /readyz and /healthz of a real `dbevents run` (PostgreSQL source,
SQLite eventing DB, a real webhook receiver): the counters parsed with
prometheus-client's own parser match what the receiver saw; readiness follows
the source's database."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from plugins.admin.tests.support import TOKEN, Admin
from tests.e2e import Dbevents
from testsupport.ports import free_port
from testsupport.receiver import ThreadedReceiver
from testsupport.servers import PostgresServer

CONFIG = """
[eventing]
store = "sqlite:///events.db"

[databases.app]
type = "postgres"
url = "{dsn}"
reconnect_for = 1.0

[admin]
listen = "127.0.0.1:{port}"
token = "{token}"
{extra}
[[triggers]]
name = "items"
tables = ["items"]
url = "{hook}"
retries = 2
backoff_base = 10
"""


@contextlib.contextmanager
def started(server: PostgresServer, tmp_path: Path, receiver: ThreadedReceiver,
            extra: str = "") -> Iterator[Admin]:
    """`dbevents run` on a new database of ``server``; then stopped, and the
    database dropped (its replication slot, named by the source, with it)."""
    name = f"metrics_{uuid.uuid4().hex[:8]}"
    server.create_database(name)
    server.execute("CREATE TABLE items (id int PRIMARY KEY, name text)", dbname=name)
    port = free_port()
    config = tmp_path / "dbevents.toml"
    config.write_text(CONFIG.format(dsn=server.dsn(name), port=port, token=TOKEN,
                                    hook=receiver.url("/hook"), extra=extra))
    process = Dbevents(config).start()
    try:
        yield Admin(base=f"http://127.0.0.1:{port}", config=config, receiver=receiver,
                    sql=lambda text: server.execute(text, dbname=name), process=process)
    finally:
        process.stop()
        if server.running:
            server.drop_database(name)


@pytest.fixture
def running(postgres_server: PostgresServer, tmp_path: Path,
            receiver: ThreadedReceiver) -> Iterator[Admin]:
    with started(postgres_server, tmp_path, receiver) as admin:
        yield admin


def get(admin: Admin, path: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    request = urllib.request.Request(admin.base + path)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""  # not listening yet


def scrape(admin: Admin) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by name and labels, as prometheus-client parses it."""
    status, body = get(admin, "/metrics")
    assert status == 200, body
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def readyz(admin: Admin) -> tuple[int, Any]:
    status, body = get(admin, "/readyz", token=None)
    return status, json.loads(body) if body else None


def test_metrics_count_what_the_receiver_saw(running: Admin) -> None:
    admin, n = running, 5
    # The first POST is answered 500, every later one 200: one event is retried.
    admin.receiver.script("/hook", 500, 200)
    admin.wait_until("ready", lambda: readyz(admin)[0] == 200)
    admin.sql("INSERT INTO items SELECT g, 'row ' || g FROM generate_series(1, 5) g")
    admin.wait_until("delivered", lambda: len(admin.events("status=delivered")) == n)

    requests = admin.receiver.requests("/hook")
    ids = [r.json()["id"] for r in requests]
    assert len(requests) == n + 1 and len(set(ids)) == n
    m = scrape(admin)
    assert value(m, "dbevents_changes_captured_total", database="app") == n
    assert value(m, "dbevents_events_captured_total", database="app") == n
    assert value(m, "dbevents_events_stored_total", database="app") == n
    assert value(m, "dbevents_attempts_total", trigger="items", status_class="5xx") == 1
    assert value(m, "dbevents_attempts_total", trigger="items", status_class="2xx") == n
    assert value(m, "dbevents_deliveries_total", trigger="items", outcome="ok") == n
    assert value(m, "dbevents_deliveries_total", trigger="items", outcome="error") == 1
    assert value(m, "dbevents_events_finished_total", trigger="items", status="delivered") == n
    assert value(m, "dbevents_events_finished_total", trigger="items", status="failed") == 0
    # One latency observation per 2xx, each from the commit to the answer.
    assert value(m, "dbevents_delivery_latency_seconds_count", trigger="items") == n
    assert value(m, "dbevents_delivery_latency_seconds_sum", trigger="items") > 0
    assert value(m, "dbevents_queue_events", trigger="items", status="delivered") == n
    assert value(m, "dbevents_queue_events", trigger="items", status="pending") == 0
    assert value(m, "dbevents_source_streaming", database="app") == 1
    assert value(m, "dbevents_source_lag_seconds", database="app") >= 0
    assert value(m, "process_resident_memory_bytes") > 0

    # The replication lag in bytes comes from the polled status probe; once it
    # finds the source has stored all the server sent, the lag in seconds is 0.
    admin.wait_until("probed", lambda: ("dbevents_source_lag_bytes", (("database", "app"),))
                     in scrape(admin))
    admin.wait_until("caught up", lambda: ("dbevents_source_lag_seconds",
                                           (("database", "app"),)) in (m := scrape(admin))
                     and value(m, "dbevents_source_lag_seconds", database="app") == 0)

    assert get(admin, "/metrics", token=None)[0] == 401
    assert get(admin, "/metrics", token=TOKEN + "x")[0] == 401
    assert readyz(admin) == (200, {"status": "ready"})
    assert get(admin, "/healthz", token=None) == (200, b'{"status": "ok"}')


def test_readyz_names_a_source_whose_database_went_away(
        tmp_path: Path, receiver: ThreadedReceiver) -> None:
    server = PostgresServer().start()  # its own server, to stop mid-run
    try:
        with started(server, tmp_path, receiver) as admin:
            admin.wait_until("ready", lambda: readyz(admin)[0] == 200)
            server.stop()
            admin.wait_until("not ready", lambda: readyz(admin)[0] == 503)
            status, body = readyz(admin)
            assert status == 503 and body["status"] == "not ready"
            assert list(body["not_ready"]) == ["databases.app"]  # the store still answers
            # The process still serves, and says so.
            assert get(admin, "/healthz", token=None)[0] == 200
            # Capture gives up after reconnect_for and restarts: not streaming meanwhile.
            admin.wait_until("stopped streaming", lambda: value(
                scrape(admin), "dbevents_source_streaming", database="app") == 0)
    finally:
        server.stop()


def test_metrics_public_serves_metrics_alone_without_the_token(
        postgres_server: PostgresServer, tmp_path: Path, receiver: ThreadedReceiver) -> None:
    with started(postgres_server, tmp_path, receiver,
                 extra="metrics_public = true\n") as admin:
        admin.wait_until("ready", lambda: readyz(admin)[0] == 200)
        status, body = get(admin, "/metrics", token=None)
        assert status == 200
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert {"dbevents_changes_captured", "dbevents_queue_events"} <= names
        assert get(admin, "/api/events", token=None)[0] == 401  # the rest still needs it
