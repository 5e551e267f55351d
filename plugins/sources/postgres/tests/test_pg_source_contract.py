"""The core's source contract, against a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from dbevents.testing import SourceContract
from dbevents_source_postgres import PostgresSource

if TYPE_CHECKING:
    from plugins.sources.postgres.tests.conftest import PgEnv


class _Env:
    def __init__(self, pg: PgEnv) -> None:
        self.pg = pg
        self.written = 0

    def make_source(self, batch_size: int | None = None) -> PostgresSource:
        if batch_size is None:
            return self.pg.source(tables=["items"])
        return self.pg.source(tables=["items"], batch_size=batch_size)

    async def write(self, n: int) -> None:
        for _ in range(n):
            self.written += 1
            self.pg.execute("INSERT INTO items (id, name) VALUES (%s, %s)",
                            (self.written, f"item {self.written}"))

    async def update_and_delete(self) -> None:
        self.pg.execute("BEGIN; UPDATE items SET name = 'renamed' WHERE id = 1; "
                        "DELETE FROM items WHERE id = 2; COMMIT")


class TestPostgresSourceContract(SourceContract):
    @pytest.fixture
    def source_env(self, pg: PgEnv) -> Iterator[Any]:
        pg.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        pg.execute("ALTER TABLE items REPLICA IDENTITY FULL")  # updates carry "old"
        yield _Env(pg)
