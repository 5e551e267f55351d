"""The six scenarios of issue 9. Each appends rows (figure, ceiling, target) and
notes to the shared Results; runs of one scenario and its ceiling are
interleaved in rounds and reported as medians, because this machine is shared."""

from __future__ import annotations

import itertools
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import http_clients
from bench.e2e import ceiling, workloads
from bench.e2e.proc import Dbevents, FileWrites, Profiler, gc_pauses, summarise_profile
from bench.e2e.receiver import ReceiverProcess, Snapshot
from testsupport.servers import MariaDBServer, PostgresServer

CONCURRENCY = 16  # the trigger's default `concurrency`; the ceilings use the same
BATCH = 100
TARGET_RATIO = 0.9
TARGET_BATCH_RATE = 50_000.0
TARGET_P50_MS = 2.0
TARGET_P99_MS = 5.0
TARGET_RSS_MB = 200.0


# The eventing-DB stores scenarios 1, 2 and 5 run with: key suffix of their rows, name.
STORES = {"sqlite": ("", "SQLite store"), "postgres": (" pg", "PostgreSQL store")}


@dataclass(frozen=True)
class Scale:
    name: str
    changes: int  # scenarios 1 and 2
    rounds: int
    latency_rate: float
    latency_seconds: float
    mysql_rows: int
    backlog: int
    pgbench_seconds: int


SCALES = {
    "quick": Scale("quick", changes=20_000, rounds=3, latency_rate=200, latency_seconds=20,
                   mysql_rows=10_000, backlog=100_000, pgbench_seconds=10),
    "full": Scale("full", changes=100_000, rounds=3, latency_rate=200, latency_seconds=60,
                  mysql_rows=50_000, backlog=1_000_000, pgbench_seconds=30),
}


@dataclass
class Row:
    key: str
    what: str
    figure: float
    unit: str
    ceiling: float | None
    ceiling_what: str
    target: str = ""
    met: bool | None = None
    miss: str = ""  # by how much a target was missed
    samples: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.ceiling is None or not self.ceiling:
            return None
        return self.figure / self.ceiling


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # ms, scenario 3
    floor_latencies: list[float] = field(default_factory=list)
    rss_timeline: list[tuple[float, float]] = field(default_factory=list)  # (s, MB), 5
    backlog_switch: float | None = None  # seconds into the timeline: webhook back
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    missed: dict[str, str] = field(default_factory=dict)  # scenario -> what to profile
    pipeline_rate_1: dict[str, float] = field(default_factory=dict)  # by store
    # Every bare client measured for a ceiling: (scenario, client) -> events/s per round.
    clients: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def note(self, scenario: str, text: str) -> None:
        self.notes.setdefault(scenario, []).append(text)
        print(f"    {text}", flush=True)


@dataclass
class Context:
    scale: Scale
    rx: ReceiverProcess
    tmp: Path
    log_level: str
    results: Results
    pg: PostgresServer | None = None
    my: MariaDBServer | None = None
    stores: tuple[str, ...] = ("sqlite",)  # for 1, 2 and 5
    # Webhook transports scenario 1 runs with, interleaved; the first gives the
    # figure, the others (SQLite store only) a note each. Empty: the sink's default.
    transports: tuple[str, ...] = ()


@dataclass
class Run:
    rate: float  # events/s, first to last receipt
    events: int
    seconds: float
    cpu_us: float = 0.0  # CPU of the dbevents process per event
    peak_rss_mb: float = 0.0
    log: dict[str, float] = field(default_factory=dict)  # Dbevents.log_stats()
    client: str = ""  # a ceiling's: the bare client that set it


def _rate(snap: Snapshot, first_request_events: int) -> tuple[float, float]:
    """Events after the first request, over the time from its receipt to the last."""
    assert snap.first is not None and snap.last is not None
    span = snap.last - snap.first
    return ((snap.events - first_request_events) / span if span > 0 else float("nan")), span


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _miss(figure: float, target: float, lower_is_better: bool = False) -> str:
    if lower_is_better:
        return f"{figure / target - 1:+.0%} over"
    return f"{1 - figure / target:.0%} short"


# -- one pipeline run and one ceiling run -------------------------------------------


def _pipeline(ctx: Context, folder: Path, cfg: str, n: int, first_events: int,
              profile: Path | None = None, store_dsn: str | None = None) -> Run:
    """Start dbevents on a database already holding the changes (its slot or
    binlog position set before they were written), and time it from the first
    to the last receipt: the figure is dbevents' rate, not the writer's."""
    ctx.rx.reset()
    folder.mkdir(parents=True)
    proc = Dbevents(folder, cfg, ctx.log_level, store_dsn=store_dsn).start()
    prof = Profiler(proc.pid, profile) if profile else None
    cpu = proc.cpu_seconds()
    loop0, other0 = proc.thread_cpu()
    try:
        snap = ctx.rx.wait_events(n)
        cpu = proc.cpu_seconds() - cpu
        loop1, other1 = proc.thread_cpu()
        threads = (loop1 - loop0, other1 - other0)
        peak = proc.peak_rss_mb()
    finally:
        if prof:
            prof.stop()
        code = proc.stop()
    if code != 0:
        raise RuntimeError(f"dbevents exited {code}:\n{proc.tail()}")
    final = ctx.rx.snapshot()
    if final.events != n or final.refused:
        raise RuntimeError(f"expected {n} events, the receiver counted {final.events} "
                           f"(+{final.refused} refused)")
    rate, span = _rate(snap, first_events)
    return Run(rate, n, span, cpu / n * 1e6, peak,
               {**proc.log_stats(), **proc.store_stats(), "main_cpu_us": threads[0] / n * 1e6,
                "other_cpu_us": threads[1] / n * 1e6, "loop_busy": threads[0] / span})


def _ceiling(ctx: Context, bodies: list[bytes], events: int, batch: bool,
             key: str = "") -> Run:
    """Every bare HTTP client installed (bench/http_clients.py: aiohttp, and the
    native ones the environment has) POSTs the payloads to the same receiver;
    the fastest is the ceiling. Each client's rate is kept under ``key``."""
    best: Run | None = None
    for client in http_clients.installed():
        ctx.rx.reset()
        cpu = time.process_time()  # this process does nothing else meanwhile
        http_clients.post_all(client, ctx.rx.url(), bodies, CONCURRENCY, batch)
        cpu = time.process_time() - cpu
        snap = ctx.rx.snapshot()
        if snap.events != events:
            raise RuntimeError(f"ceiling ({client}): {snap.events} of {events} events arrived")
        rate, span = _rate(snap, BATCH if batch else 1)
        if key:
            ctx.results.clients.setdefault((key, client), []).append(rate)
        if best is None or rate > best.rate:
            best = Run(rate, events, span, cpu / events * 1e6, client=client)
    assert best is not None
    return best


def _ceiling_what(batch: bool = False) -> str:
    clients = http_clients.installed()
    return (f"fastest bare client of {len(clients)} ({', '.join(clients)}), same receiver"
            + (f", {BATCH}-event bodies" if batch else ""))


def _store(ctx: Context, store: str, tag: str) -> tuple[str, str | None, str | None]:
    """(store URL for the config, psycopg DSN of its database or None, that
    database's name to drop afterwards or None). The PostgreSQL store gets a
    fresh database on the same private server as the source."""
    if store == "sqlite":
        return "sqlite:///events.db", None, None
    assert ctx.pg is not None
    db = ctx.pg.create_database(_name(f"store_{tag}"))
    return f"{ctx.pg.dsn(db)}?schema=dbevents", ctx.pg.dsn(db), db


def _pg_run(ctx: Context, n: int, batch_size: int, profile: Path | None = None,
            store: str = "sqlite", transport: str | None = None) -> Run:
    assert ctx.pg is not None
    db = _name("tput")
    workloads.pg_prepare(ctx.pg, db, seed=n)
    url, dsn, store_db = _store(ctx, store, "tput")
    try:
        workloads.pg_mix(ctx.pg, db, n)
        chosen = {"transport": transport} if transport else {}
        cfg = workloads.config(url, workloads.pg_database(ctx.pg, db),
                               ctx.rx.url(), batch_size=batch_size, **chosen)
        return _pipeline(ctx, ctx.tmp / db, cfg, n, batch_size, profile, dsn)
    finally:
        ctx.pg.drop_database(db)
        if store_db is not None:
            ctx.pg.drop_database(store_db)


# -- scenarios 1 and 2 -------------------------------------------------------------


def throughput(ctx: Context, which: set[str]) -> None:
    n, res = ctx.scale.changes, ctx.results
    bodies = ceiling.payloads(n)
    batched = ceiling.batches(bodies, BATCH)
    stores = ctx.stores
    runs: dict[str, list[Run]] = {}
    first, *others = ctx.transports or (None,)
    alt: dict[str, list[Run]] = {t: [] for t in others if t}
    for r in range(1, ctx.scale.rounds + 1):
        line = []
        for key, batch in (("1", False), ("2", True)):
            if key not in which:
                continue
            c = _ceiling(ctx, batched if batch else bodies, n, batch=batch, key=key)
            runs.setdefault(f"c{key}", []).append(c)
            line.append(f"{key}: ceiling {c.rate:,.0f} ({c.client})")
            for store in stores:
                run = _pg_run(ctx, n, BATCH if batch else 1, store=store,
                              transport=None if batch else first)
                runs.setdefault(f"p{key}{store}", []).append(run)
                line.append(f"{STORES[store][1]} {run.rate:,.0f}")
            if not batch:
                for t, got in alt.items():
                    got.append(_pg_run(ctx, n, 1, transport=t))
                    line.append(f"transport {t} {got[-1].rate:,.0f}")
        print(f"  round {r}/{ctx.scale.rounds}: " + "; ".join(line) + " events/s", flush=True)
    for key, batch in (("1", False), ("2", True)):
        if key not in which:
            continue
        ceil = _median([x.rate for x in runs[f"c{key}"]])
        for store in stores:
            suffix, label = STORES[store]
            pipe = runs[f"p{key}{store}"]
            fig = _median([x.rate for x in pipe])
            if batch:
                what = f"PostgreSQL -> webhook, batch_size {BATCH}, {n:,} changes, {label}"
                met = fig >= TARGET_BATCH_RATE
                target, miss = (f">= {TARGET_BATCH_RATE:,.0f} events/s",
                                "" if met else _miss(fig, TARGET_BATCH_RATE))
            else:
                res.pipeline_rate_1[store] = fig
                what = f"PostgreSQL -> webhook, 1 event/POST, {n:,} changes, {label}"
                met = fig >= TARGET_RATIO * ceil
                target, miss = (f">= {TARGET_RATIO} x ceiling", "" if met else
                                f"ratio {fig / ceil:.2f}, "
                                f"{_miss(fig / ceil, TARGET_RATIO)} of {TARGET_RATIO}")
            res.rows.append(Row(key + suffix, what, fig, "events/s", ceil,
                                _ceiling_what(batch), target, met, miss,
                                [x.rate for x in pipe]))
            _run_notes(res, key, pipe, runs[f"c{key}"], label if len(stores) > 1 else "")
            if not met and store == "sqlite":
                res.missed[key] = (f"throughput, batch_size {BATCH}" if batch
                                   else "throughput, 1 event/POST")
        if not batch:
            _transport_notes(res, first, alt, ceil)
        _client_notes(res, key)


def _transport_notes(res: Results, first: str | None, alt: dict[str, list[Run]],
                     ceil: float) -> None:
    """Scenario 1 with other webhook transports, interleaved with the figure's."""
    if first:
        res.note("1", f"transport {first}")
    for t, got in alt.items():
        rate = _median([x.rate for x in got])
        res.note("1", f"the same with transport {t} (SQLite store, interleaved): median "
                      f"{rate:,.0f} events/s, ratio {rate / ceil:.2f}, rounds "
                      + ", ".join(f"{x.rate:,.0f}" for x in got)
                      + f"; {_median([x.cpu_us for x in got]):,.0f} µs CPU per event, "
                      f"the event loop {_median([x.log['main_cpu_us'] for x in got]):,.0f}"
                      f" µs and on a CPU "
                      f"{_median([x.log['loop_busy'] for x in got]):.0%} of the time")


def _client_notes(res: Results, key: str) -> None:
    """Every bare client of the ceiling, fastest first (median of its rounds)."""
    seen = {c: rates for (k, c), rates in res.clients.items() if k == key}
    if not seen:
        return
    ranked = sorted(seen.items(), key=lambda kv: -_median(kv[1]))
    res.note(key, "bare clients for the ceiling (median events/s of the rounds; the "
             "ceiling of each round is its fastest): " + ", ".join(
                 f"{c} {_median(r):,.0f}" for c, r in ranked))


def _run_notes(res: Results, key: str, pipeline: list[Run], ceil: list[Run],
               label: str = "") -> None:
    if label:
        res.note(key, f"**{label}**:")
    res.note(key, "rounds (dbevents / ceiling, events/s): " + ", ".join(
        f"{p.rate:,.0f} / {c.rate:,.0f}" for p, c in zip(pipeline, ceil, strict=True)))
    res.note(key, f"dbevents process: {_median([p.cpu_us for p in pipeline]):,.0f} µs CPU "
                  f"per event (all its threads; the bare client: "
                  f"{_median([c.cpu_us for c in ceil]):,.0f} µs), peak RSS "
                  f"{max(p.peak_rss_mb for p in pipeline):.0f} MB")
    logs = [p.log for p in pipeline if p.log.get("store_txns") and p.log.get("posts")]
    if logs:
        res.note(key, "from its log (medians): "
                 f"{_median([g['changes'] / g['store_txns'] for g in logs]):,.1f} changes "
                 f"per store transaction of captured changes, "
                 f"{_median([g['store_ms'] / g['store_txns'] for g in logs]):.1f} ms each; "
                 f"{_median([g['posted_events'] / g['posts'] for g in logs]):.1f} events "
                 f"per POST; warnings {max(g.get('warning', 0) for g in logs):.0f}, "
                 f"errors {max(g.get('error', 0) for g in logs):.0f}")
    split = [p.log for p in pipeline if "main_cpu_us" in p.log]
    if split:
        res.note(key, "CPU per event by thread (medians): the event loop "
                 f"{_median([g['main_cpu_us'] for g in split]):,.0f} µs, the other threads "
                 f"(the webhook transport's curl thread, SQLite's worker) "
                 f"{_median([g['other_cpu_us'] for g in split]):,.0f} µs; the event-loop "
                 f"thread was on a CPU {_median([g['loop_busy'] for g in split]):.0%} of the "
                 "time (a CPU-bound event loop is near 100%)")
    stores = [p.log for p in pipeline if p.log.get("finish_txns")]
    if stores:
        res.note(key, "from its eventing DB (medians): "
                 f"{_median([g['events'] / g['finish_txns'] for g in stores]):,.1f} events "
                 "per transaction recording results (`finish`; one claim transaction "
                 "precedes each batch of POSTs too)")


# -- scenario 3 --------------------------------------------------------------------


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": ordered[-1]}


@dataclass
class LatencyRun:
    series: list[tuple[float, float]]  # (ms, wall-clock commit time) per change
    checkpoints: list[float]  # wall-clock times the store's main file was written
    gc: list[tuple[float, int, float]]  # (wall-clock end, generation, ms) per collection
    stored_ms: list[float] | None = None  # per change in series: commit -> stored, ms


def _latency_run(ctx: Context, seconds: float, profile: Path | None = None) -> LatencyRun:
    assert ctx.pg is not None
    db = _name("lat")
    rate = ctx.scale.latency_rate
    workloads.pg_prepare(ctx.pg, db, seed=0, full_identity=True)
    folder = ctx.tmp / db
    folder.mkdir()
    cfg = workloads.config("sqlite:///events.db", workloads.pg_database(ctx.pg, db),
                           ctx.rx.url())
    ctx.rx.reset(record=True)
    gc_log = folder / "gc.log"
    proc = Dbevents(folder, cfg, ctx.log_level, gc_log=gc_log).start()
    writes = FileWrites(proc.store)
    prof = None
    try:
        # Warm-up (first connections, first statements), not measured.
        warm = workloads.LatencyWriter(ctx.pg, db, rate, 2.0, first=0)
        warm.run()
        ctx.rx.wait_events(len(warm.commits))
        writes.start()
        prof = Profiler(proc.pid, profile) if profile else None
        writer = workloads.LatencyWriter(ctx.pg, db, rate, seconds, first=10_000_000)
        writer.start()
        writer.join()
        if writer.error:
            raise writer.error
        snap = ctx.rx.wait_events(len(warm.commits) + len(writer.commits))
        snap = ctx.rx.snapshot(times=True)
    finally:
        if prof:
            prof.stop()
        if writes.is_alive():
            writes.stop()
        code = proc.stop()
        ctx.pg.drop_database(db)
    if code != 0:
        raise RuntimeError(f"dbevents exited {code}:\n{proc.tail()}")
    missing = [k for k in writer.commits if k not in snap.times]
    if missing:
        raise RuntimeError(f"{len(missing)} changes never arrived, e.g. {missing[:3]}")
    if writer.late and profile is None:
        ctx.results.note("3", f"the writer fell > 5 ms behind its schedule "
                              f"{writer.late} times")
    run = LatencyRun([((snap.times[k] - t) * 1000, t) for k, t in writer.commits.items()],
                     writes.times, gc_pauses(gc_log))
    # Changes reach the log's "captured" lines in commit order, the order the one
    # writer thread committed them in (warm-up first).
    stored: list[float] = []
    for when, count in proc.captured_lines():
        stored += [when] * count
    order = [*warm.commits, *writer.commits]
    if len(stored) == len(order):
        at = dict(zip(order, stored, strict=True))
        run.stored_ms = [(at[k] - t) * 1000 for k, t in writer.commits.items()]
    return run


def latency(ctx: Context) -> None:
    res, scale = ctx.results, ctx.scale
    run = _latency_run(ctx, scale.latency_seconds)
    lat = [ms for ms, _ in run.series]
    # The floor: the same receiver, the same rate, a bare client, nothing behind it.
    floor_seconds = min(scale.latency_seconds, 20.0)
    ctx.rx.reset(record=True)
    sent = ceiling.paced_posts(ctx.rx.url(), scale.latency_rate, floor_seconds)
    snap = ctx.rx.snapshot(times=True)
    floor = [(snap.times[k] - t) * 1000 for k, t in sent.items() if k in snap.times]
    res.latencies, res.floor_latencies = lat, floor
    got, fl = _percentiles(lat), _percentiles(floor)
    what = (f"commit -> receipt, {scale.latency_rate:.0f} changes/s for "
            f"{scale.latency_seconds:.0f} s")
    for stat in ("p50", "p90", "p99", "max"):
        target = {"p50": TARGET_P50_MS, "p99": TARGET_P99_MS}.get(stat)
        met = None if target is None else got[stat] <= target
        res.rows.append(Row(f"3 {stat}", f"{what}: {stat}", got[stat], "ms", fl[stat],
                            "bare aiohttp POST -> receipt (floor)",
                            f"<= {target:g} ms" if target else "", met,
                            "" if met in (None, True) else
                            _miss(got[stat], target or 1, lower_is_better=True)))
    res.note("3", f"{len(lat):,} changes (5 inserts, 3 updates, 2 deletes per ten), one "
                  f"transaction each; commit time = writer's clock just before COMMIT; "
                  f"floor from {len(floor):,} bare POSTs over {floor_seconds:.0f} s")
    res.note("3", "dbevents: " + ", ".join(f"{k} {v:.1f} ms" for k, v in got.items())
             + "; floor: " + ", ".join(f"{k} {v:.2f} ms" for k, v in fl.items()))
    res.note("3", _tail(run.series, got["p99"]))
    res.note("3", _stalls(run, got["p99"]))
    if run.stored_ms is not None:
        stored = run.stored_ms
        after = [ms - s for (ms, _), s in zip(run.series, stored, strict=True)]
        slow = [i for i, (ms, _) in enumerate(run.series) if ms >= got["p99"]]
        res.note("3", "split where the change's store transaction ended (its `captured` log "
                 "line, ms precision): commit -> stored / stored -> receipt, medians: "
                 f"all changes {_median(stored):.1f} / {_median(after):.1f} ms; the "
                 f"slowest 1% {_median([stored[i] for i in slow]):.1f} / "
                 f"{_median([after[i] for i in slow]):.1f} ms")
    if got["p50"] > TARGET_P50_MS or got["p99"] > TARGET_P99_MS:
        res.missed["3"] = "latency"


def _tail(series: list[tuple[float, float]], p99: float) -> str:
    """When the slowest 1% happened: spread out, or in bursts (a stall hits every
    change that arrives during it)."""
    slow = sorted(t for ms, t in series if ms >= p99)
    if len(slow) < 2:
        return "too few slow changes to say when they happen"
    bursts = [slow[0]]
    for before, t in itertools.pairwise(slow):
        if t - before > 0.1:  # a new burst: 100 ms after the last slow change
            bursts.append(t)
    gaps = [b - a for a, b in itertools.pairwise(bursts)]
    return (f"the {len(slow)} changes at or above p99 fall in {len(bursts)} bursts "
            f"(slow changes within 100 ms of each other)"
            + (f", a median {_median(gaps):.1f} s apart" if gaps else ""))


def _stalls(run: LatencyRun, p99: float) -> str:
    """How many slow changes (>= p99), against all changes, were in flight while
    the store checkpointed or a GC pause of 5 ms or more ran."""
    big_gc = [(end - ms / 1000, end) for end, _, ms in run.gc if ms >= 5]

    def hit(ms: float, t: float) -> tuple[bool, bool]:
        done = t + ms / 1000
        return (any(t <= c <= done for c in run.checkpoints),
                any(a <= done and b >= t for a, b in big_gc))

    slow = [hit(ms, t) for ms, t in run.series if ms >= p99]
    every = [hit(ms, t) for ms, t in run.series]
    gen2 = [ms for _, gen, ms in run.gc if gen == 2]
    return (f"of the {len(slow)} changes at or above p99, {sum(c for c, _ in slow)} were "
            f"in flight while the store's main file was written (a WAL checkpoint: "
            f"{len(run.checkpoints)} in the run; {sum(c for c, _ in every) / len(every):.0%} "
            f"of all changes overlap one) and {sum(g for _, g in slow)} during a GC pause "
            f">= 5 ms ({len(big_gc)} such pauses; {len(gen2)} full collections, longest "
            f"{max(gen2, default=0):.0f} ms)")


# -- scenario 4 --------------------------------------------------------------------


def _my_run(ctx: Context, n: int, server_id: int, profile: Path | None = None) -> Run:
    assert ctx.my is not None
    db = _name("my")
    start = workloads.my_prepare(ctx.my, db)
    try:
        workloads.my_inserts(ctx.my, db, n)
        cfg = workloads.config("sqlite:///events.db",
                               workloads.my_database(ctx.my, db, start, server_id),
                               ctx.rx.url())
        return _pipeline(ctx, ctx.tmp / db, cfg, n, 1, profile)
    finally:
        ctx.my.drop_database(db)


def mariadb(ctx: Context) -> None:
    n, res = ctx.scale.mysql_rows, ctx.results
    bodies = ceiling.payloads(n, db="sql-mysql")
    pipe: list[Run] = []
    ceil: list[Run] = []
    for r in range(1, ctx.scale.rounds + 1):
        ceil.append(_ceiling(ctx, bodies, n, batch=False, key="4"))
        pipe.append(_my_run(ctx, n, 3_000_000_000 + r))
        print(f"  round {r}/{ctx.scale.rounds}: {pipe[-1].rate:,.0f} vs ceiling "
              f"{ceil[-1].rate:,.0f} events/s", flush=True)
    fig, c = _median([x.rate for x in pipe]), _median([x.rate for x in ceil])
    res.rows.append(Row("4", f"MariaDB -> webhook, 1 event/POST, {n:,} inserts", fig,
                        "events/s", c, _ceiling_what(),
                        "(none set; 1's is >= 0.9 x ceiling)", None, "",
                        [x.rate for x in pipe]))
    _run_notes(res, "4", pipe, ceil)
    _client_notes(res, "4")
    if fig < TARGET_RATIO * c:
        res.missed["4"] = "MariaDB throughput"


# -- scenario 5 --------------------------------------------------------------------


class _RssSampler(threading.Thread):
    def __init__(self, proc: Dbevents, every: float = 0.5) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.proc, self.every = proc, every
        self.samples: list[tuple[float, float]] = []
        self.started = time.monotonic()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.every):
            try:
                self.samples.append((time.monotonic() - self.started, self.proc.rss_mb()))
            except OSError:
                return

    def stop(self) -> None:
        self._halt.set()
        self.join()


def backlog(ctx: Context) -> None:
    for store in ctx.stores:
        _backlog(ctx, store)


def _backlog(ctx: Context, store: str) -> None:
    assert ctx.pg is not None
    n, res = ctx.scale.backlog, ctx.results
    suffix, label = STORES[store]
    db = _name("backlog")
    workloads.pg_prepare(ctx.pg, db, seed=n)
    url, dsn, store_db = _store(ctx, store, "backlog")
    folder = ctx.tmp / db
    folder.mkdir()
    # Retries enough for any outage, and a short backoff cap, so draining starts
    # within half a second of the webhook coming back.
    cfg = workloads.config(url, workloads.pg_database(ctx.pg, db),
                           ctx.rx.url(), retries=1_000_000, backoff_base=100, backoff_max=500)
    ctx.rx.reset(status=503)
    proc = Dbevents(folder, cfg, ctx.log_level, store_dsn=dsn).start()
    sampler = _RssSampler(proc)
    sampler.start()
    try:
        time.sleep(1.0)
        idle = proc.rss_mb()
        t0 = time.monotonic()
        workloads.pg_mix(ctx.pg, db, n)
        written = time.monotonic() - t0
        _wait(lambda: proc.stored_events() >= n, f"{n:,} events stored", stall=120,
              progress=proc.stored_events)
        captured = time.monotonic() - t0
        peak_capture = proc.peak_rss_mb()
        down = ctx.rx.snapshot()
        switched = ctx.rx.set_status(200)
        cpu = proc.cpu_seconds()
        snap = ctx.rx.wait_events(n, stall=120)
        cpu = proc.cpu_seconds() - cpu
        peak_total = proc.peak_rss_mb()
    finally:
        try:
            sampler.stop()
        finally:
            code = proc.stop()
            ctx.pg.drop_database(db)
            if store_db is not None:
                ctx.pg.drop_database(store_db)
    if code != 0:
        raise RuntimeError(f"dbevents exited {code}:\n{proc.tail()}")
    assert snap.last is not None
    drain = n / (snap.last - switched)
    if store == "sqlite" or not res.rss_timeline:  # the plot shows one: SQLite's
        res.rss_timeline = sampler.samples
        res.backlog_switch = switched - sampler.started
    # The webhook ceiling again, right after, on the same receiver.
    m = min(n, ctx.scale.changes)
    ceil = _ceiling(ctx, ceiling.payloads(m), m, batch=False, key="5")
    met_rss = peak_capture <= TARGET_RSS_MB
    res.rows.append(Row("5 rss" + suffix,
                        f"backlog of {n:,} changes, webhook down: peak RSS, {label}",
                        peak_capture, "MB", idle, "RSS of the same process idle after start",
                        f"<= {TARGET_RSS_MB:.0f} MB", met_rss,
                        "" if met_rss else _miss(peak_capture, TARGET_RSS_MB, True)))
    want = res.pipeline_rate_1.get(store)
    met_drain = None if want is None else drain >= want
    res.rows.append(Row("5 drain" + suffix,
                        f"backlog of {n:,} drained once the webhook is back, {label}",
                        drain, "events/s", ceil.rate, _ceiling_what(),
                        f">= rate in 1 ({want:,.0f})" if want else ">= rate in 1 (not run)",
                        met_drain, "" if met_drain in (None, True) else
                        _miss(drain, want or 1)))
    if len(ctx.stores) > 1:
        res.note("5", f"**{label}**:")
    res.note("5", f"{n:,} single-row changes written in {written:.0f} s and stored by "
                  f"dbevents {captured:.0f} s after the writes began, while the receiver "
                  f"answered 503 ({down.refused:,} failed attempts meanwhile, each retried "
                  f"after at most 500 ms)")
    res.note("5", f"peak RSS {peak_capture:.0f} MB while capturing ({peak_total:.0f} MB "
                  f"including the drain), {idle:.0f} MB idle after start")
    res.note("5", f"drain: {n:,} events in {snap.last - switched:.1f} s from the switch back "
                  f"to 200, {cpu / n * 1e6:,.0f} µs CPU per event; ceiling "
                  f"{ceil.rate:,.0f} events/s")
    if not met_rss:
        res.missed["5 rss" + suffix] = "backlog memory"
    if met_drain is False:
        res.missed["5" + suffix] = "backlog drain"


def _wait(done: Callable[[], bool], what: str, stall: float,
          progress: Callable[[], int]) -> None:
    last, changed = -1, time.monotonic()
    while not done():
        now = progress()
        if now != last:
            last, changed = now, time.monotonic()
        elif time.monotonic() - changed > stall:
            raise TimeoutError(f"waiting for {what}: stuck at {now:,} for {stall:.0f} s")
        time.sleep(1.0)


# -- scenario 6 --------------------------------------------------------------------

_OPS = (("DB_INSERT", 0), ("DB_UPDATE", 1), ("DB_DELETE", 2))


def pgbench(ctx: Context) -> None:
    assert ctx.pg is not None
    res, seconds = ctx.results, ctx.scale.pgbench_seconds
    db = workloads.pgbench_init(ctx.pg, _name("pgbench"), scale=1)
    tables = workloads.PGBENCH_TABLES
    folder = ctx.tmp / db
    folder.mkdir()
    try:
        workloads.pg_prepare(ctx.pg, db, seed=0, tables=", ".join(tables), ddl="",
                             create=False)
        before = workloads.table_counters(ctx.pg, db)
        cfg = workloads.config("sqlite:///events.db", workloads.pg_database(ctx.pg, db),
                               ctx.rx.url(), tables=list(tables))
        ctx.rx.reset(record=True)
        proc = Dbevents(folder, cfg, ctx.log_level).start()
        try:
            bench = workloads.pgbench_run(ctx.pg, db, seconds, clients=2)
            ended = time.monotonic()
            after = _settled_counters(ctx.pg, db)
            expected = {(t, op): after[t][i] - before.get(t, (0, 0, 0))[i]
                        for t in tables for op, i in _OPS
                        if after[t][i] - before.get(t, (0, 0, 0))[i]}
            total = sum(expected.values())
            t0 = time.monotonic()
            ctx.rx.wait_events(total, stall=120)
            time.sleep(2.0)  # anything beyond the expected count would show up now
            snap = ctx.rx.snapshot()
            drained = time.monotonic() - t0
        finally:
            code = proc.stop()
        history = ctx.pg.execute("SELECT count(*) FROM pgbench_history", dbname=db)[0][0]
    finally:
        ctx.pg.drop_database(db)
    if code != 0:
        raise RuntimeError(f"dbevents exited {code}:\n{proc.tail()}")
    txns = int(bench["transactions"])
    got_total = sum(snap.kinds.values())
    match = snap.kinds == expected and snap.duplicates == 0
    res.rows.append(Row("6", f"pgbench TPC-B-like, {seconds} s, 2 clients: events delivered",
                        got_total, "events", total, "changes PostgreSQL counted "
                        "(pg_stat_user_tables)", "every change, once", match,
                        "" if match else "counts differ"))
    res.note("6", f"pgbench: {txns:,} transactions, {bench['tps']:,.0f} tps; "
                  f"pgbench_history holds {history:,} rows "
                  f"({'=' if history == txns else '!='} transactions)")
    res.note("6", "per table and operation (delivered / PostgreSQL's count):")
    for key in sorted(set(expected) | set(snap.kinds)):
        ok = "ok" if snap.kinds.get(key, 0) == expected.get(key, 0) else "MISMATCH"
        res.note("6", f"  {key[0]} {key[1]}: {snap.kinds.get(key, 0):,} / "
                      f"{expected.get(key, 0):,} {ok}")
    res.note("6", "last event of each kind received, seconds after pgbench ended: " + ", ".join(
        f"{t.removeprefix('pgbench_')} {op.removeprefix('DB_').lower()} {last - ended:.1f}"
        for (t, op), last in sorted(snap.kind_last.items(), key=lambda kv: kv[1])))
    res.note("6", f"duplicates at the receiver: {snap.duplicates}; the backlog left when "
                  f"pgbench ended took {drained:.1f} s to deliver "
                  f"({snap.events / max(drained, 1e-9):,.0f} events/s over that wait)")
    if not match:
        res.missed["6"] = "pgbench counts"


def _settled_counters(pg: PostgresServer, db: str) -> dict[str, tuple[int, int, int]]:
    """Table counters once they stop moving (backends report them at exit)."""
    last = workloads.table_counters(pg, db)
    for _ in range(20):
        time.sleep(0.5)
        now = workloads.table_counters(pg, db)
        if now == last:
            return now
        last = now
    return last


# -- profiles where a target was missed ------------------------------------------


def profile_missed(ctx: Context, out_dir: Path) -> None:
    """Run each missed scenario once more (not counted) with py-spy on the
    dbevents process, and keep its top functions."""
    res = ctx.results
    n = min(ctx.scale.changes, 50_000)
    jobs: dict[str, Callable[[Path], object]] = {}
    if "1" in res.missed or "5" in res.missed:
        jobs["1"] = lambda p: _pg_run(ctx, n, 1, p)
    if "2" in res.missed:
        jobs["2"] = lambda p: _pg_run(ctx, n, BATCH, p)
    if "3" in res.missed:
        jobs["3"] = lambda p: _latency_run(ctx, min(ctx.scale.latency_seconds, 30.0), p)
    if "4" in res.missed and ctx.my is not None:
        jobs["4"] = lambda p: _my_run(ctx, min(ctx.scale.mysql_rows, 20_000), 3_999_999_999, p)
    for key, job in jobs.items():
        raw = out_dir / f"profile-{key}.txt"
        print(f"  profiling scenario {key} ({raw})", flush=True)
        try:
            job(raw)
        except Exception as exc:
            res.note(key, f"profile run failed: {exc}")
            continue
        if not raw.exists():
            res.note(key, "py-spy wrote no profile")
            continue
        res.profiles[key] = summarise_profile(raw)
