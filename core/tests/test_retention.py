"""Retention: the engine purges delivered events older than [eventing] retention
in the background; failed ones stay."""

from __future__ import annotations

import asyncio

import pytest
from dbevents import engine as engine_mod
from dbevents.config import Config, DatabaseConfig, EventingConfig
from dbevents.engine import Engine
from dbevents.testing import database, isolated_plugins, reset
from dbevents.testing.memory import STORES, MemorySinkOptions
from dbevents.values import Status, Trigger


@pytest.fixture(autouse=True)
def _clean() -> None:
    reset()


async def test_delivered_events_are_purged_failed_ones_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "RETENTION_EVERY", 0.05)
    db = database("db")
    for i in range(5):
        db.commit(("users", "insert", str(i), {"id": i}))
    cfg = Config(
        eventing=EventingConfig(store="memory://r", source_id="x", retention=0.2),
        databases={"app": DatabaseConfig("app", "memory", "memory://db")},
        triggers=(
            Trigger(name="ok", url="http://x", sink="memory"),
            Trigger(name="bad", url="http://x", sink="memory", retries=0,
                    sink_options=MemorySinkOptions(always_fail=True)),
        ),
    )
    engine = Engine(cfg, isolated_plugins())
    task = asyncio.create_task(engine.run())
    try:
        async def settled() -> None:
            while True:
                events = list(STORES["r"].events.values()) if "r" in STORES else []
                if events and all(e.status is Status.FAILED for e in events) and \
                        engine.dispatcher.delivered == 5:
                    return
                await asyncio.sleep(0.02)

        await asyncio.wait_for(settled(), 10)
    finally:
        engine.stop()
        await asyncio.wait_for(task, 10)
    remaining = list(STORES["r"].events.values())
    assert len(remaining) == 5 and {e.trigger for e in remaining} == {"bad"}
