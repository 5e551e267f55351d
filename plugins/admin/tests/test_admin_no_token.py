"""Without a token (loopback only): the server answers only requests addressed to
a loopback name (no DNS rebinding), and actions must be JSON (no cross-site
form). In process, on the real SQLite store."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from dbevents import StoreSettings
from dbevents import config as cfg
from dbevents.plugins import load
from dbevents.testing import make_event
from dbevents_admin.plugin import AdminService, ConsoleContext
from dbevents_store_sqlite.store import SqliteStore

from testsupport.ports import free_port


@pytest.fixture
async def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    monkeypatch.delenv("DBEVENTS_ADMIN_TOKEN", raising=False)
    plugins = load()
    port = free_port()
    config = cfg.parse(tomllib.loads(f'[admin]\nlisten = "127.0.0.1:{port}"\n'), plugins)
    store = SqliteStore(StoreSettings(url=f"sqlite:///{tmp_path}/events.db"))
    await store.open()
    await store.enqueue([make_event(doc_id="<b>1</b>")], {})
    service = AdminService(config.services["admin"], ConsoleContext(store, config, plugins))
    await service.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await service.close()
        await store.close()


async def test_loopback_without_a_token(base: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/api/events") as r:
            assert r.status == 200
            [ev] = (await r.json())["events"]
            assert ev["docId"] == "<b>1</b>"
        async with http.get(base + "/events") as r:
            page = await r.text()
            assert "&lt;b&gt;1&lt;/b&gt;" in page and "<b>1</b>" not in page
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        # Another name for this address: refused.
        async with http.get(base + "/api/events", headers={"Host": "evil.example:80"}) as r:
            assert r.status == 401
        # A form post (what another site could make the browser send): refused.
        async with http.post(base + f"/api/events/{ev['id']}/redeliver",
                             data={"x": "1"}) as r:
            assert r.status == 415
        async with http.post(base + f"/api/events/{ev['id']}/redeliver", json={}) as r:
            assert (r.status, await r.json()) == (200, {"redelivered": 1})
