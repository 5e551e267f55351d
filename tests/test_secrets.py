"""Passwords never reach the output, whatever a driver echoes back.

The real launcher runs as a process with URLs whose password holds "@", ":",
"/" and "%40", unescaped: libpq, PyMySQL and PyMongo each split such a URL
differently and quote a piece of the password as a host name or a port in
their own error text. Every command that can print a URL or a driver error is
checked (check, run, JSON logs, status, events list/show) against unreachable
ports and against the private servers with a real user holding that password.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from testsupport.ports import free_port
from testsupport.servers import MariaDBServer, PostgresServer

# As written in the config: "@", ":", "/" and "%40" unescaped. A raw "/" cuts the
# URL's host part short, so such a URL is refused before any driver sees it.
SECRET = "Xy7q@Zsec:ret9/pw%40Q99"
# Raw "@" and ":" only: the launcher encodes the "@" and the drivers connect.
READABLE = "Ab3d@Ef6h:Ij9k"
# Every piece a driver could quote on its own, as written and percent-decoded.
PIECES = ("Xy7q", "Zsec", "ret9", "pw%40Q99", "pw@Q99", "Ab3d", "Ef6h", "Ij9k")
HOOK = "https://hook:Tok3nPass@hooks.example.com/x?token=QueryTok99"

COMMANDS = (("check",), ("run",), ("status",), ("status", "--json"), ("events", "list"),
            ("events", "show", "0000"))


def dbevents(config: Path, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "DBEVENTS_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-m", "dbevents.cli", "--config", str(config), "--log-format", "json",
         *args], capture_output=True, text=True, timeout=180, env=env)
    return done.returncode, done.stdout + done.stderr


def assert_no_secret(output: str) -> None:
    for piece in (*PIECES, "Tok3nPass", "QueryTok99"):
        assert piece not in output, output


def write(tmp_path: Path, db_type: str, url: str, store: str = "sqlite:///ev.db") -> Path:
    path = tmp_path / "dbevents.toml"
    path.write_text(f'[eventing]\nstore = "{store}"\n'
                    f'[databases.app]\ntype = "{db_type}"\nurl = "{url}"\n'
                    f'[[triggers]]\nname = "t"\nurl = "{HOOK}"\n')
    return path


@pytest.mark.parametrize(("db_type", "scheme", "query"), [
    ("postgres", "postgresql", ""),
    ("mysql", "mysql", ""),
    ("mongodb", "mongodb", "?serverSelectionTimeoutMS=500"),
])
def test_unreachable_source_never_shows_the_password(tmp_path: Path, db_type: str,
                                                     scheme: str, query: str) -> None:
    url = f"{scheme}://app:{READABLE}@127.0.0.1:{free_port()}/app{query}"
    config = write(tmp_path, db_type, url)
    for command in COMMANDS:
        code, out = dbevents(config, *command)
        assert_no_secret(out)
        if command == ("check",):
            assert code == 0 and f"app: {db_type} {scheme}://app:***@127.0.0.1:" in out, out
        if command == ("run",):
            assert code != 0 and "error: " in out, out  # says what went wrong
    # A raw "/" in the password: every command refuses the URL and says how to fix it.
    config = write(tmp_path, db_type, f"{scheme}://app:{SECRET}@127.0.0.1:1/app{query}")
    for command in COMMANDS:
        code, out = dbevents(config, *command)
        assert_no_secret(out)
        assert code == 2 and "databases.app.url: " in out and "%2F for /" in out, out


def test_unreachable_postgres_store_never_shows_the_password(tmp_path: Path) -> None:
    raw = f"postgresql://app:{SECRET}@127.0.0.1:{free_port()}/ev"
    escaped = f"postgresql://app:{quote(SECRET, safe='')}@127.0.0.1:{free_port()}/ev"
    for store in (raw, escaped):
        config = write(tmp_path, "postgres", "postgresql://app@127.0.0.1:1/app", store=store)
        for command in COMMANDS:
            code, out = dbevents(config, *command)
            assert_no_secret(out)
            if command != ("check",) or store == raw:
                assert code != 0 and "error: " in out, out
    code, out = dbevents(config, "status")
    assert "cannot reach PostgreSQL" in out and "Connection refused" in out, out


def test_postgres_user_with_such_a_password(tmp_path: Path, postgres_server: PostgresServer,
                                            pg_database: str) -> None:
    user = postgres_server.create_password_user(f"u_{pg_database}", SECRET)
    port = postgres_server.port
    # Unescaped: refused before libpq could take the userinfo to the first "@".
    config = write(tmp_path, "postgres", f"postgresql://{user}:{SECRET}@127.0.0.1:{port}/"
                   f"{pg_database}")
    for command in COMMANDS:
        _, out = dbevents(config, *command)
        assert_no_secret(out)
    # Escaped but one character off: the server refuses it, and status says why.
    wrong = quote(SECRET[:-1] + "8", safe="")
    config = write(tmp_path, "postgres", f"postgresql://{user}:{wrong}@127.0.0.1:{port}/"
                   f"{pg_database}")
    code, out = dbevents(config, "status")
    assert code == 0 and "probe=unavailable:" in out, out
    assert f'password authentication failed for user "{user}"' in out, out
    assert "OperationalError" not in out
    code, out = dbevents(config, "run")
    assert code != 0 and "password authentication failed" in out, out
    # The right password, as the store's user too: the store opens, status works.
    right = f"postgresql://{user}:{quote(SECRET, safe='')}@127.0.0.1:{port}/{pg_database}"
    config = write(tmp_path, "postgres", right, store=right)
    code, out = dbevents(config, "status")
    assert code == 0 and "probe=" not in out.split("SOURCE", 1)[1], out
    assert_no_secret(out)


def test_mariadb_user_with_such_a_password(tmp_path: Path, mariadb_server: MariaDBServer,
                                           mariadb_database: str) -> None:
    user = f"u{mariadb_database[-8:]}"
    mariadb_server.execute(f"CREATE USER '{user}'@'%%' IDENTIFIED BY %s", (SECRET,))
    mariadb_server.execute(f"GRANT ALL ON *.* TO '{user}'@'%'")
    port = mariadb_server.port
    wrong = quote(SECRET[:-1] + "8", safe="")
    config = write(tmp_path, "mysql", f"mysql://{user}:{wrong}@127.0.0.1:{port}/"
                   f"{mariadb_database}")
    for command in COMMANDS:
        _, out = dbevents(config, *command)
        assert_no_secret(out)
    code, out = dbevents(config, "status")
    assert code == 0 and "probe=unavailable:" in out and "refused the login" in out, out
    code, out = dbevents(config, "run")
    assert code != 0 and "Access denied" in out, out


def test_status_says_a_database_is_down(tmp_path: Path) -> None:
    config = write(tmp_path, "postgres", f"postgresql://app:{quote(SECRET, safe='')}@127.0.0.1:"
                   f"{free_port()}/app")
    code, out = dbevents(config, "status")
    assert code == 0 and "probe=unreachable: connection refused" in out, out
    assert_no_secret(out)


def test_raw_at_and_colon_in_a_password_connect(tmp_path: Path, postgres_server: PostgresServer,
                                                pg_database: str, mariadb_server: MariaDBServer,
                                                mariadb_database: str) -> None:
    # libpq alone would end the user part at the first "@" and dial "Ef6h" as a host.
    user = postgres_server.create_password_user(f"r_{pg_database}", READABLE)
    url = f"postgresql://{user}:{READABLE}@127.0.0.1:{postgres_server.port}/{pg_database}"
    config = write(tmp_path, "postgres", url, store=url)
    code, out = dbevents(config, "status")
    assert code == 0 and "probe=" not in out.split("SOURCE", 1)[1], out
    assert_no_secret(out)
    mysql_user = f"r{mariadb_database[-8:]}"
    mariadb_server.execute(f"CREATE USER '{mysql_user}'@'%%' IDENTIFIED BY %s", (READABLE,))
    mariadb_server.execute(f"GRANT ALL ON *.* TO '{mysql_user}'@'%'")
    config = write(tmp_path, "mysql", f"mysql://{mysql_user}:{READABLE}@127.0.0.1:"
                   f"{mariadb_server.port}/{mariadb_database}")
    code, out = dbevents(config, "status")
    assert code == 0 and "probe=" not in out.split("SOURCE", 1)[1], out
    assert_no_secret(out)
