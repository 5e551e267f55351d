"""The entry point (``source-mongodb``): the ``mongodb`` source and its commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from dbevents import hookimpl

from dbevents_source_mongodb.commands import mongodb
from dbevents_source_mongodb.source import MongoSource


@hookimpl
def register_sources(register: Callable[[str, Any], None]) -> None:
    register("mongodb", MongoSource)


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(mongodb)
