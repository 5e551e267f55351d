"""The admin application: a JSON API over the store, the console pages, and
the token check in front of both."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

import attrs
import structlog
from aiohttp import web
from dbevents import Event, EventFilter, Status, request_body
from dbevents.masking import mask_url
from dbevents.protocols import ServiceContext, trigger_pauses
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dbevents_admin import pages
from dbevents_admin.metrics import AdminMetrics
from dbevents_admin.openapi import document
from dbevents_admin.options import Options

log = structlog.get_logger("dbevents.admin")

CONTEXT = web.AppKey("context", ServiceContext)
OPTIONS = web.AppKey("options", Options)
METRICS = web.AppKey("metrics", AdminMetrics)
# Set when an engine runs in this process (`dbevents run`), not in `dbevents console`.
ENGINE = web.AppKey("engine", bool)
STORE_TIMEOUT = 5.0  # seconds /readyz and /metrics wait for the store
COOKIE = "dbevents_admin"
MAX_LIMIT = 500
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Every page and answer: no inline script can run, nothing loads from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
OPEN_PATHS = ("/healthz", "/readyz", "/login", "/logout")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class BadRequest(Exception):
    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


def session_value(token: str) -> str:
    """The console cookie: derived from the token, so the token itself never sits
    in the browser, and changing the token ends every session."""
    return hmac.new(token.encode(), b"dbevents-console-session", hashlib.sha256).hexdigest()


def _authorized(request: web.Request, token: str | None) -> tuple[bool, bool]:
    """(allowed, by cookie)."""
    if token is None:
        # No token (loopback only, by config): refuse other Host names, so a web
        # page elsewhere cannot reach this server through DNS rebinding.
        host = (request.host or "").rsplit(":", 1)[0] if not (request.host or "").endswith("]") \
            else request.host
        return host in LOOPBACK_HOSTS, False
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return hmac.compare_digest(header[7:].encode(), token.encode()), False
    cookie = request.cookies.get(COOKIE)
    if cookie is not None:
        return hmac.compare_digest(cookie.encode(), session_value(token).encode()), True
    return False, False


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await _guarded(request, handler)
    except web.HTTPException as exc:
        response = exc
    response.headers.update(SECURITY_HEADERS)
    return response


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path in OPEN_PATHS or path.startswith("/static/") or (
            path == "/metrics" and request.app[OPTIONS].metrics_public):
        return await handler(request)
    allowed, by_cookie = _authorized(request, request.app[OPTIONS].bearer)
    api = path.startswith("/api/") or path in ("/openapi.json", "/metrics")
    if not allowed:
        if api or request.method != "GET":
            return web.json_response({"error": "a valid bearer token is required"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="dbevents"'})
        raise web.HTTPSeeOther("/login")
    if request.method == "POST" and (by_cookie or request.app[OPTIONS].bearer is None) \
            and request.content_type != "application/json":
        # A form on another site can POST with the browser's cookie, but cannot
        # send a JSON content type without asking first (CORS preflight).
        return web.json_response({"error": "send Content-Type: application/json"}, status=415)
    try:
        return await handler(request)
    except BadRequest as exc:
        body: dict[str, Any] = {"error": str(exc)}
        if exc.parameter:
            body["parameter"] = exc.parameter
        return web.json_response(body, status=400)


# -- values as JSON --------------------------------------------------------------


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def event_json(ev: Event) -> dict[str, Any]:
    return {"id": ev.id, "seq": ev.seq, "trigger": ev.trigger, "database": ev.database,
            "table": ev.table, "docId": ev.doc_id, "type": ev.type, "status": ev.status.value,
            "attempts": ev.attempts, "created_at": iso(ev.created_at),
            "updated_at": iso(ev.updated_at), "next_attempt_at": iso(ev.next_attempt_at),
            "last_error": ev.last_error}


def with_raw(obj: dict[str, Any], key: str, raw: bytes) -> str:
    """``obj`` as JSON with ``key`` set to JSON text as stored: the payload is
    never re-encoded, so every number keeps its digits."""
    head = json.dumps(obj)
    sep = ", " if obj else ""
    return f'{head[:-1]}{sep}"{key}": {raw.decode("utf-8", "replace")}}}'


def _time(value: str, parameter: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"expected an ISO 8601 time, got {value!r}", parameter) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _status(value: str | None, parameter: str = "status") -> Status | None:
    if not value:
        return None
    try:
        return Status(value)
    except ValueError:
        raise BadRequest(f"expected one of {', '.join(s.value for s in Status)}, got "
                         f"{value!r}", parameter) from None


def event_filter(q: Any, limit_default: int = 50) -> EventFilter:
    """An EventFilter from query parameters (or a JSON object's keys)."""
    def text(name: str) -> str | None:
        value = q.get(name)
        if value is not None and not isinstance(value, str):
            raise BadRequest("expected a string", name)
        return value or None

    try:
        limit = int(q.get("limit", limit_default))
        cursor = int(q["cursor"]) if q.get("cursor") else None
    except (TypeError, ValueError):
        raise BadRequest("expected an integer", "limit" if "limit" in q else "cursor") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"must be 1 to {MAX_LIMIT}", "limit")
    since, until = text("since"), text("until")
    return EventFilter(
        status=_status(text("status")), trigger=text("trigger"), database=text("database"),
        table=text("table"), doc_id=text("docId"), limit=limit, before_seq=cursor,
        since=_time(since, "since") if since else None,
        until=_time(until, "until") if until else None)


# -- reads --------------------------------------------------------------------------


async def triggers_data(ctx: ServiceContext) -> list[dict[str, Any]]:
    stats = {s.trigger: s for s in await ctx.store.stats()}
    pauses = trigger_pauses(ctx.store)
    paused = await pauses.paused_triggers() if pauses is not None else {}
    out = []
    for t in ctx.config.triggers:
        s = stats.get(t.name)
        last = await ctx.store.list_events(
            EventFilter(trigger=t.name, status=Status.DELIVERED, limit=1))
        out.append({
            "name": t.name, "sink": t.sink, "url": mask_url(t.url),
            "databases": sorted(t.databases) if t.databases else None,
            "tables": sorted(t.tables) if t.tables else None,
            "operations": sorted(o.value for o in t.operations),
            "retries": t.retries, "timeout": t.timeout, "concurrency": t.concurrency,
            "counts": {st.value: getattr(s, st.value, 0) if s else 0 for st in Status},
            "last_delivery": iso(last[0].updated_at) if last else None,
            # Its receiver is down: events wait, one probe at a time (docs/delivery.md).
            "paused_since": iso(paused[t.name]) if t.name in paused else None,
        })
    return out


async def sources_data(ctx: ServiceContext) -> list[dict[str, Any]]:
    checkpoints = await ctx.store.checkpoints()
    return [{"name": name, "type": db.type,
             "checkpoint": str(checkpoints[name]) if name in checkpoints else None}
            for name, db in ctx.config.databases.items()]


async def event_detail(ctx: ServiceContext, event_id: str
                       ) -> tuple[Event, list[dict[str, Any]]] | None:
    ev = await ctx.store.get_event(event_id)
    if ev is None:
        return None
    attempts = []
    for a in await ctx.store.attempts(event_id):
        members: list[Event] = []
        if a.request_id is not None:
            members = await ctx.store.list_events(
                EventFilter(request_id=a.request_id, limit=max(1, a.batch_size)))
        sent = request_body(ev, a, members)
        attempts.append({
            "number": a.number, "started_at": iso(a.started_at),
            "duration_ms": round(a.duration_ms, 1), "ok": a.ok, "status_code": a.status_code,
            "error": a.error, "request_headers": dict(a.request_headers),
            # The exact bytes sent (None: other events of its batch were purged).
            "request_body": sent.decode("utf-8", "replace") if sent is not None else None,
            "response_body": a.response_body, "batch_size": a.batch_size,
            "request_id": a.request_id, "batch_index": a.batch_index})
    return ev, attempts


def _ctx(request: web.Request) -> ServiceContext:
    return request.app[CONTEXT]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when the store answers and (under `dbevents run`) every source is
    streaming; else 503 naming what is not ready."""
    not_ready: dict[str, str] = {}
    try:
        await asyncio.wait_for(_ctx(request).store.checkpoints(), STORE_TIMEOUT)
    except Exception as exc:
        not_ready["store"] = f"the eventing DB does not answer: {str(exc) or type(exc).__name__}"
    if request.app[ENGINE]:
        not_ready.update({f"databases.{name}": why
                          for name, why in request.app[METRICS].not_ready().items()})
    if not_ready:
        return web.json_response({"status": "not ready", "not_ready": not_ready}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    found = request.app[METRICS]
    try:  # the queue gauge is read now, the rest is what was counted or polled
        await asyncio.wait_for(found.refresh_queue(_ctx(request)), STORE_TIMEOUT)
    except Exception as exc:
        log.warning("queue depth not read for /metrics", error=str(exc) or type(exc).__name__)
    found.refresh_lag()
    return web.Response(body=generate_latest(found.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())


async def api_triggers(request: web.Request) -> web.Response:
    return web.json_response({"triggers": await triggers_data(_ctx(request))})


async def api_sources(request: web.Request) -> web.Response:
    return web.json_response({"sources": await sources_data(_ctx(request))})


async def api_events(request: web.Request) -> web.Response:
    flt = event_filter(request.query)
    evs = await _ctx(request).store.list_events(flt)
    next_cursor = str(evs[-1].seq) if len(evs) == flt.limit else None
    return web.json_response({"events": [event_json(e) for e in evs],
                              "next_cursor": next_cursor})


async def api_event(request: web.Request) -> web.Response:
    found = await event_detail(_ctx(request), request.match_info["id"])
    if found is None:
        return web.json_response({"error": "no such event"}, status=404)
    ev, attempts = found
    body = with_raw({**event_json(ev), "attempts_log": attempts}, "payload", ev.payload)
    return web.Response(text=body, content_type="application/json")


# -- actions --------------------------------------------------------------------------


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object")
    return body


async def api_redeliver_one(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    event_id = request.match_info["id"]
    if await ctx.store.get_event(event_id) is None:
        return web.json_response({"error": "no such event"}, status=404)
    n = await ctx.store.redeliver([event_id], None, None)
    ctx.wake()
    log.info("admin redeliver", events=n)
    return web.json_response({"redelivered": n})


async def api_redeliver(request: web.Request) -> web.Response:
    """By ids, or every event matching a filter whose status is failed or delivered."""
    ctx = _ctx(request)
    body = await _json_body(request)
    ids = body.get("ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise BadRequest("expected a list of event ids", "ids")
        n = await ctx.store.redeliver(ids, None, None)
    else:
        flt = event_filter({**body, "limit": MAX_LIMIT})
        if flt.status not in (Status.FAILED, Status.DELIVERED):
            raise BadRequest("give ids, or status 'failed' or 'delivered'", "status")
        if flt == EventFilter(status=flt.status, trigger=flt.trigger, limit=MAX_LIMIT):
            n = await ctx.store.redeliver(None, flt.status, flt.trigger)
        else:
            chosen: list[str] = []
            while True:
                page = await ctx.store.list_events(flt)
                chosen += [e.id for e in page]
                if len(page) < flt.limit:
                    break
                flt = attrs.evolve(flt, before_seq=page[-1].seq)
            # The status is checked again as each event is changed.
            n = await ctx.store.redeliver(chosen, flt.status, None) if chosen else 0
    ctx.wake()
    log.info("admin redeliver", events=n)
    return web.json_response({"redelivered": n})


async def api_purge(request: web.Request) -> web.Response:
    """Finished events last updated before a time, by status (default both) and,
    when given, of one trigger."""
    body = await _json_body(request)
    before = body.get("before")
    if not isinstance(before, str):
        raise BadRequest("required: an ISO 8601 time", "before")
    raw = body.get("status", ["delivered", "failed"])
    statuses = [_status(s) for s in (raw if isinstance(raw, list) else [raw])]
    if not statuses or any(s not in (Status.DELIVERED, Status.FAILED) for s in statuses):
        raise BadRequest("only delivered and failed events are purged", "status")
    trigger = body.get("trigger")
    if trigger is not None and not isinstance(trigger, str):
        raise BadRequest("expected a trigger name", "trigger")
    n = await _ctx(request).store.purge(_time(before, "before"),
                                        [s for s in statuses if s is not None], trigger)
    log.info("admin purge", events=n, before=before, trigger=trigger)
    return web.json_response({"purged": n})


def build_app(context: ServiceContext, options: Options,
              found: AdminMetrics | None = None) -> web.Application:
    app = web.Application(middlewares=[guard])
    app[CONTEXT] = context
    app[OPTIONS] = options
    app[ENGINE] = found is not None
    # Without an engine (console) the counters stay at zero; the queue, the
    # sources' lag (from their probes) and the process facts are still served.
    app[METRICS] = found if found is not None else AdminMetrics(context, engine=False)
    app.add_routes([
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
        web.get("/openapi.json", openapi),
        web.get("/api/triggers", api_triggers),
        web.get("/api/sources", api_sources),
        web.get("/api/events", api_events),
        web.post("/api/events/redeliver", api_redeliver),
        web.post("/api/events/purge", api_purge),
        web.get("/api/events/{id}", api_event),
        web.post("/api/events/{id}/redeliver", api_redeliver_one),
        web.static("/static", str(files("dbevents_admin") / "static")),
    ])
    pages.add_routes(app)
    return app
