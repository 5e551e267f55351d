"""Fixtures for the NATS sink tests: a private nats-server with JetStream (one
per session), a client connection for setting up streams and reading them back,
and a fresh stream per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import attrs
import nats
import pytest
from dbevents_sink_nats import NatsSink
from nats.aio.client import Client
from nats.js import JetStreamContext

from testsupport.nats_server import NatsServer, nats_server_missing_is_fatal
from testsupport.servers import ServerError


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    try:
        server = NatsServer().start()
    except ServerError as exc:
        if nats_server_missing_is_fatal() or "not found" not in str(exc):
            raise
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A plain nats-py connection to the private server, for setup and checks."""
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


@pytest.fixture
def js(client: Client) -> JetStreamContext:
    return client.jetstream()


@attrs.frozen
class Stream:
    name: str
    prefix: str  # the stream captures "<prefix>.>"


@pytest.fixture
async def stream(js: JetStreamContext) -> AsyncIterator[Stream]:
    """A new stream capturing ``<prefix>.>``, deleted after the test."""
    tag = uuid.uuid4().hex[:10]
    s = Stream(name=f"S_{tag}", prefix=f"t{tag}")
    await js.add_stream(name=s.name, subjects=[f"{s.prefix}.>"])
    yield s
    await js.delete_stream(s.name)


@pytest.fixture
async def sink() -> AsyncIterator[NatsSink]:
    s = NatsSink()
    await s.open()
    yield s
    await s.close()
