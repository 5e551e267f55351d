"""The plugin contract. Each hook hands the plugin a ``register`` callback, so
adding a capability never changes a hook's signature."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
import pluggy

hookspec = pluggy.HookspecMarker("dbevents")
hookimpl = pluggy.HookimplMarker("dbevents")

Register = Callable[[str, Any], None]


@hookspec
def register_sources(register: Register) -> None:
    """register("postgres", PostgresSource): a source, by the `type` users write."""


@hookspec
def register_sinks(register: Register) -> None:
    """register("webhook", WebhookSink): a sink, by the trigger's `sink` key."""


@hookspec
def register_stores(register: Register) -> None:
    """register("sqlite", SqliteStore): a store, by its URL scheme."""


@hookspec
def register_matchers(register: Register) -> None:
    """register("filter", RowFilter): extra trigger keys that narrow matching."""


@hookspec
def register_services(register: Register) -> None:
    """register("admin", AdminService): a service that runs beside the engine,
    configured by the top-level table of that name ([admin])."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add click commands or groups to the `dbevents` launcher."""
