"""The webhook receiver every scenario and every ceiling POSTs to, in its own
process so it never shares an event loop (or a GIL) with the sender.

Two modes. Counting (throughput): one event per single POST, or the number of
events in a batch array, found without parsing. Recording (latency, pgbench):
each event is parsed, counted per (table, type), deduplicated by its id, and
its receipt wall-clock time kept under a key the writer can rebuild. The reply
status can be switched (503 while "the webhook is down"), and every reply can be
held for a fixed delay (a webhook that takes some milliseconds to answer).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from aiohttp import web


def event_key(event: dict[str, Any]) -> str:
    """What the latency writer records for a change: type, docId and the row's
    ``seq`` column (unique per change; a delete carries the old row's)."""
    data = event.get("data") or {}
    doc = data.get("doc") or {}
    return f"{event.get('type')}:{data.get('docId')}:{doc.get('seq')}"


@dataclass
class Snapshot:
    events: int = 0  # events answered with 2xx
    requests: int = 0
    refused: int = 0  # requests answered with a non-2xx status
    first: float | None = None  # time.monotonic() of the first 2xx receipt
    last: float | None = None
    switched: float | None = None  # time.monotonic() of the last status switch
    duplicates: int = 0  # recording mode only
    kinds: dict[tuple[str, str], int] = field(default_factory=dict)
    kind_last: dict[tuple[str, str], float] = field(default_factory=dict)  # monotonic
    times: dict[str, float] = field(default_factory=dict)  # key -> time.time() at receipt


def _serve(conn: Connection) -> None:
    snap = Snapshot()
    settings: dict[str, Any] = {"status": 200, "record": False, "delay": 0.0}
    seen: set[str] = set()
    kinds: Counter[tuple[str, str]] = Counter()
    kind_last: dict[tuple[str, str], float] = {}

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if settings["delay"]:
            await asyncio.sleep(settings["delay"])
        wall, mono = time.time(), time.monotonic()
        status = settings["status"]
        if status != 200:
            snap.refused += 1
            return web.Response(status=status)
        if settings["record"]:
            doc = json.loads(body)
            batch = doc if isinstance(doc, list) else [doc]
            for ev in batch:
                if ev["id"] in seen:
                    snap.duplicates += 1
                    continue
                seen.add(ev["id"])
                kind = (ev["data"]["col"], ev["type"])
                kinds[kind] += 1
                kind_last[kind] = mono
                snap.times.setdefault(event_key(ev), wall)
            n = len(batch)
        else:
            n = body.count(b'"specversion"') if body[:1] == b"[" else 1
        snap.events += n
        snap.requests += 1
        if snap.first is None:
            snap.first = mono
        snap.last = mono
        return web.Response(status=200)

    async def main() -> None:
        nonlocal snap
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock, backlog=1024).start()
        conn.send(sock.getsockname()[1])
        loop = asyncio.get_running_loop()
        while True:
            # Commands are handled on the loop's thread, between requests, so
            # nothing here needs a lock.
            cmd, arg = await loop.run_in_executor(None, conn.recv)
            if cmd == "stop":
                break
            if cmd == "reset":
                snap = Snapshot()
                seen.clear()
                kinds.clear()
                kind_last.clear()
                settings.update(arg)
                conn.send(None)
            elif cmd == "status":
                settings["status"] = arg
                snap.switched = time.monotonic()
                conn.send(snap.switched)
            elif cmd == "snapshot":
                snap.kinds = dict(kinds)
                snap.kind_last = dict(kind_last)
                out = Snapshot(**{**snap.__dict__,
                                  "times": dict(snap.times) if arg else {}})
                conn.send(out)
            elif cmd == "ids":
                conn.send(set(seen))
        await runner.cleanup()

    asyncio.run(main())


class ReceiverProcess:
    """``with ReceiverProcess() as rx``: the receiver and its controls."""

    def __enter__(self) -> ReceiverProcess:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True,
                                 name="bench-receiver")
        self._proc.start()
        self.port: int = self._conn.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.send(("stop", None))
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.terminate()

    @property
    def pid(self) -> int:
        return int(self._proc.pid or 0)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def reset(self, *, record: bool = False, status: int = 200, delay: float = 0.0) -> None:
        """Count afresh; ``delay``: seconds every reply is held back (the
        receipt time is taken after it, when the answer goes out)."""
        self._conn.send(("reset", {"record": record, "status": status, "delay": delay}))
        self._conn.recv()

    def ids(self) -> set[str]:
        """The ids of the events received so far (recording mode only)."""
        self._conn.send(("ids", None))
        got: set[str] = self._conn.recv()
        return got

    def set_status(self, status: int) -> float:
        """Answer ``status`` from now on; returns the switch's time.monotonic()."""
        self._conn.send(("status", status))
        switched: float = self._conn.recv()
        return switched

    def snapshot(self, times: bool = False) -> Snapshot:
        self._conn.send(("snapshot", times))
        snap: Snapshot = self._conn.recv()
        return snap

    def wait_events(self, count: int, *, stall: float = 60.0, poll: float = 0.05) -> Snapshot:
        """Until ``count`` events arrived; raises when none arrive for ``stall`` s."""
        last_n, last_change = -1, time.monotonic()
        while True:
            snap = self.snapshot()
            if snap.events >= count:
                return snap
            if snap.events != last_n:
                last_n, last_change = snap.events, time.monotonic()
            elif time.monotonic() - last_change > stall:
                raise TimeoutError(f"receiver stalled at {snap.events} of {count} events "
                                   f"({snap.refused} refused) for {stall:.0f} s")
            time.sleep(poll)
