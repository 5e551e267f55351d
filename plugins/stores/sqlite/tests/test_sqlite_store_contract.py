"""The core's store contract, on a real SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from dbevents.protocols import Store
from dbevents.testing import StoreContract
from dbevents_store_sqlite import SqliteStore

OpenStore = Callable[..., Awaitable[SqliteStore]]


class TestSqliteStore(StoreContract):
    @pytest.fixture
    async def open_store(self, open_sqlite: OpenStore
                         ) -> AsyncIterator[Callable[..., Awaitable[Store]]]:
        workers: list[SqliteStore] = []

        async def open_(role: str = "worker") -> Store:
            if role == "worker":
                # One worker per file: a new worker stands for a restart, so the
                # previous one goes away the way a killed process does (its
                # connection and lock are dropped, its claims stay in the file).
                for old in workers:
                    await old.close()
            store = await open_sqlite(role=role)
            if role == "worker":
                workers.append(store)
            return store

        yield open_
