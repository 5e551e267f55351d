"""The table on the terminal, docs/benchmarks.md and docs/benchmarks.png."""

from __future__ import annotations

import math
import os
import platform
import sqlite3
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench import http_clients
from bench.e2e.scenarios import TARGET_BATCH_RATE, TARGET_P50_MS, TARGET_P99_MS, Results, Row, Scale

METHOD = {
    "1": "A private PostgreSQL (testsupport.servers.PostgresServer) gets a table seeded "
         "before capture starts, then a publication and a slot, then N single-row "
         "transactions from a server-side loop (per ten: 5 inserts of new rows, 3 updates "
         "and 2 deletes of seeded rows; every change touches a different row). Then "
         "`dbevents run` starts as its own process (the trigger's defaults: concurrency "
         "16, one event per POST, the webhook sink's default transport, log level info to "
         "a file) and delivers to the receiver, an aiohttp server in its own process. It "
         "runs once with the SQLite store (a file in a temp folder) and once with the "
         "PostgreSQL store (a fresh database, schema `dbevents`, on the same private server "
         "as the source), rows marked `pg`. The figure is events per second from the "
         "first receipt to the last, so it measures dbevents (capture, store, dispatch, "
         "POST) rather than the writer or the start-up. The ceiling: every bare HTTP client "
         "installed (bench/http_clients.py: aiohttp with the sink's pool settings, and each "
         "native client the environment has) POSTing N pre-built payloads of the same "
         "shape to the same receiver, 16 in flight; the fastest of them in each round is "
         "that round's ceiling. Ceiling and dbevents alternate in rounds; medians are "
         "reported.",
    "2": "As 1 with `batch_size = 100` (every POST an array of up to 100 events), with "
         "both stores; the ceiling POSTs the same payloads as 100-event arrays.",
    "3": "A writer thread commits changes at a fixed rate, one transaction each, to a "
         "table with REPLICA IDENTITY FULL (so a delete carries the old row); each row has "
         "a `seq` column set to a number unique per change. The writer notes its wall "
         "clock just before sending COMMIT under the key type:docId:seq; the receiver "
         "notes its wall clock at receipt under the key it rebuilds from the event (the "
         "event's `time` has only millisecond precision, so it is not used). Latency is "
         "receipt minus commit; a 2 s warm-up is left out. The floor: a bare aiohttp "
         "client POSTing at the same rate to the same receiver, its clock before each "
         "POST against the receipt.",
    "4": "A private MariaDB (testsupport.servers.MariaDBServer: row binlog, full row "
         "image and metadata) gets N single-row INSERTs, each its own transaction (200 "
         "statements per round trip), after the binlog position is noted; dbevents then "
         "starts from that position (`start = \"FILE:POS\"`) and is timed as in 1, with "
         "the same kind of ceiling (MySQL-shaped payloads).",
    "5": "The receiver answers 503 while N single-row changes (the mix of 1) are "
         "written and captured; the trigger has `retries = 1000000`, `backoff_base = "
         "100`, `backoff_max = 500`, so nothing fails for good and retries come at most "
         "0.5 s apart. Peak RSS is the dbevents process's VmHWM (/proc/PID/status) once "
         "every event is in the eventing DB; the reference is its RSS idle after start. "
         "Then the receiver answers 200 again and the drain rate is N over the time from "
         "that switch to the last receipt. Its ceiling is the bare clients as in 1, "
         "measured right after. It runs with each store, as 1.",
    "6": "`pgbench -i -s 1`, then a publication on pgbench_accounts, _branches, _tellers "
         "and _history and a slot, then dbevents watching those four tables, then `pgbench "
         "-n -T SECONDS -c 2` (the built-in TPC-B-like script; -n skips its VACUUM, which "
         "would TRUNCATE pgbench_history). The receiver parses every event and counts it "
         "per table and type, deduplicated by id; PostgreSQL's own counts are the changes "
         "of pg_stat_user_tables (n_tup_ins, n_tup_upd, n_tup_del) over the run, checked "
         "against pgbench's transaction count and the rows in pgbench_history. Per-row "
         "order shapes the delivery here: at scale 1 pgbench_branches has one row, and "
         "pgbench_history has no primary key (its events' docId is null, and dbevents "
         "orders them as one row), so the events of each of those two go out one at a "
         "time, while those of accounts and tellers go out 16 at a time.",
}


# What the evidence above (profiles, log and store figures in the notes) says
# about a missed target, and what would move it; shown only for a scenario that
# missed. Mechanisms, not numbers: the numbers are this run's, above.
READING = {
    "1": "One event per POST costs dbevents several times the bare client's CPU per "
         "event (notes of 1), spread over three threads that share the GIL: the event "
         "loop, the webhook sink's curl thread (the default `transport = \"pycurl\"`: "
         "libcurl does the connection work there, outside the interpreter) and, with "
         "SQLite, the store's one-thread executor (the PostgreSQL store runs on the "
         "event loop itself). Events are delivered from memory (`enqueue_held` stores "
         "them leased to this process and the dispatcher never reads them back) and "
         "results are recorded in batches written by event id (`finish`). No one part "
         "dominates any more, and the event loop is no longer on a CPU all the time "
         "(notes of 1): on it, capture (pgoutput decoding, matching, the CloudEvents "
         "envelope), the dispatcher's per-attempt verdict and invocation-log values, "
         "asyncio's scheduling around each hand-off, and the one JSON `delivery` log line "
         "per POST; beside it, the curl thread's Python callbacks and the store's "
         "INSERT and UPDATE per event. On this 2-core machine PostgreSQL's walsender and "
         "the receiver run on the same cores. py-spy samples a thread that waits to "
         "take the GIL back at the line it waits on, so shares include such waits; the "
         "CPU split by thread in the notes (from /proc) does not. What would move it: "
         "fewer Python steps per event on each of the three threads (capture decoding "
         "and the envelope in compiled code, a smaller `finish` write).",
    "2": "With 100 events per POST the webhook side is nearly free (the ceiling is far "
         "above). What is left per event is capture on the event loop (pgoutput "
         "decoding, matching, the envelope's JSON and id) and, on the store's side, the "
         "event's INSERT (`enqueue_held`) and its result (`finish`: an UPDATE of the row "
         "by id and an attempt row), each with its partial indexes kept current; the "
         "profile shows which of the two threads is busier. 50,000 events/s needs about "
         "20 µs per event over all of it on this machine: e.g. the delivery state kept "
         "apart from the payload row (an UPDATE then rewrites a few bytes), attempts of "
         "one request recorded as one row, and decoding and the envelope built in one "
         "pass per row.",
    "3": "The median is inside its target; the tail is what misses. The notes of 3 "
         "locate it: when the slowest changes happened (in bursts, or spread out), how "
         "many of them were in flight during a WAL checkpoint of the store (the SQLite "
         "store checkpoints every 10,000 WAL pages, `WAL_AUTOCHECKPOINT` in "
         "plugins/stores/sqlite/src/dbevents_store_sqlite/connection.py, on the commit that "
         "crosses it, on its only thread) or a GC pause, and which part of the path their "
         "time went to: commit -> stored (the source, the engine's queue, the enqueue "
         "transaction waiting its turn on the store thread) or stored -> receipt (the "
         "dispatcher's claim, also on the store thread, and the POST). The floor's own "
         "p99 and max show what the shared 2-core machine adds by itself.",
    "4": "The MariaDB path shares everything after the source with 1 (store, dispatcher, "
         "sink), and its profile looks the same; see 1.",
}


def machine(pg_version: str | None, my_version: str | None) -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "postgresql": pg_version or "not run",
        "mariadb": my_version or "not run",
        "sqlite": sqlite3.sqlite_version,
        "aiohttp": version("aiohttp"),
        **{name: _version_of(name) for name in http_clients.installed() if name != "aiohttp"},
    }


def _version_of(client: str) -> str:
    try:
        return version(client.split("+")[-1])
    except PackageNotFoundError:
        return "?"


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "events/s":
        return f"{value:,.0f}/s"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"
    if unit == "MB":
        return f"{value:.0f} MB"
    return f"{value:,.0f}"


def _verdict(row: Row) -> str:
    if row.met is None:
        return "-"
    return "met" if row.met else f"MISSED ({row.miss})"


def _ratio(row: Row) -> str:
    ratio = row.ratio
    return "-" if ratio is None else f"{ratio:.2f}"


def table(rows: list[Row]) -> str:
    head = ("#", "figure", "dbevents", "ceiling", "ratio", "target", "result")
    body = [(r.key, r.what, _fmt(r.figure, r.unit), _fmt(r.ceiling, r.unit), _ratio(r),
             r.target, _verdict(r)) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i in (0, 1, 5, 6) else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(x, widths, strict=True))).rstrip()
             for x in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(results: Results, scale: Scale, ran: list[str], info: dict[str, str],
             command: str, started: datetime, load: tuple[float, float],
             plot: Path | None) -> str:
    out = ["# Benchmarks", "",
           "End-to-end figures of dbevents on one machine, each next to a ceiling measured "
           "in the same run (issue 9). Written by `python -m bench`; rerun it to refresh "
           "this page. Targets are what we aim for; no benchmark is a test assertion. The "
           "machine is shared with other jobs (see the load averages), so ceilings are "
           "measured in the same run, interleaved with the runs they bound, and rounds are "
           "reported as medians.", "",
           f"- run: `{command}` on {started:%Y-%m-%d %H:%M} UTC",
           f"- scale: **{scale.name}**: {_sizes(scale)}" + (
               "" if scale.name == "full" else " (issue 9's sizes: `--full`)"),
           f"- scenarios run: {', '.join(ran)}",
           "", "## Machine", ""]
    out += [f"- {k}: {v}" for k, v in info.items()]
    out += [f"- load average (1 min): {load[0]:.2f} at the start, {load[1]:.2f} at the end",
            "", "## Results", "", "| # | figure | dbevents | ceiling | ratio | target | result |",
            "|---|---|--:|--:|--:|---|---|"]
    for r in results.rows:
        out.append(f"| {r.key} | {r.what} | {_fmt(r.figure, r.unit)} | "
                   f"{_fmt(r.ceiling, r.unit)} | {_ratio(r)} | {r.target} | {_verdict(r)} |")
    ceilings: dict[str, dict[str, None]] = {}
    for r in results.rows:
        # The four latency rows share one floor: name it once, as "3".
        key = "3" if r.key.startswith("3 ") else r.key
        ceilings.setdefault(r.ceiling_what, {})[key] = None
    out += ["", "Ceilings: " + "; ".join(
        f"{', '.join(keys)}: {what}" for what, keys in ceilings.items()) + ".",
            "Ratio = dbevents / ceiling (for latency, how many times the floor)."]
    if plot is not None:
        out += ["", f"![throughput, latency and backlog memory]({plot.name})"]
    out += ["", "## How each figure is measured", ""]
    for key in ("1", "2", "3", "4", "5", "6"):
        if key not in ran:
            continue
        out += [f"**{key}.** {METHOD[key]}", ""]
        out += [f"- {n.strip()}" if not n.startswith("  ") else f"  - {n.strip()}"
                for n in results.notes.get(key, [])]
        out.append("")
    out += missed_section(results)
    return "\n".join(out).rstrip() + "\n"


def _sizes(scale: Scale) -> str:
    return (f"{scale.changes:,} changes for 1 and 2 ({scale.rounds} rounds each), "
            f"{scale.latency_rate:.0f} changes/s for {scale.latency_seconds:.0f} s, "
            f"{scale.mysql_rows:,} MariaDB inserts, a backlog of {scale.backlog:,}, "
            f"pgbench for {scale.pgbench_seconds} s")


def missed_section(results: Results) -> list[str]:
    missed = [r for r in results.rows if r.met is False]
    if not missed:
        return ["## Targets", "", "Every target with a verdict was met in this run.", ""]
    out = ["## Missed targets and where the time goes", ""]
    for r in missed:
        out.append(f"- **{r.key}** {r.what}: {_fmt(r.figure, r.unit)} against "
                   f"{r.target}: {r.miss}.")
    out.append("")
    for key, prof in results.profiles.items():
        out += [f"### Profile of scenario {key}", "",
                f"py-spy sampling the `dbevents run` process ({prof['samples']:,} busy samples "
                f"at 200 Hz, without pausing it; a further {prof['idle']:.0%} of samples were "
                "waits in epoll or in the store thread's queue, left out below) during a separate, "
                "uncounted run of the scenario. By thread: " + ", ".join(
                    f"{t} {s:.0%}" for t, s in prof["threads"]) + ". By library or part "
                "of dbevents (where the sampled frame's own code is; time in C, such as "
                "SQLite or a socket call, counts for the Python code calling it):", ""]
        out += [f"- {area}: {share:.0%}" for area, share in prof["areas"]]
        if prof.get("loop_areas"):
            out += ["", "The event-loop thread alone: " + ", ".join(
                f"{area} {share:.0%}" for area, share in prof["loop_areas"]) + "."]
        out += ["", "Top functions by own time (inclusive time in brackets):", "",
                "| own | incl. | function |", "|--:|--:|---|"]
        out += [f"| {own:.1%} | {incl:.1%} | `{name}` |"
                for name, own, incl in prof["functions"]]
        out.append("")
    keys = [k for k in ("1", "2", "3", "4") if any(
        r.met is False and r.key.split()[0] == k for r in results.rows)
        or k in results.profiles]
    if "5" in {r.key.split()[0] for r in missed} and "1" not in keys:
        keys.insert(0, "1")  # the drain runs the same path as 1
    if keys:
        out += ["### Reading", ""]
        out += [f"- **{k}.** {READING[k]}" for k in keys] + [""]
    return out


def plot(results: Results, path: Path) -> Path | None:
    """Throughput bars, the latency distribution and the backlog's RSS; None
    when matplotlib is not installed (`uv run --group bench ...` brings it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    bars = [r for r in results.rows if r.unit == "events/s"]
    panels = [p for p, has in (("tput", bars), ("lat", results.latencies),
                               ("rss", results.rss_timeline)) if has]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "tput":
            _bars(ax, bars)
        elif panel == "lat":
            _latency(ax, results)
        else:
            _rss(ax, results)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax: Any, rows: list[Row]) -> None:
    x = list(range(len(rows)))
    width = 0.38
    mine = ax.bar([i - width / 2 for i in x], [r.figure for r in rows], width,
                  label="dbevents", color="#3b7dd8")
    ceil = ax.bar([i + width / 2 for i in x], [r.ceiling or 0 for r in rows], width,
                  label="ceiling (fastest bare client)", color="#bbbbbb")
    for group in (mine, ceil):
        for bar in group:
            h = bar.get_height()
            ax.annotate(f"{h:,.0f}", (bar.get_x() + bar.get_width() / 2, h), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(x, [{"1": "1: 1/POST", "2": "2: batch 100", "4": "4: MariaDB",
                       "5 drain": "5: drain", "1 pg": "1: pg store",
                       "2 pg": "2: pg store", "5 drain pg": "5: drain, pg store",
                       }.get(r.key, r.key) for r in rows], fontsize=7, rotation=20)
    for i, r in enumerate(rows):
        if r.key.split()[0] == "2":
            ax.hlines(TARGET_BATCH_RATE, i - 0.45, i + 0.45, colors="#d83b3b",
                      linestyles="--", linewidth=0.8)
            ax.annotate(f"target {TARGET_BATCH_RATE:,.0f}", (i, TARGET_BATCH_RATE),
                        fontsize=7, color="#d83b3b", ha="center", va="bottom")
    ax.set_yscale("log")
    ax.set_ylabel("events/s (log scale)")
    ax.set_title("Throughput (median of rounds)")
    ax.legend(fontsize=8, loc="upper left")


def _latency(ax: Any, results: Results) -> None:
    for values, label, color in ((results.latencies, "dbevents: commit -> receipt", "#3b7dd8"),
                                 (results.floor_latencies, "floor: bare POST -> receipt",
                                  "#999999")):
        if not values:
            continue
        ordered = sorted(max(v, 1e-3) for v in values)
        n = len(ordered)
        ax.plot(ordered, [(i + 1) / n for i in range(n)], label=label, color=color)
    for ms, text in ((TARGET_P50_MS, "p50 target"), (TARGET_P99_MS, "p99 target")):
        ax.axvline(ms, color="#d83b3b", linestyle="--", linewidth=0.8)
        ax.annotate(text, (ms, 0.35), rotation=90, fontsize=7, color="#d83b3b",
                    ha="right", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log scale)")
    ax.set_ylabel("fraction of changes")
    ax.set_title("Latency distribution (CDF), scenario 3")
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=8, loc="lower right")


def _rss(ax: Any, results: Results) -> None:
    xs = [t for t, _ in results.rss_timeline]
    ax.plot(xs, [m for _, m in results.rss_timeline], color="#3b7dd8", label="RSS")
    ax.axhline(200, color="#d83b3b", linestyle="--", linewidth=0.8, label="target 200 MB")
    if results.backlog_switch is not None:
        ax.axvline(results.backlog_switch, color="#2a9d4b", linewidth=0.8,
                   label="webhook back")
    ax.set_xlabel("seconds since dbevents started")
    ax.set_ylabel("MB")
    ax.set_ylim(bottom=0)
    ax.set_title("Backlog (scenario 5): dbevents RSS")
    ax.legend(fontsize=8)


def now() -> datetime:
    return datetime.now(UTC)
