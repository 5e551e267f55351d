"""Services: a plugin owns a top-level config table, validated like any plugin
Options, and runs beside the engine from after the store opens until shutdown."""

from __future__ import annotations

import asyncio
import tomllib
from typing import Any

import attrs
import pytest
from dbevents import config as cfg
from dbevents.engine import Engine
from dbevents.errors import ConfigError
from dbevents.plugins import module_from
from dbevents.protocols import EventFilter, Service, ServiceContext
from dbevents.testing import isolated_plugins, reset

CONFIG = """
[eventing]
store = "memory://services"

[[triggers]]
name = "t"
url = "http://unused"
sink = "memory"
"""


@attrs.frozen
class Options:
    port: int = 1
    name: str = "x"


class Recorder:
    Options = Options
    seen: list[tuple[str, Any]] = []

    def __init__(self, options: Options, context: ServiceContext) -> None:
        self.options, self.context = options, context

    async def start(self) -> None:
        # The store is open: the service can read the log.
        listed = await self.context.store.list_events(EventFilter())
        self.seen.append(("start", (self.options, listed, self.context.config.triggers[0].name)))

    async def close(self) -> None:
        self.seen.append(("close", None))


@pytest.fixture
def plugins() -> Any:
    reset()
    Recorder.seen = []
    return isolated_plugins(("recorder", module_from(
        "recorder", register_services=lambda register: register("rec", Recorder))))


def test_the_table_of_a_registered_service_is_validated(plugins: Any) -> None:
    config = cfg.parse(tomllib.loads(CONFIG + '[rec]\nport = 8\n'), plugins)
    assert config.services == {"rec": Options(port=8)}
    assert isinstance(Recorder(Options(), None), Service)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as err:
        cfg.parse(tomllib.loads(CONFIG + '[rec]\nport = "8"\n'), plugins)
    assert err.value.path == "rec.port"
    with pytest.raises(ConfigError) as err:
        cfg.parse(tomllib.loads(CONFIG + '[rec]\nprot = 8\n'), plugins)
    assert err.value.path == "rec.prot" and "did you mean 'port'" in err.value.message
    with pytest.raises(ConfigError) as err:
        cfg.parse(tomllib.loads(CONFIG + '[other]\nport = 8\n'), plugins)
    assert err.value.path == "other" and "rec" in err.value.message


async def test_the_engine_starts_a_configured_service_and_closes_it(plugins: Any) -> None:
    assert cfg.parse(tomllib.loads(CONFIG), plugins).services == {}
    config = cfg.parse(tomllib.loads(CONFIG + "[rec]\n"), plugins)
    engine = Engine(config, plugins)
    task = asyncio.create_task(engine.run())
    while not Recorder.seen and not task.done():
        await asyncio.sleep(0.01)
    engine.stop()
    await task
    assert Recorder.seen == [("start", (Options(), [], "t")), ("close", None)]
