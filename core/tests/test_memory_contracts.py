"""The contract suites run against the in-memory plugins: proves the suites and
the in-memory plugins the engine tests rely on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from dbevents.protocols import SourceSettings, Store, StoreSettings
from dbevents.testing import (
    MemorySink,
    MemorySource,
    MemoryStore,
    SinkContract,
    SourceContract,
    StoreContract,
    database,
    reset,
)
from dbevents.testing.memory import MemorySinkOptions, MemorySourceOptions
from dbevents.values import Trigger


@pytest.fixture(autouse=True)
def _clean() -> None:
    reset()


class TestMemoryStore(StoreContract):
    @pytest.fixture
    async def open_store(self) -> AsyncIterator[Callable[..., Awaitable[Store]]]:
        async def open_(role: str = "worker") -> Store:
            s = MemoryStore(StoreSettings(url="memory://contract", role=role))
            await s.open()
            return s

        yield open_


class _Env:
    def __init__(self) -> None:
        self.written = 0

    def make_source(self, batch_size: int | None = None) -> MemorySource:
        options = None if batch_size is None else MemorySourceOptions(chunk=batch_size)
        return MemorySource(SourceSettings(name="app", url="memory://db", options=options))

    async def write(self, n: int) -> None:
        db = database("db")
        for _ in range(n):
            self.written += 1
            db.commit(("users", "insert", str(self.written), {"id": self.written}))

    async def update_and_delete(self) -> None:
        database("db").commit(("users", "update", "1", {"id": 1, "v": 2}, {"id": 1}),
                              ("users", "delete", "2", {"id": 2}))


class TestMemorySource(SourceContract):
    @pytest.fixture
    def source_env(self) -> Any:
        return _Env()


class TestMemorySink(SinkContract):
    @pytest.fixture
    async def sink(self) -> MemorySink:
        s = MemorySink()
        await s.open()
        return s

    @pytest.fixture
    def ok_trigger(self) -> Trigger:
        return Trigger(name="ok", url="http://x", sink="memory")

    @pytest.fixture
    def failing_trigger(self) -> Trigger:
        return Trigger(name="bad", url="http://x", sink="memory",
                       sink_options=MemorySinkOptions(always_fail=True))


class TestMemorySinkBatched(TestMemorySink):
    @pytest.fixture
    def ok_trigger(self) -> Trigger:
        return Trigger(name="ok", url="http://x", sink="memory",
                       sink_options=MemorySinkOptions(batch_size=10))
