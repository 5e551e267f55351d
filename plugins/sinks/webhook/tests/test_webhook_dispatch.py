"""The core Dispatcher driving the webhook sink against a real receiver: retries,
timeouts, Retry-After, per-row order, batching and masking, end to end through
the in-memory store's event and invocation logs."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Sequence
from typing import Any

import pytest
import standardwebhooks
import structlog
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from dbevents import Attempt, Event, EventFilter, Outcome, Status, Trigger, request_body
from dbevents.testing import MemoryStore, make_event
from dbevents_sink_webhook import WebhookOptions, WebhookSink

from plugins.sinks.webhook.tests.conftest import xfail_cutoff_race
from testsupport.ports import free_port
from testsupport.receiver import Reply, ThreadedReceiver


def fast(url: str, **kw: Any) -> Trigger:
    """A trigger with millisecond backoffs so retries do not slow the suite."""
    base: dict[str, Any] = {"name": "t", "url": url, "timeout": 2000, "backoff_base": 1,
                            "backoff_max": 5}
    return Trigger(**{**base, **kw})


async def outcome_of(store: MemoryStore, ev: Event) -> tuple[Event, list[Attempt]]:
    got = await store.get_event(ev.id)
    assert got is not None
    return got, await store.attempts(ev.id)


async def test_success_is_one_attempt(receiver: ThreadedReceiver, run_dispatch: Any) -> None:
    evs = [make_event(doc_id=str(i), n=i) for i in range(5)]
    store = await run_dispatch([fast(receiver.url("/ok"))], evs)
    for ev in evs:
        got, attempts = await outcome_of(store, ev)
        assert got.status is Status.DELIVERED and got.attempts == 1
        [a] = attempts
        assert a.ok and a.status_code == 200 and a.error is None and a.number == 1
        assert a.request_headers["Content-Type"] == "application/json"
    assert sorted(r.body for r in receiver.requests("/ok")) == sorted(e.payload for e in evs)


async def test_500_twice_then_200(receiver: ThreadedReceiver, run_dispatch: Any) -> None:
    receiver.script("/hook", Reply(500, body=b"db down"), 500, 200)
    ev = make_event()
    store = await run_dispatch([fast(receiver.url("/hook"))], [ev])
    got, attempts = await outcome_of(store, ev)
    assert got.status is Status.DELIVERED and got.attempts == 3
    assert [(a.number, a.ok, a.status_code, a.error) for a in attempts] == [
        (1, False, 500, "HTTP 500"), (2, False, 500, "HTTP 500"), (3, True, 200, None)]
    assert attempts[0].response_body == "db down"
    assert len(receiver.requests("/hook")) == 3


async def test_always_500_makes_exactly_one_plus_retries_attempts(
        receiver: ThreadedReceiver, run_dispatch: Any) -> None:
    receiver.script("/hook", 500)
    evs = [make_event(doc_id=str(i)) for i in range(3)]
    # pause_after = 0: a receiver failing every event is otherwise taken for one
    # that is down, and the trigger pauses instead (test_e2e_outage.py).
    store = await run_dispatch([fast(receiver.url("/hook"), retries=2, pause_after=0)], evs)
    for ev in evs:
        got, attempts = await outcome_of(store, ev)
        assert got.status is Status.FAILED and got.attempts == 3
        assert got.last_error == "HTTP 500"
        assert [a.number for a in attempts] == [1, 2, 3] and not any(a.ok for a in attempts)
    await asyncio.sleep(0.1)  # nothing more arrives once the events have failed
    assert len(receiver.requests("/hook")) == 9


async def test_retries_zero_is_a_single_attempt(receiver: ThreadedReceiver,
                                                run_dispatch: Any) -> None:
    receiver.script("/hook", 503)
    ev = make_event()
    store = await run_dispatch([fast(receiver.url("/hook"), retries=0)], [ev])
    got, attempts = await outcome_of(store, ev)
    assert got.status is Status.FAILED and got.attempts == 1 and len(attempts) == 1
    assert len(receiver.requests("/hook")) == 1


async def test_slow_handler_is_cut_at_the_timeout(receiver: ThreadedReceiver,
                                                  run_dispatch: Any) -> None:
    # The timeout leaves the second attempt (a quick 200) room under load.
    receiver.script("/slow", Reply(delay=30), 200)
    ev = make_event()
    store = await run_dispatch([fast(receiver.url("/slow"), timeout=1000, retries=1)], [ev])
    got, attempts = await outcome_of(store, ev)
    assert got.status is Status.DELIVERED and got.attempts == 2
    first, second = attempts
    assert first.error == "timeout after 1000 ms" and first.status_code is None
    assert 990 <= first.duration_ms < 10_000  # cut at 1 s, not at the handler's 30 s
    assert second.ok


async def test_connection_refused(run_dispatch: Any) -> None:
    port = free_port()
    ev = make_event()
    store = await run_dispatch([fast(f"http://127.0.0.1:{port}/hook", retries=1)], [ev])
    got, attempts = await outcome_of(store, ev)
    assert got.status is Status.FAILED and got.attempts == 2
    assert [a.error for a in attempts] == [f"connection refused: 127.0.0.1:{port}"] * 2


async def test_connection_reset_mid_response_then_success(
        odd_server: Any, run_dispatch: Any, request: pytest.FixtureRequest,
        transport: str) -> None:
    xfail_cutoff_race(request, transport)
    ev = make_event()
    store = await run_dispatch([fast(odd_server.url("/cutoff"))], [ev])
    got, attempts = await outcome_of(store, ev)
    assert got.status is Status.DELIVERED and got.attempts == 2
    assert attempts[0].error == "connection reset: response cut off"
    assert attempts[0].status_code == 200 and not attempts[0].ok
    assert attempts[1].ok
    assert odd_server.bodies == [ev.payload, ev.payload]


async def test_connection_reset_before_the_response(receiver: ThreadedReceiver,
                                                    run_dispatch: Any) -> None:
    receiver.script("/flaky", "reset", 200)
    ev = make_event()
    store = await run_dispatch([fast(receiver.url("/flaky"))], [ev])
    got, attempts = await outcome_of(store, ev)
    assert got.status is Status.DELIVERED and got.attempts == 2
    assert attempts[0].error is not None and attempts[0].error.startswith("connection reset")


async def test_invalid_response_is_retried(odd_server: Any, run_dispatch: Any) -> None:
    ev = make_event()
    store = await run_dispatch([fast(odd_server.garbage_url(), retries=1)], [ev])
    got, attempts = await outcome_of(store, ev)
    assert got.status is Status.FAILED and got.attempts == 2
    assert all(a.error is not None and a.error.startswith("invalid response")
               for a in attempts)


async def test_429_retry_after_is_honoured(receiver: ThreadedReceiver,
                                           run_dispatch: Any) -> None:
    receiver.script("/busy", Reply(429, retry_after=1), 200)
    ev = make_event()
    # Without Retry-After the backoff would be at most 5 ms.
    store = await run_dispatch([fast(receiver.url("/busy"), backoff_max=5000)], [ev])
    got, attempts = await outcome_of(store, ev)
    assert got.status is Status.DELIVERED and got.attempts == 2
    assert attempts[0].status_code == 429
    first, second = receiver.requests("/busy")
    assert second.received_monotonic - first.received_monotonic >= 0.95


async def test_retry_after_is_capped_by_backoff_max(receiver: ThreadedReceiver,
                                                    run_dispatch: Any) -> None:
    receiver.script("/busy", Reply(503, retry_after=3600), 200)
    ev = make_event()
    store = await run_dispatch([fast(receiver.url("/busy"), backoff_max=200)], [ev])
    got, _ = await outcome_of(store, ev)
    assert got.status is Status.DELIVERED and got.attempts == 2
    first, second = receiver.requests("/busy")
    assert second.received_monotonic - first.received_monotonic >= 0.19


class CountingSink(WebhookSink):
    """The real sink, counting how many of its POSTs are in flight at once."""

    def __init__(self, transport: str) -> None:
        super().__init__(transport=transport)
        self.live = 0
        self.peak = 0

    async def deliver(self, trigger: Trigger, events: Sequence[Event]) -> Sequence[Outcome]:
        self.live += 1
        self.peak = max(self.peak, self.live)
        try:
            return await super().deliver(trigger, events)
        finally:
            self.live -= 1


async def test_per_row_order_under_concurrency_with_random_delays(
        receiver: ThreadedReceiver, run_dispatch: Any, transport: str) -> None:
    # Some attempts fail too, so retries are interleaved with new events.
    receiver.script("/hook", *[Reply(500 if i % 7 == 3 else 200, delay=(0.0, 0.02))
                               for i in range(50)], Reply(delay=(0.0, 0.02)))
    rows, per_row = 6, 20
    evs = [make_event(doc_id=f"row{i % rows}", n=i) for i in range(rows * per_row)]
    sink = CountingSink(transport)
    # Seven 500s in the script: with 7 retries no event can run out of attempts,
    # whichever events the 500s happen to land on.
    store = await run_dispatch([fast(receiver.url("/hook"), concurrency=4, retries=7)], evs,
                               sink=sink)
    for ev in evs:
        got, _ = await outcome_of(store, ev)
        assert got.status is Status.DELIVERED
    accepted: dict[str, list[int]] = {}
    for req in receiver.requests("/hook"):
        if req.reply.status == 200:
            data = json.loads(req.body)["data"]
            accepted.setdefault(data["docId"], []).append(data["doc"]["n"])
    assert len(accepted) == rows
    for row in accepted.values():
        assert row == sorted(row) and len(row) == per_row  # commit order, each once
    assert 1 < sink.peak <= 4  # rows did go out concurrently, within the limit


async def test_signature_and_webhook_id_are_stable_across_retries(
        receiver: ThreadedReceiver, run_dispatch: Any) -> None:
    old = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    new = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    receiver.script("/signed", 500, 200)
    ev = make_event()
    t = fast(receiver.url("/signed"), sink_options=WebhookOptions(secret=[old, new]))
    store = await run_dispatch([t], [ev])
    got, attempts = await outcome_of(store, ev)
    assert got.status is Status.DELIVERED
    requests = receiver.requests("/signed")
    assert [r.headers["webhook-id"] for r in requests] == [ev.id, ev.id]
    for req in requests:
        for secret in (old, new):
            assert standardwebhooks.Webhook(secret).verify(req.body, dict(req.headers))["id"] \
                == ev.id
    assert all(a.request_headers["webhook-signature"] == "***" for a in attempts)


async def test_batch_mode_through_the_dispatcher(receiver: ThreadedReceiver,
                                                 run_dispatch: Any) -> None:
    receiver.script("/batch", 500, 200)  # the first batch fails once: all of it is retried
    evs = [make_event(doc_id=str(i), n=i) for i in range(10)]
    t = fast(receiver.url("/batch"), concurrency=1, sink_options=WebhookOptions(batch_size=4))
    store = await run_dispatch([t], evs)
    requests = receiver.requests("/batch")
    seen: dict[str, int] = {}
    for req in requests:
        assert req.headers["Content-Type"] == "application/cloudevents-batch+json"
        items = json.loads(req.body)
        assert isinstance(items, list) and 1 <= len(items) <= 4
        for item in items:
            ce = JSONFormat().read(CloudEvent, json.dumps(item).encode())
            seen[ce.get_id()] = seen.get(ce.get_id(), 0) + 1
    assert len(requests) < len(evs)  # batched: fewer POSTs than events
    first_batch = json.loads(requests[0].body)
    for ev in evs:
        got, attempts = await outcome_of(store, ev)
        assert got.status is Status.DELIVERED
        retried = any(item["id"] == ev.id for item in first_batch)
        assert got.attempts == (2 if retried else 1) == seen[ev.id]
        assert attempts[-1].ok
    sizes = {a.batch_size for ev in evs for a in await store.attempts(ev.id)}
    assert sizes <= {1, 2, 3, 4} and 4 in sizes  # the log says how many shared each POST
    # The invocation log rebuilds each request's exact body from the event log:
    # every attempt's body is one the receiver got, and every body received is
    # some attempt's.
    received = [req.body for req in requests]
    rebuilt = set()
    for ev in evs:
        for a in await store.attempts(ev.id):
            assert a.request_id is not None
            members = await store.list_events(EventFilter(request_id=a.request_id))
            assert [m.id for m in members][a.batch_index] == ev.id
            body = request_body(ev, a, members)
            assert body in received
            rebuilt.add(body)
    assert rebuilt == set(received)


async def test_nothing_secret_reaches_the_logs_or_the_invocation_log(
        receiver: ThreadedReceiver, run_dispatch: Any) -> None:
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    path = "/hooks/path-token-7c1e"
    url = receiver.url(path) + "?token=query-token-93ab"
    headers = {"Authorization": "Bearer auth-token-55aa", "X-Api-Key": "key-token-0f0f",
               "X-Team": "blue"}
    receiver.script(path, 500, 200)
    ev = make_event()
    refused = f"http://127.0.0.1:{free_port()}/refused/path-token-d00d"
    triggers = [
        fast(url, sink_options=WebhookOptions(headers=headers, secret=secret)),
        fast(refused, name="refused", retries=0,
             sink_options=WebhookOptions(headers=headers, secret=secret)),
    ]
    ev2 = make_event(trigger="refused")
    with structlog.testing.capture_logs() as logs:
        store = await run_dispatch(triggers, [ev, ev2])
    got, attempts = await outcome_of(store, ev)
    assert got.status is Status.DELIVERED and len(attempts) == 2
    got2, attempts2 = await outcome_of(store, ev2)
    assert got2.status is Status.FAILED

    # The receiver did get the real values...
    [first, _] = receiver.requests(path)
    assert first.headers["Authorization"] == "Bearer auth-token-55aa"
    assert first.query_string == "token=query-token-93ab"
    signature = first.headers["webhook-signature"]
    # ...but none of them is in a log line or an attempt.
    assert any(e.get("event") == "delivery" for e in logs)  # the logs were captured
    recorded = repr(logs) + repr([*attempts, *attempts2, got, got2])
    for secret_text in ("auth-token-55aa", "key-token-0f0f", secret, secret[6:],
                        signature.split(",")[1], "path-token-7c1e", "query-token-93ab",
                        "path-token-d00d"):
        assert secret_text not in recorded, secret_text
    for a in [*attempts, *attempts2]:
        assert a.request_headers["Authorization"] == "***"
        assert a.request_headers["X-Api-Key"] == "***"
        assert a.request_headers["webhook-signature"] == "***"
        assert a.request_headers["X-Team"] == "blue"
