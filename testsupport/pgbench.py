"""pgbench against a private PostgreSQL (testsupport.servers.PostgresServer):
the binary from the server's own bin directory, initialised and run as a client
over TCP. Shared by the end-to-end tests and the benchmarks."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testsupport.servers import PostgresServer

TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")


@dataclass(frozen=True)
class Result:
    transactions: int  # committed ("actually processed")
    failed: int
    tps: float
    output: str


def init(server: PostgresServer, db: str, scale: int) -> None:
    """`pgbench -i -q -s scale` on an existing database."""
    subprocess.run([str(server.bindir / "pgbench"), "-i", "-q", "-s", str(scale),
                    server.dsn(db)], check=True, capture_output=True)


def start(server: PostgresServer, db: str, *args: str) -> subprocess.Popen[str]:
    """pgbench's built-in TPC-B-like script in the background, with ``args``
    (e.g. "-c", "2", "-T", "10"). Always -n: no vacuum (it would TRUNCATE
    pgbench_history, a change of another kind than the script's)."""
    return subprocess.Popen([str(server.bindir / "pgbench"), "-n", *args, server.dsn(db)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait(proc: subprocess.Popen[str], timeout: float | None = None) -> Result:
    """Wait for a started pgbench; raise unless it ended cleanly with no failed
    transaction."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench exited {proc.returncode}:\n{out}\n{err}")
    txns = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    tps = re.search(r"tps = ([\d.]+)", out)
    if not txns or not tps:
        raise RuntimeError(f"unexpected pgbench output:\n{out}\n{err}")
    result = Result(int(txns.group(1)), int(failed.group(1)) if failed else 0,
                    float(tps.group(1)), out)
    if result.failed:
        raise RuntimeError(f"pgbench: {result.failed} failed transactions:\n{out}")
    return result


def run(server: PostgresServer, db: str, *args: str) -> Result:
    """As start(), waiting for the end."""
    return wait(start(server, db, *args))
