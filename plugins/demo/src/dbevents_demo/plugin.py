"""Adds the `demo` command to the launcher."""

from __future__ import annotations

import click
from dbevents import hookimpl


@hookimpl
def register_commands(cli: click.Group) -> None:
    from dbevents_demo.command import demo

    cli.add_command(demo)
