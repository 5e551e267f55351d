"""End-to-end benchmarks of dbevents against this machine's own ceilings (issue 9).

    uv run --group bench python -m bench            # quick sizes (a few minutes)
    uv run --group bench python -m bench --full     # issue 9's sizes (much longer)
    uv run --group bench python -m bench --only 1,3 --no-report
    uv run --group bench python -m bench --only 1,2 --stores sqlite   # one store only
    uv run --group bench python -m bench --only 1 --transport aiohttp,pycurl   # A/B

Starts a private PostgreSQL and MariaDB (never the system services), a webhook
receiver in its own process, and `dbevents run` as its own process per run
(scenarios 1, 2 and 5 once with the SQLite store and once with the PostgreSQL
store, a fresh database on the private server; the ceilings are the fastest of
the bare HTTP clients installed, see bench/http_clients.py); prints a table of
each figure, its ceiling and the ratio, and writes
docs/benchmarks.md and docs/benchmarks.png. Where a target is missed, the
scenario runs once more under py-spy and the report names where the time goes.
Without the `bench` group (matplotlib) everything runs but the plot is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import re
import shlex
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from bench.e2e import report, scenarios
from bench.e2e.receiver import ReceiverProcess
from bench.e2e.scenarios import Context, Results
from testsupport.servers import MariaDBServer, PostgresServer

ROOT = Path(__file__).resolve().parent.parent
ALL = ["1", "2", "3", "4", "5", "6"]


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description=(__doc__ or "").splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="scale", action="store_const", const="quick",
                      help="smaller sizes (the default)")
    size.add_argument("--full", dest="scale", action="store_const", const="full",
                      help="issue 9's sizes: 100k changes, 60 s latency, 50k MariaDB "
                           "inserts, a 1M backlog")
    parser.set_defaults(scale="quick")
    parser.add_argument("--scale", dest="scale", choices=sorted(scenarios.SCALES),
                        help="the same as --quick / --full")
    parser.add_argument("--only", default=",".join(ALL),
                        help="comma-separated scenarios to run (default: all)")
    parser.add_argument("--rounds", type=int, help="rounds of 1, 2 and 4 (default by scale)")
    parser.add_argument("--transport", default="",
                        help="comma-separated webhook transports for scenario 1, run "
                             "interleaved in each round; the first gives the figure "
                             "(default: the webhook sink's default)")
    parser.add_argument("--stores", default=",".join(scenarios.STORES),
                        help="eventing-DB stores for 1, 2 and 5, comma-separated "
                             "(default: sqlite,postgres; the PostgreSQL store gets a "
                             "database on the same private server as the source)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="dbevents' log level (its log goes to a file)")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the py-spy runs of scenarios that missed a target")
    parser.add_argument("--profiles", type=Path,
                        help="keep py-spy's raw stacks in this folder (default: a temp one)")
    parser.add_argument("--no-report", action="store_true",
                        help="print only; leave docs/benchmarks.* as they are")
    parser.add_argument("--save", type=Path,
                        help="also pickle the results here (for --render)")
    parser.add_argument("--render", type=Path,
                        help="run nothing: write the report from results saved by --save")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs",
                        help="where benchmarks.md and benchmarks.png go")
    return parser.parse_args()


def main() -> int:
    args = _args()
    # A SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so the private servers
    # and dbevents processes are stopped by their context managers, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.render:
        with args.render.open("rb") as f:
            saved = pickle.load(f)
        print(report.table(saved["results"].rows))
        parts = shlex.split(saved["command"])
        saved["command"] = _command(parts[parts.index("-m") + 2:])
        _write(args.docs, **saved)
        return 0
    scale = scenarios.SCALES[args.scale]
    if args.rounds:
        scale = scenarios.Scale(**{**scale.__dict__, "rounds": args.rounds})
    ran = [k for k in ALL if k in {s.strip() for s in args.only.split(",")}]
    started, load_start = report.now(), os.getloadavg()[0]
    command = _command(sys.argv[1:])
    # Only warnings of the libraries this process uses (psycopg, aiohttp).
    logging.basicConfig(level=logging.WARNING)
    print(f"dbevents end-to-end benchmarks, {scale.name} scale, scenarios "
          f"{', '.join(ran)}; {os.cpu_count()} cores, load average {load_start:.2f}",
          flush=True)

    results = Results()
    versions: dict[str, str | None] = {"pg": None, "my": None}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dbevents-bench-")))
        rx = stack.enter_context(ReceiverProcess())
        stores = tuple(x for x in scenarios.STORES if x in args.stores.split(","))
        ctx = Context(scale=scale, rx=rx, tmp=tmp, log_level=args.log_level, results=results,
                      stores=stores or ("sqlite",),
                      transports=tuple(t.strip() for t in args.transport.split(",")
                                       if t.strip()))
        if set(ran) & {"1", "2", "3", "5", "6"}:
            # A WAL backlog of a million changes must not force checkpoints mid-run.
            ctx.pg = stack.enter_context(PostgresServer({"max_wal_size": "4GB"}))
            versions["pg"] = str(ctx.pg.execute("SHOW server_version")[0][0])
        if "4" in ran:
            ctx.my = stack.enter_context(MariaDBServer())
            versions["my"] = str(ctx.my.execute("SELECT VERSION()")[0][0])
        steps: list[tuple[str, str, Callable[[], None]]] = [
            ("1,2", "throughput, PostgreSQL",
             lambda: scenarios.throughput(ctx, set(ran) & {"1", "2"})),
            ("3", "latency", lambda: scenarios.latency(ctx)),
            ("4", "throughput, MariaDB", lambda: scenarios.mariadb(ctx)),
            ("5", "backlog", lambda: scenarios.backlog(ctx)),
            ("6", "pgbench", lambda: scenarios.pgbench(ctx)),
        ]
        failed: list[str] = []
        for keys, title, step in steps:
            if not set(keys.split(",")) & set(ran):
                continue
            print(f"\n[{keys}] {title}", flush=True)
            t0 = time.monotonic()
            try:
                step()
            except Exception as exc:  # one broken scenario must not hide the others
                traceback.print_exc()
                failed.append(keys)
                for key in keys.split(","):
                    if key in ran:
                        results.note(key, f"FAILED: {type(exc).__name__}: {exc}")
            print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)
        if results.missed and not args.no_profile:
            print("\n[profiles] scenarios that missed a target, under py-spy", flush=True)
            if args.profiles:
                args.profiles.mkdir(parents=True, exist_ok=True)
            scenarios.profile_missed(ctx, args.profiles or tmp)
            _print_profiles(results)

    print("\n" + report.table(results.rows))
    load_end = os.getloadavg()[0]
    print(f"\nload average {load_start:.2f} at the start, {load_end:.2f} at the end")
    saved = {"results": results, "scale": scale, "ran": ran,
             "info": report.machine(versions["pg"], versions["my"]), "command": command,
             "started": started, "load": (load_start, load_end)}
    if args.save:
        with args.save.open("wb") as f:
            pickle.dump(saved, f)
    if not args.no_report:
        _write(args.docs, **saved)
    return 1 if failed else 0


def _command(argv: list[str]) -> str:
    """The command as the report shows it: without the options that only say
    where files went on this machine."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--profiles", "--save", "--docs", "--render"):
            skip = True
        elif not arg.startswith(("--profiles=", "--save=", "--docs=", "--render=")):
            out.append(arg)
    return shlex.join(["uv", "run", "--group", "bench", "python", "-m", "bench", *out])


def _write(docs: Path, results: Results, scale: scenarios.Scale, ran: list[str],
           info: dict[str, str], command: str, started: datetime,
           load: tuple[float, float]) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    png = report.plot(results, docs / "benchmarks.png")
    if png is None:
        print("matplotlib missing: no plot (run with `uv run --group bench ...`)")
    md = report.markdown(results, scale, ran, info, command, started, load, png)
    path = docs / "benchmarks.md"
    # Sections written by hand or by other benches (bench/workers.py) sit between
    # <!-- NAME: begin --> and <!-- NAME: end --> markers: kept, in their order.
    old = path.read_text() if path.exists() else ""
    kept = [m.group(0) for m in re.finditer(
        r"<!-- ([^>]+?): begin -->.*?<!-- \1: end -->", old, re.S)]
    if kept:
        md = md.rstrip("\n") + "\n\n" + "\n\n".join(kept) + "\n"
    path.write_text(md)
    print(f"wrote {docs / 'benchmarks.md'}" + (f" and {png}" if png else ""))


def _print_profiles(results: Results) -> None:
    for key, prof in results.profiles.items():
        print(f"  scenario {key}: {prof['samples']:,} samples; by thread: " + ", ".join(
            f"{t} {s:.0%}" for t, s in prof["threads"]) + "; by area: " + ", ".join(
            f"{a} {s:.0%}" for a, s in prof["areas"][:6]))
        for name, own, incl in prof["functions"][:10]:
            print(f"    {own:6.1%} own {incl:6.1%} incl  {name}")


if __name__ == "__main__":
    sys.exit(main())
