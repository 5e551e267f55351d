"""The ceilings: a bare aiohttp client doing what dbevents' webhook sink does, with
nothing behind it (no database, no store, no dispatcher), against the same
receiver, with the same concurrency and connection pool settings."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence

import aiohttp
from dbevents_sink_webhook import WebhookSink

SOURCE_ID = str(uuid.uuid4())


def payloads(n: int, db: str = "sql-postgres") -> list[bytes]:
    """CloudEvents bodies shaped like the ones dbevents sends for the bench table
    (same keys, similar values and size)."""
    out = []
    kinds = ("DB_INSERT",) * 5 + ("DB_UPDATE",) * 3 + ("DB_DELETE",) * 2
    for i in range(n):
        kind = kinds[i % 10]
        doc: dict[str, object] = {"id": i} if kind == "DB_DELETE" else {
            "id": i, "sku": f"sku-{i}", "qty": i % 100, "price": f"{i % 10000 / 100:.2f}",
            "note": "new", "updated_at": "2025-01-01T12:00:00.123456+00:00"}
        out.append(json.dumps({
            "specversion": "1.0", "id": str(uuid.uuid4()), "type": kind, "source": SOURCE_ID,
            "time": "2025-01-01T12:00:00.123Z",
            "data": {"db": db, "col": "items", "docId": str(i), "doc": doc},
        }, separators=(",", ":")).encode())
    return out


def batches(bodies: Sequence[bytes], size: int) -> list[bytes]:
    return [b"[" + b",".join(bodies[i:i + size]) + b"]" for i in range(0, len(bodies), size)]


def _session() -> aiohttp.ClientSession:
    # The sink's own pool settings, so the ceiling differs from dbevents only in
    # what happens around each POST.
    sink = WebhookSink()
    connector = aiohttp.TCPConnector(limit=sink.limit, limit_per_host=sink.limit_per_host,
                                     keepalive_timeout=sink.keepalive_timeout)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())


async def _post_all(url: str, bodies: Sequence[bytes], concurrency: int, batch: bool) -> None:
    headers = {"Content-Type": "application/cloudevents-batch+json" if batch
               else "application/json"}
    timeout = aiohttp.ClientTimeout(total=10.0)
    async with _session() as session:
        it = iter(bodies)

        async def worker() -> None:
            for body in it:
                async with session.post(url, data=body, headers=headers,
                                        timeout=timeout) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"receiver answered {resp.status}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def post_all(url: str, bodies: Sequence[bytes], concurrency: int, batch: bool = False) -> None:
    """POST every body, ``concurrency`` in flight, as the sink's trigger would."""
    asyncio.run(_post_all(url, bodies, concurrency, batch))


async def _paced(url: str, rate: float, seconds: float) -> dict[str, float]:
    sent: dict[str, float] = {}
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=10.0)
    tasks: set[asyncio.Task[None]] = set()
    async with _session() as session:

        async def post(key: str, body: bytes) -> None:
            sent[key] = time.time()
            async with session.post(url, data=body, headers=headers, timeout=timeout) as resp:
                await resp.read()

        start = time.monotonic()
        for k in range(int(rate * seconds)):
            delay = start + k / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            body = json.dumps({"specversion": "1.0", "id": str(uuid.uuid4()), "type": "FLOOR",
                               "source": SOURCE_ID, "time": "2025-01-01T12:00:00.123Z",
                               "data": {"db": "sql-postgres", "col": "floor", "docId": str(k),
                                        "doc": {"id": k, "seq": k}}}).encode()
            task = asyncio.create_task(post(f"FLOOR:{k}:{k}", body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    return sent


def paced_posts(url: str, rate: float, seconds: float) -> dict[str, float]:
    """The latency floor: POSTs at ``rate`` per second; key -> time.time() just
    before each was handed to aiohttp (compare with the receipt times)."""
    return asyncio.run(_paced(url, rate, seconds))
