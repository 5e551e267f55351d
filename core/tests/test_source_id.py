"""The payload's CloudEvents `source`: `[eventing] source_id` when set, else an id
generated once and kept in the eventing DB. Through the engine, with the
in-memory plugins and a config parsed from TOML."""

from __future__ import annotations

import asyncio
import json
import tomllib

import pytest
from dbevents import config as cfg
from dbevents.engine import Engine
from dbevents.plugins import Plugins
from dbevents.protocols import StoreSettings
from dbevents.testing import DELIVERIES, MemoryStore, database, isolated_plugins, reset

CONFIG = """
[eventing]
store = "memory://ids"
{source_id}

[databases.app]
type = "memory"
url = "memory://app"

[[triggers]]
name = "t"
url = "http://unused"
sink = "memory"
"""


@pytest.fixture(autouse=True)
def _clean() -> None:
    reset()


async def deliver(plugins: Plugins, config: cfg.Config, rows: int) -> list[dict[str, object]]:
    """Commit ``rows`` more rows, run an engine until all are delivered, stop it."""
    db = database("app")
    start = db.change_count()
    for n in range(start, start + rows):
        db.commit(("users", "insert", str(n), {"id": n}))
    engine = Engine(config, plugins)
    task = asyncio.create_task(engine.run())
    try:
        async with asyncio.timeout(20):
            while len(DELIVERIES) < start + rows and not task.done():
                await asyncio.sleep(0.01)
    finally:
        engine.stop()
        await asyncio.wait_for(task, 10)
    return [json.loads(p) for _, _, p in DELIVERIES[start:]]


async def test_configured_source_id_is_the_payload_source() -> None:
    plugins = isolated_plugins()
    config = cfg.parse(tomllib.loads(CONFIG.format(source_id='source_id = "orders-eu-1"')),
                       plugins, {})
    assert config.eventing.source_id == "orders-eu-1"
    bodies = await deliver(plugins, config, 3)
    assert [b["source"] for b in bodies] == ["orders-eu-1"] * 3


async def test_without_it_the_source_is_generated_once_and_kept() -> None:
    plugins = isolated_plugins()
    config = cfg.parse(tomllib.loads(CONFIG.format(source_id="")), plugins, {})
    assert config.eventing.source_id is None
    first = await deliver(plugins, config, 2)
    # A restart on the same eventing DB keeps the id it generated.
    again = await deliver(plugins, config, 2)
    kept = await MemoryStore(StoreSettings(url="memory://ids")).instance_id()
    assert kept and {b["source"] for b in first + again} == {kept}
