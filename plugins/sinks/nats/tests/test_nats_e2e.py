"""End to end in one process: the engine with the in-memory source, the SQLite
store and the NATS sink, delivering into a private JetStream."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import dbevents_sink_nats.plugin as nats_plugin
import dbevents_store_sqlite.plugin as sqlite_plugin
from dbevents import EventFilter, Status, StoreUnavailable
from dbevents.engine import Engine
from dbevents.testing import database, isolated_plugins, parse_config, reset, running
from nats.js import JetStreamContext

from plugins.sinks.nats.tests.conftest import Stream
from testsupport.nats_server import NatsServer


def config(tmp_path: Path, name: str, url: str, **keys: Any) -> str:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    return f"""
[eventing]
store = "sqlite:///{tmp_path}/events.db"

[databases.app]
type = "memory"
url = "memory://{name}"

[[triggers]]
name = "orders"
tables = ["orders"]
sink = "nats"
url = "{url}"
retries = 5
backoff_base = 50
backoff_max = 200
timeout = 2000
{extra}"""


async def settled(engine: Engine, expected: int) -> list[Any]:
    """The events once all ``expected`` are stored and none is pending; bounded
    only so that a broken run fails instead of hanging."""
    events: list[Any] = []
    for _ in range(2000):
        events = await listed(engine)
        if len(events) == expected and all(
                e.status in (Status.DELIVERED, Status.FAILED) for e in events):
            return events
        await asyncio.sleep(0.01)
    raise AssertionError(f"not settled: {[(e.status, e.attempts) for e in events]}")


async def listed(engine: Engine) -> list[Any]:
    try:
        return await engine.store.list_events(EventFilter(limit=10_000))
    except StoreUnavailable:  # the engine has not opened it yet
        return []


def plugins() -> Any:
    return isolated_plugins(("sink-nats", nats_plugin), ("store-sqlite", sqlite_plugin))


async def test_changes_reach_the_stream_and_attempts_are_logged(
        tmp_path: Path, nats_server: NatsServer, js: JetStreamContext,
        stream: Stream) -> None:
    reset()
    name = uuid.uuid4().hex
    db = database(name)
    for i in range(20):
        db.commit(("orders", "insert", str(i), {"id": i}))
    db.commit(("orders", "update", "3", {"id": 3, "v": 2}), ("orders", "delete", "4", {"id": 4}))
    cfg = parse_config(config(tmp_path, name, nats_server.url, stream=stream.name,
                              subject=f"{stream.prefix}.{{table}}.{{type}}", batch_size=10),
                       plugins())
    async with running(cfg, plugins()) as engine:
        events = await settled(engine, 22)
        assert {e.status for e in events} == {Status.DELIVERED}
        attempts = {e.id: await engine.store.attempts(e.id) for e in events}
    info = await js.stream_info(stream.name)
    assert info.state.messages == 22
    seen = {}
    for seq in range(1, 23):
        msg = await js.get_msg(stream.name, seq)
        assert msg.headers is not None
        seen[msg.headers["Nats-Msg-Id"]] = (msg.subject, json.loads(msg.data))
    by_id = {e.id: e for e in events}
    assert set(seen) == set(by_id)
    for eid, (subject, body) in seen.items():
        assert body["id"] == eid
        assert subject == f"{stream.prefix}.orders.{by_id[eid].type}"
    # The invocation log holds where each message went in the stream.
    for eid, [attempt] in attempts.items():
        assert attempt.ok and attempt.request_headers["Nats-Msg-Id"] == eid
        ack = json.loads(attempt.response_body or "")
        assert ack["stream"] == stream.name and 1 <= ack["seq"] <= 22
        assert seen[eid][0] == ack["subject"]


async def test_a_missing_stream_fails_attempts_until_it_exists(
        tmp_path: Path, nats_server: NatsServer, js: JetStreamContext) -> None:
    reset()
    name = uuid.uuid4().hex
    stream_name = f"LATE_{name[:8]}"
    database(name).commit(("orders", "insert", "1", {"id": 1}))
    cfg = parse_config(config(tmp_path, name, nats_server.url, stream=stream_name,
                              subject=f"late{name[:8]}.{{table}}"), plugins())
    async with running(cfg, plugins()) as engine:
        for _ in range(2000):
            [event] = await listed(engine) or [None]
            if event is not None and event.attempts >= 1:
                break
            await asyncio.sleep(0.01)
        await js.add_stream(name=stream_name, subjects=[f"late{name[:8]}.>"])
        try:
            [event] = await settled(engine, 1)
            attempts = await engine.store.attempts(event.id)
        finally:
            await js.delete_stream(stream_name)
    assert event.status is Status.DELIVERED
    assert not attempts[0].ok
    assert attempts[0].error == f"stream {stream_name!r} does not exist on {nats_server.url}"
    assert attempts[-1].ok
    assert json.loads(attempts[-1].response_body or "")["seq"] == 1
