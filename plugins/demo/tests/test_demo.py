"""`dbevents demo` as a user runs it: a separate process, real embedded
PostgreSQL, real receiver; then again on the same folder, resuming."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def demo_until(folder: Path, out: Path, done: Callable[[str], bool],
               limit: float = 300) -> str:
    """Run `dbevents demo` until its output satisfies ``done``, then stop it the
    way a user does (Ctrl-C) and return its whole output. Not on a timer: under
    load the `dbevents run` child can take many seconds just to start.

    Ctrl-C in a terminal sends SIGINT to the whole foreground process group, so
    the demo runs in a group of its own and the signal goes to that group. One
    Ctrl-C must give one graceful stop: the `run` child drains (no "second
    signal"), and nothing prints a traceback or an error block."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DBEVENTS_CONFIG", None)
    run_log = folder / "dbevents.log"
    log_start = run_log.stat().st_size if run_log.exists() else 0
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dbevents.cli", "demo", "--dir", str(folder),
             "--every", "0.4"],
            stdout=sink, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True)
    try:
        deadline = time.monotonic() + limit
        while not done(_complete(out)):
            assert proc.poll() is None, f"the demo exited {proc.returncode}:\n{out.read_text()}"
            assert time.monotonic() < deadline, f"not seen in {limit} s:\n{out.read_text()}"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    text = out.read_text()
    assert code == 0, text
    for bad in ("Traceback", "Exception ignored", "ERROR", "WARNING", "KeyboardInterrupt"):
        assert bad not in text, text
    assert "events list" in text.rstrip().splitlines()[-1], text  # the demo's own goodbye
    with run_log.open("rb") as f:
        f.seek(log_start)
        run_lines = [json.loads(line) for line in f.read().decode().splitlines()]
    said = [line["event"] for line in run_lines]
    assert sum(e.startswith("stopping:") for e in said) == 1, said
    assert not any("second signal" in e for e in said), said
    assert all(line["level"] not in ("error", "critical") for line in run_lines), run_lines
    return text


def _complete(out: Path) -> str:
    """The output's complete lines (the demo may be mid-line)."""
    text = out.read_text(errors="replace")
    return text[: text.rfind("\n") + 1]


def payloads(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("  {")]


def events(folder: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "dbevents.cli", "--config", str(folder / "dbevents.toml"),
         "events", "list", "--json", "--limit", "100000"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


FIRST_RUN = ("DB_INSERT users", "DB_UPDATE users", "DB_DELETE users", "200 OK",
             "500 on purpose (attempt 1 of 3)", "the event is now 'failed'")


def test_demo_shows_deliveries_retries_and_resumes(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    out = demo_until(folder, tmp_path / "first.out",
                     lambda text: all(w in text for w in FIRST_RUN))
    for kind in ("DB_INSERT", "DB_UPDATE", "DB_DELETE"):
        assert f"{kind} users" in out and "200 OK" in out
    assert "500 on purpose (attempt 1 of 3)" in out
    assert "the event is now 'failed'" in out
    # Each delivery's line shows its latency: event time to arrival, in ms.
    deliveries = [line for line in out.splitlines() if line.startswith("DB_")]
    latencies = [re.search(r"  attempt \d+  latency (-?\d+) ms  ", line) for line in deliveries]
    assert deliveries and all(latencies), deliveries
    # Commit time and arrival share this machine's clock: small and not negative
    # (bar the commit time's rounding to the millisecond).
    assert all(-1 <= int(m.group(1)) < 300_000 for m in latencies if m), deliveries
    first_payloads = payloads(out)
    assert first_payloads and all(p["specversion"] == "1.0" for p in first_payloads)
    assert (folder / "dbevents.toml").exists() and (folder / "dbevents.db").exists()
    assert not _postgres_running(folder), "the demo stops its PostgreSQL"
    before = events(folder)
    assert any(e["status"] == "failed" for e in before)
    known = {e["id"] for e in before}

    # Again on the same folder: runs until an event captured after resuming
    # (one the first run never stored) has been delivered.
    demo_until(folder, tmp_path / "second.out",
               lambda text: any(p["id"] not in known for p in payloads(text)))
    after = events(folder)
    ids = [e["id"] for e in after]
    assert len(ids) == len(set(ids))  # resumed: nothing stored twice
    assert len(after) > len(before)  # and new changes kept coming
    assert known <= set(ids)
    assert not _postgres_running(folder)


def _postgres_running(folder: Path) -> bool:
    found = subprocess.run(["pgrep", "-f", f"postgres -D {folder / 'pgdata'}"],
                           capture_output=True)
    return found.returncode == 0
