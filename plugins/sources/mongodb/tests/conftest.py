"""Fixtures for the MongoDB source tests; the scripted server is in mongo_fake.py."""

from __future__ import annotations

import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbevents.testing import reset
from dbevents_source_mongodb import MongoSource

# The helpers module sits beside the tests (a unique name: the test run imports
# in importlib mode, without package-relative imports).
sys.path.insert(0, str(Path(__file__).parent))

from mongo_fake import FakeReplicaSet


@pytest.fixture(autouse=True)
def _fresh_memory() -> None:
    reset()


_stopping: list[threading.Thread] = []


@pytest.fixture(scope="session", autouse=True)
def _servers_stopped() -> Iterator[None]:
    yield
    for thread in _stopping:
        thread.join(15)


@pytest.fixture
def make_fake() -> Iterator[Callable[..., FakeReplicaSet]]:
    made: list[FakeReplicaSet] = []

    def make(**kwargs: Any) -> FakeReplicaSet:
        fake = FakeReplicaSet(**kwargs).start()
        made.append(fake)
        return fake

    yield make
    # mockupdb takes up to a second to stop (its accept loop polls once a second):
    # stop in the background, each server on its own port, all joined at the end.
    for fake in made:
        thread = threading.Thread(target=fake.stop, daemon=True)
        thread.start()
        _stopping.append(thread)


@pytest.fixture
def fake(make_fake: Callable[..., FakeReplicaSet]) -> FakeReplicaSet:
    return make_fake()


@pytest.fixture
async def sources() -> AsyncIterator[list[MongoSource]]:
    """Sources a test opened; closed afterwards."""
    opened: list[MongoSource] = []
    yield opened
    for source in opened:
        await source.close()
