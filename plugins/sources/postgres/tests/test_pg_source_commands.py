"""`dbevents postgres drop-slot` and the slot facts in `dbevents status`: the
command's cases in process, then both through the real launcher."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import psycopg
from click.testing import CliRunner
from dbevents_source_postgres import PostgresOptions, PostgresSource, plugin

if TYPE_CHECKING:
    from plugins.sources.postgres.tests.conftest import PgEnv

DBEVENTS = str(Path(sys.executable).parent / "dbevents")


class _Database:
    def __init__(self, type_: str, url: str, options: Any = None) -> None:
        self.type, self.url, self.options = type_, url, options


class _Config:
    def __init__(self, databases: dict[str, _Database]) -> None:
        self.databases = databases
        self.path = Path("dbevents.toml")


class _Plugins:
    def get(self, kind: str, name: str) -> Any:
        assert kind == "source"
        return {"postgres": PostgresSource}.get(name, object)


class _State:
    """What the launcher hands its commands (click's obj): .config and .plugins."""

    def __init__(self, databases: dict[str, _Database]) -> None:
        self.config = _Config(databases)
        self.plugins = _Plugins()


def invoke(state: _State, *args: str, answer: str = "") -> tuple[int, str]:
    group = click.Group("dbevents")
    plugin.register_commands(group)
    result = CliRunner().invoke(group, ["postgres", "drop-slot", *args], obj=state,
                                input=answer)
    return result.exit_code, result.output


def slots(pg: PgEnv) -> list[str]:
    return [r[0] for r in pg.server.execute(
        "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (pg.dbname,))]


def test_drop_slot(pg: PgEnv) -> None:
    slot = "dbevents_app_" + pg.dbname[-12:]
    pg.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    state = _State({"app": _Database("postgres", pg.url, PostgresOptions(slot=slot)),
                    "other": _Database("mysql", "mysql://x")})

    code, out = invoke(state, "app", answer="n\n")
    assert code == 1 and f"Drop the replication slot '{slot}' on {pg.url}?" in out
    assert "Aborted" in out and slots(pg) == [slot]

    holder = psycopg.connect(pg.url, replication="database", autocommit=True)
    try:
        holder.execute(f"START_REPLICATION SLOT {slot} LOGICAL 0/0"
                       f" (proto_version '1', publication_names 'none')")
        code, out = invoke(state, "app", "--yes")
        assert code == 1 and f"in use (PostgreSQL backend pid {holder.info.backend_pid})" in out
    finally:
        holder.close()
    assert slots(pg) == [slot]
    pg.wait_slot_released(slot)  # the holder's walsender lets go a moment after the close

    code, out = invoke(state, "app", answer="y\n")
    assert code == 0 and f"dropped the replication slot '{slot}'" in out
    assert slots(pg) == []

    code, out = invoke(state, "app", "--yes")
    assert code == 1 and f"there is no replication slot '{slot}'" in out
    code, out = invoke(state, "nope", "--yes")
    assert code == 2 and "no [databases.nope] section" in out
    code, out = invoke(state, "other", "--yes")
    assert code == 2 and "not a postgres database" in out


def test_drop_slot_masks_the_password(pg: PgEnv) -> None:
    url = pg.url.replace("postgres@", "postgres:s3cret@")
    code, out = invoke(_State({"app": _Database("postgres", url)}), "app", "--yes")
    assert code == 1 and "postgres:***@" in out and "s3cret" not in out


async def test_through_the_launcher(pg: PgEnv, tmp_path: Path) -> None:
    config = tmp_path / "dbevents.toml"
    config.write_text(
        f'[eventing]\nstore = "sqlite:///events.db"\n\n'
        f'[databases.{pg.dbname}]\ntype = "postgres"\nurl = "{pg.url}"\n')

    async def run(*args: str) -> tuple[int, str, str]:
        env = {**os.environ, "DBEVENTS_PLUGINS": "source-postgres,store-sqlite"}
        proc = await asyncio.create_subprocess_exec(
            DBEVENTS, "--config", str(config), "--log-format", "json", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    pg.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    source = await pg.started(tables=["t"])
    await source.close()
    pg.execute("INSERT INTO t SELECT i, repeat('z', 200) FROM generate_series(1, 500) i")
    code, out, err = await run("status", "--json")
    assert code == 0, err
    info = json.loads(out)["sources"][pg.dbname]
    assert info["type"] == "postgres" and info["slot"] == source.slot
    assert info["slot_active"] is False and info["lag_bytes"] > 100_000

    code, out, err = await run("postgres", "drop-slot", pg.dbname, "--yes")
    assert code == 0, err
    assert f"dropped the replication slot '{source.slot}'" in out
    assert slots(pg) == []

