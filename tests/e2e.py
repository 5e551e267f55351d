"""Helpers for end-to-end tests: `dbevents` as a separate process with a real
config, and the CLI's JSON output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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

    def start(self) -> Dbevents:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dbevents.cli", "--config", str(self.config),
                 "--log-format", "json", "run"],
                stdout=log, stderr=log, env=_env(),
            )
        self.wait_for_log("running")
        return self

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def wait_for_log(self, event: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if line.get("event") == event:
                    return line
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"dbevents exited {self.proc.returncode}:\n"
                                     + self.log.read_text(errors="replace")[-4000:])
            time.sleep(0.05)
        raise AssertionError(f"no {event!r} log line in {timeout} s:\n"
                             + self.log.read_text(errors="replace")[-4000:])

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


def cloudevent(request: Any) -> Any:
    """Parse a received request with the CloudEvents SDK (validates it)."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    return from_http(HTTPMessage(headers=headers, body=request.body), JSONFormat(), CloudEvent)
