"""The source under the real engine (in-memory store and sink): the payload, and a
killed worker followed by a new one: every change stored and delivered, once."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from dbevents import Operation, Status, StoreSettings, Trigger
from dbevents.config import Config, DatabaseConfig, EventingConfig
from dbevents.engine import Engine
from dbevents.testing import DELIVERIES, MemorySink, MemoryStore, isolated_plugins, reset
from dbevents.testing.memory import STORES
from dbevents_source_mysql import MysqlOptions
from dbevents_source_mysql import plugin as mysql_plugin

TRIGGER = Trigger(name="items", url="http://receiver.invalid/hook", sink="memory",
                  operations=frozenset({Operation.INSERT, Operation.UPDATE}))


def _engine(env: Any) -> Engine:
    config = Config(
        eventing=EventingConfig(store="memory://mysql-engine", source_id="test"),
        databases={"app": DatabaseConfig("app", "mysql", env.server.dsn(env.database),
                                         MysqlOptions(start=env.start, batch_size=7))},
        triggers=(TRIGGER,),
    )
    plugins = isolated_plugins(("source-mysql", mysql_plugin))
    return Engine(config, plugins, store=MemoryStore(StoreSettings(url="memory://mysql-engine")),
                  sinks={"memory": MemorySink()})


def _stored() -> int:
    state = STORES.get("mysql-engine")
    return len(state.events) if state is not None else 0


async def _until(check: Any) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_killed_worker_then_a_new_one(mysql_env: Any) -> None:
    reset()
    try:
        first = asyncio.create_task(_engine(mysql_env).run())
        await mysql_env.write(40)
        await _until(lambda: _stored() >= 10)
        first.cancel()  # killed: whatever was not stored with its checkpoint is read again
        with contextlib.suppress(BaseException):
            await first
        await mysql_env.write(40)
        mysql_env.execute("UPDATE items SET name = 'renamed' WHERE id = 1")
        second_engine = _engine(mysql_env)
        second = asyncio.create_task(second_engine.run())
        state = STORES["mysql-engine"]
        await _until(lambda: len(state.events) >= 81 and all(
            e.status is Status.DELIVERED for e in state.events.values()))
        second_engine.stop()
        await asyncio.wait_for(second, 20)

        events = list(state.events.values())
        assert len(events) == 81 and len({e.id for e in events}) == 81
        inserts = sorted(int(e.doc_id or 0) for e in events if e.type == "DB_INSERT")
        assert inserts == list(range(1, 81))  # every row once: nothing lost, none twice
        assert {eid for _, eid, _ in DELIVERIES} == {e.id for e in events}
        [update] = [json.loads(e.payload) for e in events if e.type == "DB_UPDATE"]
        assert update["data"] == {"db": "sql-mysql", "col": "items", "docId": "1",
                                  "doc": {"id": 1, "name": "renamed"},
                                  "old": {"id": 1, "name": "item 0"}}
        assert update["time"].endswith("Z") and update["source"] == "test"
        assert state.checkpoints["app"].value.startswith(mysql_env.start.split(":")[0])
    finally:
        reset()
