"""The entry point: registers the ``sqlite`` store (chosen by ``sqlite:///`` URLs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dbevents import hookimpl

from dbevents_store_sqlite.store import SqliteStore


@hookimpl
def register_stores(register: Callable[[str, Any], None]) -> None:
    register("sqlite", SqliteStore)
