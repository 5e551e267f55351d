"""Pytest fixtures giving tests real servers and a real webhook receiver.

Load with ``pytest_plugins = ["testsupport.fixtures"]`` in the root conftest.py.
The servers start once per session, on first use, so a run that needs neither pays
nothing; a missing server binary fails the test rather than skipping it.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator

import pytest
import structlog

from testsupport.receiver import ThreadedReceiver
from testsupport.servers import MariaDBServer, PostgresServer

_configure = structlog.configure


def _configure_uncached(*args: object, **kwargs: object) -> None:
    # `dbevents` caches each logger on first use (cheaper in production); a
    # command run in-process by one test would then freeze the loggers of the
    # modules it touched, and a later test's structlog.testing.capture_logs
    # would see nothing from them.
    kwargs["cache_logger_on_first_use"] = False
    _configure(*args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _loggers_stay_capturable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(structlog, "configure", _configure_uncached)


def unique_name(prefix: str = "t") -> str:
    """A fresh, identifier-safe name (lower case, no quoting needed in either SQL dialect)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL with wal_level=logical, shared by the whole session."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDBServer]:
    """A private MariaDB with a full row-based binlog, shared by the whole session."""
    server = MariaDBServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_database(postgres_server: PostgresServer) -> Iterator[str]:
    """The name of a fresh database on the session's PostgreSQL, dropped afterwards."""
    name = postgres_server.create_database(unique_name("pg"))
    yield name
    try:
        postgres_server.drop_database(name)
    except Exception as exc:  # a leftover database on a throwaway server is harmless
        warnings.warn(f"could not drop database {name}: {exc}", stacklevel=1)


@pytest.fixture
def mariadb_database(mariadb_server: MariaDBServer) -> Iterator[str]:
    """The name of a fresh database on the session's MariaDB, dropped afterwards."""
    name = mariadb_server.create_database(unique_name("my"))
    yield name
    try:
        mariadb_server.drop_database(name)
    except Exception as exc:
        warnings.warn(f"could not drop database {name}: {exc}", stacklevel=1)


@pytest.fixture
def receiver() -> Iterator[ThreadedReceiver]:
    """A webhook receiver on its own thread, stopped after the test."""
    with ThreadedReceiver() as rec:
        yield rec
