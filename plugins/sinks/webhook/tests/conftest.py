"""Fixtures for the webhook sink tests.

The scriptable receiver comes from ``testsupport`` (the ``receiver`` fixture). Two
behaviours it cannot script are served here, over real sockets on 127.0.0.1: a
reply cut off by a TCP reset after the status line and part of the body, and
bytes that are not HTTP at all.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
from aiohttp import web
from dbevents import Event, StoreSettings, Trigger
from dbevents.dispatcher import Dispatcher
from dbevents.testing import MemoryStore, reset
from dbevents_sink_webhook import WebhookSink
from dbevents_sink_webhook.options import TRANSPORTS

RunDispatch = Callable[..., Awaitable[MemoryStore]]


@pytest.fixture(autouse=True)
def _fresh_memory() -> None:
    reset()


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Every test using the sink runs once per transport (HTTP client)."""
    name: str = request.param
    return name


# Why pyreqwest cannot pass the two cut-off tests: OddServer writes a 200 status
# line and part of the body, then resets the connection within microseconds. The
# aiohttp client reads in this same event loop, so it has the status line before
# the RST lands; pyreqwest reads on its own thread, and when the RST arrives
# first the kernel drops the unread bytes, so the attempt is reported as
# "connection reset: closed before the response" with no status. Still a failed,
# retried attempt; only the wording and the recorded status differ.
# pycurl reads on its own thread too, yet passes: libcurl reads the socket as soon
# as it is readable and parses what it read before the next read reports the reset.
CUTOFF_RACE = ("pyreqwest reads on its own thread: the RST can overtake the unread "
               "status line, which the kernel then drops")


def xfail_cutoff_race(request: pytest.FixtureRequest, transport: str) -> None:
    if transport == "pyreqwest":
        request.applymarker(pytest.mark.xfail(reason=CUTOFF_RACE, strict=False))


@pytest.fixture
async def sink(transport: str) -> AsyncIterator[WebhookSink]:
    s = WebhookSink(transport=transport)
    await s.open()
    yield s
    await s.close()


class OddServer:
    """aiohttp.web on 127.0.0.1: ``/cutoff`` answers 200 announcing 1000 bytes,
    sends 100, then resets the connection; after ``cutoffs`` such replies it
    answers 200 normally. ``/peer`` records the client's address and port, to
    see connections being reused. Plus a raw TCP server answering garbage."""

    def __init__(self, cutoffs: int) -> None:
        self.cutoffs = cutoffs
        self.hits = 0
        self.bodies: list[bytes] = []
        self.peers: list[tuple[str, int]] = []
        self._runner: web.AppRunner | None = None
        self._raw: asyncio.Server | None = None
        self.port = 0
        self.raw_port = 0

    async def _cutoff(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.read())
        self.hits += 1
        if self.hits > self.cutoffs:
            return web.Response(status=200, text="ok")
        resp = web.StreamResponse(status=200)
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b"x" * 100)
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        # Linger 0: close() sends RST, as a crashing server would.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        request.transport.abort()
        return resp

    async def _peer(self, request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peername")[:2])
        return web.Response(status=204)

    async def _garbage(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"THIS IS NOT HTTP\r\n\r\n")
        await writer.drain()
        writer.close()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/cutoff", self._cutoff)
        app.router.add_post("/peer", self._peer)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._raw = await asyncio.start_server(self._garbage, "127.0.0.1", 0)
        self.raw_port = self._raw.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._raw is not None:
            self._raw.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str = "/cutoff") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def garbage_url(self) -> str:
        return f"http://127.0.0.1:{self.raw_port}/hook"


@pytest.fixture
async def odd_server() -> AsyncIterator[OddServer]:
    server = OddServer(cutoffs=1)
    await server.start()
    yield server
    await server.stop()


async def _run_dispatch(triggers: Sequence[Trigger], events: Sequence[Event],
                        sink: WebhookSink | None = None, deadline: float = 20.0,
                        transport: str | None = None) -> MemoryStore:
    """Enqueue ``events``, run the core Dispatcher with a webhook sink until every
    event is delivered or failed, then stop it cleanly."""
    store = MemoryStore(StoreSettings(url=f"memory://{uuid.uuid4().hex}"))
    await store.open()
    await store.enqueue(list(events), {})
    sink = sink or (WebhookSink(transport=transport) if transport else WebhookSink())
    await sink.open()
    dispatcher = Dispatcher(store, list(triggers), {"webhook": sink})
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while True:
            stats = await store.stats()
            if all(s.pending == 0 and s.delivering == 0 for s in stats):
                break
            if task.done():
                task.result()  # surface a crashed dispatcher
            if loop.time() > end:
                raise AssertionError(f"events still unfinished after {deadline}s: {stats}")
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await sink.close()
    return store


@pytest.fixture
def run_dispatch(transport: str) -> RunDispatch:
    return functools.partial(_run_dispatch, transport=transport)

