"""A source that starts "now" on a database seen for the first time: the engine
stores that position before it reports running, so a change made after the
"running" line is captured even if the process dies before capture began."""

from __future__ import annotations

import asyncio
import json
import tomllib

import pytest
from dbevents import config as cfg
from dbevents.engine import Engine
from dbevents.plugins import Plugins, module_from
from dbevents.protocols import StoreSettings
from dbevents.testing import DELIVERIES, MemoryStore, database, isolated_plugins, reset
from dbevents.testing.memory import MemorySource
from dbevents.values import Position
from structlog.testing import capture_logs

CONFIG = """
[eventing]
store = "memory://anchor"

[databases.app]
type = "memory-now"
url = "memory://app"

[[triggers]]
name = "t"
url = "http://unused"
sink = "memory"
"""


class NowSource(MemorySource):
    """Starts at the end of the database, like a binlog reader with start = "end"."""

    asked = 0

    async def initial_position(self) -> Position | None:
        NowSource.asked += 1
        return Position(str(len(self.db.transactions)))


@pytest.fixture(autouse=True)
def _clean() -> None:
    reset()
    NowSource.asked = 0


def _config() -> tuple[cfg.Config, Plugins]:
    plug = module_from("now", register_sources=lambda register: register("memory-now",
                                                                          NowSource))
    plugins = isolated_plugins(("now", plug))
    return cfg.parse(tomllib.loads(CONFIG), plugins, {}), plugins


async def _checkpoint() -> Position | None:
    return await MemoryStore(StoreSettings(url="memory://anchor")).checkpoint("app")


async def test_the_start_is_stored_before_running_and_kept_across_a_crash() -> None:
    config, plugins = _config()
    db = database("app")
    for n in range(3):  # history from before dbevents was set up: not captured
        db.commit(("users", "insert", str(n), {"id": n}))

    engine = Engine(config, plugins)
    with capture_logs() as logs:
        task = asyncio.create_task(engine.run())
        async with asyncio.timeout(10):
            while not any(e["event"] == "running" for e in logs):
                await asyncio.sleep(0.005)
        # The process dies right after saying it runs, before capturing anything.
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    events = [e["event"] for e in logs]
    assert events.index("start position stored") < events.index("running")
    assert await _checkpoint() == Position("3")

    # Written after "running", while no dbevents runs; a restart begins at the
    # stored start, not at a new "now" that would skip them.
    for n in range(3, 5):
        db.commit(("users", "insert", str(n), {"id": n}))
    engine = Engine(config, plugins)
    task = asyncio.create_task(engine.run())
    try:
        async with asyncio.timeout(10):
            while len(DELIVERIES) < 2:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # nothing more arrives
    finally:
        engine.stop()
        await asyncio.wait_for(task, 10)
    # Exactly the two changes after the start: none of the history, none lost.
    assert sorted(json.loads(payload)["data"]["docId"] for _, _, payload in DELIVERIES) == \
        ["3", "4"]
    assert NowSource.asked == 1  # with a checkpoint stored, never asked again
