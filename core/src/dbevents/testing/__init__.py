"""A kit for plugin authors: in-memory plugins and reusable contract suites.

    from dbevents.testing import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        async def open_store(self, tmp_path):
            opened = []

            async def open_(role="worker"):
                s = MyStore(StoreSettings(url=f"mystore://{tmp_path}/db", role=role))
                await s.open()
                opened.append(s)
                return s

            yield open_
            for s in opened:
                await s.close()

The suites need pytest and pytest-asyncio in auto mode: ``dbevents[testing]``.
"""

from dbevents.testing.contracts import (
    MatcherContract,
    SinkContract,
    SourceContract,
    StoreContract,
    make_event,
)
from dbevents.testing.memory import (
    DELIVERIES,
    MemoryDatabase,
    MemoryPlugin,
    MemorySink,
    MemorySource,
    MemoryStore,
    database,
    reset,
)
from dbevents.testing.plugins import isolated_plugins, parse_config, running

__all__ = [
    "DELIVERIES",
    "MatcherContract",
    "MemoryDatabase",
    "MemoryPlugin",
    "MemorySink",
    "MemorySource",
    "MemoryStore",
    "SinkContract",
    "SourceContract",
    "StoreContract",
    "database",
    "isolated_plugins",
    "make_event",
    "parse_config",
    "reset",
    "running",
]
