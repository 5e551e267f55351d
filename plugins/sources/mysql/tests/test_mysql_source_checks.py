"""Startup checks: each failure is a SetupError naming what to change; the
reset-position command; options and config errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from dbevents import ConfigError, Position, SetupError, SourceSettings
from dbevents.cli import build
from dbevents.protocols import StoreSettings
from dbevents.testing import MemoryStore, isolated_plugins, reset
from dbevents_source_mysql import MysqlOptions, MysqlSource
from dbevents_source_mysql import plugin as mysql_plugin
from dbevents_source_mysql.options import SERVER_ID_BASE, default_server_id

from testsupport.fixtures import unique_name
from testsupport.servers import MariaDBServer


async def _start_fails(source: MysqlSource) -> str:
    with pytest.raises(SetupError) as info:
        await source.start()
    return str(info.value)


@pytest.fixture
def global_setting(private_server: MariaDBServer) -> Iterator[Any]:
    """set(name, value): SET GLOBAL on the private server, put back afterwards."""
    saved: dict[str, Any] = {}

    def set_(name: str, value: str) -> None:
        (old,), = private_server.execute(f"SELECT @@global.{name}")
        saved.setdefault(name, old)
        private_server.execute(f"SET GLOBAL {name} = %s", (value,))

    yield set_
    for name, value in saved.items():
        private_server.execute(f"SET GLOBAL {name} = %s", (value,))


@pytest.mark.parametrize(("name", "value", "words"), [
    ("binlog_format", "STATEMENT", ["binlog_format is STATEMENT", "binlog_format=ROW"]),
    ("binlog_format", "MIXED", ["binlog_format is MIXED", "binlog_format=ROW"]),
    ("binlog_row_image", "MINIMAL", ["binlog_row_image is MINIMAL", "binlog_row_image=FULL"]),
    ("binlog_row_metadata", "MINIMAL", ["binlog_row_metadata is MINIMAL", "UNKNOWN_COL0",
                                        "binlog_row_metadata=FULL"]),
])
async def test_binlog_settings(private_env: Any, global_setting: Any, name: str, value: str,
                               words: list[str]) -> None:
    global_setting(name, value)
    message = await _start_fails(private_env.make_source())
    for word in words:
        assert word in message


async def test_binlog_off(private_server: MariaDBServer) -> None:
    private_server.settings["log_bin"] = None
    await asyncio.to_thread(private_server.restart)
    try:
        source = MysqlSource(SourceSettings(name="app", url=private_server.dsn("mysql"),
                                            options=None))
        message = await _start_fails(source)
        assert "log_bin=OFF" in message and "set log_bin" in message
    finally:
        del private_server.settings["log_bin"]
        await asyncio.to_thread(private_server.restart)


@pytest.fixture
def make_user(mariadb_server: MariaDBServer) -> Iterator[Any]:
    """make_user(*grants) -> the URL of a new user holding just those grants."""
    users: list[str] = []

    def make(database: str, *grants: str) -> str:
        user = unique_name("u")
        users.append(user)
        mariadb_server.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'Pw-s3cret'")
        for grant in grants:
            mariadb_server.execute(f"GRANT {grant.format(db=database)} TO '{user}'@'%'")
        return f"mysql://{user}:Pw-s3cret@127.0.0.1:{mariadb_server.port}/{database}"

    yield make
    for user in users:
        mariadb_server.execute(f"DROP USER '{user}'@'%'")


REPL = "REPLICATION SLAVE ON *.*"
MONITOR = "BINLOG MONITOR ON *.*"
SELECT = "SELECT ON `{db}`.*"


@pytest.mark.parametrize(("grants", "words"), [
    ((MONITOR, SELECT), ["lacks the REPLICATION SLAVE privilege", "GRANT REPLICATION SLAVE"]),
    ((REPL, SELECT), ["lacks the BINLOG MONITOR privilege", "GRANT BINLOG MONITOR ON *.*"]),
    ((REPL, MONITOR), ["has no privilege on it", "GRANT SELECT ON `"]),
    # Any privilege makes the database visible; only SELECT lets the source read.
    ((REPL, MONITOR, "INSERT ON `{db}`.*"),
     ["lacks the SELECT privilege on tables of `", "items", "GRANT SELECT ON `"]),
    ((REPL, MONITOR, "INSERT ON `{db}`.*", "SELECT (id) ON `{db}`.items"),
     ["lacks the SELECT privilege on tables of `", "GRANT SELECT ON `"]),
])
async def test_missing_privileges(mysql_env: Any, make_user: Any, grants: tuple[str, ...],
                                  words: list[str]) -> None:
    url = make_user(mysql_env.database, *grants)
    message = await _start_fails(mysql_env.make_source(url=url))
    for word in words:
        assert word in message
    assert "Pw-s3cret" not in message


async def test_enough_privileges_read_changes(mysql_env: Any, make_user: Any,
                                              reading: Any) -> None:
    url = make_user(mysql_env.database, REPL, MONITOR, SELECT)
    r = await reading(mysql_env.make_source(url=url))
    await mysql_env.write(2)
    assert len(await r.wait_for(2)) == 2


async def test_select_is_checked_on_the_watched_tables_only(mysql_env: Any, make_user: Any,
                                                          reading: Any) -> None:
    mysql_env.execute("CREATE TABLE secret (id INT PRIMARY KEY)")
    url = make_user(mysql_env.database, REPL, MONITOR, "INSERT ON `{db}`.*",
                    "SELECT ON `{db}`.items")
    message = await _start_fails(mysql_env.make_source(url=url))
    assert "lacks the SELECT privilege" in message and "secret" in message
    r = await reading(mysql_env.make_source(url=url, tables=frozenset({"items"})))
    await mysql_env.write(1)
    assert len(await r.wait_for(1)) == 1


async def test_wrong_password_hides_it(mysql_env: Any, make_user: Any) -> None:
    url = make_user(mysql_env.database, REPL).replace("Pw-s3cret", "Wrong-pw")
    message = await _start_fails(mysql_env.make_source(url=url))
    assert "refused the login" in message and "Wrong-pw" not in message and ":***@" in message


async def test_server_id_of_the_server_itself(mysql_env: Any) -> None:
    message = await _start_fails(mysql_env.make_source(server_id=1))
    assert "server_id 1 is the server's own server_id" in message


async def test_unknown_database(mysql_env: Any) -> None:
    message = await _start_fails(mysql_env.make_source(schemas=["no_such_db"]))
    assert "`no_such_db` does not exist" in message


async def test_a_checkpoint_that_is_not_a_binlog_position(mysql_env: Any) -> None:
    source = mysql_env.make_source()
    await source.start()
    with pytest.raises(SetupError, match="not a MySQL binlog position"):
        await asyncio.wait_for(source.changes(Position("0/16B3748")).__anext__(), 20)


def _cli(tmp_path: Path, url: str, *args: str) -> Any:
    path = tmp_path / "dbevents.toml"
    path.write_text(f'[eventing]\nstore = "memory://mysql-cli"\n\n'
                    f'[databases.app]\ntype = "mysql"\nurl = "{url}"\n')
    plugins = isolated_plugins(("source-mysql", mysql_plugin))
    return CliRunner().invoke(build(plugins), ["--config", str(path), *args], obj=plugins)


async def test_purged_binlog_and_reset_position(private_env: Any, reading: Any,
                                                tmp_path: Path) -> None:
    reset()
    server = private_env.server
    r = await reading(private_env.make_source())
    await private_env.write(2)
    await r.wait_for(2)
    checkpoint = r.checkpoint
    await r.stop()
    await r.source.close()
    # The server drops the binlog the checkpoint points into. It keeps a file while
    # a dump thread reads it (it notices a closed reader only at its next heartbeat)
    # or crash recovery may need it (until the binlog checkpoint moves on): retry.
    server.execute("FLUSH BINARY LOGS")
    newest = server.execute("SHOW BINARY LOGS")[-1][0]
    for _ in range(100):
        for (thread,) in server.execute("SELECT ID FROM information_schema.PROCESSLIST "
                                        "WHERE COMMAND LIKE 'Binlog Dump%'"):
            server.execute(f"KILL {thread}")
        server.execute(f"PURGE BINARY LOGS TO '{newest}'")
        if [row[0] for row in server.execute("SHOW BINARY LOGS")] == [newest]:
            break
        await asyncio.sleep(0.1)
    assert [row[0] for row in server.execute("SHOW BINARY LOGS")] == [newest]
    again = private_env.make_source()
    await again.start()
    with pytest.raises(SetupError) as info:
        await asyncio.wait_for(again.changes(checkpoint).__anext__(), 20)
    message = str(info.value)
    assert f"the binlog file {checkpoint.value.split(':')[0]} is no longer on the server" \
        in message
    assert "dbevents mysql reset-position app" in message and "purged" in message
    # The documented way out: move the checkpoint (worker stopped), then resume.
    result = await asyncio.to_thread(_cli, tmp_path, server.dsn(private_env.database),
                                     "mysql", "reset-position", "app")
    assert result.exit_code == 0, result.output
    store = MemoryStore(StoreSettings(url="memory://mysql-cli"))
    moved = await store.checkpoint("app")
    assert moved is not None and moved.value.startswith(newest + ":")
    assert f"checkpoint of app: (none) -> {moved.value}" in result.output
    r2 = await reading(private_env.make_source(), since=moved)
    await private_env.write(1)
    assert [c.doc_id for c in await r2.wait_for(1)] == ["3"]
    reset()


def test_reset_position_errors(tmp_path: Path, mariadb_server: MariaDBServer) -> None:
    reset()
    url = mariadb_server.dsn("mysql")
    bad = _cli(tmp_path, url, "mysql", "reset-position", "nope")
    assert bad.exit_code == 2 and "no [databases.nope]" in bad.output
    far = _cli(tmp_path, url, "mysql", "reset-position", "app", "--to", "binlog.999999:4")
    assert far.exit_code == 2 and "no longer on the server" in far.output
    earliest = _cli(tmp_path, url, "mysql", "reset-position", "app", "--to", "earliest")
    assert earliest.exit_code == 0 and earliest.output.strip().endswith(":4")
    reset()


def test_check_validates_options(tmp_path: Path) -> None:
    path = tmp_path / "dbevents.toml"
    path.write_text('[eventing]\nstore = "memory://x"\n[databases.app]\ntype = "mysql"\n'
                    'url = "mysql://u@h/db"\nstart = "yesterday"\n')
    plugins = isolated_plugins(("source-mysql", mysql_plugin))
    result = CliRunner().invoke(build(plugins), ["--config", str(path), "check"], obj=plugins)
    assert result.exit_code == 2
    assert "databases.app" in result.output and "start must be" in result.output


def test_url_and_options() -> None:
    with pytest.raises(ConfigError, match="mysql:// or mariadb://"):
        MysqlSource(SourceSettings(name="a", url="postgresql://u@h/db", options=None))
    with pytest.raises(ConfigError, match="name the database"):
        MysqlSource(SourceSettings(name="a", url="mysql://u@h", options=None))
    source = MysqlSource(SourceSettings(name="a", url="mariadb://u:p%40ss@h:3307/db",
                                        options=MysqlOptions(schemas=["x", "y"])))
    assert (source.params.password, source.params.port, source.schemas) == ("p@ss", 3307,
                                                                          ("x", "y"))
    with pytest.raises(ValueError, match="server_id"):
        MysqlOptions(server_id=0)


def test_default_server_id_is_stable_high_and_distinct() -> None:
    a = default_server_id("app", ("shop",))
    assert a == default_server_id("app", ("shop",))
    assert SERVER_ID_BASE <= a < 2**32
    assert len({default_server_id(n, ("shop",)) for n in ("app", "app2", "orders")}) == 3


def test_status_shows_the_servers_binlog(tmp_path: Path, mysql_env: Any) -> None:
    reset()
    result = _cli(tmp_path, mysql_env.server.dsn(mysql_env.database), "status", "--json")
    assert result.exit_code == 0, result.output
    app = json.loads(result.output)["sources"]["app"]
    assert app["type"] == "mysql" and app["checkpoint"] is None
    assert app["server_position"].startswith(mysql_env.start.split(":")[0] + ":")
    assert app["oldest_binlog"] and app["binlog_bytes"] > 0
    reset()
