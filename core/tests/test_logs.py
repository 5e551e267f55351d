"""Log lines as users see them: `--log-level`, and the default format (console
on a terminal, JSON lines otherwise), always on stderr.

Each test runs the real launcher (`python -m dbevents.cli`) in its own process,
so the output goes to a real pipe or a real terminal (a pty), and the logging
setup of one run cannot leak into another. A small plugin, installed as a fake
distribution on the child's path, adds a command that logs at every level.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

SPEAKER = '''
import logging

import click
import structlog
from dbevents import hookimpl


@click.command("speak")
def speak():
    log = structlog.get_logger("speaker")
    log.debug("a debug line", n=1)
    log.info("an info line", n=2)
    log.warning("a warning line", n=3)
    log.error("an error line", n=4)
    logging.getLogger("somelib").warning("a library warning")
    click.echo("spoken")


@hookimpl
def register_commands(cli):
    cli.add_command(speak)
'''

ALL = ["a debug line", "an info line", "a warning line", "an error line"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    info = tmp_path / "fake_speaker-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-speaker\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[dbevents]\nspeaker = fakeplug_speaker\n")
    (tmp_path / "fakeplug_speaker.py").write_text(SPEAKER)
    return {**os.environ, "PYTHONPATH": str(tmp_path), "DBEVENTS_PLUGINS": "speaker"}


def launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "dbevents.cli", *args]


def run_piped(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(launcher(*args), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "spoken\n"  # log lines never land on stdout
    return r


def run_on_terminal(env: dict[str, str], *args: str) -> str:
    """Run with stderr on a pseudo-terminal; return what the terminal showed."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(launcher(*args), env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=slave)
    finally:
        os.close(slave)  # the child holds its own copy; EOF comes when it exits
    shown = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer to the terminal is gone
                break
            if not chunk:
                break
            shown += chunk
        assert proc.stdout is not None
        assert proc.stdout.read() == b"spoken\n"
        assert proc.wait(timeout=60) == 0, shown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        os.close(master)
    return ANSI.sub("", shown.decode().replace("\r\n", "\n"))


def json_lines(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_not_a_terminal_defaults_to_json_lines_at_info(env: dict[str, str]) -> None:
    r = run_piped(env, "speak")
    lines = json_lines(r.stderr)
    assert [x["event"] for x in lines] == ALL[1:]
    assert [(x["level"], x["n"]) for x in lines] == [("info", 2), ("warning", 3), ("error", 4)]
    assert all(str(x["timestamp"]).endswith("Z") for x in lines)  # ISO 8601 UTC
    # The rest of stderr: the standard library's warning, in its own short format.
    others = [line for line in r.stderr.splitlines() if not line.startswith("{")]
    assert others == ["WARNING somelib: a library warning"]


@pytest.mark.parametrize(("level", "shown", "library_warning"), [
    ("debug", ALL, True),
    ("info", ALL[1:], True),
    ("warning", ALL[2:], True),
    ("error", ALL[3:], False),
])
def test_log_level(env: dict[str, str], level: str, shown: list[str],
                   library_warning: bool) -> None:
    r = run_piped(env, "--log-level", level, "speak")
    assert [x["event"] for x in json_lines(r.stderr)] == shown
    assert ("a library warning" in r.stderr) is library_warning


def test_an_unknown_log_level_is_a_usage_error(env: dict[str, str]) -> None:
    r = subprocess.run(launcher("--log-level", "verbose", "speak"), env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Invalid value for '--log-level'" in r.stderr and r.stdout == ""


def test_a_terminal_defaults_to_console_lines(env: dict[str, str]) -> None:
    shown = run_on_terminal(env, "speak")
    lines = [line for line in shown.splitlines() if "line" in line]
    assert len(lines) == 3 and not any(line.lstrip().startswith("{") for line in lines)
    info, warning, error = lines
    assert re.search(r"\[info\s*\] an info line\s+n=2$", info), info
    assert re.search(r"\[warning\s*\] a warning line\s+n=3$", warning), warning
    assert re.search(r"\[error\s*\] an error line\s+n=4$", error), error


def test_log_format_overrides_the_default(env: dict[str, str]) -> None:
    on_terminal = run_on_terminal(env, "--log-format", "json", "speak")
    assert [x["event"] for x in json_lines(on_terminal)] == ALL[1:]
    piped = run_piped(env, "--log-format", "console", "speak")
    assert json_lines(piped.stderr) == []
    assert re.search(r"\[info\s*\] an info line\s+n=2$", piped.stderr, re.MULTILINE)
