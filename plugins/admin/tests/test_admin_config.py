"""The [admin] table through `dbevents check`: errors name the key and exit 2;
a non-loopback address needs a token (from the config or the environment)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BASE = """
[eventing]
store = "sqlite:///events.db"

[admin]
"""


def check(tmp_path: Path, admin: str, **env: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "dbevents.toml"
    config.write_text(BASE + admin)
    environ = {k: v for k, v in os.environ.items()
               if k not in ("DBEVENTS_CONFIG", "DBEVENTS_ADMIN_TOKEN")}
    return subprocess.run([sys.executable, "-m", "dbevents.cli", "--config", str(config),
                           "check"], capture_output=True, text=True, timeout=60,
                          env={**environ, **env})


@pytest.mark.parametrize(("admin", "key", "words"), [
    ('listen = "0.0.0.0:8642"\n', "admin.listen", "not a loopback address"),
    ('listen = "8642"\n', "admin.listen", "expected HOST:PORT"),
    ('listen = "127.0.0.1:99999"\n', "admin.listen", "expected HOST:PORT"),
    ('lisen = "127.0.0.1:1"\n', "admin.lisen", "did you mean 'listen'"),
    ('token = "short"\n', "admin.token", "at least 16 characters"),
    ("token = 5\n", "admin.token", "expected a string"),
])
def test_bad_admin_config_names_the_key(tmp_path: Path, admin: str, key: str,
                                        words: str) -> None:
    proc = check(tmp_path, admin)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{key}:" in proc.stderr and words in proc.stderr


def test_a_token_allows_another_address_and_never_shows(tmp_path: Path) -> None:
    secret = "s3cret-admin-token-value"
    proc = check(tmp_path, 'listen = "0.0.0.0:8642"\ntoken = "${DBEVENTS_ADMIN_TOKEN}"\n',
                 DBEVENTS_ADMIN_TOKEN=secret)
    assert proc.returncode == 0, proc.stderr
    # Without the key, the variable is read directly.
    proc = check(tmp_path, 'listen = "[::]:8642"\n', DBEVENTS_ADMIN_TOKEN=secret)
    assert proc.returncode == 0, proc.stderr
    assert secret not in proc.stdout + proc.stderr
