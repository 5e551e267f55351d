"""One attempt at a time: the webhook sink against a real receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata as md
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks
from aiohttp import web
from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from dbevents import Trigger
from dbevents.testing import SinkContract, isolated_plugins, make_event
from dbevents_sink_webhook import WebhookOptions, WebhookSink
from dbevents_sink_webhook.classify import parse_retry_after
from dbevents_sink_webhook.signing import batch_id

from plugins.sinks.webhook.tests.conftest import xfail_cutoff_race
from testsupport.ports import free_port
from testsupport.receiver import Reply, ThreadedReceiver


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def trigger(url: str, **options: Any) -> Trigger:
    return Trigger(name="t", url=url, timeout=2000,
                   sink_options=WebhookOptions(**options) if options else None)


def as_cloudevent(headers: dict[str, str], body: bytes) -> CloudEvent:
    event = from_http(HTTPMessage(headers=headers, body=body), JSONFormat(), CloudEvent)
    assert isinstance(event, CloudEvent)
    return event


# -- the contract every sink keeps -------------------------------------------------


class TestWebhookSinkContract(SinkContract):
    @pytest.fixture
    def ok_trigger(self, receiver: ThreadedReceiver) -> Trigger:
        return Trigger(name="ok", url=receiver.url("/ok"), timeout=2000)

    @pytest.fixture
    def failing_trigger(self, receiver: ThreadedReceiver) -> Trigger:
        receiver.script("/fail", 500)
        return Trigger(name="fail", url=receiver.url("/fail"), timeout=2000)

    @pytest.fixture
    def silent_trigger(self, receiver: ThreadedReceiver) -> Trigger:
        receiver.script("/silent", Reply(delay=3600.0))  # takes the request, never answers
        return Trigger(name="silent", url=receiver.url("/silent"), timeout=300)


class TestWebhookSinkContractBatched(TestWebhookSinkContract):
    @pytest.fixture
    def ok_trigger(self, receiver: ThreadedReceiver) -> Trigger:
        return Trigger(name="ok", url=receiver.url("/ok"), timeout=2000,
                       sink_options=WebhookOptions(batch_size=2))


# -- one event per POST ----------------------------------------------------------------


async def test_success_posts_the_payload_as_is(sink: WebhookSink,
                                               receiver: ThreadedReceiver) -> None:
    ev = make_event(doc_id="42", n=7)
    before = datetime.now(UTC)
    [out] = await sink.deliver(trigger(receiver.url("/hook")), [ev])
    assert out.ok and out.status_code == 200 and out.error is None
    assert before <= out.started_at <= datetime.now(UTC) and out.duration_ms >= 0
    assert out.batch_size == 1 and out.retry_after is None

    [req] = receiver.requests("/hook")
    assert req.method == "POST"
    assert req.body == ev.payload  # byte for byte, not re-serialised
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["User-Agent"] == f"dbevents/{md.version('dbevents')}"
    assert "webhook-signature" not in req.headers  # no secret, no signing

    ce = as_cloudevent(dict(req.headers), req.body)
    assert ce.get_id() == ev.id and ce.get_type() == "DB_INSERT"
    assert ce.get_specversion() == "1.0" and ce.get_source() == "test"
    assert ce.get_data() == {"db": "sql-postgres", "col": "users", "docId": "42",
                             "doc": {"n": 7}}


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
async def test_any_2xx_is_success_whatever_the_body(sink: WebhookSink,
                                                    receiver: ThreadedReceiver,
                                                    status: int) -> None:
    receiver.script("/hook", Reply(status, body=b"" if status == 204 else b"<not json>"))
    [out] = await sink.deliver(trigger(receiver.url("/hook")), [make_event()])
    assert out.ok and out.status_code == status and out.error is None


@pytest.mark.parametrize("status", [400, 404, 410, 500, 502, 503])
async def test_non_2xx_is_a_failure_with_the_body(sink: WebhookSink,
                                                  receiver: ThreadedReceiver,
                                                  status: int) -> None:
    receiver.script("/hook", Reply(status, body=b"boom: details"))
    [out] = await sink.deliver(trigger(receiver.url("/hook")), [make_event()])
    assert not out.ok and not out.give_up
    assert out.status_code == status and out.error == f"HTTP {status}"
    assert out.response_body == "boom: details"


async def test_redirect_is_not_followed(sink: WebhookSink, receiver: ThreadedReceiver) -> None:
    receiver.script("/hook", Reply(302, headers={"Location": "/elsewhere"}))
    [out] = await sink.deliver(trigger(receiver.url("/hook")), [make_event()])
    assert not out.ok and out.status_code == 302
    assert out.error == "HTTP 302 (redirects are not followed)"
    assert receiver.requests("/elsewhere") == []


async def test_user_headers_are_sent_and_masked_in_the_outcome(
        sink: WebhookSink, receiver: ThreadedReceiver) -> None:
    headers = {"Authorization": "Bearer tok-123", "X-Api-Key": "k-456", "X-Team": "blue",
               "User-Agent": "acme-relay/2"}
    [out] = await sink.deliver(trigger(receiver.url("/hook"), headers=headers),
                               [make_event()])
    [req] = receiver.requests("/hook")
    for name, value in headers.items():
        assert req.headers[name] == value
    assert out.request_headers["Authorization"] == "***"
    assert out.request_headers["X-Api-Key"] == "***"
    assert out.request_headers["X-Team"] == "blue"
    assert out.request_headers["User-Agent"] == "acme-relay/2"
    assert out.request_headers["Content-Type"] == "application/json"
    assert "tok-123" not in repr(out) and "k-456" not in repr(out)


async def test_response_body_is_truncated_at_64_kib(sink: WebhookSink,
                                                    receiver: ThreadedReceiver) -> None:
    receiver.script("/ascii", Reply(500, body=b"a" * 300_000))
    # Two bytes per character: the cut at 65536 bytes falls between characters.
    receiver.script("/utf8", Reply(200, body=("é" * 150_000).encode(),
                                   headers={"Content-Type": "text/plain; charset=utf-8"}))
    # A cut inside a three-byte character: the partial character is dropped.
    receiver.script("/odd", Reply(200, body=b"a" + "€".encode() * 40_000))
    [a] = await sink.deliver(trigger(receiver.url("/ascii")), [make_event()])
    [u] = await sink.deliver(trigger(receiver.url("/utf8")), [make_event()])
    [o] = await sink.deliver(trigger(receiver.url("/odd")), [make_event()])
    assert a.response_body == "a" * 65536 and not a.ok
    assert u.response_body == "é" * 32768 and u.ok
    assert o.response_body == "a" + "€" * 21845 and o.ok  # 1 + 3 * 21845 = 65536


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_seconds_on_429_and_503(sink: WebhookSink,
                                                  receiver: ThreadedReceiver,
                                                  status: int) -> None:
    receiver.script("/hook", Reply(status, retry_after=7))
    [out] = await sink.deliver(trigger(receiver.url("/hook")), [make_event()])
    assert not out.ok and out.retry_after == 7.0 and out.error == f"HTTP {status}"


async def test_retry_after_http_date(sink: WebhookSink, receiver: ThreadedReceiver) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    receiver.script("/hook", Reply(429, retry_after=format_datetime(when, usegmt=True)))
    [out] = await sink.deliver(trigger(receiver.url("/hook")), [make_event()])
    assert out.retry_after is not None and 25 <= out.retry_after <= 31


async def test_retry_after_is_ignored_on_other_statuses(sink: WebhookSink,
                                                        receiver: ThreadedReceiver) -> None:
    receiver.script("/hook", Reply(500, retry_after=7))
    [out] = await sink.deliver(trigger(receiver.url("/hook")), [make_event()])
    assert not out.ok and out.retry_after is None


def test_parse_retry_after() -> None:
    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after("Mon, 01 Jan 2024 12:00:10 GMT", now) == 10.0
    assert parse_retry_after("Mon, 01 Jan 2024 11:00:00 GMT", now) == 0.0  # in the past
    for bad in (None, "", "-5", "1.5", "soon", "Mon, 99 Foo 2024"):
        assert parse_retry_after(bad, now) is None


# -- failures that are not HTTP statuses --------------------------------------------


async def test_timeout_cuts_the_attempt(sink: WebhookSink, receiver: ThreadedReceiver) -> None:
    receiver.script("/slow", Reply(delay=5))
    t = Trigger(name="t", url=receiver.url("/slow"), timeout=300)
    [out] = await sink.deliver(t, [make_event()])
    assert not out.ok and out.error == "timeout after 300 ms" and out.status_code is None
    # Cut at the timeout, not when the handler finally answered 5 s later.
    assert 290 <= out.duration_ms < 2500
    # The request reached the receiver (which may record it after the client gave up).
    assert len(await asyncio.to_thread(receiver.wait_for, 1, "/slow", 5)) == 1


async def test_connection_refused(sink: WebhookSink) -> None:
    port = free_port()  # nobody listens there
    [out] = await sink.deliver(trigger(f"http://127.0.0.1:{port}/hook"), [make_event()])
    assert not out.ok and out.status_code is None
    assert out.error == f"connection refused: 127.0.0.1:{port}"


async def test_reset_before_the_response(sink: WebhookSink, receiver: ThreadedReceiver) -> None:
    receiver.script("/hook", "reset")
    [out] = await sink.deliver(trigger(receiver.url("/hook")), [make_event()])
    assert not out.ok and out.status_code is None
    assert out.error is not None and out.error.startswith("connection reset")


async def test_reset_mid_response_is_a_failure_even_after_a_200_status_line(
        sink: WebhookSink, odd_server: Any, request: pytest.FixtureRequest,
        transport: str) -> None:
    xfail_cutoff_race(request, transport)
    [out] = await sink.deliver(trigger(odd_server.url()), [make_event()])
    assert not out.ok
    assert out.status_code == 200  # the status line arrived; the body did not
    assert out.error == "connection reset: response cut off"


async def test_invalid_response(sink: WebhookSink, odd_server: Any) -> None:
    [out] = await sink.deliver(trigger(odd_server.garbage_url()), [make_event()])
    assert not out.ok and out.status_code is None
    assert out.error is not None and out.error.startswith("invalid response: ")
    assert "\n" not in out.error


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


async def test_tls_certificates_are_verified(sink: WebhookSink,
                                             self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
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
    try:
        [out] = await sink.deliver(trigger(f"https://127.0.0.1:{port}/hook"), [make_event()])
    finally:
        await runner.cleanup()
    # A self-signed certificate is refused: the event never reaches that server.
    assert not out.ok and hits == []
    assert out.error is not None and out.error.startswith(f"tls error: 127.0.0.1:{port}: ")
    assert "CERTIFICATE_VERIFY_FAILED" in out.error


async def test_failures_never_raise(receiver: ThreadedReceiver) -> None:
    unopened = WebhookSink()
    [out] = await unopened.deliver(trigger(receiver.url()), [make_event()])
    assert not out.ok and out.error is not None and "not open" in out.error

    sink = WebhookSink()
    await sink.open()
    bad = Trigger(name="t", url=receiver.url(), sink_options=object())
    [out] = await sink.deliver(bad, [make_event()])
    assert not out.ok and out.error is not None and out.error.startswith("sink error")
    assert sink.batch_size(bad) == 1
    await sink.close()
    [out] = await sink.deliver(trigger(receiver.url()), [make_event()])
    assert not out.ok and out.error is not None and "not open" in out.error
    assert receiver.requests() == []


async def test_one_session_per_sink_reuses_connections(sink: WebhookSink,
                                                       odd_server: Any) -> None:
    t = trigger(odd_server.url("/peer"))
    for _ in range(5):
        [out] = await sink.deliver(t, [make_event()])
        assert out.ok and out.status_code == 204
    # Five sequential POSTs, one TCP connection (one client port) kept alive.
    assert len(odd_server.peers) == 5 and len(set(odd_server.peers)) == 1


# -- signing (Standard Webhooks) ---------------------------------------------------------


async def test_signature_verifies_with_standardwebhooks(sink: WebhookSink,
                                                        receiver: ThreadedReceiver) -> None:
    secret = new_secret()
    ev = make_event()
    [out] = await sink.deliver(trigger(receiver.url("/hook"), secret=secret), [ev])
    assert out.ok
    [req] = receiver.requests("/hook")
    headers = dict(req.headers)
    assert headers["webhook-id"] == ev.id
    assert abs(int(headers["webhook-timestamp"]) - datetime.now(UTC).timestamp()) < 10
    assert headers["webhook-signature"].startswith("v1,")
    payload = standardwebhooks.Webhook(secret).verify(req.body, headers)
    assert payload["id"] == ev.id
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_secret()).verify(req.body, headers)
    tampered = req.body.replace(b'"n":0', b'"n":1')
    assert tampered != req.body
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(tampered, headers)
    # The invocation log keeps the id and timestamp but never the signature.
    assert out.request_headers["webhook-signature"] == "***"
    assert out.request_headers["webhook-id"] == ev.id
    assert headers["webhook-signature"].split(",")[1] not in repr(out)


async def test_rotation_signs_with_every_secret(sink: WebhookSink,
                                                receiver: ThreadedReceiver) -> None:
    old, new = new_secret(), new_secret()
    [out] = await sink.deliver(trigger(receiver.url("/hook"), secret=[old, new]),
                               [make_event()])
    assert out.ok
    [req] = receiver.requests("/hook")
    headers = dict(req.headers)
    entries = headers["webhook-signature"].split(" ")
    assert len(entries) == 2 and all(e.startswith("v1,") for e in entries)
    # A receiver still on the old secret and one already on the new both accept it.
    standardwebhooks.Webhook(old).verify(req.body, headers)
    standardwebhooks.Webhook(new).verify(req.body, headers)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_secret()).verify(req.body, headers)


# -- batch mode ------------------------------------------------------------------------


async def test_batch_posts_an_array_and_a_2xx_delivers_all(sink: WebhookSink,
                                                           receiver: ThreadedReceiver) -> None:
    secret = new_secret()
    evs = [make_event(doc_id=str(i), n=i) for i in range(3)]
    outs = await sink.deliver(trigger(receiver.url("/b"), batch_size=10, secret=secret), evs)
    assert len(outs) == 3 and all(o.ok and o.batch_size == 3 for o in outs)
    [req] = receiver.requests("/b")
    assert req.headers["Content-Type"] == "application/cloudevents-batch+json"
    assert req.body == b"[" + b",".join(e.payload for e in evs) + b"]"
    items = json.loads(req.body)
    for ev, item in zip(evs, items, strict=True):
        ce = JSONFormat().read(CloudEvent, json.dumps(item).encode())
        assert ce.get_id() == ev.id
        assert ce.get_data() == json.loads(ev.payload)["data"]
    headers = dict(req.headers)
    assert headers["webhook-id"] == batch_id([e.id for e in evs])
    standardwebhooks.Webhook(secret).verify(req.body, headers)


async def test_batch_failure_fails_every_event_in_it(sink: WebhookSink,
                                                     receiver: ThreadedReceiver) -> None:
    receiver.script("/b", 503)
    outs = await sink.deliver(trigger(receiver.url("/b"), batch_size=5),
                              [make_event(doc_id=str(i)) for i in range(4)])
    assert [o.ok for o in outs] == [False] * 4
    assert all(o.error == "HTTP 503" and o.batch_size == 4 for o in outs)


async def test_batch_of_one_is_still_an_array(sink: WebhookSink,
                                              receiver: ThreadedReceiver) -> None:
    ev = make_event()
    [out] = await sink.deliver(trigger(receiver.url("/b"), batch_size=5), [ev])
    assert out.ok
    [req] = receiver.requests("/b")
    assert req.body == b"[" + ev.payload + b"]"
    assert req.headers["Content-Type"] == "application/cloudevents-batch+json"


def test_batch_id_is_stable_and_order_sensitive() -> None:
    ids = ["a", "b", "c"]
    assert batch_id(ids) == batch_id(list(ids))
    assert batch_id(ids) != batch_id(["c", "b", "a"]) != batch_id(["a", "b"])


async def test_several_events_without_batching_go_one_per_post(
        sink: WebhookSink, receiver: ThreadedReceiver) -> None:
    evs = [make_event(doc_id=str(i)) for i in range(3)]
    outs = await sink.deliver(trigger(receiver.url("/one")), evs)
    assert len(outs) == 3 and all(o.ok and o.batch_size == 1 for o in outs)
    bodies = sorted(r.body for r in receiver.requests("/one"))
    assert bodies == sorted(e.payload for e in evs)


# -- options and plugin registration --------------------------------------------------------


def test_transport_must_be_known() -> None:
    assert WebhookOptions().transport is None
    assert WebhookOptions(transport="pyreqwest").transport == "pyreqwest"
    assert WebhookOptions(transport="pycurl").transport == "pycurl"
    with pytest.raises(ValueError, match="transport must be one of aiohttp, pyreqwest, pycurl"):
        WebhookOptions(transport="curl")
    with pytest.raises(ValueError, match="transport must be one of"):
        WebhookSink(transport="curl")


async def test_a_trigger_chooses_its_transport(receiver: ThreadedReceiver) -> None:
    sink = WebhookSink()  # pycurl for triggers that do not say
    await sink.open()
    try:
        for name in ("aiohttp", "pyreqwest", "pycurl"):
            t = trigger(receiver.url(f"/{name}"), transport=name, headers={"X-Trace": "1"})
            [out] = await sink.deliver(t, [make_event()])
            assert out.ok
        [out] = await sink.deliver(trigger(receiver.url("/default"),
                                           headers={"X-Trace": "1"}), [make_event()])
        assert out.ok
    finally:
        await sink.close()
    # aiohttp sends header names as given, pyreqwest in lower case, libcurl as
    # given but asks for no compression: which client sent each request shows in
    # the headers the receiver got.
    [by_aiohttp] = receiver.requests("/aiohttp")
    [by_pyreqwest] = receiver.requests("/pyreqwest")
    [by_pycurl] = receiver.requests("/pycurl")
    assert "X-Trace" in list(by_aiohttp.headers.keys())
    assert "Accept-Encoding" in by_aiohttp.headers
    assert "x-trace" in list(by_pyreqwest.headers.keys())
    assert "X-Trace" in list(by_pycurl.headers.keys())
    assert "Accept-Encoding" not in by_pycurl.headers
    [by_default] = receiver.requests("/default")
    assert "X-Trace" in list(by_default.headers.keys())
    assert "Accept-Encoding" not in by_default.headers


def test_batch_size_bounds() -> None:
    assert WebhookOptions(batch_size=1000).batch_size == 1000
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError, match="batch_size must be an integer from 1 to 1000"):
            WebhookOptions(batch_size=bad)


@pytest.mark.parametrize("secret, message", [
    ("plain-text", "whsec_"),
    ("whsec_not*base64!", "not valid standard base64"),
    ("whsec_" + base64.b64encode(b"short").decode(), "at least 24"),
    ([], "not an empty list"),
])
def test_bad_secrets_are_refused(secret: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WebhookOptions(secret=secret)


def test_bad_headers_are_refused() -> None:
    with pytest.raises(ValueError, match="set by the webhook sink"):
        WebhookOptions(headers={"Content-Type": "text/plain"})
    with pytest.raises(ValueError, match="set by the webhook sink"):
        WebhookOptions(headers={"Webhook-Signature": "x"})
    with pytest.raises(ValueError, match="not a valid HTTP header name"):
        WebhookOptions(headers={"Bad Name": "x"})
    with pytest.raises(ValueError, match="one line") as info:
        WebhookOptions(headers={"Authorization": "Bearer abc\r\nX-Evil: 1"})
    assert "abc" not in str(info.value)  # a rejected value is never echoed


def test_options_repr_hides_secrets() -> None:
    secret = new_secret()
    text = repr(WebhookOptions(headers={"Authorization": "Bearer tok-1"}, secret=[secret]))
    assert secret not in text and "tok-1" not in text and "***" in text


def dbevents_check(tmp_path: Path, trigger_toml: str,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`dbevents check` on a config with one trigger, as a user would run it."""
    config = tmp_path / "dbevents.toml"
    config.write_text(f"""
[eventing]
store = "sqlite:///events.db"

[[triggers]]
name = "orders"
url = "https://example.com/hooks/path-token-1"
{trigger_toml}
""")
    launcher = Path(sys.executable).with_name("dbevents")
    # Only the plugins this config names: the others would only slow the start.
    plugins = {"DBEVENTS_PLUGINS": "sink-webhook,store-sqlite"}
    return subprocess.run([str(launcher), "--config", str(config), "check"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **plugins, **(env or {})})


def test_the_core_accepts_the_trigger_keys(tmp_path: Path) -> None:
    secret = new_secret()
    done = dbevents_check(tmp_path, f"""
headers = {{ Authorization = "Bearer ${{HOOK_TOKEN}}", X-Team = "blue" }}
secret = ["{secret}", "${{HOOK_SECRET}}"]
batch_size = 50
""", {"HOOK_TOKEN": "tok-secret-9", "HOOK_SECRET": new_secret()})
    assert done.returncode == 0, done.stderr
    assert "-> webhook https://example.com/***" in done.stdout
    for hidden in ("tok-secret-9", secret, "path-token-1"):
        assert hidden not in done.stdout + done.stderr


def test_the_core_rejects_a_bad_trigger_key(tmp_path: Path) -> None:
    # The other refusals are the validators tested above; this shows the launcher
    # reports them with the key path and exit status 2.
    done = dbevents_check(tmp_path, "batch_size = 0")
    assert done.returncode == 2
    assert "triggers[0].batch_size: batch_size must be an integer from 1 to 1000, got 0" \
        in done.stderr


def test_the_entry_point_registers_the_webhook_sink() -> None:
    [ep] = [e for e in md.entry_points(group="dbevents") if e.name == "sink-webhook"]
    assert ep.dist is not None and ep.dist.name == "dbevents-sink-webhook"
    module = ep.load()
    plugins = isolated_plugins(("sink-webhook", module), memory=False)
    assert plugins.get("sink", "webhook") is WebhookSink


def test_a_made_up_charset_never_fails_a_delivered_request() -> None:
    from dbevents_sink_webhook.classify import decode_body

    for charset in ("rot13", "hex", "no-such-codec", None):
        assert decode_body(b"ok \xc3\xa9", charset) == "ok \u00e9"


async def test_url_credentials_go_as_a_masked_basic_authorization_header(
        sink: WebhookSink, receiver: ThreadedReceiver) -> None:
    url = receiver.url("/hook").replace("://", "://ann:s%3Acret@", 1)
    [out] = await sink.deliver(trigger(url), [make_event()])
    assert out.ok, out.error
    [req] = receiver.requests("/hook")
    assert req.headers["Authorization"] == "Basic " + base64.b64encode(b"ann:s:cret").decode()
    assert out.request_headers["Authorization"] == "***"
    assert "cret" not in repr(out)


@pytest.mark.parametrize(("url", "headers", "words"), [
    ("ftp://example.com/x", {}, "expected an http:// or https:// URL"),
    ("https://ann:pw@example.com/x", {"authorization": "Bearer t"},
     "the URL carries credentials, which are sent as a Basic Authorization header, and "
     "headers sets Authorization too"),
])
def test_a_bad_target_is_a_config_error_naming_the_trigger(
        tmp_path: Path, url: str, headers: dict[str, str], words: str) -> None:
    """`dbevents check` refuses it (exit 2, key named) instead of every attempt failing."""
    table = "".join(f'"{k}" = "{v}"\n' for k, v in headers.items())
    path = tmp_path / "dbevents.toml"
    path.write_text(f'[[triggers]]\nname = "orders"\nurl = "{url}"\n'
                    + (f"[triggers.headers]\n{table}" if headers else ""))
    env = {**os.environ, "DBEVENTS_PLUGINS": "sink-webhook,store-sqlite"}
    r = subprocess.run([sys.executable, "-m", "dbevents.cli", "--config", str(path), "check"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"triggers[0].url: {words}" in r.stderr
    assert "(trigger 'orders', sink 'webhook')" in r.stderr
    assert "pw" not in r.stderr and "Bearer" not in r.stderr


def test_credentials_alone_or_a_header_alone_are_fine() -> None:
    WebhookSink.validate_target("https://ann:pw@example.com/x", WebhookOptions())
    WebhookSink.validate_target("https://example.com/x",
                                WebhookOptions(headers={"Authorization": "Bearer t"}))
    WebhookSink.validate_target("http://example.com", None)


@pytest.fixture
def unanswered_port() -> Any:
    """A port whose accept queue is full: the kernel drops further SYNs, so a
    connection attempt hangs in connect() (as to a host that is down)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):  # more than the queue holds: the later ones hang too
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    yield port
    for c in fillers:
        c.close()
    server.close()


async def test_a_connect_that_hangs_is_cut_at_the_timeout(sink: WebhookSink,
                                                          unanswered_port: int) -> None:
    t = Trigger(name="t", url=f"http://127.0.0.1:{unanswered_port}/hook", timeout=300)
    [out] = await sink.deliver(t, [make_event()])
    assert not out.ok and out.status_code is None
    assert out.error == "timeout after 300 ms"
