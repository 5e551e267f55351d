"""A paused trigger (its receiver down) shows in the API and on the console's
trigger list, read from the store. In process, on the real SQLite store."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from dbevents import StoreSettings
from dbevents import config as cfg
from dbevents.plugins import load
from dbevents_admin.plugin import AdminService, ConsoleContext
from dbevents_store_sqlite.store import SqliteStore

from testsupport.ports import free_port


async def test_a_paused_trigger_shows_since_when(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBEVENTS_ADMIN_TOKEN", raising=False)
    plugins = load()
    port = free_port()
    config = cfg.parse(tomllib.loads(
        f'[admin]\nlisten = "127.0.0.1:{port}"\n'
        '[[triggers]]\nname = "orders"\nurl = "http://127.0.0.1:9/hook"\n'
        '[[triggers]]\nname = "users"\nurl = "http://127.0.0.1:9/users"\n'), plugins)
    store = SqliteStore(StoreSettings(url=f"sqlite:///{tmp_path}/events.db"))
    await store.open()
    since = datetime(2026, 12, 5, 18, 30, tzinfo=UTC)
    await store.set_trigger_paused("orders", since)
    service = AdminService(config.services["admin"], ConsoleContext(store, config, plugins))
    await service.start()
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/api/triggers") as r:
                body = await r.json()
            triggers = body["triggers"] if isinstance(body, dict) else body
            by_name = {t["name"]: t for t in triggers}
            assert by_name["orders"]["paused_since"] == since.isoformat()
            assert by_name["users"]["paused_since"] is None
            async with http.get(base + "/") as r:
                page = await r.text()
            assert f"paused since {since.isoformat()} (receiver down)" in page
    finally:
        await service.close()
        await store.close()
