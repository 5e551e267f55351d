"""Bare HTTP clients on this machine: which one POSTs the webhook workload fastest.

    uv run python -m bench.http_clients                   # every installed client
    uv run python -m bench.http_clients --only aiohttp,pyreqwest --events 5000
    uv run python -m bench.http_clients --only pycurl,sink:aiohttp,sink:pycurl

The receiver is bench/e2e/receiver.py (aiohttp in its own process, answering an
empty 200, counting what arrives); the payloads are bench/e2e/ceiling.py's
CloudEvents bodies, the size the pipeline sends. Each client POSTs N bodies, one
event per POST, with `concurrency` requests in flight (16, the trigger default),
keep-alive, no redirects followed, a timeout on every request. Per client:
events/s and the CPU time this process spent per request (all its threads: a
native client's runtime threads count too). Rounds interleave the clients so a
neighbour's load hits them alike; best and median are printed, and the fastest
client by its best round is the ceiling the other benches compare against.
Beside the bare clients, `sink:NAME` POSTs the same bodies through dbevents'
WebhookSink.deliver on its NAME transport (one event per call): what the sink
costs on top of its client. Those rows are never the ceiling.

Clients with a native (Rust or C) core are measured only when installed; this
bench installs nothing. For every one of them:

    uv pip install pyreqwest rnet httpr curl-cffi pycurl uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

import aiohttp

TIMEOUT_S = 10.0
# Post(body, headers) -> status, for one open client.
Post = Callable[[bytes, dict[str, str]], Awaitable[int]]


# -- the clients ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _aiohttp(concurrency: int) -> AsyncIterator[Post]:
    # The webhook sink's pool settings (dbevents_sink_webhook.WebhookSink defaults).
    connector = aiohttp.TCPConnector(limit=1024, limit_per_host=256, keepalive_timeout=4.0)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:

        async def post(body: bytes, headers: dict[str, str]) -> int:
            async with session.post(URL, data=body, headers=headers, timeout=timeout,
                                    allow_redirects=False) as resp:
                await resp.read()
                return resp.status

        yield post


@contextlib.asynccontextmanager
async def _pyreqwest(concurrency: int) -> AsyncIterator[Post]:
    from pyreqwest.client import ClientBuilder

    client = (ClientBuilder().follow_redirects(False).timeout(timedelta(seconds=TIMEOUT_S))
              .pool_idle_timeout(timedelta(seconds=4.0)).build())
    async with client:

        async def post(body: bytes, headers: dict[str, str]) -> int:
            resp = await client.post(URL).headers(headers).body_bytes(body).build().send()
            await resp.bytes()
            return resp.status

        yield post


@contextlib.asynccontextmanager
async def _rnet(concurrency: int) -> AsyncIterator[Post]:
    import rnet

    client = rnet.Client(allow_redirects=False, timeout=int(TIMEOUT_S), pool_idle_timeout=4)

    async def post(body: bytes, headers: dict[str, str]) -> int:
        resp = await client.post(URL, body=body, headers=headers)
        await resp.bytes()
        return int(resp.status)

    yield post


@contextlib.asynccontextmanager
async def _httpr(concurrency: int) -> AsyncIterator[Post]:
    import httpr

    # httpr's AsyncClient runs its blocking native call on a thread pool.
    async with httpr.AsyncClient(follow_redirects=False, timeout=TIMEOUT_S) as client:

        async def post(body: bytes, headers: dict[str, str]) -> int:
            resp = await client.post(URL, content=body, headers=headers)
            _ = resp.content
            return int(resp.status_code)

        yield post


@contextlib.asynccontextmanager
async def _curl_cffi(concurrency: int) -> AsyncIterator[Post]:
    from curl_cffi import AsyncSession

    async with AsyncSession(max_clients=concurrency, allow_redirects=False,
                            timeout=TIMEOUT_S) as session:

        async def post(body: bytes, headers: dict[str, str]) -> int:
            resp = await session.post(URL, data=body, headers=headers)
            _ = resp.content
            return int(resp.status_code)

        yield post


def _sink(transport: str) -> Callable[[int], contextlib.AbstractAsyncContextManager[Post]]:
    """Not a bare client: dbevents' WebhookSink.deliver on one of its transports,
    one event per call, so what the sink adds to its client shows beside it."""

    @contextlib.asynccontextmanager
    async def make(concurrency: int) -> AsyncIterator[Post]:
        import attrs
        from dbevents import Trigger
        from dbevents.testing import make_event
        from dbevents_sink_webhook import WebhookSink

        sink = WebhookSink(transport=transport)
        await sink.open()
        trigger = Trigger(name="bench", url=URL, timeout=int(TIMEOUT_S * 1000),
                          concurrency=concurrency)
        template = make_event(trigger="bench")

        async def post(body: bytes, headers: dict[str, str]) -> int:
            # The sink sets Content-Type itself; the event carries the body.
            [out] = await sink.deliver(trigger, [attrs.evolve(template, payload=body)])
            return out.status_code or 0

        try:
            yield post
        finally:
            await sink.close()

    return make


URL = ""  # set by measure(); the clients read it at call time


async def _drive(make: Callable[[int], contextlib.AbstractAsyncContextManager[Post]],
                 bodies: Sequence[bytes], concurrency: int, batch: bool) -> float:
    """Seconds to POST every body, `concurrency` in flight, timed after the client
    is open (opening it is not part of any delivery)."""
    headers = {"Content-Type": "application/cloudevents-batch+json" if batch
               else "application/json"}
    async with make(concurrency) as post:
        it = iter(bodies)

        async def worker() -> None:
            for body in it:
                status = await post(body, headers)
                if status != 200:
                    raise RuntimeError(f"receiver answered {status}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


def _pycurl(url: str, bodies: Sequence[bytes], concurrency: int, batch: bool) -> float:
    """pycurl has no asyncio API: libcurl's multi interface driven by its own
    select loop, `concurrency` easy handles reused (each keeps its connection)."""
    import pycurl

    ctype = ("application/cloudevents-batch+json" if batch else "application/json")
    free = []
    for _ in range(concurrency):
        c = pycurl.Curl()
        c.setopt(pycurl.URL, url)
        c.setopt(pycurl.POST, 1)
        c.setopt(pycurl.HTTPHEADER, [f"Content-Type: {ctype}", "Expect:"])
        c.setopt(pycurl.FOLLOWLOCATION, 0)
        c.setopt(pycurl.TIMEOUT_MS, int(TIMEOUT_S * 1000))
        c.setopt(pycurl.WRITEFUNCTION, len)  # discard the (empty) body
        free.append(c)
    multi = pycurl.CurlMulti()
    it = iter(bodies)
    pending = len(bodies)
    started = time.perf_counter()

    def start(c: Any) -> bool:
        body = next(it, None)
        if body is None:
            return False
        c.setopt(pycurl.POSTFIELDS, body)
        multi.add_handle(c)
        return True

    while free and start(free[-1]):
        free.pop()
    while pending:
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        _, ok, failed = multi.info_read()
        if failed:
            raise RuntimeError(f"pycurl: {failed[0][2]}")
        for c in ok:
            multi.remove_handle(c)
            pending -= 1
            if c.getinfo(pycurl.RESPONSE_CODE) != 200:
                raise RuntimeError(f"receiver answered {c.getinfo(pycurl.RESPONSE_CODE)}")
            if not start(c):
                c.close()
        if pending and not ok:
            multi.select(1.0)
    elapsed = time.perf_counter() - started
    for c in free:
        c.close()
    multi.close()
    return elapsed


# name -> (what it is, the Python module that must be importable)
CLIENTS: dict[str, tuple[str, str]] = {
    "aiohttp": ("aiohttp (C parser, asyncio loop)", "aiohttp"),
    "aiohttp+uvloop": ("aiohttp on the uvloop event loop (libuv)", "uvloop"),
    "pyreqwest": ("pyreqwest (Rust reqwest/hyper on tokio)", "pyreqwest"),
    "rnet": ("rnet (Rust wreq/hyper on tokio)", "rnet"),
    "httpr": ("httpr (Rust reqwest, blocking calls on a thread pool)", "httpr"),
    "curl-cffi": ("curl-cffi (libcurl multi, asyncio glue)", "curl_cffi"),
    "pycurl": ("pycurl (libcurl multi, select loop; no asyncio API)", "pycurl"),
}
# Through the webhook sink, per transport: reported, never the ceiling.
SINKS: dict[str, tuple[str, str]] = {
    f"sink:{name}": (f"dbevents WebhookSink, transport {name}", module)
    for name, module in (("aiohttp", "aiohttp"), ("pyreqwest", "pyreqwest"),
                         ("pycurl", "pycurl"))
}
_ASYNC = {"aiohttp": _aiohttp, "aiohttp+uvloop": _aiohttp, "pyreqwest": _pyreqwest,
          "rnet": _rnet, "httpr": _httpr, "curl-cffi": _curl_cffi,
          **{name: _sink(name.removeprefix("sink:")) for name in SINKS}}


def installed(sinks: bool = False) -> list[str]:
    """The bare clients installed (and with `sinks`, the sink transports)."""
    import importlib.util

    known = {**CLIENTS, **SINKS} if sinks else CLIENTS
    return [name for name, (_, mod) in known.items() if importlib.util.find_spec(mod)]


def post_all(client: str, url: str, bodies: Sequence[bytes], concurrency: int,
             batch: bool = False) -> float:
    """POST every body with `client`; seconds spent sending (client open excluded)."""
    global URL
    URL = url
    if client == "pycurl":
        return _pycurl(url, bodies, concurrency, batch)
    coro = _drive(_ASYNC[client], bodies, concurrency, batch)
    if client == "aiohttp+uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


def measure(client: str, url: str, bodies: Sequence[bytes], concurrency: int,
            batch: bool = False) -> tuple[float, float]:
    """(requests/s, CPU µs per request of this process) for one run."""
    cpu = time.process_time()
    seconds = post_all(client, url, bodies, concurrency, batch)
    cpu = time.process_time() - cpu
    return len(bodies) / seconds, cpu / len(bodies) * 1e6


def rank(seen: dict[str, list[tuple[float, float]]]) -> list[tuple[str, float, float, float]]:
    """(client, best/s, median/s, median CPU µs) sorted fastest first by best round."""
    rows = [(k, max(r for r, _ in v), statistics.median(r for r, _ in v),
             statistics.median(c for _, c in v)) for k, v in seen.items() if v]
    return sorted(rows, key=lambda row: -row[1])


def main() -> int:
    from bench.e2e.ceiling import payloads
    from bench.e2e.receiver import ReceiverProcess

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="comma-separated clients (default: every installed)")
    args = parser.parse_args()
    have = installed(sinks=True)
    names = [c.strip() for c in args.only.split(",")] if args.only else have
    for name in names:
        if name not in have:
            parser.error(f"{name}: not installed (or unknown); "
                         f"known: {', '.join([*CLIENTS, *SINKS])}")
    missing = [c for c in CLIENTS if c not in have]
    bodies = payloads(args.events)
    print(f"{len(bodies):,} POSTs of ~{sum(map(len, bodies)) // len(bodies)} bytes, "
          f"concurrency {args.concurrency}, {args.rounds} rounds after a warm-up; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}", flush=True)
    if missing:
        print(f"not installed, not measured: {', '.join(missing)}")
    seen: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    with ReceiverProcess() as rx:
        for round_ in range(args.rounds + 1):
            for name in names:
                rx.reset()
                warm = bodies[:2_000] if not round_ else bodies
                rate, cpu = measure(name, rx.url(), warm, args.concurrency)
                got = rx.snapshot().events
                if got != len(warm):
                    raise RuntimeError(f"{name}: {got} of {len(warm)} events arrived")
                if round_:
                    seen[name].append((rate, cpu))
                    print(f"  round {round_} {name:<15} {rate:>9,.0f} events/s  "
                          f"{cpu:>6.1f} µs CPU/request", flush=True)
    rows = rank(seen)
    labels = {**CLIENTS, **SINKS}
    print(f"\n{'client':<58} {'best/s':>9} {'median/s':>9} {'CPU µs/req':>11}")
    for name, best, median, cpu in rows:
        print(f"{labels[name][0]:<58} {best:>9,.0f} {median:>9,.0f} {cpu:>11.1f}")
    bare = [row for row in rows if row[0] in CLIENTS]
    if bare:
        print(f"\nceiling: {bare[0][0]} at {bare[0][1]:,.0f} events/s "
              f"(load average now {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
