"""Helpers for end-to-end tests: `dbevents` as a separate process with a real
config, and the CLI's JSON output."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent


def cli(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "dbevents.cli", "--config", str(config),
         "--log-format", "json", *args],
        capture_output=True, text=True, timeout=120, env=_env(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"dbevents {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def events(config: Path, *args: str) -> list[dict[str, Any]]:
    out = cli(config, "events", "list", "--json", "--limit", "1000000", *args).stdout
    return [json.loads(line) for line in out.splitlines()]


def show(config: Path, event_id: str) -> dict[str, Any]:
    return json.loads(cli(config, "events", "show", event_id).stdout)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DBEVENTS_CONFIG", None)
    return env


class Dbevents:
    """`dbevents run` in its own process; its log goes to a file."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log = config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.offset = 0

    def start(self) -> Dbevents:
        # The log file is shared by every process started on this config (a
        # restart appends): this process's lines are those after this offset.
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dbevents.cli", "--config", str(self.config),
                 "--log-format", "json", "run"],
                stdout=log, stderr=log, env=_env(),
            )
        self.wait_for_log("running")
        return self

    def text(self, complete: bool = True) -> str:
        """This process's part of the log; by default complete lines only (it may
        be mid-line)."""
        with self.log.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        if complete:
            data = data[: data.rfind(b"\n") + 1]
        return data.decode(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        """This process's JSON log lines (not those of earlier processes)."""
        return [json.loads(line) for line in self.text().splitlines() if line.startswith("{")]

    def wait_for_log(self, event: str, timeout: float = 60) -> dict[str, Any]:
        """The first line of ``event`` this process logged, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            # Polled before reading: lines written just before an exit still count.
            exited = self.proc is not None and self.proc.poll() is not None
            for line in self.lines():
                if line.get("event") == event:
                    return line
            if exited:
                assert self.proc is not None
                raise AssertionError(f"dbevents exited {self.proc.returncode}:\n"
                                     + self.text(complete=False)[-4000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event!r} log line in {timeout} s:\n"
                                     + self.text(complete=False)[-4000:])
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; killed if it has not exited within ``timeout`` (and
        then the return code is the kill's, not 0)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


def cloudevent(request: Any) -> Any:
    """Parse a received request with the CloudEvents SDK (validates it)."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    return from_http(HTTPMessage(headers=headers, body=request.body), JSONFormat(), CloudEvent)


ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def assert_envelopes(bodies: list[dict[str, Any]]) -> str:
    """The exact seed envelope on every body: these keys only, specversion 1.0, one
    UUID `source` for all, times in ms UTC, UUID ids. Returns the source."""
    source = bodies[0]["source"]
    uuid.UUID(source)
    for b in bodies:
        assert set(b) == {"specversion", "id", "type", "source", "time", "data"}
        assert b["specversion"] == "1.0" and b["source"] == source
        assert ISO_MS.match(b["time"]) and uuid.UUID(b["id"])
    return str(source)
