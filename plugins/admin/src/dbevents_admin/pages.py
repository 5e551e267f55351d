"""The console: server-rendered pages. Every value from the store or the config
goes through ``e()`` (html.escape); the scripts only ever set textContent."""

from __future__ import annotations

import hmac
import json
from html import escape
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from dbevents import Status

from dbevents_admin import app as api


def e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def layout(title: str, body: str, *, nav: bool = True) -> web.Response:
    links = ('<nav><a href="/">Triggers</a> <a href="/events">Events</a> '
             '<a href="/events?status=failed">Failed</a> <a href="/tail">Live tail</a>'
             '<form method="post" action="/logout" class="logout">'
             '<button type="submit">Sign out</button></form></nav>') if nav else ""
    return web.Response(text=(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<title>{e(title)} · dbevents</title>'
        '<link rel="stylesheet" href="/static/console.css">'
        '<script src="/static/console.js" defer></script></head>'
        f'<body><header><strong>dbevents</strong> console{links}</header>'
        f'<main><h1>{e(title)}</h1>{body}</main></body></html>'), content_type="text/html")


def table(headers: list[str], rows: list[str], cls: str = "") -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    return (f'<table class="{e(cls)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows) or "<tr><td colspan=99>none</td></tr>"}</tbody></table>')


def events_link(**query: str) -> str:
    return "/events?" + urlencode({k: v for k, v in query.items() if v})


def redeliver_button(ev_id: str, status: str) -> str:
    if status not in (Status.FAILED.value, Status.DELIVERED.value):
        return ""
    return f'<button type="button" data-redeliver="{e(ev_id)}">Redeliver</button>'


def pretty(raw: bytes | str | None) -> str:
    """JSON indented for reading (the raw text when it is not JSON)."""
    if raw is None:
        return ""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        value = json.loads(text)
    except ValueError:
        return text
    # Indented only when nothing changes on the way (a number such as 1e400 or
    # 12345678901234567.89 would): otherwise the text as stored.
    if json.dumps(value, separators=(",", ":"), ensure_ascii=False) != text.strip():
        return text
    return json.dumps(value, indent=2, ensure_ascii=False)


async def index(request: web.Request) -> web.Response:
    ctx = request.app[api.CONTEXT]
    rows = []
    for t in await api.triggers_data(ctx):
        c = t["counts"]
        state = (f'paused since {t["paused_since"]} (receiver down)' if t["paused_since"]
                 else "delivering")
        counts = "".join(
            f'<td class="num"><a href="{e(events_link(trigger=t["name"], status=s))}">'
            f'{e(c[s])}</a></td>' for s in ("pending", "delivering", "delivered", "failed"))
        rows.append(
            f'<tr><td><a href="{e(events_link(trigger=t["name"]))}">{e(t["name"])}</a></td>'
            f'<td>{e(", ".join(t["databases"] or ["*"]))} / {e(", ".join(t["tables"] or ["*"]))}'
            f'</td><td>{e(", ".join(t["operations"]))}</td>'
            f'<td>{e(t["sink"])} {e(t["url"])}</td>'
            f'<td>{e(t["retries"])} retries, {e(t["timeout"])} ms</td>{counts}'
            f'<td>{e(t["last_delivery"] or "never")}</td>'
            f'<td>{e(state)}</td></tr>')
    sources = [f'<tr><td>{e(s["name"])}</td><td>{e(s["type"])}</td>'
               f'<td><code>{e(s["checkpoint"] or "none yet")}</code></td></tr>'
               for s in await api.sources_data(ctx)]
    return layout("Triggers", table(
        ["Trigger", "Databases / tables", "Operations", "Sink", "Settings", "Pending",
         "Delivering", "Delivered", "Failed", "Last delivery", "State"], rows, "triggers")
        + "<h2>Sources</h2>" + table(["Database", "Type", "Checkpoint"], sources))


FILTER_FIELDS = (("trigger", "Trigger"), ("table", "Table"), ("docId", "docId"),
                 ("database", "Database"), ("since", "Since (ISO time)"),
                 ("until", "Until (ISO time)"))


async def events(request: web.Request) -> web.Response:
    q = request.query
    try:
        flt = api.event_filter(q)
    except api.BadRequest as exc:
        return layout("Events", f'<p class="error">{e(exc.parameter)}: {e(exc)}</p>')
    evs = await request.app[api.CONTEXT].store.list_events(flt)
    options = "".join(
        f'<option value="{e(s)}"{" selected" if q.get("status", "") == s else ""}>'
        f'{e(s or "any status")}</option>' for s in ["", *(s.value for s in Status)])
    inputs = "".join(f'<label>{e(label)} <input name="{e(name)}" value="{e(q.get(name, ""))}">'
                     '</label>' for name, label in FILTER_FIELDS)
    form = (f'<form method="get" action="/events" class="filters">{inputs}'
            f'<label>Status <select name="status">{options}</select></label>'
            '<button type="submit">Filter</button></form>')
    rows = [
        f'<tr data-event="{e(ev.id)}"><td><a href="/events/{e(ev.id)}"><code>{e(ev.id[:8])}'
        f'</code></a></td><td>{e(ev.created_at.isoformat() if ev.created_at else "")}</td>'
        f'<td>{e(ev.trigger)}</td><td>{e(ev.type)}</td><td>{e(ev.database)}.{e(ev.table)}</td>'
        f'<td>{e(ev.doc_id)}</td><td class="status" data-status-of="{e(ev.id)}">'
        f'{e(ev.status.value)}</td><td class="num">{e(ev.attempts)}</td>'
        f'<td>{e(ev.last_error)}</td><td>{redeliver_button(ev.id, ev.status.value)}</td></tr>'
        for ev in evs]
    more = ""
    if len(evs) == flt.limit:
        nxt = {k: v for k, v in q.items() if k != "cursor"}
        nxt["cursor"] = str(evs[-1].seq)
        more = f'<p><a href="/events?{e(urlencode(nxt))}">Older events</a></p>'
    return layout("Events", form + table(
        ["Id", "Created", "Trigger", "Type", "Table", "docId", "Status", "Attempts",
         "Last error", ""], rows, "events") + more)


async def event(request: web.Request) -> web.Response:
    found = await api.event_detail(request.app[api.CONTEXT], request.match_info["id"])
    if found is None:
        raise web.HTTPNotFound(text="no such event")
    ev, attempts = found
    facts = [("Id", ev.id), ("Trigger", ev.trigger), ("Type", ev.type),
             ("Table", f"{ev.database}.{ev.table}"), ("docId", ev.doc_id),
             ("Attempts", ev.attempts), ("Created", ev.created_at), ("Updated", ev.updated_at),
             ("Next attempt", ev.next_attempt_at), ("Last error", ev.last_error)]
    dl = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts)
    dl += (f'<dt>Status</dt><dd class="status" data-status-of="{e(ev.id)}">'
           f'{e(ev.status.value)}</dd>')
    parts = [f"<dl>{dl}</dl>", redeliver_button(ev.id, ev.status.value),
             "<h2>Payload</h2>", f'<pre class="payload">{e(pretty(ev.payload))}</pre>',
             "<h2>Attempts</h2>"]
    if not attempts:
        parts.append("<p>No attempt yet.</p>")
    for a in attempts:
        verdict = "ok" if a["ok"] else "failed"
        headers = "".join(f"{e(k)}: {e(v)}\n" for k, v in a["request_headers"].items())
        batch = (f", request {e(a['batch_index'] + 1)} of a batch of {e(a['batch_size'])}"
                 if a["request_id"] else "")
        sent = a["request_body"]
        parts.append(
            f'<section class="attempt {verdict}"><h3>Attempt {e(a["number"])}: {verdict}, '
            f'HTTP {e(a["status_code"] or "-")} in {e(a["duration_ms"])} ms{batch}</h3>'
            f'<p>Started {e(a["started_at"])}. {e(a["error"] or "")}</p>'
            f'<h4>Request headers</h4><pre>{headers}</pre>'
            '<h4>Request body (exactly as sent)</h4>'
            + (f'<pre class="sent">{e(sent)}</pre>' if sent is not None else
               "<p>Not available: other events of its batch were purged.</p>")
            + f'<h4>Response body</h4><pre>{e(a["response_body"] or "")}</pre></section>')
    return layout(f"Event {ev.id[:8]}", "".join(parts))


async def tail(request: web.Request) -> web.Response:
    return layout("Live tail", (
        '<p>The newest events, refreshed every two seconds.</p>'
        + table(["Updated", "Trigger", "Type", "Table", "docId", "Status", "Attempts",
                 "Last error"], [], "tail").replace(
            '<tbody><tr><td colspan=99>none</td></tr></tbody>', '<tbody id="tail"></tbody>')))


def login_page(message: str = "") -> web.Response:
    note = f'<p class="error">{e(message)}</p>' if message else ""
    return layout("Sign in", note + (
        '<form method="post" action="/login" class="login"><label>Admin token '
        '<input type="password" name="token" autocomplete="current-password" autofocus>'
        '</label><button type="submit">Sign in</button></form>'), nav=False)


async def login_form(request: web.Request) -> web.Response:
    return login_page()


async def login(request: web.Request) -> web.StreamResponse:
    token = request.app[api.OPTIONS].bearer
    given = str((await request.post()).get("token", ""))
    if token is None:
        raise web.HTTPSeeOther("/")
    if not hmac.compare_digest(given.encode(), token.encode()):
        response = login_page("That is not the admin token.")
        response.set_status(401)
        return response
    response = web.HTTPSeeOther("/")
    response.set_cookie(api.COOKIE, api.session_value(token), httponly=True,
                        samesite="Strict", path="/", secure=request.secure)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    response = web.HTTPSeeOther("/login")
    response.del_cookie(api.COOKIE, path="/")
    raise response


def add_routes(app: web.Application) -> None:
    app.add_routes([
        web.get("/", index), web.get("/events", events), web.get("/events/{id}", event),
        web.get("/tail", tail), web.get("/login", login_form), web.post("/login", login),
        web.post("/logout", logout)])
