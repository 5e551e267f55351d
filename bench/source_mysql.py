"""Benchmark of the MySQL/MariaDB source (dbevents-source-mysql).

    uv run python bench/source_mysql.py [--rows 50000] [--rounds 3] [--profile]

Starts a private MariaDB (testsupport.servers.MariaDBServer: log_bin, ROW format,
FULL row image and metadata), commits --rows single-row INSERTs, each its own
transaction, into a table of typical columns, then reads that same binlog range
with:

- the stock mysql-replication loop: ``BinLogStreamReader(only_events=[WriteRowsEvent,
  UpdateRowsEvent, DeleteRowsEvent])`` iterating ``event.rows``;
- MysqlSource.changes(), which turns every row into a Change (typed JSON-ready values,
  key, doc id) and hands batches over to the event loop.

Each reader runs --rounds times; the best round of each is reported with the ratio.
Targets: >= 20,000 events/s and >= 5x the stock loop. --profile prints where the
source's reader thread spends its time (cProfile, one extra round).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import threading
import time
from pathlib import Path

from dbevents import SourceSettings
from dbevents_source_mysql import MysqlOptions, MysqlSource
from pymysql.constants import CLIENT
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from testsupport.servers import MariaDBServer

TARGET_RATE = 20_000
TARGET_RATIO = 5.0
DB = "bench"
SCHEMA = """
CREATE TABLE orders (
    id BIGINT AUTO_INCREMENT PRIMARY KEY,
    customer VARCHAR(64) NOT NULL,
    total DECIMAL(12, 2) NOT NULL,
    status VARCHAR(16) NOT NULL,
    created_at DATETIME(6) NOT NULL
)
"""


def workload(server: MariaDBServer, rows: int) -> tuple[tuple[str, int], tuple[str, int]]:
    """Commit ``rows`` single-row INSERTs (autocommit: one transaction each), sent 200
    statements per round trip; return the binlog positions before and after."""
    server.create_database(DB)
    server.execute(SCHEMA, db=DB)
    before = server.execute("SHOW MASTER STATUS")[0]
    conn = server.connect(DB, client_flag=CLIENT.MULTI_STATEMENTS)
    try:
        with conn.cursor() as cur:
            per_trip = 200
            for first in range(0, rows, per_trip):
                sql = ";".join(
                    f"INSERT INTO orders (customer, total, status, created_at) VALUES "
                    f"('customer-{i % 977}', {i % 10000 / 100:.2f}, 'new', NOW(6))"
                    for i in range(first, min(first + per_trip, rows)))
                cur.execute(sql)
                while cur.nextset():
                    pass
    finally:
        conn.close()
    after = server.execute("SHOW MASTER STATUS")[0]
    return (str(before[0]), int(before[1])), (str(after[0]), int(after[1]))


def stock(server: MariaDBServer, start: tuple[str, int], rows: int) -> float:
    """The library's documented loop over the same binlog range; seconds taken."""
    settings = {"host": "127.0.0.1", "port": server.port, "user": "root", "passwd": ""}
    stream = BinLogStreamReader(
        connection_settings=settings, server_id=4_000_000_001, blocking=False,
        resume_stream=True, log_file=start[0], log_pos=start[1],
        only_events=[WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent], enable_logging=False)
    seen = 0
    started = time.perf_counter()
    try:
        for event in stream:
            seen += len(event.rows)
            if seen >= rows:
                break
    finally:
        elapsed = time.perf_counter() - started
        stream.close()
    if seen < rows:
        raise SystemExit(f"the stock loop saw {seen} of {rows} rows")
    return elapsed


async def source(server: MariaDBServer, start: tuple[str, int], rows: int) -> float:
    """MysqlSource.changes() from ``start`` until every row arrived; seconds taken."""
    opts = MysqlOptions(start=f"{start[0]}:{start[1]}", server_id=4_000_000_002)
    src = MysqlSource(SourceSettings(name="bench", url=server.dsn(DB), options=opts))
    await src.start()
    seen = 0
    started = time.perf_counter()
    try:
        async for batch in src.changes(None):
            seen += len(batch.changes)
            if seen >= rows and batch.checkpoint is not None:
                break
    finally:
        elapsed = time.perf_counter() - started
        await src.close()
    if seen != rows:
        raise SystemExit(f"the source saw {seen} changes, expected {rows}")
    return elapsed


def profiled_source(server: MariaDBServer, start: tuple[str, int], rows: int) -> None:
    """One more source round with the reader thread under cProfile."""
    profile = cProfile.Profile()
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        if self.name.startswith("mysql-binlog-"):
            profile.enable()
            try:
                original(self)
            finally:
                profile.disable()
        else:
            original(self)

    threading.Thread.run = run  # type: ignore[method-assign]
    try:
        asyncio.run(source(server, start, rows))
    finally:
        threading.Thread.run = original  # type: ignore[method-assign]
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    with MariaDBServer() as server:
        started = time.perf_counter()
        start, end = workload(server, args.rows)
        print(f"workload: {args.rows} single-row INSERT transactions in "
              f"{time.perf_counter() - started:.1f}s, binlog {start[0]}:{start[1]} .. "
              f"{end[0]}:{end[1]}")
        stock_s = min(stock(server, start, args.rows) for _ in range(args.rounds))
        source_s = min(asyncio.run(source(server, start, args.rows))
                       for _ in range(args.rounds))
        stock_rate = args.rows / stock_s
        source_rate = args.rows / source_s
        ratio = source_rate / stock_rate
        print(f"stock BinLogStreamReader loop : {stock_rate:>9,.0f} events/s "
              f"({stock_s:.2f}s, best of {args.rounds})")
        print(f"MysqlSource.changes()         : {source_rate:>9,.0f} events/s "
              f"({source_s:.2f}s, best of {args.rounds})")
        print(f"ratio                         : {ratio:>9.1f}x")
        ok = source_rate >= TARGET_RATE and ratio >= TARGET_RATIO
        print(f"target >= {TARGET_RATE:,} events/s and >= {TARGET_RATIO:.0f}x: "
              f"{'met' if ok else 'NOT met'}")
        if args.profile:
            profiled_source(server, start, args.rows)


if __name__ == "__main__":
    main()
