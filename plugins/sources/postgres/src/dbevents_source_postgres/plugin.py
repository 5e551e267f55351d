"""The entry point (``source-postgres``): the ``postgres`` source and the
``dbevents postgres`` commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from dbevents import hookimpl

from dbevents_source_postgres.commands import postgres
from dbevents_source_postgres.source import PostgresSource


@hookimpl
def register_sources(register: Callable[[str, Any], None]) -> None:
    register("postgres", PostgresSource)


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(postgres)
