"""The core's store contract, on a real PostgreSQL database."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from dbevents.protocols import Store
from dbevents.testing import StoreContract
from dbevents_store_postgres import PostgresStore

OpenPg = Callable[..., Awaitable[PostgresStore]]


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def open_store(self, open_pg: OpenPg) -> Callable[..., Awaitable[Store]]:
        # Many workers share one PostgreSQL store: a new worker does not end the
        # others, it takes over their claims when the leases run out.
        async def open_(role: str = "worker") -> Store:
            return await open_pg(role=role)

        return open_
