"""`dbevents check --connect`: every database's and the store's startup checks
against real servers, every problem listed in one run, nothing created."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from dbevents import plugins as plugins_mod
from dbevents.cli import build

from testsupport.fixtures import unique_name
from testsupport.ports import free_port
from testsupport.servers import MariaDBServer, PostgresServer

TRIGGER = """
[[triggers]]
name = "all"
url = "https://hooks.example.com/t0ken-path"
"""


def check(tmp_path: Path, toml: str, *args: str) -> Result:
    path = tmp_path / "dbevents.toml"
    path.write_text(toml + TRIGGER)
    plugins = plugins_mod.load()
    return CliRunner().invoke(build(plugins), ["check", "--config", str(path), *args],
                              obj=plugins)


def section(name: str, type_: str, url: str) -> str:
    return f'[databases.{name}]\ntype = "{type_}"\nurl = "{url}"\n'


@pytest.fixture(scope="module")
def misconfigured_mariadb() -> Iterator[MariaDBServer]:
    server = MariaDBServer({"binlog_format": "STATEMENT", "binlog_row_image": "MINIMAL",
                            "binlog_row_metadata": "MINIMAL"}).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def replica_level_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer({"wal_level": "replica"}).start()
    try:
        yield server
    finally:
        server.stop()


def test_plain_check_says_it_did_not_connect(tmp_path: Path) -> None:
    r = check(tmp_path, section("app", "postgres", f"postgresql://127.0.0.1:{free_port()}/x"))
    assert r.exit_code == 0, r.output
    assert "no database or store was contacted" in r.output
    assert "check --connect" in r.output


def test_all_good(tmp_path: Path, postgres_server: PostgresServer, pg_database: str,
                  mariadb_server: MariaDBServer, mariadb_database: str) -> None:
    store = tmp_path / "events.db"
    toml = (f'[eventing]\nstore = "sqlite:///{store}"\n'
            + section("pg", "postgres", postgres_server.dsn(pg_database))
            + section("maria", "mysql", mariadb_server.dsn(mariadb_database)))
    r = check(tmp_path, toml, "--connect")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert f"  pg (postgres {postgres_server.dsn(pg_database)}): ok" in lines
    assert any(line.startswith("  maria (mysql mysql://root:***@") and line.endswith(": ok")
               for line in lines), r.output
    assert f"  store sqlite:///{store}: ok" in lines
    assert lines[-1] == "ok"
    # Nothing was created: no slot, no publication, no eventing DB file.
    assert postgres_server.execute(
        "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (pg_database,)) == []
    assert postgres_server.execute("SELECT pubname FROM pg_publication",
                                   dbname=pg_database) == []
    assert not store.exists()


def test_every_problem_listed_at_once(tmp_path: Path, misconfigured_mariadb: MariaDBServer,
                                      replica_level_postgres: PostgresServer,
                                      postgres_server: PostgresServer,
                                      pg_database: str) -> None:
    maria_db = misconfigured_mariadb.create_database(unique_name("my"))
    role = unique_name("norepl")
    postgres_server.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'S3cret-pw'")
    try:
        toml = (f'[eventing]\nstore = "sqlite:///{tmp_path}/missing/events.db"\n'
                + section("maria", "mysql", misconfigured_mariadb.dsn(maria_db))
                + section("replica", "postgres", replica_level_postgres.dsn())
                + section("norepl", "postgres",
                          f"postgresql://{role}:S3cret-pw@127.0.0.1:{postgres_server.port}/"
                          f"{pg_database}")
                + section("down", "postgres",
                          f"postgresql://u:S3cret-pw@127.0.0.1:{free_port()}/x")
                + section("mdown", "mysql", f"mysql://u:S3cret-pw@127.0.0.1:{free_port()}/x"))
        r = check(tmp_path, toml, "--connect")
    finally:
        postgres_server.execute(f"DROP ROLE {role}")
    assert r.exit_code == 2, r.output
    out = r.output
    assert "S3cret-pw" not in out
    maria = out.split("  maria (")[1].split("\n  replica (")[0]
    assert "3 problem(s)" in maria
    for words in ("binlog_format is STATEMENT", "binlog_row_image is MINIMAL",
                  "binlog_row_metadata is MINIMAL"):
        assert words in maria
    replica = out.split("  replica (")[1].split("\n  norepl (")[0]
    assert "wal_level = replica" in replica and "wal_level = logical" in replica
    norepl = out.split("  norepl (")[1].split("\n  down (")[0]
    assert "lacks the REPLICATION attribute" in norepl
    assert f"ALTER ROLE {role} WITH REPLICATION" in norepl
    assert "down (postgres postgresql://u:***@127.0.0.1:" in out
    down = out.split("  down (")[1].split("\n  mdown (")[0]
    assert "cannot connect" in down
    mdown = out.split("  mdown (")[1].split("\n  store ")[0]
    assert "cannot connect" in mdown
    store = out.split("\n  store ")[1]
    assert "does not exist" in store and "mkdir -p" in store
    assert not (tmp_path / "missing").exists()
    assert out.splitlines()[-1].startswith("not ready")
