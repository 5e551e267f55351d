"""`dbevents demo` as a user runs it: a separate process, real embedded
PostgreSQL, real receiver; then again on the same folder, resuming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def demo(folder: Path, seconds: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dbevents.cli", "demo", "--dir", str(folder),
         "--duration", str(seconds), "--every", "0.4"],
        capture_output=True, text=True, timeout=300,
    )


def events(folder: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "dbevents.cli", "--config", str(folder / "dbevents.toml"),
         "events", "list", "--json", "--limit", "100000"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_demo_shows_deliveries_retries_and_resumes(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    first = demo(folder, 12)
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    for kind in ("DB_INSERT", "DB_UPDATE", "DB_DELETE"):
        assert f"{kind} users" in out and "200 OK" in out
    assert "500 on purpose (attempt 1 of 3)" in out
    assert "the event is now 'failed'" in out
    payloads = [json.loads(line) for line in out.splitlines() if line.startswith("  {")]
    assert payloads and all(p["specversion"] == "1.0" for p in payloads)
    assert (folder / "dbevents.toml").exists() and (folder / "dbevents.db").exists()
    assert not _postgres_running(folder), "the demo stops its PostgreSQL"
    before = events(folder)
    assert any(e["status"] == "failed" for e in before)

    second = demo(folder, 6)
    assert second.returncode == 0, second.stdout + second.stderr
    after = events(folder)
    ids = [e["id"] for e in after]
    assert len(ids) == len(set(ids))  # resumed: nothing stored twice
    assert len(after) > len(before)  # and new changes kept coming
    assert {e["id"] for e in before} <= set(ids)
    assert not _postgres_running(folder)


def _postgres_running(folder: Path) -> bool:
    found = subprocess.run(["pgrep", "-f", f"postgres -D {folder / 'pgdata'}"],
                           capture_output=True)
    return found.returncode == 0
