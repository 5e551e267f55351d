"""A real HTTP webhook receiver that records requests and replies as scripted.

``Receiver`` runs on the caller's asyncio loop (for async tests); ``ThreadedReceiver``
runs one on its own loop in a background thread (for sync tests that drive another
process against it). Replies are scripted per path::

    receiver.script("/hook", 500, 500, 200)                  # fail twice, then succeed
    receiver.script("/slow", Reply(delay=10))                # slower than the client timeout
    receiver.script("/busy", Reply(429, retry_after=2), 200) # ask the client to back off
    receiver.script("/flaky", "reset", 200)                  # TCP reset, then succeed
    receiver.script("/jitter", Reply(delay=(0.0, 0.05)))     # random delay in a range

The last reply of a script repeats; unscripted paths answer 200 (or the "*" script).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDictProxy


@dataclass(frozen=True)
class Reply:
    """One scripted answer.

    ``delay`` is seconds before answering, or a (low, high) range to draw from.
    ``reset`` aborts the connection with a TCP RST instead of answering.
    """

    status: int = 200
    delay: float | tuple[float, float] = 0.0
    retry_after: int | str | None = None
    reset: bool = False
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


ReplySpec = Reply | int | Literal["reset"]


def _as_reply(spec: ReplySpec) -> Reply:
    if isinstance(spec, Reply):
        return spec
    if spec == "reset":
        return Reply(reset=True)
    if isinstance(spec, int):
        return Reply(status=spec)
    raise TypeError(f"not a reply: {spec!r}")


@dataclass(frozen=True)
class RecordedRequest:
    """A request as it arrived (recorded before any scripted delay)."""

    method: str
    path: str
    query_string: str
    headers: CIMultiDictProxy[str]
    body: bytes
    received_monotonic: float
    received_at: float  # wall clock, time.time()
    reply: Reply

    def json(self) -> Any:
        return json.loads(self.body)


class _Script:
    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.used = 0

    def next(self) -> Reply:
        reply = self.replies[min(self.used, len(self.replies) - 1)]
        self.used += 1
        return reply


class Receiver:
    """The webhook receiver on the running asyncio loop: ``async with Receiver() as r``."""

    def __init__(self, host: str = "127.0.0.1", *, seed: int | None = None) -> None:
        self.host = host
        self.port = 0
        self._rng = random.Random(seed)
        self._scripts: dict[str, _Script] = {}
        # (path, bytes in the body) -> script: one event among many answered apart.
        self._matching: dict[tuple[str, bytes], _Script] = {}
        self._requests: list[RecordedRequest] = []
        # Guards scripts and requests, which ThreadedReceiver's caller reads from
        # another thread; notified on every request for blocking waiters.
        self._cond = threading.Condition()
        self._arrived: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Short shutdown timeout: a scripted slow reply must not hold up stop().
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        # Binding port 0 ourselves leaves no window for another process to take it.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        self._arrived = asyncio.Event()
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Receiver:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def script(self, path: str, *replies: ReplySpec) -> None:
        """Set the replies for ``path`` ("*" for every unscripted path); restarts its count."""
        if not replies:
            raise ValueError("script needs at least one reply")
        with self._cond:
            self._scripts[path] = _Script([_as_reply(r) for r in replies])

    def script_matching(self, path: str, needle: bytes, *replies: ReplySpec) -> None:
        """Replies for requests to ``path`` whose body contains ``needle`` (before the
        path's own script): e.g. one poisoned event answered 500 while others pass."""
        if not replies:
            raise ValueError("script_matching needs at least one reply")
        with self._cond:
            self._matching[(path, needle)] = _Script([_as_reply(r) for r in replies])

    def requests(self, path: str | None = None) -> list[RecordedRequest]:
        """Requests received so far, oldest first, optionally only those for ``path``."""
        with self._cond:
            return [r for r in self._requests if path is None or r.path == path]

    # Same signature as ThreadedReceiver.wait_for, hence a timeout parameter.
    async def wait_for(
        self,
        count: int,
        path: str | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> list[RecordedRequest]:
        """Wait until at least ``count`` requests (for ``path``) arrived; return them."""
        deadline = time.monotonic() + timeout
        while len(found := self.requests(path)) < count:
            assert self._arrived is not None, "receiver not started"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(_timeout_message(count, path, timeout, found))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return found

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        with self._cond:
            script = next((sc for (path, needle), sc in self._matching.items()
                           if path == request.path and needle in body), None) \
                or self._scripts.get(request.path) or self._scripts.get("*")
            reply = script.next() if script else Reply()
            self._requests.append(
                RecordedRequest(
                    method=request.method,
                    path=request.path,
                    query_string=request.query_string,
                    headers=request.headers,
                    body=body,
                    received_monotonic=time.monotonic(),
                    received_at=time.time(),
                    reply=reply,
                )
            )
            self._cond.notify_all()
        if self._arrived is not None:
            # Wake every async waiter; later waiters wait on a fresh event.
            self._arrived.set()
            self._arrived = asyncio.Event()

        delay = reply.delay
        if isinstance(delay, tuple):
            delay = self._rng.uniform(*delay)
        if delay > 0:
            await asyncio.sleep(delay)
        if reply.reset and request.transport is not None:
            # Linger 0 turns the close into a TCP RST: the client sees
            # "connection reset by peer", as with a crashed or overloaded server.
            sock = request.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.transport.abort()
            return web.Response()  # never sent: the connection is gone
        headers = dict(reply.headers)
        if reply.retry_after is not None:
            headers["Retry-After"] = str(reply.retry_after)
        return web.Response(status=reply.status, body=reply.body, headers=headers)


def _timeout_message(
    count: int, path: str | None, timeout: float, found: list[RecordedRequest]
) -> str:
    where = f" to {path}" if path else ""
    return f"expected {count} requests{where} within {timeout}s, got {len(found)}"


class ThreadedReceiver:
    """A Receiver running on its own loop in a background thread, for sync tests."""

    def __init__(self, host: str = "127.0.0.1", *, seed: int | None = None) -> None:
        self.receiver = Receiver(host, seed=seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ThreadedReceiver:
        loop = asyncio.new_event_loop()
        started: Future[None] = Future()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.receiver.start())
            except BaseException as exc:
                started.set_exception(exc)
                loop.close()
                return
            started.set_result(None)
            loop.run_forever()
            loop.run_until_complete(self.receiver.stop())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="webhook-receiver", daemon=True)
        self._thread.start()
        started.result(timeout=10)
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop = self._thread = None

    def __enter__(self) -> ThreadedReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.receiver.port

    def url(self, path: str = "/hook") -> str:
        return self.receiver.url(path)

    def script(self, path: str, *replies: ReplySpec) -> None:
        self.receiver.script(path, *replies)

    def script_matching(self, path: str, needle: bytes, *replies: ReplySpec) -> None:
        self.receiver.script_matching(path, needle, *replies)

    def requests(self, path: str | None = None) -> list[RecordedRequest]:
        return self.receiver.requests(path)

    def wait_for(
        self, count: int, path: str | None = None, timeout: float = 5.0
    ) -> list[RecordedRequest]:
        """Block until at least ``count`` requests (for ``path``) arrived; return them."""
        with self.receiver._cond:
            arrived = self.receiver._cond.wait_for(
                lambda: len(self.receiver.requests(path)) >= count, timeout
            )
        found = self.receiver.requests(path)
        if not arrived:
            raise TimeoutError(_timeout_message(count, path, timeout, found))
        return found
