"""MongoDB at the wire level: the real mongodb source and engine against the
scripted change-stream server of the mongodb source's tests (mockupdb), the
webhook sink and a real HTTP receiver: only documents the condition takes are
stored and delivered, nested fields included."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

from dbevents import EventFilter, StoreSettings
from dbevents.testing import isolated_plugins, parse_config, running
from dbevents_matcher_cel import plugin as cel_plugin
from dbevents_sink_webhook import plugin as webhook_plugin
from dbevents_source_mongodb import plugin as mongo_plugin
from dbevents_store_sqlite import plugin as sqlite_plugin

from testsupport.receiver import ThreadedReceiver

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "sources" / "mongodb" / "tests"))
from mongo_fake import FakeReplicaSet

CONFIG = """
[eventing]
store = "sqlite:///{dir}/events.db"

[databases.shop]
type = "mongodb"
url = "{url}"

[[triggers]]
name = "all"
tables = "orders"
url = "{hooks}/all"

[[triggers]]
name = "vip-orders"
tables = "orders"
condition = "db == 'shop' && 'vip' in doc.tags && doc.customer.country in ['FR', 'DE']"
url = "{hooks}/vip"
"""


async def test_mongodb_documents_filtered_by_condition(
        tmp_path: Path, receiver: ThreadedReceiver) -> None:
    fake = FakeReplicaSet().start()
    try:
        plugins = isolated_plugins(("source-mongodb", mongo_plugin), ("matcher-cel", cel_plugin),
                                   ("sink-webhook", webhook_plugin),
                                   ("store-sqlite", sqlite_plugin), memory=False)
        config = parse_config(CONFIG.format(dir=tmp_path, url=fake.url(),
                                            hooks=receiver.url("").rstrip("/")), plugins)
        store = plugins.get("store", "sqlite")(StoreSettings(url=config.eventing.store,
                                                             role="admin"))
        async with running(config, plugins):
            # The first run starts from "now" and stores that point at once.
            deadline = asyncio.get_running_loop().time() + 30
            await store.open()
            while await store.checkpoint("shop") is None:
                assert asyncio.get_running_loop().time() < deadline, "no checkpoint"
                await asyncio.sleep(0.05)
            fake.insert({"_id": 1, "tags": ["vip"], "customer": {"country": "FR"}})  # kept
            fake.insert({"_id": 2, "tags": [], "customer": {"country": "FR"}})
            fake.insert({"_id": 3, "tags": ["vip"], "customer": {"country": "US"}})
            fake.insert({"_id": 4, "tags": ["vip"]})  # no customer: an error, not kept
            fake.insert({"_id": 5, "tags": ["vip", "new"], "customer": {"country": "DE"}})
            await asyncio.to_thread(receiver.wait_for, 5, "/all", 30)
            await asyncio.to_thread(receiver.wait_for, 2, "/vip", 30)
        assert [r.json()["data"]["docId"] for r in receiver.requests("/vip")] == ["1", "5"]
        stored = await store.list_events(EventFilter(trigger="vip-orders", limit=100))
        assert sorted(e.doc_id for e in stored) == ["1", "5"]
        await store.close()
    finally:
        threading.Thread(target=fake.stop, daemon=True).start()
