"""Benchmark of the PostgreSQL source (dbevents-source-postgres).

    uv run python bench/source_postgres.py [--changes 100000] [--txn 1000] [--rounds 3]

Starts a private PostgreSQL (testsupport.servers.PostgresServer), creates two
pgoutput slots at the same LSN, commits --changes inserted rows (transactions of
--txn rows) into a table of typical columns, then drains the same WAL twice:

- pg_recvlogical (from the server's bindir) on one slot, writing the raw pgoutput
  stream to /dev/null, until it reaches the WAL end (--endpos);
- PostgresSource.changes() on the other slot, decoding every row into a Change
  with typed values, until it has seen every change.

Slots are re-created for each round, so both readers decode the same WAL from
the same point in every round; the best round of each is reported, with the
ratio (target >= 1.0: the source keeps up with PostgreSQL's own client).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

import structlog
from dbevents.protocols import SourceSettings
from dbevents_source_postgres import PostgresOptions, PostgresSource

# testsupport lives at the repository root, which is not on a script's path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from testsupport.servers import PostgresServer

TARGET = 1.0
DB = "bench"

SCHEMA = """
CREATE TABLE orders (
    id bigint PRIMARY KEY,
    customer text NOT NULL,
    total numeric(12, 2) NOT NULL,
    status text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE PUBLICATION bench FOR TABLE orders;
"""


def workload(server: PostgresServer, changes: int, txn: int) -> str:
    """Insert the rows, committing every ``txn`` rows (in one server-side loop, so
    the client's round trips do not matter); return the WAL end afterwards."""
    with server.connect(DB) as conn:
        conn.execute(f"""
            DO $$
            BEGIN
                FOR k IN 0 .. {changes - 1} BY {txn} LOOP
                    INSERT INTO orders (id, customer, total, status)
                    SELECT i, 'customer-' || (i % 977), (i % 10000) / 100.0, 'new'
                    FROM generate_series(k, least(k + {txn}, {changes}) - 1) AS i;
                    COMMIT;
                END LOOP;
            END $$""")
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def make_slots(server: PostgresServer, names: list[str]) -> None:
    with server.connect(DB) as conn:
        for name in names:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                         " WHERE slot_name = %s", (name,))
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))


def run_recvlogical(server: PostgresServer, slot: str, endpos: str) -> float:
    argv = [str(server.bindir / "pg_recvlogical"), "-d", server.dsn(DB), "--slot", slot,
            "--start", "--endpos", endpos, "-f", "/dev/null", "--no-loop",
            "-o", "proto_version=1", "-o", "publication_names=bench"]
    started = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - started


async def run_source(server: PostgresServer, slot: str, changes: int,
                     profile: cProfile.Profile | None = None) -> tuple[float, float]:
    """Drain ``changes`` through PostgresSource: (wall seconds, CPU seconds of this
    process, decoding included)."""
    options = PostgresOptions(slot=slot, publication="bench", batch_size=1000)
    source = PostgresSource(SourceSettings(name="bench", url=server.dsn(DB), options=options,
                                           tables=frozenset({"orders"})))
    await source.start()
    seen = 0
    started = time.perf_counter()
    cpu = time.process_time()
    if profile is not None:
        profile.enable()
    batches = source.changes(None)
    try:
        async for batch in batches:
            seen += len(batch.changes)
            if seen >= changes and batch.checkpoint is not None:
                break
    finally:
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        if profile is not None:
            profile.disable()
        await batches.aclose()  # type: ignore[attr-defined]
        await source.close()
    assert seen == changes, (seen, changes)
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--txn", type=int, default=1000, help="rows per transaction")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile the source's drain")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    load_before = os.getloadavg()[0]
    with PostgresServer({"logical_decoding_work_mem": "256MB"}) as server:
        server.create_database(DB)
        with server.connect(DB) as conn:
            conn.execute(SCHEMA)
        make_slots(server, ["bench_recv", "bench_src"])
        endpos = workload(server, args.changes, args.txn)
        recv_times: list[float] = []
        src_times: list[tuple[float, float]] = []
        profile = cProfile.Profile() if args.profile else None
        for i in range(args.rounds):
            # Alternate who goes first, so neither always reads a warm cache.
            order = ["recv", "src"] if i % 2 == 0 else ["src", "recv"]
            for who in order:
                if who == "recv":
                    recv_times.append(run_recvlogical(server, "bench_recv", endpos))
                else:
                    src_times.append(asyncio.run(
                        run_source(server, "bench_src", args.changes, profile)))
            print(f"round {i + 1}: pg_recvlogical {recv_times[-1]:.3f} s, PostgresSource "
                  f"{src_times[-1][0]:.3f} s ({src_times[-1][1]:.3f} s CPU)")
            # A slot cannot be rewound: each round writes the workload again into
            # two new slots.
            if i + 1 < args.rounds:
                with server.connect(DB) as conn:
                    conn.execute("TRUNCATE orders")
                make_slots(server, ["bench_recv", "bench_src"])
                endpos = workload(server, args.changes, args.txn)

    recv = args.changes / min(recv_times)
    src = args.changes / min(t for t, _ in src_times)
    cpu = args.changes / min(c for _, c in src_times)
    print(f"{args.changes:,} changes in transactions of {args.txn} rows, best of "
          f"{args.rounds}; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs")
    print(f"pg_recvlogical (raw pgoutput to /dev/null): {recv:>9,.0f} changes/s")
    print(f"PostgresSource (decoded into Changes):      {src:>9,.0f} changes/s "
          f"({cpu:,.0f} per CPU second of its process)")
    ratio = src / recv
    print(f"ratio: {ratio:.2f}: {'meets' if ratio >= TARGET else 'MISSES'} the target "
          f"of >= {TARGET}")
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)
    if ratio < TARGET:
        sys.exit(1)

if __name__ == "__main__":
    main()
