"""`dbevents mysql ...`: commands for the operator.

``reset-position NAME`` moves the stored checkpoint of a mysql database, e.g. after
the binlog it pointed into was purged. Run it with the worker stopped: a running
worker would write its own checkpoint over it.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click
from dbevents import ConfigError, DbeventsError, SetupError

from dbevents_source_mysql import checks
from dbevents_source_mysql.options import MysqlOptions, parse_url
from dbevents_source_mysql.position import BinlogPosition


@click.group("mysql")
def mysql_group() -> None:
    """Commands of the MySQL/MariaDB source."""


@mysql_group.command("reset-position")
@click.argument("name")
@click.option("--to", "target", default="end", show_default=True,
              help='"end" (the binlog\'s current end: skip what was missed), "earliest" '
                   '(the oldest binlog file on the server: replay what is left) or '
                   'FILE:OFFSET.')
@click.pass_obj
def reset_position(state: Any, name: str, target: str) -> None:
    """Set the checkpoint of mysql database NAME (stop the worker first)."""
    try:
        old, new = asyncio.run(_reset(state, name, target))
    except DbeventsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    click.echo(f"checkpoint of {name}: {old or '(none)'} -> {new}")


async def _reset(state: Any, name: str, target: str) -> tuple[str | None, str]:
    # The launcher's context object holds the loaded config and opens the store.
    config = getattr(state, "config", None)
    if config is None or not hasattr(state, "store"):
        raise SetupError("this command needs the dbevents launcher's config and store")
    db = config.databases.get(name)
    if db is None:
        raise ConfigError(f"no [databases.{name}] in the config", path=f"databases.{name}")
    if db.type != "mysql":
        raise ConfigError(f"[databases.{name}] is of type {db.type!r}, not mysql",
                          path=f"databases.{name}.type")
    position = await asyncio.to_thread(_resolve, db.url, db.options or MysqlOptions(), name,
                                       target)
    store = state.store(role="admin")
    await store.open()
    try:
        old = await store.checkpoint(name)
        await store.enqueue([], {name: position.to_position()})
    finally:
        await store.close()
    return (str(old) if old else None), str(position)


def _resolve(url: str, options: MysqlOptions, name: str, target: str) -> BinlogPosition:
    params = parse_url(url, key=f"databases.{name}.url")
    conn = checks.connect(params, options.connect_timeout, url)
    try:
        if target == "end":
            return checks.current_position(conn)
        if target == "earliest":
            return checks.earliest_position(conn)
        try:
            position = BinlogPosition.parse(target)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--to") from None
        checks.check_resume(conn, name, position)
        return position
    finally:
        conn.close()
