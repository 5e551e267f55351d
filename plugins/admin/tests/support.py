"""A real `dbevents run` with the [admin] service: a private PostgreSQL source,
the SQLite eventing DB and a real webhook receiver."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.e2e import Dbevents
from testsupport.ports import free_port
from testsupport.receiver import ThreadedReceiver
from testsupport.servers import PostgresServer

TOKEN = "admin-test-token-0123456789"
XSS = '<script>window.__xss = 1</script><img src="x" onerror="window.__xss = 2">'

CONFIG = """
[eventing]
store = "sqlite:///events.db"

[databases.app]
type = "postgres"
url = "{dsn}"

[admin]
listen = "127.0.0.1:{port}"
token = "{token}"

[[triggers]]
name = "items"
tables = ["items"]
url = "{hook}"
retries = 0
"""


@attrs.frozen
class Admin:
    """A running `dbevents run` with its admin API at ``base``."""

    base: str
    config: Path
    sql: Callable[[str], Any]
    receiver: ThreadedReceiver
    process: Dbevents

    def call(self, method: str, path: str, body: Any = None, token: str | None = TOKEN,
             base: str | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request((base or self.base) + path, data=data, method=method)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            text = exc.read()
            return exc.code, json.loads(text) if text.startswith(b"{") else text

    def events(self, query: str = "", base: str | None = None) -> list[dict[str, Any]]:
        status, page = self.call("GET", "/api/events?limit=500&" + query, base=base)
        assert status == 200, page
        return list(page["events"])

    def wait_until(self, what: str, ready: Callable[[], bool], timeout: float = 60) -> None:
        """Wait for another process to get somewhere (not a timing assertion)."""
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"still not {what} after {timeout} s:\n"
                                     + self.process.text(complete=False)[-3000:])
            time.sleep(0.1)


@pytest.fixture
def admin(postgres_server: PostgresServer, tmp_path: Path,
          receiver: ThreadedReceiver) -> Iterator[Admin]:
    name = f"admin_{uuid.uuid4().hex[:8]}"
    postgres_server.create_database(name)
    postgres_server.execute("CREATE TABLE items (id int PRIMARY KEY, name text)", dbname=name)
    port = free_port()
    config = tmp_path / "dbevents.toml"
    config.write_text(CONFIG.format(dsn=postgres_server.dsn(name), port=port, token=TOKEN,
                                    hook=receiver.url("/hook")))
    receiver.script("/hook", 500)  # every event fails until a test says otherwise
    process = Dbevents(config).start()
    try:
        yield Admin(base=f"http://127.0.0.1:{port}", config=config, receiver=receiver,
                    sql=lambda text: postgres_server.execute(text, dbname=name),
                    process=process)
    finally:
        process.stop()
        postgres_server.drop_database(name)
