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

    def make_source(self) -> PostgresSource:
        return self.pg.source(tables=["items"])

    async def write(self, n: int) -> None:
        for _ in range(n):
            self.written += 1
            self.pg.execute("INSERT INTO items (id, name) VALUES (%s, %s)",
                            (self.written, f"item {self.written}"))


class TestPostgresSourceContract(SourceContract):
    @pytest.fixture
    def source_env(self, pg: PgEnv) -> Iterator[Any]:
        pg.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        yield _Env(pg)
