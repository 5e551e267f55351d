"""The ``pycurl`` transport: requests sent by libcurl on a thread of their own.

One thread per sink drives a ``pycurl.CurlMulti``. libcurl connects, writes each
request and parses each response in C with the GIL released (inside
``socket_action`` and the epoll wait), so the event loop's thread only hands over
a prepared request
and, later, reads its result. Both directions are batched: requests go through
a queue and one wake-up byte per burst; completions come back as one
``call_soon_threadsafe`` per wake-up of the curl thread carrying every result it
collected, so the event loop pays one callback for many requests.

If the thread dies, every request it held or had queued fails at once and the
next request starts a new thread; nothing waits forever on a dead one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import pycurl
import structlog

log = structlog.get_logger("dbevents.sink.webhook")

# The bytes of a response body kept (the invocation log's cap); reading stops there.
MAX_BODY = 64 * 1024

_FAILED_VERIFICATION = {pycurl.E_PEER_FAILED_VERIFICATION, pycurl.E_SSL_CACERT,
                        pycurl.E_SSL_CACERT_BADFILE, pycurl.E_SSL_ISSUER_ERROR,
                        pycurl.E_SSL_INVALIDCERTSTATUS, pycurl.E_SSL_PINNEDPUBKEYNOTMATCH}
_TLS = {pycurl.E_SSL_CONNECT_ERROR, pycurl.E_SSL_CERTPROBLEM, pycurl.E_SSL_CIPHER,
        pycurl.E_USE_SSL_FAILED} | _FAILED_VERIFICATION
_CUT = {pycurl.E_RECV_ERROR, pycurl.E_PARTIAL_FILE, pycurl.E_SEND_ERROR,
        pycurl.E_GOT_NOTHING}
# CURLE_WEIRD_SERVER_REPLY (8) keeps its old FTP name in pycurl.
_INVALID = {pycurl.E_FTP_WEIRD_SERVER_REPLY, pycurl.E_UNSUPPORTED_PROTOCOL,
            pycurl.E_BAD_CONTENT_ENCODING, pycurl.E_HTTP2}


class CurlError(Exception):
    """A request libcurl could not complete."""

    def __init__(self, code: int, message: str, os_errno: int, status: int | None) -> None:
        super().__init__(f"curl error {code}: {message}")
        self.code = code
        self.message = message
        self.os_errno = os_errno
        self.status = status  # the response status, if its line had arrived


class TransportStopped(RuntimeError):
    """The curl thread ended (closed, or died) before the request completed."""


class Response:
    """What came back: the status, the raw header lines of the last response,
    the body (at most MAX_BODY bytes) and its Content-Type."""

    __slots__ = ("body", "content_type", "header_lines", "status")

    def __init__(self, status: int, header_lines: list[bytes], body: bytes,
                 content_type: str | None) -> None:
        self.status = status
        self.header_lines = header_lines
        self.body = body
        self.content_type = content_type

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` in the final response, if any."""
        wanted = name.lower().encode("latin-1")
        found: str | None = None
        for line in self.header_lines:
            if line.startswith(b"HTTP/"):
                found = None  # a new response (after a 1xx): forget the earlier one
                continue
            key, sep, value = line.partition(b":")
            if sep and key.strip().lower() == wanted:
                found = value.strip().decode("latin-1")
        return found


class _Request:
    """One request between the event loop and the curl thread."""

    __slots__ = ("body", "future", "headers", "timeout_ms", "url")

    def __init__(self, url: str, headers: list[bytes], body: bytes, timeout_ms: int,
                 future: asyncio.Future[Response]) -> None:
        self.url = url
        self.headers = headers
        self.body = body
        self.timeout_ms = timeout_ms
        self.future = future


class _Slot:
    """An easy handle and what it has collected of its current request. Its
    callbacks are bound once, and options a request shares with the handle's
    previous one (a trigger's URL, headers, timeout) are not set again."""

    __slots__ = ("capped", "chunks", "handle", "header_lines", "headers", "req", "size",
                 "timeout_ms", "url")

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.req: _Request | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.capped = False
        self.header_lines: list[bytes] = []
        self.url: str | None = None
        self.headers: list[bytes] | None = None
        self.timeout_ms = -1
        handle.setopt(pycurl.WRITEFUNCTION, self.write)
        handle.setopt(pycurl.HEADERFUNCTION, self.header_lines.append)

    def write(self, data: bytes) -> int | None:
        """libcurl's body callback: keep up to MAX_BODY bytes, then stop the
        transfer (its connection is closed instead of going back to the pool)."""
        room = MAX_BODY - self.size
        if len(data) > room:
            if room:
                self.chunks.append(data[:room])
                self.size = MAX_BODY
            self.capped = True
            return 0  # not len(data): libcurl aborts with CURLE_WRITE_ERROR
        self.chunks.append(data)
        self.size += len(data)
        return None  # all of it taken

    def start(self, req: _Request) -> None:
        c = self.handle
        self.req = req
        if req.url != self.url:
            c.setopt(pycurl.URL, req.url)
            self.url = req.url
        if req.headers is not self.headers:
            c.setopt(pycurl.HTTPHEADER, req.headers)
            self.headers = req.headers
        if req.timeout_ms != self.timeout_ms:
            c.setopt(pycurl.TIMEOUT_MS, req.timeout_ms)
            c.setopt(pycurl.CONNECTTIMEOUT_MS, req.timeout_ms)
            self.timeout_ms = req.timeout_ms
        c.setopt(pycurl.POSTFIELDS, req.body)  # copied, its length set too

    def finish(self, code: int, message: str
               ) -> tuple[asyncio.Future[Response], Response | BaseException]:
        req, self.req = self.req, None
        assert req is not None
        c = self.handle
        status = c.getinfo(pycurl.RESPONSE_CODE)
        result: Response | BaseException
        if code == 0 or (code == pycurl.E_WRITE_ERROR and self.capped):
            body = b"".join(self.chunks) if self.chunks else b""
            result = Response(status, self.header_lines[:], body,
                              c.getinfo(pycurl.CONTENT_TYPE) if body else None)
        else:
            result = CurlError(code, message, c.getinfo(pycurl.OS_ERRNO), status or None)
        self.clear()
        return req.future, result

    def clear(self) -> None:
        if self.chunks:
            self.chunks.clear()
            self.size = 0
        self.capped = False
        self.header_lines.clear()


def _resolve(done: list[tuple[asyncio.Future[Response], Response | BaseException]]) -> None:
    """On the event loop: settle a batch of futures in one callback."""
    for future, result in done:
        if future.done():  # cancelled while in flight
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def _verify_paths() -> tuple[str | None, str | None]:
    """The CA file and folder Python's ssl module (so aiohttp) verifies against,
    SSL_CERT_FILE / SSL_CERT_DIR included: both transports trust the same roots."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile, paths.capath


class _Worker:
    """One curl thread, its multi handle and its queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, limit: int, limit_per_host: int,
                 keepalive_timeout: float) -> None:
        self.loop = loop
        self.limit = limit
        self.limit_per_host = limit_per_host
        self.keepalive = max(1, round(keepalive_timeout))
        self.cafile, self.capath = _verify_paths()
        self.queue: collections.deque[_Request] = collections.deque()
        self.cancels: collections.deque[_Request] = collections.deque()
        self.stopping = False
        self.dead: BaseException | None = None
        # Set by the curl thread while it waits in epoll; the event loop writes
        # a wake-up byte only then, and once per wait (`signalled`).
        self.sleeping = False
        self.signalled = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # A fault the tests inject, raised on the curl thread when it next wakes.
        self._crash: Callable[[], None] | None = None
        self.thread = threading.Thread(target=self._main, name="dbevents-webhook-curl",
                                       daemon=True)
        self.thread.start()

    # -- the event loop's side ----------------------------------------------------

    def submit(self, request: _Request) -> None:
        self.queue.append(request)
        self._wake()

    def cancel(self, request: _Request) -> None:
        self.cancels.append(request)
        self._wake()

    def stop(self) -> None:
        self.stopping = True
        self.signalled = False
        self._wake()

    def _wake(self) -> None:
        # The append happened before this check, and the curl thread sets
        # `sleeping` before it looks at the queue a last time: no lost wake-up.
        if self.sleeping and not self.signalled:
            self.signalled = True
            # OSError: the buffer is full (a wake-up is pending) or the thread has gone.
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    # -- the curl thread -------------------------------------------------------------

    def _main(self) -> None:
        multi = pycurl.CurlMulti()
        multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, self.limit)
        multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, self.limit_per_host)
        multi.setopt(pycurl.M_MAXCONNECTS, self.limit)
        free: list[_Slot] = []
        active: dict[Any, _Slot] = {}  # by easy handle
        # Closed last: closing the handles below still calls the socket callback.
        poller = select.epoll()
        try:
            self._loop(multi, poller, free, active)
        except BaseException as exc:
            self.dead = exc
            log.error("webhook curl thread died", error=f"{type(exc).__name__}: {exc}")
        finally:
            error = TransportStopped(
                "the webhook sink closed" if self.dead is None else
                f"the curl thread died: {type(self.dead).__name__}: {self.dead}")
            failed: list[tuple[asyncio.Future[Response], Response | BaseException]] = [
                (slot.req.future, error) for slot in active.values() if slot.req is not None]
            # Stop taking requests first, then fail whatever was queued.
            self.stopping = True
            while self.queue:
                failed.append((self.queue.popleft().future, error))
            if failed:
                self._post(failed)
            for slot in [*active.values(), *free]:
                with contextlib.suppress(pycurl.error):
                    if slot.req is not None:
                        multi.remove_handle(slot.handle)
                    slot.handle.close()
            multi.close()
            poller.close()
            self._wake_r.close()
            self._wake_w.close()

    def _post(self, done: list[tuple[asyncio.Future[Response], Response | BaseException]]
              ) -> None:
        # RuntimeError: the event loop is closed, nobody awaits these any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_resolve, done)

    def _slot(self, free: list[_Slot]) -> _Slot:
        if free:
            return free.pop()
        c = pycurl.Curl()
        c.setopt(pycurl.NOSIGNAL, 1)  # libcurl must not use signals off the main thread
        # A 3xx is a failed attempt: following it would send the payload to a URL
        # nobody configured.
        c.setopt(pycurl.FOLLOWLOCATION, 0)
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        # Environment proxies are ignored, as with aiohttp's trust_env=False; no
        # cookie engine is enabled (libcurl's default).
        c.setopt(pycurl.PROXY, "")
        c.setopt(pycurl.SSL_VERIFYPEER, 1)
        c.setopt(pycurl.SSL_VERIFYHOST, 2)
        if self.cafile:
            c.setopt(pycurl.CAINFO, self.cafile)
        if self.capath:
            c.setopt(pycurl.CAPATH, self.capath)
        c.setopt(pycurl.MAXAGE_CONN, self.keepalive)
        c.setopt(pycurl.POST, 1)
        return _Slot(c)

    def _loop(self, multi: Any, poller: select.epoll, free: list[_Slot],
              active: dict[Any, _Slot]) -> None:
        # libcurl's socket interface: it names the sockets to watch and its next
        # timeout through callbacks; epoll waits on them and the wake-up socket.
        # (curl_multi_fdset and select() stop at file descriptor 1024.)
        queue, cancels = self.queue, self.cancels
        wake = self._wake_r.fileno()
        poller.register(wake, select.EPOLLIN)
        watched: set[int] = set()
        deadline: list[float | None] = [None]  # libcurl's next timeout (monotonic)

        def on_socket(what: int, fd: int, _multi: Any, _data: Any) -> None:
            if what == pycurl.POLL_REMOVE:
                if fd in watched:
                    watched.discard(fd)
                    with contextlib.suppress(OSError):  # closed already: epoll forgot it
                        poller.unregister(fd)
                return
            mask = ((select.EPOLLIN if what & pycurl.POLL_IN else 0)
                    | (select.EPOLLOUT if what & pycurl.POLL_OUT else 0))
            if fd in watched:
                try:
                    poller.modify(fd, mask)
                except FileNotFoundError:  # closed and its number reused
                    poller.register(fd, mask)
            else:
                try:
                    poller.register(fd, mask)
                except FileExistsError:
                    poller.modify(fd, mask)
                watched.add(fd)

        def on_timer(ms: int) -> None:
            deadline[0] = None if ms < 0 else time.monotonic() + ms / 1000.0

        multi.setopt(pycurl.M_SOCKETFUNCTION, on_socket)
        multi.setopt(pycurl.M_TIMERFUNCTION, on_timer)
        while not self.stopping:
            if self._crash is not None:
                self._crash()
            while queue:
                slot = self._slot(free)
                slot.start(queue.popleft())
                multi.add_handle(slot.handle)
                active[slot.handle] = slot
            while cancels:
                req = cancels.popleft()
                for c, slot in active.items():
                    if slot.req is req:
                        del active[c]
                        multi.remove_handle(c)
                        slot.req = None
                        slot.clear()
                        free.append(slot)
                        break
            due = deadline[0]
            if due is not None and time.monotonic() >= due:
                deadline[0] = None  # the callback sets the next one
                multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
            self._collect(multi, free, active)
            # Wait for a socket, libcurl's next timeout, or a wake-up.
            self.sleeping = True
            if queue or cancels or self.stopping:
                self.sleeping = False
                continue
            due = deadline[0]
            wait = 1.0 if due is None else min(max(due - time.monotonic(), 0.0), 1.0)
            events = poller.poll(wait) if wait > 0 else []
            self.sleeping = False
            self.signalled = False
            for fd, ev in events:
                if fd == wake:
                    self._drain()
                    continue
                flags = ((pycurl.CSELECT_IN if ev & (select.EPOLLIN | select.EPOLLHUP)
                          else 0)
                         | (pycurl.CSELECT_OUT if ev & select.EPOLLOUT else 0)
                         | (pycurl.CSELECT_ERR if ev & select.EPOLLERR else 0))
                multi.socket_action(fd, flags)

    def _collect(self, multi: Any, free: list[_Slot], active: dict[Any, _Slot]) -> None:
        """Hand every finished request back to the event loop, in one call."""
        done: list[tuple[asyncio.Future[Response], Response | BaseException]] = []
        while True:
            queued, ok, failed = multi.info_read()
            for c in ok:
                slot = active.pop(c)
                done.append(slot.finish(0, ""))
                multi.remove_handle(c)
                free.append(slot)
            for c, code, message in failed:
                slot = active.pop(c)
                done.append(slot.finish(code, message))
                multi.remove_handle(c)
                free.append(slot)
            if not queued:
                break
        if done:
            self._post(done)

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass


class CurlTransport:
    """The sink's handle on its curl thread, made on first use."""

    def __init__(self, *, limit: int, limit_per_host: int, keepalive_timeout: float) -> None:
        self.limit = limit
        self.limit_per_host = limit_per_host
        self.keepalive_timeout = keepalive_timeout
        self._worker: _Worker | None = None
        self._closed = False

    def _live(self) -> _Worker:
        worker = self._worker
        loop = asyncio.get_running_loop()
        if worker is None or worker.dead is not None or not worker.thread.is_alive() \
                or worker.loop is not loop:
            if worker is not None:
                if worker.loop is not loop:
                    # Used from another event loop (a sink reused across
                    # asyncio.run calls): the old thread would settle futures on
                    # a loop nobody runs.
                    worker.stop()
                else:
                    log.warning("webhook curl thread restarted")
            worker = self._worker = _Worker(
                loop, limit=self.limit,
                limit_per_host=self.limit_per_host,
                keepalive_timeout=self.keepalive_timeout)
        return worker

    async def post(self, url: str, headers: list[bytes], body: bytes,
                   timeout_ms: int) -> Response:
        if self._closed:
            raise TransportStopped("the webhook sink closed")
        worker = self._live()
        future: asyncio.Future[Response] = worker.loop.create_future()
        request = _Request(url, headers, body, timeout_ms, future)
        worker.submit(request)
        try:
            return await future
        except asyncio.CancelledError:
            worker.cancel(request)
            raise

    async def close(self) -> None:
        """Stop the thread (failing what it still holds), wait for it, free its
        handles and sockets."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is None:
            return
        worker.stop()
        await asyncio.to_thread(worker.thread.join)


def describe(exc: BaseException, timeout_ms: int, where: str, status: int | None) -> str:
    """The error string for a failed attempt, worded as the aiohttp transport
    words it (classify.py); ``where`` is host:port."""
    if not isinstance(exc, CurlError):
        return f"sink error: {type(exc).__name__}: {exc}"
    code, message = exc.code, exc.message
    if code == pycurl.E_OPERATION_TIMEDOUT:
        return f"timeout after {timeout_ms} ms"
    if code in _CUT and status is not None:
        # The status line arrived but the body was cut off: the exchange did not
        # complete, so even a 2xx counts as failed (at-least-once errs on retrying).
        return "connection reset: response cut off"
    if code == pycurl.E_COULDNT_RESOLVE_HOST:
        return f"dns lookup failed: {where.rsplit(':', 1)[0]}"
    if code in _TLS:
        # The same searchable word as the aiohttp transport's verification error.
        tag = "CERTIFICATE_VERIFY_FAILED: " if code in _FAILED_VERIFICATION else ""
        return f"tls error: {where}: {tag}{message}"
    if code == pycurl.E_COULDNT_CONNECT:
        if exc.os_errno == errno.ECONNREFUSED:
            return f"connection refused: {where}"
        return f"connection failed: {where}: {message}"
    if code in _CUT:
        return "connection reset: closed before the response"
    if code in _INVALID:
        return f"invalid response: {message}"
    return f"request failed: curl error {code}: {message}"
