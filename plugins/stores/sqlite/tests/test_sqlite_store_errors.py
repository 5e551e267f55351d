"""Stores that cannot be used fail at open() with a SetupError (exit code 2)
that names the file and the fix; failures while running surface as
StoreUnavailable, which the engine retries."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from dbevents.errors import ConfigError, SetupError, StoreUnavailable
from dbevents.protocols import StoreSettings
from dbevents.testing import make_event
from dbevents.values import Attempt, Finish, Status
from dbevents_store_sqlite import SqliteStore

OpenStore = Callable[..., Awaitable[SqliteStore]]
NOBODY = 65534


def _try_open(url: str) -> str:
    async def attempt() -> str:
        store = SqliteStore(StoreSettings(url=url))
        try:
            await store.open()
        except SetupError as exc:
            return f"SetupError: {exc}"
        await store.close()
        return "opened"

    return asyncio.run(attempt())


def open_as_unprivileged_user(url: str) -> str:
    """Open a worker store on ``url`` as a user that file permissions apply to:
    this user, or when running as root (which ignores them) a forked child that
    has become ``nobody``. Returns "opened" or the SetupError's message."""
    if os.geteuid() != 0:
        return _try_open(url)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.close(read_end)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            message = _try_open(url)
        except BaseException as exc:
            message = f"child failed: {exc!r}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder other users can enter (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="dbevents-sqlite-perm-"))
    folder.chmod(0o755)
    yield folder
    for path in [folder, *folder.iterdir()]:
        path.chmod(stat.S_IRWXU)
    shutil.rmtree(folder)


def _make_store_file(path: Path) -> None:
    async def create() -> None:
        store = SqliteStore(StoreSettings(url=f"sqlite:///{path}"))
        await store.open()
        await store.enqueue([make_event()], {})
        await store.close()

    asyncio.run(create())


def test_a_read_only_file_is_refused(shared_dir: Path) -> None:
    db = shared_dir / "events.db"
    _make_store_file(db)
    shared_dir.chmod(0o777)  # the folder is fine; the file is not
    db.chmod(0o444)
    message = open_as_unprivileged_user(f"sqlite:///{db}")
    assert message.startswith("SetupError:"), message
    assert str(db) in message and "read-only" in message and "write access" in message


def test_an_unwritable_folder_is_refused(shared_dir: Path) -> None:
    db = shared_dir / "events.db"
    _make_store_file(db)
    db.chmod(0o666)
    shared_dir.chmod(0o555)  # nobody may create events.db-wal here
    message = open_as_unprivileged_user(f"sqlite:///{db}")
    assert message.startswith("SetupError:"), message
    assert f"the folder {shared_dir} is not writable" in message and "-wal" in message


def test_permissions_checks_let_a_usable_store_open(shared_dir: Path) -> None:
    shared_dir.chmod(0o777)
    assert open_as_unprivileged_user(f"sqlite:///{shared_dir / 'fresh.db'}") == "opened"


async def test_a_missing_folder_is_refused(open_sqlite: OpenStore, tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "events.db"
    with pytest.raises(SetupError) as info:
        await open_sqlite(path=path)
    assert f"the folder {path.parent} for the eventing DB {path} does not exist" in str(info.value)
    assert "mkdir -p" in str(info.value)
    assert not path.parent.exists()


async def test_a_folder_in_place_of_the_file_is_refused(open_sqlite: OpenStore,
                                                       tmp_path: Path) -> None:
    (tmp_path / "events.db").mkdir()
    with pytest.raises(SetupError, match="is a folder"):
        await open_sqlite(path=tmp_path / "events.db")


@pytest.mark.parametrize("damage", ["text", "header kept, schema page overwritten"])
async def test_a_corrupt_file_is_refused(open_sqlite: OpenStore, db_path: Path,
                                         damage: str) -> None:
    if damage == "text":
        _write(db_path, b"id,name\n1,alice\n" * 500)
    else:
        store = await open_sqlite()
        await store.enqueue([make_event()], {})
        await store.close()
        data = bytearray(_read(db_path))
        data[100:4096] = b"\xff" * (4096 - 100)  # page 1 after the 100-byte file header
        _write(db_path, bytes(data))
    before = _read(db_path)
    with pytest.raises(SetupError) as info:
        await open_sqlite()
    message = str(info.value)
    assert str(db_path) in message and "not a SQLite database or is corrupt" in message
    assert "restore it from a backup" in message
    assert _read(db_path) == before  # left alone for the user to rescue
    assert _read(db_path.with_name("events.db.lock")) == b""  # the lock was given back


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


@pytest.mark.parametrize(("url", "expected"), [
    ("sqlite:///x.db?synchronous=sometimes", "synchronous must be one of normal, full"),
    ("sqlite:///x.db?cache=big", "unknown option 'cache'"),
    ("sqlite:///", "names no file"),
    ("sqlite://host/x.db", "expected 'sqlite:///relative/path.db'"),
])
def test_a_bad_url_is_a_config_error(url: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        SqliteStore(StoreSettings(url=url))
    assert info.value.path == "eventing.store" and info.value.exit_code == 2


async def test_a_failure_while_running_is_store_unavailable(open_sqlite: OpenStore,
                                                           db_path: Path) -> None:
    store = await open_sqlite()
    ev = make_event()
    await store.enqueue([ev], {})
    await store.claim({"t": 1}, 30.0, datetime.now(UTC))
    with sqlite3.connect(db_path) as raw:  # someone damages the live DB
        raw.execute("DROP TABLE attempts")
    attempt = Attempt(event_id=ev.id, number=1, started_at=datetime.now(UTC),
                      duration_ms=1.0, ok=True)
    with pytest.raises(StoreUnavailable, match="no such table: attempts"):
        await store.finish([Finish(ev.id, attempt, Status.DELIVERED)])
    got = await store.get_event(ev.id)  # the failed transaction left nothing behind
    assert got is not None and got.status is Status.DELIVERING
    await store.close()
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.claim({"t": 1}, 30.0, datetime.now(UTC))


def test_the_entry_point_registers_the_sqlite_store() -> None:
    [ep] = [ep for ep in entry_points(group="dbevents") if ep.name == "store-sqlite"]
    registered: dict[str, Any] = {}
    ep.load().register_stores(register=registered.__setitem__)
    assert registered == {"sqlite": SqliteStore}


def test_the_cli_exits_2_on_a_corrupt_store(tmp_path: Path) -> None:
    (tmp_path / "events.db").write_bytes(b"\x00garbage" * 1000)
    (tmp_path / "dbevents.toml").write_text('[eventing]\nstore = "sqlite:///events.db"\n')
    cli = Path(sys.executable).with_name("dbevents")
    done = subprocess.run([str(cli), "--config", str(tmp_path / "dbevents.toml"),
                           "--log-format", "json", "events", "list"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DBEVENTS_PLUGINS": "store-sqlite"})
    assert done.returncode == 2, done.stderr
    assert f"{tmp_path / 'events.db'} is not a SQLite database or is corrupt" in done.stderr


async def test_preflight_creates_nothing_and_names_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    store = SqliteStore(StoreSettings(url=f"sqlite:///{path}", config_dir=tmp_path))
    assert await store.preflight() == []
    assert os.listdir(tmp_path) == []  # no file, no lock: created by `run` only
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    problems = await store.preflight()
    assert len(problems) == 1 and "not a dbevents eventing DB" in problems[0].message
    assert path.read_bytes() == before
