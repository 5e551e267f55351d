"""SIGTERM and SIGINT: stop reading, let in-flight attempts finish, exit 0."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest

# Each delivery takes 3 s: between the capture and the signal the attempts in
# flight cannot finish (nor new ones start), however slowly the parent reacts.
# The first claim takes 2 x concurrency = 8 events: 4 are being sent, 4 wait
# queued (handed back to the store on stop, never sent).
CONFIG = """
[eventing]
store = "memory://s"
[databases.app]
type = "memory"
url = "memory://db"
[[triggers]]
name = "slow"
url = "http://unused"
sink = "memory"
delay_ms = 3000
concurrency = 4
"""


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_after_in_flight_attempts(tmp_path: Path, sig: int) -> None:
    cfg = tmp_path / "dbevents.toml"
    cfg.write_text(CONFIG)
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("memory_cli.py")), "20",
         "--config", str(cfg), "--log-format", "json", "run"],
        stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    # Read on a thread: a child that never logs must not block the test.
    pending: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stderr, pending), daemon=True)
    reader.start()
    raw: list[str] = []
    lines: list[dict[str, Any]] = []

    def take(line: str) -> None:
        raw.append(line)
        if line.startswith("{"):
            lines.append(json.loads(line))

    try:
        # The changes may be captured over several batches: wait for all 20.
        captured = 0
        deadline = time.monotonic() + 60
        while captured < 20:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "not all 20 changes captured:\n" + "".join(raw)
            try:
                line = pending.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line is not None, "dbevents exited early:\n" + "".join(raw)
            take(line)
            if line.startswith("{") and lines[-1]["event"] == "captured":
                captured += lines[-1]["changes"]
        # The dispatcher claims as soon as the changes are stored; a moment for it
        # to start sending, well inside the 3 s the attempts take.
        time.sleep(0.2)
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)  # the pipe closed with the process: everything is read
    while not pending.empty():
        if (line := pending.get_nowait()) is not None:
            take(line)
    assert code == 0, "".join(raw)
    deliveries = [x for x in lines if x["event"] == "delivery"]
    # The four attempts in flight at the signal finished and were recorded...
    assert len(deliveries) == 4 and all(d["outcome"] == "delivered" for d in deliveries), \
        "".join(raw)
    # ...and no new ones started after it.
    [stopped] = [x for x in lines if x["event"] == "stopped"]
    assert stopped["delivered"] == 4 and stopped["captured"] == 20
