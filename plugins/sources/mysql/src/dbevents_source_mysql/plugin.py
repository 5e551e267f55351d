"""The entry point (``source-mysql``): the ``mysql`` source and its commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from dbevents import hookimpl

from dbevents_source_mysql.commands import mysql_group
from dbevents_source_mysql.source import MysqlSource


@hookimpl
def register_sources(register: Callable[[str, Any], None]) -> None:
    register("mysql", MysqlSource)


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(mysql_group)
