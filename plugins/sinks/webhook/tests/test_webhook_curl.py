"""The pycurl transport's own thread: closing it, cancelling a request, the thread
dying with requests in flight, and the connection pool's limits, against a real
receiver on 127.0.0.1. Everything else about the transport is the shared suite
(test_webhook_sink.py, test_webhook_dispatch.py) run once per transport."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from dbevents import Outcome, Trigger
from dbevents.testing import make_event
from dbevents_sink_webhook import WebhookSink
from dbevents_sink_webhook.curl import CurlTransport

from testsupport.receiver import Reply, ThreadedReceiver

# A bound on how long a test waits for something that should happen at once; it
# turns a hang into a failure and measures nothing.
HANG = 30.0


def curl_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dbevents-webhook-curl"]


def transport_of(sink: WebhookSink) -> CurlTransport:
    curl = sink._curl
    assert curl is not None
    return curl


async def in_flight(sink: WebhookSink, receiver: ThreadedReceiver,
                    path: str) -> asyncio.Task[Any]:
    """A delivery to a path that takes the request and never answers, once the
    receiver has it."""
    receiver.script(path, Reply(delay=3600.0))
    t = Trigger(name="silent", url=receiver.url(path), timeout=600_000)
    task = asyncio.create_task(sink.deliver(t, [make_event()]))
    await asyncio.to_thread(receiver.wait_for, 1, path, HANG)
    return task


@pytest.fixture
async def curl_sink() -> Any:
    sink = WebhookSink(transport="pycurl")
    await sink.open()
    yield sink
    await sink.close()


def ok(receiver: ThreadedReceiver) -> Trigger:
    return Trigger(name="ok", url=receiver.url("/ok"), timeout=5000)


async def test_close_fails_what_is_in_flight_and_joins_the_thread(
        receiver: ThreadedReceiver) -> None:
    before = set(curl_threads())
    sink = WebhookSink(transport="pycurl")
    await sink.open()
    [out] = await sink.deliver(ok(receiver), [make_event()])
    assert out.ok
    worker = transport_of(sink)._worker
    assert worker is not None and worker.thread.is_alive()
    pending = await in_flight(sink, receiver, "/silent")
    await sink.close()
    [out] = await asyncio.wait_for(pending, HANG)
    assert not out.ok and out.status_code is None
    assert out.error == "sink error: TransportStopped: the webhook sink closed"
    # The thread has been joined, its wake-up sockets closed.
    assert not worker.thread.is_alive() and set(curl_threads()) <= before
    assert worker._wake_r.fileno() == -1 and worker._wake_w.fileno() == -1
    [out] = await sink.deliver(ok(receiver), [make_event()])
    assert not out.ok and out.error is not None and "not open" in out.error


async def test_a_cancelled_request_leaves_the_transport_working(
        curl_sink: WebhookSink, receiver: ThreadedReceiver) -> None:
    task = await in_flight(curl_sink, receiver, "/silent")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    outs = await asyncio.gather(*(curl_sink.deliver(ok(receiver), [make_event()])
                                  for _ in range(20)))
    assert all(o.ok for [o] in outs) and len(receiver.requests("/ok")) == 20


async def test_a_dying_thread_fails_its_requests_and_the_next_one_starts_anew(
        curl_sink: WebhookSink, receiver: ThreadedReceiver) -> None:
    [out] = await curl_sink.deliver(ok(receiver), [make_event()])
    assert out.ok
    worker = transport_of(curl_sink)._worker
    assert worker is not None
    pending = await in_flight(curl_sink, receiver, "/silent")

    def crash() -> None:
        raise RuntimeError("injected fault")

    # A fault on the curl thread, raised when it next wakes up: by the request
    # queued below, which is then failed with the one already in flight.
    worker._crash = crash
    queued = asyncio.create_task(curl_sink.deliver(ok(receiver), [make_event()]))
    outs: list[Outcome] = [o for [o] in await asyncio.wait_for(
        asyncio.gather(pending, queued), HANG)]
    for out in outs:
        assert not out.ok and out.status_code is None
        assert out.error == ("sink error: TransportStopped: the curl thread died: "
                             "RuntimeError: injected fault")
    await asyncio.to_thread(worker.thread.join, HANG)
    assert not worker.thread.is_alive()
    # The next delivery runs on a new thread.
    [out] = await curl_sink.deliver(ok(receiver), [make_event()])
    assert out.ok
    assert transport_of(curl_sink)._worker is not worker


async def test_connections_per_host_are_capped_by_the_pool(odd_server: Any,
                                                           transport: str) -> None:
    if transport == "pyreqwest":
        pytest.skip("pyreqwest's pool has one limit, on idle connections per host")
    sink = WebhookSink(transport=transport, limit=8, limit_per_host=2)
    await sink.open()
    try:
        t = Trigger(name="peer", url=odd_server.url("/peer"), timeout=5000)
        outs = await asyncio.gather(*(sink.deliver(t, [make_event()]) for _ in range(12)))
    finally:
        await sink.close()
    assert all(o.ok for [o] in outs) and len(odd_server.peers) == 12
    # Twelve POSTs at once through a pool of two connections to that host.
    assert len(set(odd_server.peers)) <= 2


def test_a_sink_used_from_a_second_event_loop_still_delivers(
        receiver: ThreadedReceiver) -> None:
    sink = WebhookSink(transport="pycurl")

    async def once() -> Outcome:
        await sink.open()
        [out] = await sink.deliver(ok(receiver), [make_event()])
        return out

    first = asyncio.run(once())
    worker = transport_of(sink)._worker
    second = asyncio.run(once())  # a new loop: the first thread's loop is gone
    asyncio.run(sink.close())
    assert first.ok and second.ok and len(receiver.requests("/ok")) == 2
    assert worker is not None
    worker.thread.join(HANG)
    assert not worker.thread.is_alive()


@pytest.fixture
def cert_for_127(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate naming 127.0.0.1 (as an IP address entry)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_a_certificate_the_system_cas_trust_is_accepted(
        cert_for_127: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The positive side of TLS verification: pycurl trusts what Python's ssl
    module trusts, SSL_CERT_FILE included, and checks the host name."""
    cert, key = cert_for_127
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    hits: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(await request.read())
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
    port = runner.addresses[0][1]
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    sink = WebhookSink(transport="pycurl")
    await sink.open()
    try:
        ev = make_event()
        [good] = await sink.deliver(Trigger(name="tls", url=f"https://127.0.0.1:{port}/hook",
                                            timeout=5000), [ev])
        # The same server under a name its certificate does not carry.
        [bad] = await sink.deliver(Trigger(name="name", url=f"https://localhost:{port}/hook",
                                           timeout=5000), [make_event()])
    finally:
        await sink.close()
        await runner.cleanup()
    assert good.ok, good.error
    assert hits == [ev.payload]
    assert not bad.ok and bad.error is not None
    assert bad.error.startswith(f"tls error: localhost:{port}: ")
