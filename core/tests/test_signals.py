"""SIGTERM and SIGINT: stop reading, let in-flight attempts finish, exit 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
delay_ms = 400
concurrency = 4
"""


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
    lines = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(json.loads(line))
        if lines[-1]["event"] == "captured":
            # Deliveries of 400 ms are now in flight.
            time.sleep(0.1)
            proc.send_signal(sig)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=20) == 0
    lines += [json.loads(x) for x in rest.splitlines() if x.startswith("{")]
    deliveries = [x for x in lines if x["event"] == "delivery"]
    # The four attempts in flight at the signal finished and were recorded...
    assert len(deliveries) == 4 and all(d["outcome"] == "delivered" for d in deliveries)
    # ...and no new ones started after it.
    [stopped] = [x for x in lines if x["event"] == "stopped"]
    assert stopped["delivered"] == 4 and stopped["captured"] == 20
