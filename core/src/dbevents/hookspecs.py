"""The plugin contract. Each hook hands the plugin a ``register`` callback, so
adding a capability never changes a hook's signature."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
import pluggy

from dbevents.protocols import Matcher, Observer, Service, Sink, Source, Store

hookspec = pluggy.HookspecMarker("dbevents")
hookimpl = pluggy.HookimplMarker("dbevents")

# One registry per kind. Each class is checked against its kind's protocol when
# it is registered; one that does not fit is reported naming its distribution.
Register = Callable[[str, Any], None]
RegisterSource = Callable[[str, type[Source]], None]
RegisterSink = Callable[[str, type[Sink]], None]
RegisterStore = Callable[[str, type[Store]], None]
RegisterMatcher = Callable[[str, type[Matcher]], None]
RegisterService = Callable[[str, type[Service]], None]
RegisterObserver = Callable[[str, type[Observer]], None]


@hookspec
def register_sources(register: RegisterSource) -> None:
    """register("postgres", PostgresSource): a source, by the `type` users write."""


@hookspec
def register_sinks(register: RegisterSink) -> None:
    """register("webhook", WebhookSink): a sink, by the trigger's `sink` key."""


@hookspec
def register_stores(register: RegisterStore) -> None:
    """register("sqlite", SqliteStore): a store, by its URL scheme."""


@hookspec
def register_matchers(register: RegisterMatcher) -> None:
    """register("filter", RowFilter): extra trigger keys that narrow matching."""


@hookspec
def register_services(register: RegisterService) -> None:
    """register("admin", AdminService): a service that runs beside the engine,
    configured by the top-level table of that name ([admin])."""


@hookspec
def register_observers(register: RegisterObserver) -> None:
    """register("admin", AdminMetrics): a class the engine makes one instance of
    per `dbevents run`, told of its lifecycle moments (dbevents.protocols.Observer)."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add click commands or groups to the `dbevents` launcher."""
