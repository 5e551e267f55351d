"""`dbevents run` as its own process (as a deployment runs it), its memory and CPU
read from /proc, and a py-spy profile of it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parents[2]


class Dbevents:
    """One `dbevents run` with its own config, SQLite store and log in ``folder``."""

    def __init__(self, folder: Path, config: str, log_level: str = "info",
                 gc_log: Path | None = None, store_dsn: str | None = None) -> None:
        self.folder = folder
        # The PostgreSQL store's database (its `dbevents` schema), when the
        # config names that store instead of the SQLite file in ``folder``.
        self.store_dsn = store_dsn
        self.config = folder / "dbevents.toml"
        self.config.write_text(config)
        self.log = folder / "dbevents.log"
        self.store = folder / "events.db"
        self.log_level = log_level
        self.gc_log = gc_log  # run under bench.e2e.gcwatch, GC pauses to this file
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0  # time.monotonic() when the process was launched
        self.ready = 0.0  # ... and when it logged "running"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> Dbevents:
        env = {k: v for k, v in os.environ.items() if k != "DBEVENTS_CONFIG"}
        module = "dbevents.cli"
        if self.gc_log is not None:
            module = "bench.e2e.gcwatch"
            env["BENCH_GC_LOG"] = str(self.gc_log)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        with self.log.open("ab") as log:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, "--config", str(self.config),
                 "--log-format", "json", "--log-level", self.log_level, "run"],
                stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        with self.log.open("rb") as log:
            buf = b""
            while time.monotonic() < deadline:
                buf += log.read()
                if b'"event": "running"' in buf or b'"event":"running"' in buf:
                    self.ready = time.monotonic()
                    return self
                if self.proc.poll() is not None:
                    raise RuntimeError(f"dbevents exited {self.proc.returncode}:\n"
                                       f"{self.tail()}")
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"dbevents did not log 'running' within {timeout:.0f} s:\n"
                           f"{self.tail()}")

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM (a clean stop); SIGKILL only if it hangs (exit code -9 then)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def _status_kib(self, key: str) -> int:
        text = Path(f"/proc/{self.pid}/status").read_text()
        found = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        return int(found.group(1)) if found else 0

    def rss_mb(self) -> float:
        return self._status_kib("VmRSS") / 1024

    def peak_rss_mb(self) -> float:
        """VmHWM: the peak resident set since the process started."""
        return self._status_kib("VmHWM") / 1024

    def cpu_seconds(self) -> float:
        """User + system CPU of every thread of the process so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def thread_cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the main (event-loop) thread and of all other
        threads together (the SQLite store's worker above all); Python leaves OS
        thread names alone, so the main thread is told apart by its id."""
        main = other = 0.0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended meanwhile
                continue
            seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK
            if task.name == str(self.pid):
                main += seconds
            else:
                other += seconds
        return main, other

    def stored_events(self) -> int:
        """Events in the eventing DB (seq is AUTOINCREMENT and nothing is purged
        during a run, so the largest seq is the count), read without a lock."""
        import sqlite3

        if self.store_dsn is not None:
            return int(self._pg("SELECT max(seq) FROM dbevents.events")[0] or 0)
        if not self.store.exists():
            return 0
        conn = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True, timeout=10)
        try:
            row = conn.execute("SELECT max(seq) FROM events").fetchone()
        except sqlite3.OperationalError:  # schema not created yet
            return 0
        finally:
            conn.close()
        return int(row[0] or 0)

    def store_stats(self) -> dict[str, float]:
        """From the eventing DB after a run: how many transactions stored the
        events and how many recorded their results. Each enqueue stamps its
        events' created_at, and each finish their updated_at, with one clock
        reading per transaction, so distinct values count transactions."""
        import sqlite3

        if self.store_dsn is not None:
            events, enqueues, finishes = self._pg(
                "SELECT count(*), count(DISTINCT created_at), count(DISTINCT updated_at) "
                "FROM dbevents.events WHERE status = 'delivered'")
            attempts = self._pg("SELECT count(*) FROM dbevents.attempts")[0]
            return {"events": events, "enqueue_txns": enqueues, "finish_txns": finishes,
                    "attempts": attempts}
        conn = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True, timeout=10)
        try:
            events, enqueues, finishes = conn.execute(
                "SELECT count(*), count(DISTINCT created_at), count(DISTINCT updated_at) "
                "FROM events WHERE status = 'delivered'").fetchone()
            attempts = conn.execute("SELECT count(*) FROM attempts").fetchone()[0]
        finally:
            conn.close()
        return {"events": events, "enqueue_txns": enqueues, "finish_txns": finishes,
                "attempts": attempts}

    def _pg(self, sql: str) -> tuple[Any, ...]:
        import psycopg

        assert self.store_dsn is not None
        try:
            with psycopg.connect(self.store_dsn, autocommit=True) as conn:
                row = conn.execute(sql).fetchone()
        except psycopg.errors.UndefinedTable:  # schema not created yet
            return (0, 0, 0)
        assert row is not None
        return tuple(row)

    def captured_lines(self) -> list[tuple[float, int]]:
        """(wall-clock time, changes) of each "captured" log line, in order: the
        moment a store transaction of captured changes (and its confirm) ended."""
        from datetime import datetime

        out = []
        with self.log.open(errors="replace") as f:
            for line in f:
                if '"captured"' not in line or not line.startswith("{"):
                    continue
                rec = json.loads(line)
                if rec.get("event") == "captured":
                    when = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00"))
                    out.append((when.timestamp(), int(rec.get("changes", 0))))
        return out

    def log_stats(self) -> dict[str, float]:
        """From its own log: store transactions of captured changes ("captured"
        lines), POSTs ("delivery" lines) and the events they carried, warnings
        and errors."""
        stats: Counter[str] = Counter()
        with self.log.open(errors="replace") as f:
            for line in f:
                if not line.startswith("{"):
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                event, level = rec.get("event"), rec.get("level")
                if event == "captured":
                    stats["store_txns"] += 1
                    stats["changes"] += rec.get("changes", 0)
                    stats["store_ms"] += rec.get("ms", 0.0)
                elif event == "delivery":
                    stats["posts"] += 1
                    stats["posted_events"] += rec.get("events", 0)
                if level in ("warning", "error", "critical"):
                    stats[level] += 1
        return dict(stats)


def gc_pauses(path: Path) -> list[tuple[float, int, float]]:
    """(wall-clock end, generation, ms) per collection, from bench.e2e.gcwatch."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            end, gen, ms = line.split()
            out.append((float(end), int(gen), float(ms)))
    return out


class FileWrites(threading.Thread):
    """Wall-clock times at which a file's mtime changed, polled every 2 ms. On
    a WAL-mode SQLite file the main file is written only by checkpoints, so
    these are the store's checkpoints."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="file-writes", daemon=True)
        self.path = path
        self.times: list[float] = []
        self._halt = threading.Event()

    def run(self) -> None:
        last = None
        while not self._halt.wait(0.002):
            try:
                mtime = self.path.stat().st_mtime_ns
            except OSError:
                continue
            if last is not None and mtime != last:
                self.times.append(time.time())
            last = mtime

    def stop(self) -> None:
        self._halt.set()
        self.join()


class Profiler:
    """py-spy sampling a running process (no pause: --nonblocking), raw
    collapsed stacks, summarised as the functions with the most samples."""

    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        self.out = out
        exe = shutil.which("py-spy")
        argv = [exe] if exe else ["uvx", "--from", "py-spy", "py-spy"]
        self.proc = subprocess.Popen(
            [*argv, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate),
             "--nonblocking", "--threads", "--full-filenames", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        # py-spy writes its output on SIGINT, or by itself when the target exits.
        # Its own process group: uvx, when it launched py-spy, gets the signal too.
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# Frames py-spy samples although the thread only waits: the event loop in
# epoll_wait, the store's worker thread waiting for its next call.
IDLE = frozenset({"EpollSelector.select (selectors.py)", "_worker (concurrent/futures/thread.py)"})


def summarise_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """Shares of the busy samples (waits in IDLE left out, their share kept as
    "idle"): the top functions by own time (with inclusive time), by area
    (library or part of dbevents whose code ran), by thread."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    loop_areas: Counter[str] = Counter()  # the main (event-loop) thread's alone
    total = idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        parts = stack.split(";")
        thread = "?"
        if parts[0].startswith("thread ("):  # --threads: "thread (TID): NAME"
            thread = parts.pop(0).split(":", 1)[-1].strip()
        if not parts:
            continue
        frames = [_frame(f) for f in parts]
        if frames[-1][0] in IDLE:
            idle += count
            continue
        threads[thread] += count
        own[frames[-1][0]] += count
        areas[frames[-1][1]] += count
        if thread == "MainThread":
            loop_areas[frames[-1][1]] += count
        for name in {name for name, _ in frames}:
            incl[name] += count
    busy = total - idle
    if not busy:
        return {"samples": 0, "idle": 0.0, "functions": [], "areas": [], "threads": []}
    return {
        "samples": busy,
        "idle": idle / total,
        "functions": [(name, n / busy, incl[name] / busy) for name, n in own.most_common(top)],
        "areas": [(a, n / busy) for a, n in areas.most_common(10)],
        "threads": [(t, n / busy) for t, n in threads.most_common(5)],
        "loop_areas": [(a, n / max(1, threads["MainThread"]))
                       for a, n in loop_areas.most_common(8)],
    }


def _frame(text: str) -> tuple[str, str]:
    """'func (path/to/file.py:12)' -> ('func (file.py)', area)."""
    found = re.match(r"^(.*) \((.*?)(?::\d+)?\)$", text)
    if not found:
        return text, "other"
    func, path = found.groups()
    return f"{func} ({_short(path)})", _area(path)


def _short(path: str) -> str:
    for marker in ("site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3" else tail
    return path.rsplit("/", 2)[-1] if "/" in path else path


def _area(path: str) -> str:
    """Which library or part of dbevents a frame belongs to."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/src/" in path:
        return path.split("/src/", 1)[1].split("/", 1)[0]
    if "/lib/python3" in path:
        mod = path.split("/lib/python3", 1)[1].split("/", 2)
        return "stdlib " + (mod[1].removesuffix(".py") if len(mod) > 1 else "?")
    return path
