"""The webhook sink: one HTTP POST per delivery, one attempt per call.

Retries, backoff, concurrency and per-row order belong to the core's dispatcher;
this class only turns a list of events into one request and the request into
Outcomes. It never raises for a failed delivery.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import aiohttp
import attrs
import structlog
from dbevents import Event, Outcome, Trigger, batch_body
from dbevents.masking import MASK, mask_headers, mask_url
from dbevents.protocols import sink_options
from yarl import URL

from dbevents_sink_webhook import curl, native
from dbevents_sink_webhook.classify import (
    RETRY_AFTER_STATUSES,
    decode_body,
    describe,
    parse_retry_after,
)
from dbevents_sink_webhook.options import DEFAULT_TRANSPORT, TRANSPORTS, WebhookOptions
from dbevents_sink_webhook.signing import Signer, batch_id

log = structlog.get_logger("dbevents.sink.webhook")

MAX_RESPONSE_BODY = 64 * 1024  # bytes of a response kept in the invocation log
JSON = "application/json"
BATCH_JSON = "application/cloudevents-batch+json"


def _user_agent() -> str:
    try:
        return f"dbevents/{version('dbevents')}"
    except PackageNotFoundError:  # running from a source tree without metadata
        return "dbevents"


USER_AGENT = _user_agent()


def options_of(trigger: Trigger) -> WebhookOptions:
    return sink_options(trigger, WebhookOptions)


@attrs.frozen
class _Plan:
    """Everything about a trigger's requests that does not change per request."""

    trigger: Trigger
    url: URL
    batch: bool
    batch_size: int
    headers: dict[str, str]  # sent with every request
    masked: dict[str, str]  # the same, masked, for the invocation log
    signer: Signer | None
    timeout: aiohttp.ClientTimeout
    masked_url: str
    transport: str
    url_text: str  # the URL as sent (percent-encoded)
    where: str  # host:port, for error strings
    deadline: timedelta  # the timeout, for pyreqwest
    curl_headers: list[bytes]  # the headers as libcurl takes them, for pycurl


def _plan(trigger: Trigger, default_transport: str) -> _Plan:
    opts = options_of(trigger)
    url = URL(trigger.url, encoded=False)
    batch = opts.batch_size > 1
    headers = {"User-Agent": USER_AGENT, **opts.headers,
               "Content-Type": BATCH_JSON if batch else JSON}
    auth = aiohttp.BasicAuth.from_url(url)
    if auth is not None:
        # Credentials in the URL become a Basic Authorization header here, not in
        # the HTTP client, so the invocation log records it (masked) like the others.
        headers["Authorization"] = auth.encode()
        url = url.with_user(None)
    secrets = opts.secrets
    return _Plan(
        trigger=trigger,
        url=url,
        batch=batch,
        batch_size=opts.batch_size,
        headers=headers,
        masked=mask_headers(headers),
        signer=Signer.from_secrets(secrets) if secrets else None,
        # aiohttp rounds timeouts above ceil_threshold up to a whole second; an
        # attempt must end at the configured timeout, so never round.
        timeout=aiohttp.ClientTimeout(total=trigger.timeout / 1000.0, ceil_threshold=math.inf),
        masked_url=mask_url(trigger.url),
        transport=opts.transport or default_transport,
        url_text=str(url),
        where=f"{url.host}:{url.port}",
        deadline=timedelta(milliseconds=trigger.timeout),
        curl_headers=_curl_headers(headers),
    )


def _curl_headers(headers: Mapping[str, str]) -> list[bytes]:
    """``Name: value`` lines for libcurl. An empty value is written ``Name;``
    (libcurl drops a header written ``Name:``); ``Expect:`` stops libcurl from
    asking for a 100 Continue before a large body, which aiohttp never does."""
    lines = [(f"{k}: {v}" if v.strip() else f"{k};").encode() for k, v in headers.items()]
    lines.append(b"Expect:")
    return lines


class WebhookSink:
    """POSTs CloudEvents JSON to each trigger's ``url``.

    One HTTP client per transport per sink (so per process), with keep-alive:
    libcurl on its own thread for ``pycurl`` (the default), an
    ``aiohttp.ClientSession`` for ``aiohttp``, a pyreqwest client for
    ``pyreqwest``. The pool limits cap connections across every trigger using it.
    Redirects are not followed: a 3xx is a failed attempt, because following one
    would send the payload (and its headers) to a URL nobody configured.
    """

    Options = WebhookOptions

    @classmethod
    def validate_target(cls, url: str, options: WebhookOptions | None) -> None:
        """Called by the core when the config loads: a bad target is a config
        error naming the trigger's ``url`` key, not a run of failed attempts."""
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError("expected an http:// or https:// URL")
        headers = options.headers if options is not None else {}
        if URL(url, encoded=False).user is not None and \
                any(name.lower() == "authorization" for name in headers):
            raise ValueError(
                "the URL carries credentials, which are sent as a Basic Authorization "
                "header, and headers sets Authorization too; keep one of them")

    def __init__(self, *, limit: int = 1024, limit_per_host: int = 256,
                 keepalive_timeout: float = 4.0, transport: str = DEFAULT_TRANSPORT) -> None:
        # keepalive_timeout below the 5 s default of Node.js servers: reusing a
        # connection the server is closing would fail an attempt for nothing.
        self.limit = limit
        self.limit_per_host = limit_per_host
        self.keepalive_timeout = keepalive_timeout
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, "
                             f"got {transport!r}")
        # For triggers that do not name a transport.
        self.transport = transport
        self._session: aiohttp.ClientSession | None = None
        self._native: Any = None  # pyreqwest Client, made on first use
        self._curl: curl.CurlTransport | None = None  # its thread starts on first use
        self._plans: dict[str, _Plan] = {}

    async def open(self) -> None:
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=self.limit,
            limit_per_host=self.limit_per_host,
            keepalive_timeout=self.keepalive_timeout,
        )
        # No cookie jar: a receiver's Set-Cookie must not leak into the next event.
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        client, self._native = self._native, None
        if client is not None:
            await client.close()
        curl_transport, self._curl = self._curl, None
        if curl_transport is not None:
            await curl_transport.close()
        if session is not None:
            await session.close()

    def batch_size(self, trigger: Trigger) -> int:
        try:
            return self._plan_for(trigger).batch_size
        except Exception:  # deliver() reports the broken options as a failed attempt
            return 1

    def _plan_for(self, trigger: Trigger) -> _Plan:
        plan = self._plans.get(trigger.name)
        if plan is None or plan.trigger is not trigger:
            plan = self._plans[trigger.name] = _plan(trigger, self.transport)
        return plan

    async def deliver(self, trigger: Trigger, events: Sequence[Event]) -> Sequence[Outcome]:
        if not events:
            return []
        try:
            plan = self._plan_for(trigger)
        except Exception as exc:  # options that slipped past validation
            return [_failed(f"sink error: {type(exc).__name__}: {exc}", len(events))] \
                * len(events)
        if not plan.batch and len(events) > 1:
            # One event per POST was asked for; a caller handing more gets them
            # as separate requests, never as an array the receiver does not expect.
            results = await asyncio.gather(*(self._post(plan, [ev]) for ev in events))
            return [o for out in results for o in out]
        return await self._post(plan, events)

    async def _post(self, plan: _Plan, events: Sequence[Event]) -> list[Outcome]:
        n = len(events)
        started_at = datetime.now(UTC)
        t0 = time.perf_counter()
        # The invocation log keeps no copy of the body: a single event's is its
        # payload, a batch's is rebuilt from the events sharing its request id.
        if plan.batch:
            body = batch_body([ev.payload for ev in events])
            request_id: str | None = str(uuid.uuid4())
        else:
            body = events[0].payload
            request_id = None
        headers = plan.headers
        masked: Mapping[str, str] = plan.masked
        if plan.signer is not None:
            msg_id = batch_id([ev.id for ev in events]) if plan.batch else events[0].id
            ts = int(time.time())
            signature = plan.signer.sign(msg_id, ts, body)
            headers = {**headers, "webhook-id": msg_id, "webhook-timestamp": str(ts),
                       "webhook-signature": signature}
            masked = {**masked, "webhook-id": msg_id, "webhook-timestamp": str(ts),
                      "webhook-signature": MASK}
        got: list[int] = []  # the status, once its line has arrived
        try:
            if self._session is None:
                raise RuntimeError("the webhook sink is not open (open() was not called)")
            if plan.transport == "pycurl":
                status, text, retry_after = await self._send_curl(plan, body, headers, got)
            elif plan.transport == "pyreqwest":
                status, text, retry_after = await self._send_native(plan, body, headers, got)
            else:
                status, text, retry_after = await self._send_aiohttp(plan, body, headers, got)
        except Exception as exc:
            status = got[0] if got else None
            if plan.transport == "pycurl":
                if isinstance(exc, curl.CurlError):
                    status = exc.status
                error = curl.describe(exc, plan.trigger.timeout, plan.where, status)
            elif plan.transport == "pyreqwest":
                error = native.describe(exc, plan.trigger.timeout, plan.where, status)
            else:
                error = describe(exc, plan.trigger.timeout)
            error = _scrub(error, plan)
            log.debug("webhook attempt failed", trigger=plan.trigger.name,
                      url=plan.masked_url, error=error, events=n)
            out = Outcome(ok=False, started_at=started_at,
                          duration_ms=(time.perf_counter() - t0) * 1000.0,
                          status_code=status, error=error, request_headers=masked,
                          batch_size=n, request_id=request_id)
            return [out] * n
        ok = 200 <= status < 300
        if ok:
            error = None
        elif 300 <= status < 400:
            error = f"HTTP {status} (redirects are not followed)"
        else:
            error = f"HTTP {status}"
        out = Outcome(ok=ok, started_at=started_at,
                      duration_ms=(time.perf_counter() - t0) * 1000.0,
                      status_code=status, response_body=text, error=error,
                      retry_after=retry_after, request_headers=masked, batch_size=n,
                      request_id=request_id)
        return [out] * n

    async def _send_aiohttp(self, plan: _Plan, body: bytes, headers: Mapping[str, str],
                            got: list[int]) -> tuple[int, str, float | None]:
        session = self._session
        assert session is not None
        async with session.post(plan.url, data=body, headers=headers,
                                timeout=plan.timeout, allow_redirects=False) as resp:
            status = resp.status
            got.append(status)
            content = resp.content
            # Most receivers answer with an empty body: skip reading and decoding.
            if content.at_eof():
                text = ""
            else:
                raw = await _read_capped(content)
                text = decode_body(raw, resp.charset) if raw else ""
            retry_after = (parse_retry_after(resp.headers.get("Retry-After"))
                           if status in RETRY_AFTER_STATUSES else None)
        return status, text, retry_after

    async def _send_curl(self, plan: _Plan, body: bytes, headers: Mapping[str, str],
                         got: list[int]) -> tuple[int, str, float | None]:
        transport = self._curl
        if transport is None:
            transport = self._curl = curl.CurlTransport(
                limit=self.limit, limit_per_host=self.limit_per_host,
                keepalive_timeout=self.keepalive_timeout)
        lines = plan.curl_headers if headers is plan.headers else _curl_headers(headers)
        resp = await transport.post(plan.url_text, lines, body, plan.trigger.timeout)
        status = resp.status
        got.append(status)
        text = decode_body(resp.body, _charset(resp.content_type)) if resp.body else ""
        retry_after = (parse_retry_after(resp.header("Retry-After"))
                       if status in RETRY_AFTER_STATUSES else None)
        return status, text, retry_after

    async def _send_native(self, plan: _Plan, body: bytes, headers: Mapping[str, str],
                           got: list[int]) -> tuple[int, str, float | None]:
        client = self._native
        if client is None:
            client = self._native = native.client(limit=self.limit,
                                                  keepalive_timeout=self.keepalive_timeout)
        request = (client.post(plan.url_text).headers(dict(headers)).body_bytes(body)
                   .timeout(plan.deadline).build_streamed())
        async with request as resp:
            status = resp.status
            got.append(status)
            resp_headers = resp.headers
            if resp_headers.get("Content-Length") == "0":
                text = ""
            else:
                raw = await _read_capped_native(resp.body_reader)
                text = decode_body(raw, _charset(resp_headers.get("Content-Type"))) \
                    if raw else ""
            retry_after = (parse_retry_after(resp_headers.get("Retry-After"))
                           if status in RETRY_AFTER_STATUSES else None)
        return status, text, retry_after


async def _read_capped_native(reader: Any) -> bytes:
    """At most MAX_RESPONSE_BODY bytes of a pyreqwest response body."""
    chunks: list[bytes] = []
    size = 0
    while size < MAX_RESPONSE_BODY:
        chunk = await reader.read(MAX_RESPONSE_BODY - size)
        if chunk is None:
            break
        data = bytes(chunk)
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


def _charset(content_type: str | None) -> str | None:
    """The charset parameter of a Content-Type value, if any."""
    if not content_type:
        return None
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip('"') or None
    return None


async def _read_capped(content: aiohttp.StreamReader) -> bytes:
    """At most MAX_RESPONSE_BODY bytes; a longer body is not read further (its
    connection is then closed instead of going back to the pool)."""
    chunks: list[bytes] = []
    size = 0
    while size < MAX_RESPONSE_BODY:
        chunk = await content.read(MAX_RESPONSE_BODY - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _scrub(message: str, plan: _Plan) -> str:
    """Error text from a library may quote the URL; its path and query may carry
    tokens, so only the masked form may reach the log."""
    raw = plan.trigger.url
    if raw in message or str(plan.url) in message:
        message = message.replace(raw, plan.masked_url).replace(str(plan.url), plan.masked_url)
    path = plan.url.raw_path_qs
    if len(path) > 1 and path in message:
        message = message.replace(path, "/" + MASK)
    return message


def _failed(error: str, n: int) -> Outcome:
    return Outcome(ok=False, started_at=datetime.now(UTC), duration_ms=0.0, error=error,
                   batch_size=n)


__all__ = ["WebhookSink", "options_of"]
