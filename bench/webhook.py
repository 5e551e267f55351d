"""Webhook delivery throughput: the core Dispatcher + WebhookSink against the raw
aiohttp ceiling, on this machine.

    uv run python bench/webhook.py                    # all runs, best and median
    uv run python bench/webhook.py --only "a,b"       # some of them
    uv run python bench/webhook.py --profile b        # cProfile of the timed part of (b)

A local aiohttp receiver runs in a separate process (so client and server do not
share one event loop) and answers every POST with an empty 200. Against it, with
the same concurrency and connection pool settings:

  (a)  the raw ceiling: a bare aiohttp client POSTing N pre-built JSON payloads;
  (a:NAME) the same with every other bare client installed (bench/http_clients.py:
       pyreqwest, rnet, httpr, curl-cffi, pycurl, aiohttp on uvloop); the
       ceiling the targets use is the fastest of (a) and these;
  (b)  the core Dispatcher + WebhookSink delivering N events stored in
       dbevents.testing.MemoryStore with enqueue_held and handed over in memory,
       as the engine does, one event per POST;
  (c)  the same with batch_size = 100;
  (s)  the sink alone: WebhookSink.deliver called in plain loops, one event per
       call, no dispatcher or store (what the sink adds to (a); (b) adds the
       dispatcher and the store on top);
  (sp), (bp)  (s) and (b) with the sink's pyreqwest transport;
  (sc), (bc)  (s) and (b) with the sink's pycurl transport.

MemoryStore keeps the store contract (per-row order, leases, retries) with
indexes, so a claim costs O(events claimed): what is measured is the dispatcher
and the sink, not a store's disk.

Targets: (b) >= 0.9 x the ceiling; (c) >= 50,000 events/s. Runs are interleaved in
rounds after a warm-up round, so load from other processes hits them alike. Besides
events/s, each run reports the CPU time this (client) process spent per event,
which depends much less on what else the machine is doing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import logging
import multiprocessing as mp
import os
import pstats
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from dbevents import StoreSettings, Trigger
from dbevents.dispatcher import Dispatcher
from dbevents.testing import MemoryStore, make_event, reset
from dbevents_sink_webhook import WebhookOptions, WebhookSink

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
from bench import http_clients

# Set by --profile: enabled only around the timed part of a run.
PROFILER: cProfile.Profile | None = None
TARGET_RATIO = 0.9
ENQUEUE_BATCH = 5000  # events per store transaction, as the engine's largest
TARGET_BATCH_RATE = 50_000.0


# -- the receiver, in its own process -----------------------------------------------


def _serve(conn: Connection) -> None:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=200)

    async def main() -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", ok)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock, backlog=1024).start()
        conn.send(sock.getsockname()[1])
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told
        await runner.cleanup()

    asyncio.run(main())


class ReceiverProcess:
    def __enter__(self) -> ReceiverProcess:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self._proc.start()
        self.port: int = self._conn.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.send("stop")
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.terminate()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


# -- the three runs -------------------------------------------------------------------


def _connector() -> aiohttp.TCPConnector:
    # The same pool settings the sink uses, so (a) and (b) differ only in what
    # happens around each POST.
    sink = WebhookSink()
    return aiohttp.TCPConnector(limit=sink.limit, limit_per_host=sink.limit_per_host,
                                keepalive_timeout=sink.keepalive_timeout)


# CPU share of the client process during the last timed block: near 1.0 means
# the client side (this process) is the bottleneck, lower means it waited.
LAST_CPU = 0.0


@contextlib.contextmanager
def _timed() -> Iterator[Callable[[], float]]:
    """Seconds spent inside the block (read after it), profiled under --profile."""
    global LAST_CPU
    box = [0.0]
    if PROFILER is not None:
        PROFILER.enable()
    started, cpu = time.perf_counter(), time.process_time()
    try:
        yield lambda: box[0]
    finally:
        box[0] = time.perf_counter() - started
        LAST_CPU = (time.process_time() - cpu) / box[0]
        if PROFILER is not None:
            PROFILER.disable()


async def run_raw(url: str, n: int, concurrency: int) -> float:
    """(a): N pre-built payloads, `concurrency` POSTs in flight; events/s."""
    payloads = [make_event(trigger="bench", doc_id=str(i), n=i).payload for i in range(n)]
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=5.0)
    async with aiohttp.ClientSession(connector=_connector()) as session:
        it = iter(payloads)

        async def worker() -> None:
            for body in it:
                async with session.post(url, data=body, headers=headers,
                                        timeout=timeout) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"receiver answered {resp.status}")

        with _timed() as elapsed:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / elapsed()


def run_client(client: str, url: str, n: int, concurrency: int) -> float:
    """(a:NAME): the bare `client` POSTing the same payloads as (a); events/s."""
    global LAST_CPU
    payloads = [make_event(trigger="bench", doc_id=str(i), n=i).payload for i in range(n)]
    rate, cpu_us = http_clients.measure(client, url, payloads, concurrency)
    LAST_CPU = cpu_us * rate / 1e6
    return rate


async def run_sink(url: str, n: int, concurrency: int, transport: str = "aiohttp") -> float:
    """(s): WebhookSink.deliver called by `concurrency` plain loops, one event per
    call, no dispatcher or store: what the sink adds to (a)."""
    events = [make_event(trigger="bench", doc_id=str(i), n=i) for i in range(n)]
    trigger = Trigger(name="bench", url=url, concurrency=concurrency, timeout=5000)
    sink = WebhookSink(transport=transport)
    await sink.open()
    it = iter(events)

    async def worker() -> None:
        for ev in it:
            (outcome,) = await sink.deliver(trigger, [ev])
            if not outcome.ok:
                raise RuntimeError(f"receiver answered {outcome.error}")

    try:
        with _timed() as elapsed:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await sink.close()
    return n / elapsed()


async def run_dispatcher(url: str, n: int, concurrency: int, batch_size: int,
                         transport: str = "aiohttp") -> float:
    """(b)/(c): N events stored held in a MemoryStore (batches of ENQUEUE_BATCH)
    and delivered from memory by the core Dispatcher through the WebhookSink;
    events/s from the dispatcher's start to the last finish, the store's writes
    (enqueue_held, finish) included."""
    reset()
    # Distinct rows: per-row order never holds an event back, as in a busy table.
    events = [make_event(trigger="bench", doc_id=str(i), n=i) for i in range(n)]
    store = MemoryStore(StoreSettings(url=f"memory://bench-{uuid.uuid4().hex}"))
    await store.open()
    trigger = Trigger(name="bench", url=url, concurrency=concurrency, timeout=5000,
                      sink_options=WebhookOptions(batch_size=batch_size))
    sink = WebhookSink(transport=transport)
    await sink.open()
    dispatcher = Dispatcher(store, [trigger], {"webhook": sink})
    stop = asyncio.Event()
    with _timed() as elapsed:
        task = asyncio.create_task(dispatcher.run(stop))
        # As the engine does: each stored batch is held for this process and
        # handed to the dispatcher in memory (never claimed back).
        # A capture that keeps up: the next batch is read once memory has room
        # for it (past the limit the engine would store pending, for claims).
        for i in range(0, n, ENQUEUE_BATCH):
            chunk = events[i:i + ENQUEUE_BATCH]
            while True:  # polled: the dispatcher has no event for "memory has room"
                if dispatcher.HOLD_LIMIT - dispatcher.in_memory() >= len(chunk):
                    break
                await asyncio.sleep(0.001)
            if dispatcher.room():
                ticket = dispatcher.ticket()
                held = await store.enqueue_held(chunk, {}, dispatcher.lease_seconds)
                dispatcher.hand(held, ticket)
                dispatcher.untick(ticket)
            else:
                await store.enqueue(chunk, {})
                dispatcher.notify()
            await asyncio.sleep(0)
        while dispatcher.delivered + dispatcher.failed < n:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
    stop.set()
    await task
    await sink.close()
    if dispatcher.failed:
        raise RuntimeError(f"{dispatcher.failed} events failed")
    return n / elapsed()


def profile(make: Callable[[], Coroutine[Any, Any, float]], top: int,
            out_file: str | None = None) -> None:
    global PROFILER
    asyncio.run(make())  # warm-up, not profiled
    prof = PROFILER = cProfile.Profile()
    rate = asyncio.run(make())
    PROFILER = None
    if out_file:
        prof.dump_stats(out_file)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print(f"profiled run: {rate:,.0f} events/s (slowed by the profiler)")
    print(out.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5_000,
                        help="N for one event per POST: (a), (b)")
    parser.add_argument("--batch-events", type=int, default=50_000,
                        help="N for batches: (c)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="POSTs in flight (the trigger's `concurrency`)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="a,a:*,s,sp,sc,b,bp,bc,c",
                        help="comma-separated runs to measure (a:* = every other "
                             "installed bare client)")
    parser.add_argument("--profile", choices=["a", "s", "b", "c"],
                        help="profile one run instead of measuring")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--profile-out", help="also save the profile (pstats) to this file")
    args = parser.parse_args()

    # The dispatcher logs one info line per POST; a production deployment ships
    # those, but writing them to a terminal would measure the terminal. Loggers
    # are cached as `dbevents run` does (dbevents.logs.setup).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        cache_logger_on_first_use=True)

    n, nb, conc, size = args.events, args.batch_events, args.concurrency, args.batch_size
    with ReceiverProcess() as receiver:
        url = receiver.url()
        runs: dict[str, tuple[str, Callable[[], Coroutine[Any, Any, float]]]] = {
            "a": (f"raw aiohttp client, 1 event/POST, N={n:,}",
                  lambda: run_raw(url, n, conc)),
            "s": (f"sink alone (no dispatcher), 1 event/POST, N={n:,}",
                  lambda: run_sink(url, n, conc)),
            "b": (f"dispatcher + sink, MemoryStore, 1 event/POST, N={n:,}",
                  lambda: run_dispatcher(url, n, conc, 1)),
            "c": (f"dispatcher + sink, MemoryStore, {size} events/POST, N={nb:,}",
                  lambda: run_dispatcher(url, nb, conc, size)),
            "sp": (f"sink alone, pyreqwest, 1 event/POST, N={n:,}",
                   lambda: run_sink(url, n, conc, "pyreqwest")),
            "bp": (f"dispatcher + sink, pyreqwest, 1 event/POST, N={n:,}",
                   lambda: run_dispatcher(url, n, conc, 1, "pyreqwest")),
            "sc": (f"sink alone, pycurl, 1 event/POST, N={n:,}",
                   lambda: run_sink(url, n, conc, "pycurl")),
            "bc": (f"dispatcher + sink, pycurl, 1 event/POST, N={n:,}",
                   lambda: run_dispatcher(url, n, conc, 1, "pycurl")),
        }
        # The other bare clients; each runs its own event loop (or none).
        clients: dict[str, tuple[str, Callable[[], float]]] = {
            f"a:{name}": (f"raw {name}, 1 event/POST, N={n:,}",
                          lambda name=name: run_client(name, url, n, conc))  # type: ignore[misc]
            for name in http_clients.installed() if name != "aiohttp"
        }
        if args.profile:
            profile(runs[args.profile][1], args.top, args.profile_out)
            return 0
        print(f"receiver: aiohttp in its own process on {url}; concurrency {conc}; "
              f"best of {args.repeat} after a warm-up; {os.cpu_count()} CPUs", flush=True)
        keys = [k.strip() for k in args.only.split(",")]
        if "a:*" in keys:
            at = keys.index("a:*")
            keys[at:at + 1] = list(clients)
        labels = {**{k: v[0] for k, v in runs.items()}, **{k: v[0] for k, v in clients.items()}}
        seen: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
        # Rounds interleave the runs, so a neighbour's load on this machine hits
        # them alike; round 0 is a warm-up (imports, first connections).
        for round_ in range(args.repeat + 1):
            for key in keys:
                rate = (clients[key][1]() if key in clients
                        else asyncio.run(runs[key][1]()))
                if round_:
                    seen[key].append((rate, LAST_CPU))
                    print(f"  round {round_} ({key}): {rate:,.0f} events/s, "
                          f"client CPU {LAST_CPU:.0%}", flush=True)
        rates: dict[str, float] = {}
        print(f"\n{'events/s':<65} {'best':>9} {'median':>9}  client CPU µs/event")
        for key in keys:
            rates[key] = max(r for r, _ in seen[key])
            median = statistics.median(r for r, _ in seen[key])
            # CPU time this process spent per event: what the client side costs,
            # whatever the neighbours on this machine were doing meanwhile.
            cost = statistics.median(cpu / r * 1e6 for r, cpu in seen[key])
            print(f"{'(' + key + ')':<16} {labels[key]:<48} "
                  f"{rates[key]:>9,.0f} {median:>9,.0f}  {cost:>8,.1f}")
    bare = {k: r for k, r in rates.items() if k == "a" or k.startswith("a:")}
    if bare:
        top = max(bare, key=lambda k: bare[k])
        ceiling = bare[top]
        print(f"ceiling: ({top}) {ceiling:,.0f} events/s, the fastest bare client measured")
        for key in ("s", "sp"):
            if key in rates:
                print(f"({key})/ceiling = {rates[key] / ceiling:.3f}  (for reference)")
        for key in ("b", "bp"):
            if key in rates:
                ratio = rates[key] / ceiling
                print(f"({key})/ceiling = {ratio:.3f}  (target >= {TARGET_RATIO}): "
                      f"{'met' if ratio >= TARGET_RATIO else 'MISSED'}")
    for key in ("c",):
        if key in rates:
            print(f"({key}) = {rates[key] / TARGET_BATCH_RATE:.2f} x the "
                  f"{TARGET_BATCH_RATE:,.0f} events/s target: "
                  f"{'met' if rates[key] >= TARGET_BATCH_RATE else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
