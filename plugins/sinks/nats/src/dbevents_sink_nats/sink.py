"""The NATS JetStream sink: each event's CloudEvents JSON published to a subject,
acknowledged by the stream that stores it. One attempt per call.

Retries, backoff, concurrency and per-row order belong to the core's dispatcher;
this class turns events into publishes and their acks into Outcomes. It never
raises for a failed delivery.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

import attrs
import nats
import nats.errors
import nats.js.errors
import structlog
from dbevents import Event, Outcome, Trigger
from dbevents.masking import MASK, add_secrets, scrub, secret_fragments
from dbevents.protocols import sink_options
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from dbevents_sink_nats.options import NatsOptions, servers_of, subject_token, template_fields

log = structlog.get_logger("dbevents.sink.nats")

MSG_ID = "Nats-Msg-Id"
EXPECTED_STREAM = "Nats-Expected-Stream"
# JetStream's answer when the stream that captures a subject is not the expected one.
WRONG_STREAM = 10060


def options_of(trigger: Trigger) -> NatsOptions:
    return sink_options(trigger, NatsOptions)


def mask_servers(url: str) -> str:
    """Server URLs for logs: scheme, host and port; credentials (user and
    password, or a token) become ***."""
    out = []
    for s in url.split(","):
        parts = urlsplit(s.strip())
        host = parts.hostname or ""
        try:
            port = parts.port
        except ValueError:
            port = None
        where = f"{host}:{port}" if port else host
        creds = f"{MASK}@" if "@" in parts.netloc else ""
        out.append(f"{parts.scheme}://{creds}{where}")
    return ",".join(out)


def _url_secrets(url: str) -> set[str]:
    """The user info of each server URL: a token alone, or a password."""
    out: set[str] = set()
    for s in url.split(","):
        netloc = urlsplit(s.strip()).netloc
        if "@" in netloc:
            userinfo = netloc.rsplit("@", 1)[0]
            secret = userinfo.split(":", 1)[1] if ":" in userinfo else userinfo
            out |= secret_fragments(secret) | secret_fragments(unquote(secret))
    return out


@attrs.frozen
class _Plan:
    """Everything about a trigger's publishes that does not change per event."""

    trigger: Trigger
    servers: tuple[str, ...]
    masked_url: str
    subject: str  # the template
    fields: frozenset[str]
    stream: str | None
    batch_size: int
    timeout: float  # seconds


def _plan(trigger: Trigger) -> _Plan:
    opts = options_of(trigger)
    servers = tuple(servers_of(trigger.url))
    # A token in the URL is not a password, so the core's masking does not know
    # it: register it, so no line this process prints can show it.
    add_secrets(_url_secrets(trigger.url))
    return _Plan(trigger=trigger, servers=servers, masked_url=mask_servers(trigger.url),
                 subject=opts.subject, fields=frozenset(template_fields(opts.subject)),
                 stream=opts.stream, batch_size=opts.batch_size,
                 timeout=trigger.timeout / 1000.0)


def subject_for(plan: _Plan, event: Event) -> str:
    values = {"trigger": event.trigger, "database": event.database, "table": event.table,
              "type": event.type}
    return plan.subject.format(**{k: subject_token(values[k]) for k in plan.fields})


class _Connection:
    """One NATS connection (per server list) and its JetStream context, with the
    last error the client reported while connecting."""

    def __init__(self, masked_url: str) -> None:
        self.masked_url = masked_url
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.last_error: BaseException | None = None
        self.lock = asyncio.Lock()
        self.streams_seen: set[str] = set()  # streams known to exist

    async def on_error(self, exc: Exception) -> None:
        self.last_error = exc
        log.warning("nats client error", url=self.masked_url,
                    error=scrub(_describe(exc, where=self.masked_url)))

    async def on_disconnected(self) -> None:
        log.info("nats disconnected", url=self.masked_url)

    async def on_reconnected(self) -> None:
        log.info("nats reconnected", url=self.masked_url)

    @property
    def usable(self) -> bool:
        return self.nc is not None and not self.nc.is_closed


class NatsSink:
    """Publishes CloudEvents JSON to NATS JetStream.

    One connection per server list (a trigger's ``url``), made on first use and
    shared by every trigger naming the same servers; closed in ``close()``. A
    connection that cannot be made is a failed attempt, tried again on the next
    delivery.
    """

    Options = NatsOptions

    @classmethod
    def validate_target(cls, url: str, options: NatsOptions | None) -> None:
        """Called when the config loads: a bad URL is a config error naming the
        trigger's ``url`` key, not a run of failed attempts."""
        servers_of(url)

    def __init__(self) -> None:
        self._connections: dict[tuple[str, ...], _Connection] = {}
        self._plans: dict[str, _Plan] = {}
        self._open = False

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False
        connections, self._connections = self._connections, {}
        for conn in connections.values():
            await _close(conn)

    def batch_size(self, trigger: Trigger) -> int:
        try:
            return self._plan_for(trigger).batch_size
        except Exception:  # deliver() reports the broken options as a failed attempt
            return 1

    def _plan_for(self, trigger: Trigger) -> _Plan:
        plan = self._plans.get(trigger.name)
        if plan is None or plan.trigger is not trigger:
            plan = self._plans[trigger.name] = _plan(trigger)
        return plan

    async def deliver(self, trigger: Trigger, events: Sequence[Event]) -> Sequence[Outcome]:
        if not events:
            return []
        started_at = datetime.now(UTC)
        t0 = time.perf_counter()
        n = len(events)
        request_id = str(uuid.uuid4()) if n > 1 else None

        def failed(error: str, headers: Mapping[str, str] | None = None) -> Outcome:
            return Outcome(ok=False, started_at=started_at,
                           duration_ms=(time.perf_counter() - t0) * 1000.0,
                           error=scrub(error), request_headers=headers or {},
                           batch_size=n, request_id=request_id)

        try:
            plan = self._plan_for(trigger)
        except Exception as exc:  # options that slipped past validation
            return [failed(f"sink error: {type(exc).__name__}: {exc}")] * n
        if not self._open:
            return [failed("the nats sink is not open (open() was not called)")] * n
        deadline = time.monotonic() + plan.timeout
        try:
            conn = await self._connection(plan, deadline)
            if plan.stream is not None:
                await _check_stream(conn, plan.stream, deadline)
        except _Failed as exc:
            log.debug("nats attempt failed", trigger=trigger.name, url=plan.masked_url,
                      error=str(exc), events=n)
            return [failed(str(exc))] * n
        assert conn.js is not None
        subjects = [subject_for(plan, ev) for ev in events]
        headers = [self._headers(plan, ev) for ev in events]
        if n == 1:
            results: list[PubAck | BaseException] = [
                await _publish(conn.js, subjects[0], events[0].payload, headers[0], plan)]
        else:
            results = await _publish_batch(conn.js, subjects, events, headers, plan, deadline)
        duration = (time.perf_counter() - t0) * 1000.0
        outcomes = []
        for subject, hdrs, result in zip(subjects, headers, results, strict=True):
            if isinstance(result, PubAck):
                body = json.dumps({"stream": result.stream, "seq": result.seq,
                                   "duplicate": bool(result.duplicate), "subject": subject})
                outcomes.append(Outcome(ok=True, started_at=started_at, duration_ms=duration,
                                        response_body=body, request_headers=hdrs,
                                        batch_size=n, request_id=request_id))
            else:
                error = scrub(_describe(result, subject=subject, plan=plan))
                log.debug("nats publish failed", trigger=trigger.name, url=plan.masked_url,
                          error=error)
                outcomes.append(Outcome(ok=False, started_at=started_at, duration_ms=duration,
                                        error=error, request_headers=hdrs, batch_size=n,
                                        request_id=request_id))
        if any(isinstance(r, nats.errors.ConnectionClosedError) for r in results):
            # Gone for good (the client gave up reconnecting): the next
            # delivery connects afresh.
            self._connections.pop(plan.servers, None)
        return outcomes

    @staticmethod
    def _headers(plan: _Plan, event: Event) -> dict[str, str]:
        # The event id is the same on every attempt: JetStream drops a message
        # whose id it has seen within the stream's duplicate window.
        headers = {MSG_ID: event.id}
        if plan.stream is not None:
            headers[EXPECTED_STREAM] = plan.stream
        return headers

    async def _connection(self, plan: _Plan, deadline: float) -> _Connection:
        conn = self._connections.get(plan.servers)
        if conn is None:
            conn = self._connections[plan.servers] = _Connection(plan.masked_url)
        if conn.usable:
            return conn
        async with conn.lock:
            if conn.usable:
                return conn
            await _connect(conn, plan, deadline)
        return conn


class _Failed(Exception):
    """An attempt failed before anything was published; the text is the error."""


async def _connect(conn: _Connection, plan: _Plan, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _Failed(f"timeout after {plan.trigger.timeout} ms (connecting)")
    conn.last_error = None
    tls = ssl.create_default_context() if any(
        s.startswith("tls://") for s in plan.servers) else None
    try:
        # Two tries per server, each bounded by the attempt's time left; after a
        # drop the client reconnects on its own, and once it gives up the
        # connection is closed and the next delivery connects afresh.
        nc = await nats.connect(
            list(plan.servers), connect_timeout=max(0.05, remaining / 2),
            reconnect_time_wait=0.25, max_reconnect_attempts=1, tls=tls,
            error_cb=conn.on_error, disconnected_cb=conn.on_disconnected,
            reconnected_cb=conn.on_reconnected, name="dbevents")
    except Exception as exc:
        cause = conn.last_error or exc
        raise _Failed(_describe(cause, plan=plan)) from None
    conn.nc = nc
    conn.js = nc.jetstream(timeout=plan.timeout)
    conn.streams_seen.clear()
    log.info("nats connected", url=plan.masked_url)


async def _close(conn: _Connection) -> None:
    nc, conn.nc, conn.js = conn.nc, None, None
    if nc is None or nc.is_closed:
        return
    # No drain: deliver() has already waited for the acks of its publishes.
    try:
        await nc.close()
    except Exception as exc:
        log.debug("nats close failed", url=conn.masked_url, error=scrub(_describe(exc)))


async def _check_stream(conn: _Connection, stream: str, deadline: float) -> None:
    """The stream must exist: say so plainly rather than as a publish error."""
    if stream in conn.streams_seen:
        return
    assert conn.js is not None
    try:
        await conn.js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        raise _Failed(f"stream {stream!r} does not exist on {conn.masked_url}") from None
    except nats.errors.TimeoutError:
        raise _Failed(f"timeout asking for stream {stream!r}: is JetStream enabled "
                      f"on {conn.masked_url}?") from None
    except nats.errors.NoRespondersError:
        raise _Failed(f"JetStream is not enabled on {conn.masked_url}") from None
    except Exception as exc:
        raise _Failed(f"stream {stream!r}: {_describe(exc)}") from None
    conn.streams_seen.add(stream)


async def _publish(js: JetStreamContext, subject: str, payload: bytes,
                   headers: dict[str, str], plan: _Plan) -> PubAck | BaseException:
    try:
        # A copy: the client adds to the dict it is given.
        return await js.publish(subject, payload, timeout=plan.timeout, headers=dict(headers))
    except Exception as exc:
        return exc


async def _publish_batch(js: JetStreamContext, subjects: Sequence[str],
                         events: Sequence[Event], headers: Sequence[dict[str, str]],
                         plan: _Plan, deadline: float) -> list[PubAck | BaseException]:
    """Publish every event without waiting, then wait for all the acks until the
    attempt's deadline; what has no ack by then timed out."""
    results: list[PubAck | BaseException | None] = [None] * len(events)
    futures: dict[int, asyncio.Future[PubAck]] = {}
    for i, ev in enumerate(events):
        try:
            futures[i] = await js.publish_async(
                subjects[i], ev.payload, wait_stall=max(0.0, deadline - time.monotonic()),
                headers=dict(headers[i]))
        except Exception as exc:
            results[i] = exc
    if futures:
        _, pending = await asyncio.wait(futures.values(),
                                        timeout=max(0.0, deadline - time.monotonic()))
        for fut in pending:
            fut.cancel()  # also frees its place in the client's pending limit
    for i, fut in futures.items():
        if fut.cancelled():
            results[i] = nats.errors.TimeoutError()
        else:
            err = fut.exception()
            results[i] = err if err is not None else fut.result()
    return [r if r is not None else RuntimeError("not published") for r in results]


def _describe(exc: BaseException, *, subject: str | None = None,
              plan: _Plan | None = None, where: str = "") -> str:
    """The invocation log's error text for what the client raised."""
    timeout_ms = plan.trigger.timeout if plan is not None else None
    where = plan.masked_url if plan is not None else where
    if isinstance(exc, nats.errors.TimeoutError | asyncio.TimeoutError | TimeoutError):
        return f"timeout after {timeout_ms} ms" if timeout_ms is not None else "timeout"
    if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        if plan is not None and plan.stream is not None:
            return f"stream {plan.stream!r} does not capture subject {subject!r}"
        return f"no stream captures subject {subject!r}"
    if isinstance(exc, nats.js.errors.APIError):
        if exc.err_code == WRONG_STREAM and plan is not None:
            return (f"subject {subject!r} is captured by another stream, "
                    f"not {plan.stream!r}")
        return f"jetstream error {exc.err_code}: {exc.description}"
    if isinstance(exc, nats.js.errors.TooManyStalledMsgsError):
        return f"timeout after {timeout_ms} ms (too many publishes awaiting acks)"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused: {where}"
    if isinstance(exc, nats.errors.AuthorizationError):
        return f"authorization violation: {where}"
    if isinstance(exc, ssl.SSLError):
        return f"tls error: {where}: {exc}"
    if isinstance(exc, nats.errors.NoServersError):
        return f"no server reachable: {where}"
    if isinstance(exc, nats.errors.ConnectionClosedError):
        return f"connection closed: {where}"
    if isinstance(exc, OSError):
        return f"connection error: {where}: {exc.strerror or exc}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = ["NatsSink", "mask_servers", "options_of"]
