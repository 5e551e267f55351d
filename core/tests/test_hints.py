"""Commands named in messages work from where the user runs dbevents."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dbevents.hints import command

ROOT = Path(__file__).resolve().parents[2]
SHOW = "from dbevents.hints import command; print(command('mysql reset-position app'))"


def test_plain_when_not_run_through_uv() -> None:
    assert command("run", {}) == "dbevents run"
    assert command(environ={"VIRTUAL_ENV": "/x/.venv"}) == "dbevents"


def test_uv_run_when_uv_started_the_process() -> None:
    assert command("events list", {"UV": "/usr/bin/uv"}) == "uv run dbevents events list"


def test_a_process_started_without_uv_says_dbevents() -> None:
    env = {k: v for k, v in os.environ.items() if k != "UV"}
    out = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "dbevents mysql reset-position app"


@pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not on PATH")
def test_a_process_started_by_uv_run_says_uv_run() -> None:
    env = {k: v for k, v in os.environ.items() if k != "UV"}
    out = subprocess.run(["uv", "run", "--frozen", "--no-sync", "python", "-c", SHOW],
                         cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "uv run dbevents mysql reset-position app"
