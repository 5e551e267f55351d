"""Fixtures for the SQLite store tests: stores opened on real files in tmp_path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from dbevents.protocols import StoreSettings
from dbevents_store_sqlite import SqliteStore

OpenStore = Callable[..., Awaitable[SqliteStore]]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


@pytest.fixture
async def open_sqlite(db_path: Path) -> AsyncIterator[OpenStore]:
    """``await open_sqlite(role="worker", path=db_path, query="")``: an opened
    store; every store opened is closed afterwards."""
    opened: list[SqliteStore] = []

    async def open_(role: str = "worker", path: Path | None = None,
                    query: str = "") -> SqliteStore:
        url = f"sqlite:///{path or db_path}" + (f"?{query}" if query else "")
        store = SqliteStore(StoreSettings(url=url, role=role))
        await store.open()
        opened.append(store)
        return store

    yield open_
    for store in reversed(opened):
        await store.close()
