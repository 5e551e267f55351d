"""The demo's webhook receiver: prints each delivery as it arrives."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime

import click
from aiohttp import web

OK_PATH = "/hooks/users"
BROKEN_PATH = "/hooks/broken"


class DemoReceiver:
    def __init__(self, broken_attempts: int) -> None:
        self.broken_attempts = broken_attempts
        self.seen: Counter[str] = Counter()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(OK_PATH, self._ok)
        app.router.add_post(BROKEN_PATH, self._broken)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _ok(self, request: web.Request) -> web.Response:
        event = await request.json()
        self.seen[event["id"]] += 1
        self._show(event, request, "200 OK", "green")
        return web.Response(status=200, text="ok")

    async def _broken(self, request: web.Request) -> web.Response:
        event = await request.json()
        self.seen[event["id"]] += 1
        n = self.seen[event["id"]]
        note = f"500 on purpose (attempt {n} of {self.broken_attempts})"
        if n >= self.broken_attempts:
            note += " -> the event is now 'failed'; see: dbevents events list --status failed"
        self._show(event, request, note, "red")
        return web.Response(status=500, text="this receiver always fails")

    def _show(self, event: dict, request: web.Request, verdict: str, color: str) -> None:  # type: ignore[type-arg]
        sent = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
        latency_ms = (datetime.now(UTC) - sent).total_seconds() * 1000
        data = event.get("data", {})
        head = (f"{event['type']:<9} {data.get('col')} docId={data.get('docId')} "
                f"-> {request.path}  attempt {self.seen[event['id']]}  "
                f"latency {latency_ms:.0f} ms  {verdict}")
        click.secho(head, fg=color, bold=True)
        click.echo("  " + json.dumps(event, separators=(", ", ": ")))
