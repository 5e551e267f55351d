"""A kit for plugin authors: in-memory plugins and reusable contract suites.

    from dbevents.testing import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        async def store(self, tmp_path):
            s = MyStore(StoreSettings(url=...))
            await s.open()
            yield s
            await s.close()
"""

from dbevents.testing.contracts import SinkContract, SourceContract, StoreContract, make_event
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
from dbevents.testing.plugins import isolated_plugins

__all__ = [
    "DELIVERIES",
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
    "reset",
]
