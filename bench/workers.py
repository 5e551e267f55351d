"""Several delivery workers sharing one PostgreSQL eventing DB: events/s per worker count.

    uv run python bench/workers.py [--events 8000] [--latency-ms 20] [--workers 1,2,3]
                                   [--concurrency 8,16] [--write-docs]

Starts a private PostgreSQL (testsupport.servers.PostgresServer) holding the
eventing store (database ``store``, one schema per worker count, so every count
starts from an empty queue) and a webhook receiver in its own process that holds
every answer for --latency-ms before its 200 (a webhook that takes that long to
answer). For each worker count K:

1. K `dbevents run` processes start with the same config: the store, one
   trigger (``concurrency``: each value of --concurrency in turn, one event
   per POST) and no
   database to capture: they only deliver. Each waits for work on the store's
   LISTEN/NOTIFY channel.
2. The backlog: N events, each of a different row, are enqueued through the
   store itself (PostgresStore.enqueue, as the engine stores what it captured)
   in ONE transaction, so all N become claimable at the same instant; its
   NOTIFY wakes every worker. No capture runs during the timing: the figure is
   delivery alone.
3. The clock runs from that commit to the receiver's answer to the last of the
   N events. The receiver keeps every event id: each must have arrived (none
   missing); duplicates are counted. The store's event statuses are checked too.

Printed per K: events/s, the speedup over K=1, the ideal (K x the single
worker's rate), the latency ceiling (K x concurrency / latency), CPU seconds of
the dbevents processes, of PostgreSQL (the postmaster with every backend, live
or ended) and of the receiver over the timed window (from /proc/PID/stat), and
a verdict of what bounds the rate. --write-docs puts the figures into
docs/benchmarks.md (its "Several workers" section, which `python -m bench`
keeps when it rewrites the page).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ and testsupport/ live at the repository root, not on a script's path.
sys.path.insert(0, str(ROOT))

from bench.e2e.proc import CLK_TCK, Dbevents  # noqa: E402
from bench.e2e.receiver import ReceiverProcess  # noqa: E402
from bench.e2e.workloads import config  # noqa: E402
from bench.store_postgres import make_events  # noqa: E402
from testsupport.servers import PostgresServer  # noqa: E402

TRIGGER = "bench"
READING = (
    "How to read it: with one event per POST a worker keeps at most `concurrency` "
    "POSTs in flight, so against a receiver that takes L to answer it cannot exceed "
    "concurrency / L events/s, whatever the machine; the time between one answer and "
    "the next POST of the same slot (recording the result, claiming the next event: a "
    "store round trip or two) keeps it somewhat below. Workers add their slots, so "
    "while that ceiling binds, delivery scales with the worker count. On this machine "
    "the dbevents processes, PostgreSQL and the receiver share the same cores: once "
    "they keep them all busy, another worker adds slots but no CPU, and the rate stops "
    "growing. On separate machines the next bound is the store: PostgreSQL's CPU, "
    "which grows with the events claimed and finished per second, not with the number "
    "of workers.")
BEGIN = "<!-- bench/workers.py: begin -->"
END = "<!-- bench/workers.py: end -->"


@dataclass
class Run:
    workers: int
    events: int
    seconds: float
    received: int  # distinct event ids the receiver answered 200 to
    missing: int
    duplicates: int
    statuses: dict[str, int]
    cpu_dbevents: float
    cpu_postgres: float
    cpu_receiver: float
    window: float  # wall seconds between the two CPU readings
    machine: float  # cores' worth of CPU the whole machine used meanwhile (/proc/stat)
    load: tuple[float, float]

    @property
    def ours(self) -> float:
        """Cores' worth of CPU of dbevents, PostgreSQL and the receiver."""
        return (self.cpu_dbevents + self.cpu_postgres + self.cpu_receiver) / self.window

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    f = _stat(pid)
    return (int(f[11]) + int(f[12])) / CLK_TCK


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores: every
    state of /proc/stat's cpu line but idle and iowait)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(f) - f[3] - f[4]) / CLK_TCK


def postgres_cpu(postmaster: int) -> float:
    """CPU seconds of the postmaster, of its live children (backends, walwriter,
    ...) and of its children that ended (the postmaster's cutime/cstime)."""
    f = _stat(postmaster)
    total = sum(int(x) for x in f[11:15]) / CLK_TCK
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            f = _stat(int(entry.name))
        except (OSError, ValueError):
            continue  # ended meanwhile
        if int(f[1]) == postmaster:
            total += (int(f[11]) + int(f[12])) / CLK_TCK
    return total


async def enqueue_backlog(url: str, n: int) -> tuple[set[str], float]:
    """N events of distinct rows, stored in one transaction; returns their ids
    and the time.monotonic() just after the commit."""
    import structlog
    from dbevents.protocols import StoreSettings
    from dbevents_store_postgres import PostgresStore

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings

    events = make_events(n, trigger=TRIGGER)
    store = PostgresStore(StoreSettings(url=url, role="admin"))
    await store.open()
    try:
        await store.enqueue(events, {})
        committed = time.monotonic()
    finally:
        await store.close()
    return {e.id for e in events}, committed


def statuses(server: PostgresServer, schema: str) -> dict[str, int]:
    rows = server.execute(f'SELECT status, count(*) FROM "{schema}".events GROUP BY status',
                          dbname="store")
    return {str(s): int(c) for s, c in rows}


def run_once(server: PostgresServer, rx: ReceiverProcess, tmp: Path, k: int, n: int,
             concurrency: int, latency: float, log_level: str, stall: float) -> Run:
    schema = f"workers_c{concurrency}_k{k}"
    url = f"{server.dsn('store')}?schema={schema}"
    cfg = config(url, "", rx.url(), tables=["orders"], concurrency=concurrency)
    postmaster = int((server.datadir / "postmaster.pid").read_text().split()[0])
    procs: list[Dbevents] = []
    try:
        for i in range(k):
            folder = tmp / f"c{concurrency}-k{k}-w{i}"
            folder.mkdir()
            procs.append(Dbevents(folder, cfg, log_level=log_level).start())
        rx.reset(record=True, delay=latency)
        load0 = os.getloadavg()[0]
        cpu0 = ([proc_cpu(p.pid) for p in procs], postgres_cpu(postmaster), proc_cpu(rx.pid))
        t0, busy0 = time.monotonic(), machine_busy()
        ids, committed = asyncio.run(enqueue_backlog(url, n))
        last_n, last_change = -1, time.monotonic()
        while True:
            snap = rx.snapshot()
            unique = snap.events - snap.duplicates
            if unique >= n:
                break
            if unique != last_n:
                last_n, last_change = unique, time.monotonic()
            elif time.monotonic() - last_change > stall:
                raise TimeoutError(f"{k} workers: receiver stalled at {unique} of {n} "
                                   f"events for {stall:.0f} s")
            for p in procs:
                if p.proc is not None and p.proc.poll() is not None:
                    raise RuntimeError(f"a worker exited {p.proc.returncode}:\n{p.tail()}")
            time.sleep(0.02)
        cpu1 = ([proc_cpu(p.pid) for p in procs], postgres_cpu(postmaster), proc_cpu(rx.pid))
        window, busy = time.monotonic() - t0, machine_busy() - busy0
        load1 = os.getloadavg()[0]
        assert snap.first is not None and snap.last is not None
        seconds = snap.last - min(committed, snap.first)
        got = rx.ids()
        time.sleep(0.5)  # let the last results reach the store
        return Run(workers=k, events=n, seconds=seconds, received=len(got & ids),
                   missing=len(ids - got), duplicates=snap.duplicates,
                   statuses=statuses(server, schema),
                   cpu_dbevents=sum(cpu1[0]) - sum(cpu0[0]), cpu_postgres=cpu1[1] - cpu0[1],
                   cpu_receiver=cpu1[2] - cpu0[2], window=window, machine=busy / window,
                   load=(load0, load1))
    finally:
        for p in procs:
            p.stop()


def verdict(run: Run, concurrency: int, latency: float, cores: int) -> str:
    ceiling = run.workers * concurrency / latency if latency else float("inf")
    if run.rate >= 0.85 * ceiling:
        return (f"receiver latency x concurrency: {run.rate / ceiling:.0%} of "
                f"{run.workers} x {concurrency} / {latency * 1000:.0f} ms")
    if run.machine >= 0.85 * cores:
        top = "PostgreSQL" if run.cpu_postgres > run.cpu_dbevents else "dbevents"
        return (f"CPU: the {cores} cores are busy ({run.machine:.2f} in use, "
                f"{run.ours:.2f} of it this benchmark's, {top} the largest share)")
    if run.cpu_postgres / run.window >= 0.85:
        return f"store: PostgreSQL uses {run.cpu_postgres / run.window:.2f} cores"
    return (f"neither latency nor CPU: {run.rate / ceiling:.0%} of the latency ceiling, "
            f"{run.machine:.2f} of {cores} cores busy (waits: store locks or round trips)")


def table(runs: list[Run], concurrency: int, latency: float, cores: int) -> list[str]:
    base = runs[0].rate / runs[0].workers  # one worker's rate
    out = ["| workers | events/s | speedup | ideal (K x 1 worker) | latency ceiling "
           "| CPU s dbevents | CPU s PostgreSQL | CPU s receiver "
           "| cores busy: these / machine "
           "| missing / duplicates | load avg (1 min) | bound by |",
           "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in runs:
        ceiling = r.workers * concurrency / latency if latency else float("inf")
        out.append(
            f"| {r.workers} | {r.rate:,.0f} | {r.rate / base:.2f} "
            f"| {base * r.workers:,.0f} | {ceiling:,.0f} | {r.cpu_dbevents:.1f} "
            f"| {r.cpu_postgres:.1f} | {r.cpu_receiver:.1f} | {r.ours:.2f} / {r.machine:.2f} "
            f"| {r.missing} / {r.duplicates} | {r.load[0]:.2f} -> {r.load[1]:.2f} "
            f"| {verdict(r, concurrency, latency, cores)} |")
    return out


def markdown(groups: dict[int, list[Run]], args: argparse.Namespace, pg_version: str,
             cores: int, load: tuple[float, float], started: datetime) -> str:
    latency = args.latency_ms / 1000
    lines = [
        BEGIN,
        "## Several workers",
        "",
        f"`bench/workers.py` runs {args.workers.replace(',', ', ')} `dbevents run` "
        "processes against one "
        "PostgreSQL eventing DB and a receiver that takes a fixed time to answer each "
        "POST, the way real webhooks do. Each worker count drains a fresh backlog: the "
        "N events (each of a different row) are enqueued through the store itself "
        "(`PostgresStore.enqueue`, one transaction, so all of them become claimable at "
        "once and the NOTIFY wakes every worker); the workers capture nothing, so the "
        "figure is delivery alone. The clock runs from that commit to the receiver's "
        "answer to the last event; the receiver checks every event id (none missing, "
        "duplicates counted). CPU seconds are those of the timed window, from "
        "/proc/PID/stat: all the dbevents processes, PostgreSQL (the postmaster and "
        "every backend, including ended ones), the receiver.",
        "",
        f"- run: `uv run python bench/workers.py --events {args.events} --latency-ms "
        f"{args.latency_ms:g} --workers {args.workers} --concurrency {args.concurrency}` "
        f"on {started:%Y-%m-%d %H:%M} UTC",
        f"- machine: {cores} cores shared with other jobs; PostgreSQL {pg_version} on the "
        f"same host (fsync off); load average (1 min) {load[0]:.2f} at the start, "
        f"{load[1]:.2f} at the end",
        f"- trigger: one event per POST, log level {args.log_level}; the receiver answers "
        f"200 after {args.latency_ms:g} ms, so one worker's ceiling is concurrency / "
        f"{args.latency_ms:g} ms",
        "",
        "Speedup: events/s over the single worker's. Cores busy: the three CPU figures "
        "over the wall time, then the whole machine's busy CPU over the same time "
        "(/proc/stat; the difference is other jobs on the shared machine). Bound by: the "
        "latency ceiling when the rate is within 15% of K x concurrency / latency; CPU "
        f"when the machine keeps 85% of its {cores} cores busy; the store when PostgreSQL "
        "alone uses 0.85 of a core.",
        "",
    ]
    for c, group in groups.items():
        lines += [f"### concurrency = {c} (one worker's ceiling {c / latency:,.0f} events/s)",
                  "", *table(group, c, latency, cores), "",
                  f"Verdict: {overall(group, c, latency, cores)}", ""]
    lines += [READING, END]
    return "\n".join(lines) + "\n"


def overall(runs: list[Run], concurrency: int, latency: float, cores: int) -> str:
    last = runs[-1]
    eff = last.rate / (runs[0].rate / runs[0].workers * last.workers)
    return (f"{last.workers} workers deliver {last.rate:,.0f} events/s, "
            f"{eff:.0%} of {last.workers} x the single worker's rate; bound by "
            f"{verdict(last, concurrency, latency, cores)}.")


def write_docs(section: str) -> Path:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=8000, help="backlog per worker count")
    parser.add_argument("--latency-ms", type=float, default=20.0,
                        help="how long the receiver holds each answer")
    parser.add_argument("--workers", default="1,2,3", help="worker counts to run")
    parser.add_argument("--concurrency", default="8,16",
                        help="the trigger's deliveries in flight per worker: each value "
                             "is a series of runs")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--stall", type=float, default=60.0,
                        help="give up when nothing arrives for this many seconds")
    parser.add_argument("--write-docs", action="store_true",
                        help="put the figures into docs/benchmarks.md")
    args = parser.parse_args()
    counts = [int(k) for k in args.workers.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    latency = args.latency_ms / 1000
    cores = os.cpu_count() or 1
    # A SIGTERM unwinds like Ctrl-C: the context managers stop the workers, the
    # receiver and the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started, load0 = datetime.now(UTC), os.getloadavg()[0]
    print(f"worker counts {counts}, {args.events:,} events each, receiver latency "
          f"{args.latency_ms:g} ms, concurrency per worker {concurrencies} (one worker's "
          f"ceiling {', '.join(f'{c / latency:,.0f}' for c in concurrencies)} events/s); "
          f"{cores} cores, load average {load0:.2f}", flush=True)
    groups: dict[int, list[Run]] = {c: [] for c in concurrencies}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dbevents-workers-")))
        server = stack.enter_context(PostgresServer())
        server.create_database("store")
        pg_version = str(server.execute("SHOW server_version")[0][0])
        rx = stack.enter_context(ReceiverProcess())
        for c, k in ((c, k) for c in concurrencies for k in counts):
            r = run_once(server, rx, tmp, k, args.events, c, latency, args.log_level,
                         args.stall)
            groups[c].append(r)
            print(f"  concurrency {c}, {k} worker(s): {r.rate:,.0f} events/s "
                  f"({r.events:,} in {r.seconds:.2f} s); "
                  f"received {r.received:,}, missing {r.missing}, duplicates {r.duplicates}; "
                  f"store {r.statuses}; CPU s dbevents {r.cpu_dbevents:.1f}, PostgreSQL "
                  f"{r.cpu_postgres:.1f}, receiver {r.cpu_receiver:.1f}; cores busy "
                  f"{r.ours:.2f} of these, {r.machine:.2f} of the machine; load "
                  f"{r.load[0]:.2f} -> {r.load[1]:.2f}", flush=True)
    load1 = os.getloadavg()[0]
    for c, group in groups.items():
        print(f"\nconcurrency {c}:")
        print("\n".join(table(group, c, latency, cores)))
        print(f"verdict: {overall(group, c, latency, cores)}")
    print(f"\nload average {load0:.2f} at the start, {load1:.2f} at the end")
    bad = [r for g in groups.values() for r in g
           if r.missing or r.statuses.get("delivered", 0) != r.events]
    if args.write_docs:
        path = write_docs(markdown(groups, args, pg_version, cores, (load0, load1), started))
        print(f"wrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
