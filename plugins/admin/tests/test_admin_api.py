"""The admin API of a real `dbevents run`: token, triggers and sources, filters
and cursor paging, one event with its attempts and the exact body sent,
redelivery (one, a filtered set, all failed), purge, and `dbevents console`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from plugins.admin.tests.support import TOKEN, XSS, Admin
from testsupport.ports import free_port


def fail_three(admin: Admin) -> list[dict[str, object]]:
    admin.sql(f"INSERT INTO items VALUES (1, 'one'), (2, $${XSS}$$), (3, 'three')")
    admin.wait_until("failed", lambda: len(admin.events("status=failed")) == 3)
    return admin.events()


def test_the_token_is_required_for_everything_but_healthz(admin: Admin) -> None:
    assert admin.call("GET", "/healthz", token=None) == (200, {"status": "ok"})
    for path in ("/api/events", "/api/triggers", "/api/sources", "/openapi.json"):
        assert admin.call("GET", path, token=None)[0] == 401
        assert admin.call("GET", path, token=TOKEN + "x")[0] == 401
    assert admin.call("POST", "/api/events/redeliver", {"status": "failed"}, token=None)[0] \
        == 401
    status, doc = admin.call("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/api/events", "/api/events/{id}", "/api/events/redeliver",
            "/api/events/purge"} <= set(doc["paths"])


def test_log_filters_paging_detail_redeliver_and_purge(admin: Admin) -> None:
    evs = fail_three(admin)
    by_doc = {e["docId"]: e for e in evs}
    _, triggers = admin.call("GET", "/api/triggers")
    [items] = triggers["triggers"]
    assert items["counts"]["failed"] == 3 and items["last_delivery"] is None
    assert items["url"].endswith("/***")  # the path may carry a secret
    _, sources = admin.call("GET", "/api/sources")
    assert sources["sources"][0]["name"] == "app" and sources["sources"][0]["checkpoint"]

    # Filters: table, docId, trigger, time; a bad value names its parameter.
    assert [e["id"] for e in admin.events("docId=2")] == [by_doc["2"]["id"]]
    assert len(admin.events("table=items&trigger=items")) == 3
    assert admin.events("table=other") == []
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert admin.events(f"since={future.replace('+', '%2B')}") == []
    assert len(admin.events(f"until={future.replace('+', '%2B')}")) == 3
    assert admin.call("GET", "/api/events?status=lost") == \
        (400, {"error": "expected one of pending, delivering, delivered, failed, got 'lost'",
               "parameter": "status"})

    # Cursor paging, newest first, with no event twice or missing.
    _, first = admin.call("GET", "/api/events?limit=2")
    _, rest = admin.call("GET", f"/api/events?limit=2&cursor={first['next_cursor']}")
    assert rest["next_cursor"] is None
    assert [e["id"] for e in first["events"] + rest["events"]] == [e["id"] for e in evs]

    # One event: its payload as stored, and the attempt with the exact body sent.
    status, detail = admin.call("GET", f"/api/events/{by_doc['2']['id']}")
    assert status == 200
    assert detail["payload"]["data"]["doc"] == {"id": 2, "name": XSS}
    [attempt] = detail["attempts_log"]
    assert attempt["status_code"] == 500 and not attempt["ok"]
    [sent] = [r for r in admin.receiver.requests("/hook")
              if r.json()["id"] == by_doc["2"]["id"]]
    assert attempt["request_body"].encode() == sent.body
    headers = {k.lower(): v for k, v in attempt["request_headers"].items()}
    assert headers["content-type"].startswith("application/")
    assert admin.call("GET", "/api/events/no-such-id")[0] == 404

    # Redeliver one, then a filtered set, then all failed.
    admin.receiver.script("/hook", 200)
    assert admin.call("POST", f"/api/events/{by_doc['1']['id']}/redeliver") == \
        (200, {"redelivered": 1})
    admin.wait_until("delivered", lambda: len(admin.events("status=delivered")) == 1)
    assert admin.call("POST", "/api/events/redeliver", {"status": "failed", "docId": "3"}) \
        == (200, {"redelivered": 1})
    admin.wait_until("delivered", lambda: len(admin.events("status=delivered")) == 2)
    assert admin.events("status=failed") == [by_doc["2"] | admin.events("docId=2")[0]]
    assert admin.call("POST", "/api/events/redeliver", {"status": "failed"}) == \
        (200, {"redelivered": 1})
    admin.wait_until("delivered", lambda: len(admin.events("status=delivered")) == 3)
    _, triggers = admin.call("GET", "/api/triggers")
    assert triggers["triggers"][0]["last_delivery"] is not None
    assert admin.call("POST", "/api/events/redeliver", {"trigger": "items"})[0] == 400

    # Purge by time and status.
    assert admin.call("POST", "/api/events/purge", {"before": future, "status": ["failed"]}) \
        == (200, {"purged": 0})
    assert admin.call("POST", "/api/events/purge", {"before": future, "trigger": "other"}) \
        == (200, {"purged": 0})
    assert admin.call("POST", "/api/events/purge", {"before": future, "trigger": 7})[0] == 400
    assert admin.call("POST", "/api/events/purge", {"before": future}) == (200, {"purged": 3})
    assert admin.events() == []


def test_dbevents_console_serves_the_store_beside_a_worker(admin: Admin) -> None:
    evs = fail_three(admin)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DBEVENTS_CONFIG"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbevents.cli", "--config", str(admin.config),
         "--log-format", "json", "console", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if json.loads(line).get("event") == "admin listening":
                break
        base = f"http://127.0.0.1:{port}"
        assert [e["id"] for e in admin.events(base=base)] == [e["id"] for e in evs]
        assert admin.call("GET", "/api/events", token=None, base=base)[0] == 401
        # A redelivery made through the console is picked up by the worker.
        admin.receiver.script("/hook", 200)
        assert admin.call("POST", "/api/events/redeliver", {"status": "failed"}, base=base) \
            == (200, {"redelivered": 3})
        admin.wait_until("delivered", lambda: len(admin.events("status=delivered")) == 3)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
