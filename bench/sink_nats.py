"""NATS JetStream delivery throughput: the NATS sink (and the core Dispatcher
with it) next to nats-py publishing the same payloads alone, on this machine.

    uv run python bench/sink_nats.py                # all runs, best and median
    uv run python bench/sink_nats.py --only n1,s1   # some of them

A private nats-server with JetStream (file storage, in a temp folder) is started
for the run and stopped afterwards. Every run publishes N CloudEvents payloads
with a fresh `Nats-Msg-Id` each to a stream capturing `bench.>`, `concurrency`
publishers in flight:

  (n1)  nats-py alone: `js.publish`, each awaiting its ack;
  (s1)  NatsSink.deliver, one event per call, in plain loops (no dispatcher);
  (d1)  the core Dispatcher + NatsSink from dbevents.testing.MemoryStore, one
        event per delivery;
  (nb)  nats-py alone: `js.publish_async` for `batch_size` payloads, then their acks;
  (sb)  NatsSink.deliver with `batch_size` events per call;
  (db)  the Dispatcher + NatsSink with `batch_size`.

Runs are interleaved in rounds after a warm-up round, so load from other
processes hits them alike; each round purges the stream first. The ratios
compare each sink run with the nats-py run of the same shape.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import nats.js.errors
from dbevents import StoreSettings, Trigger
from dbevents.dispatcher import Dispatcher
from dbevents.testing import MemoryStore, make_event, reset
from dbevents_sink_nats import NatsOptions, NatsSink

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from testsupport.nats_server import NatsServer

STREAM = "BENCH"
SUBJECT = "bench.{trigger}.{table}.{type}"


def payloads(n: int) -> list[tuple[str, bytes]]:
    evs = [make_event(trigger="bench", doc_id=str(i), n=i) for i in range(n)]
    return [(e.id, e.payload) for e in evs]


async def bare_single(url: str, n: int, concurrency: int, _: int) -> float:
    """(n1)"""
    items = payloads(n)
    nc = await nats.connect(url)
    js = nc.jetstream()
    it = iter(items)

    async def worker() -> None:
        for msg_id, body in it:
            await js.publish("bench.bench.users.DB_INSERT", body,
                             headers={"Nats-Msg-Id": msg_id})

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await nc.close()
    return n / elapsed


async def bare_batch(url: str, n: int, concurrency: int, batch_size: int) -> float:
    """(nb)"""
    items = payloads(n)
    nc = await nats.connect(url)
    js = nc.jetstream()
    chunks = iter([items[i:i + batch_size] for i in range(0, n, batch_size)])

    async def worker() -> None:
        for chunk in chunks:
            futures = [await js.publish_async("bench.bench.users.DB_INSERT", body,
                                              headers={"Nats-Msg-Id": msg_id})
                       for msg_id, body in chunk]
            await asyncio.gather(*futures)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await nc.close()
    return n / elapsed


def trigger(url: str, concurrency: int, batch_size: int) -> Trigger:
    return Trigger(name="bench", url=url, sink="nats", concurrency=concurrency, timeout=10000,
                   sink_options=NatsOptions(subject=SUBJECT, stream=STREAM,
                                            batch_size=batch_size))


async def sink_loops(url: str, n: int, concurrency: int, batch_size: int) -> float:
    """(s1) / (sb)"""
    evs = [make_event(trigger="bench", doc_id=str(i), n=i) for i in range(n)]
    t = trigger(url, concurrency, batch_size)
    sink = NatsSink()
    await sink.open()
    await sink.deliver(t, [make_event(trigger="bench")])  # connect outside the timing
    chunks = iter([evs[i:i + batch_size] for i in range(0, n, batch_size)])
    failed = 0

    async def worker() -> None:
        nonlocal failed
        for chunk in chunks:
            failed += sum(not o.ok for o in await sink.deliver(t, chunk))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await sink.close()
    if failed:
        raise RuntimeError(f"{failed} events failed")
    return n / elapsed


async def dispatched(url: str, n: int, concurrency: int, batch_size: int) -> float:
    """(d1) / (db)"""
    reset()
    evs = [make_event(trigger="bench", doc_id=str(i), n=i) for i in range(n)]
    store = MemoryStore(StoreSettings(url=f"memory://bench-{uuid.uuid4().hex}"))
    await store.open()
    await store.enqueue(evs, {})
    t = trigger(url, concurrency, batch_size)
    sink = NatsSink()
    await sink.open()
    await sink.deliver(t, [make_event(trigger="bench")])
    dispatcher = Dispatcher(store, [t], {"nats": sink})
    stop = asyncio.Event()
    t0 = time.perf_counter()
    task = asyncio.create_task(dispatcher.run(stop))
    while dispatcher.delivered + dispatcher.failed < n:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    stop.set()
    await task
    await sink.close()
    if dispatcher.failed:
        raise RuntimeError(f"{dispatcher.failed} events failed")
    return n / elapsed


Run = Callable[[str, int, int, int], Awaitable[float]]
RUNS: dict[str, tuple[str, Run, bool]] = {
    "n1": ("nats-py js.publish, 1 per ack wait", bare_single, False),
    "s1": ("NatsSink.deliver, 1 event per call", sink_loops, False),
    "d1": ("Dispatcher + NatsSink, 1 event per delivery", dispatched, False),
    "nb": ("nats-py publish_async, batches", bare_batch, True),
    "sb": ("NatsSink.deliver, batches", sink_loops, True),
    "db": ("Dispatcher + NatsSink, batches", dispatched, True),
}
BASELINE = {"s1": "n1", "d1": "n1", "sb": "nb", "db": "nb"}


async def purge(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        await js.purge_stream(STREAM)
    except nats.js.errors.NotFoundError:
        await js.add_stream(name=STREAM, subjects=["bench.>"])
    await nc.close()


async def one(url: str, name: str, n: int, nb: int, concurrency: int, batch_size: int) -> float:
    await purge(url)
    _, run, batched = RUNS[name]
    return await run(url, nb if batched else n, concurrency, batch_size if batched else 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5_000, help="N for n1, s1, d1")
    parser.add_argument("--batch-events", type=int, default=20_000, help="N for nb, sb, db")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default=",".join(RUNS))
    args = parser.parse_args()
    names = [s.strip() for s in args.only.split(",") if s.strip()]
    for name in names:
        if name not in RUNS:
            parser.error(f"unknown run {name!r}; known: {', '.join(RUNS)}")
    rates: dict[str, list[float]] = {name: [] for name in names}
    load0 = os.getloadavg()[0]
    with NatsServer() as server:
        for round_ in range(args.repeat + 1):  # round 0 warms up
            for name in names:
                rate = asyncio.run(one(server.url, name, args.events, args.batch_events,
                                       args.concurrency, args.batch_size))
                if round_:
                    rates[name].append(rate)
    load1 = os.getloadavg()[0]
    print(f"load average {load0:.2f} at the start, {load1:.2f} at the end; "
          f"{args.concurrency} in flight, batch_size {args.batch_size}")
    print(f"{'run':<4} {'what':<46} {'best ev/s':>10} {'median':>10} {'ratio':>7}")
    for name in names:
        best, median = max(rates[name]), statistics.median(rates[name])
        base = BASELINE.get(name)
        ratio = f"{best / max(rates[base]):.2f}" if base in rates else ""
        print(f"{name:<4} {RUNS[name][0]:<46} {best:>10,.0f} {median:>10,.0f} {ratio:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
