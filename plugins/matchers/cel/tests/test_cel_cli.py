"""A wrong condition through the real launcher: `dbevents check` and `dbevents run`
exit 2 and name the key, the trigger and the column, before touching a database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = """
[eventing]
store = "sqlite:///events.db"

[databases.shop]
type = "postgres"
url = "postgresql://nobody@127.0.0.1:1/shop"

[[triggers]]
name = "every-order"
tables = "orders"
url = "http://127.0.0.1:1/all"

[[triggers]]
name = "big-paid-orders"
tables = "orders"
condition = {condition!r}
url = "http://127.0.0.1:1/big"
"""


def dbevents(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DBEVENTS_CONFIG"}
    return subprocess.run([sys.executable, "-m", "dbevents.cli", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(("condition", "words"), [
    ("doc.amount > 100 && old.status != ", "CEL error at column 35: Syntax error"),
    ("doc.amount > 100 && op > 2", "column 24: found no matching overload for '_>_'"),
])
def test_check_and_run_exit_2_naming_key_trigger_and_column(
        tmp_path: Path, condition: str, words: str) -> None:
    config = tmp_path / "dbevents.toml"
    config.write_text(CONFIG.format(condition=condition))
    for command in ("check", "run"):
        proc = dbevents(config, command)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out
        assert "triggers[1].condition" in out
        assert "(trigger 'big-paid-orders')" in out
        assert words in out
    assert not (tmp_path / "events.db").exists()  # nothing started


def test_a_good_condition_passes_check(tmp_path: Path) -> None:
    config = tmp_path / "dbevents.toml"
    config.write_text(CONFIG.format(condition="doc.amount > 100 && old.status != doc.status"))
    proc = dbevents(config, "check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
