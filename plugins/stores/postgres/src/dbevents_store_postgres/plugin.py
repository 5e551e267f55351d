"""The entry point (``store-postgres``): registers the PostgreSQL store under
both URL schemes libpq accepts, ``postgresql://`` and ``postgres://``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dbevents import hookimpl

from dbevents_store_postgres.store import PostgresStore


@hookimpl
def register_stores(register: Callable[[str, Any], None]) -> None:
    register("postgresql", PostgresStore)
    register("postgres", PostgresStore)
