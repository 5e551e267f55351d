"""Services: plugins that run beside the engine (an admin server...), each
configured by the top-level table of its registered name."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from dbevents.config import Config
from dbevents.observers import NONE, Observers
from dbevents.plugins import Plugins
from dbevents.protocols import Observer, Service, Store


@attrs.frozen
class Context:
    """The engine's side of dbevents.protocols.ServiceContext."""

    store: Store
    config: Config
    plugins: Plugins
    waker: Callable[[], None] = lambda: None
    observers: Observers = NONE

    def wake(self) -> None:
        self.waker()

    def observer(self, name: str) -> Observer | None:
        return self.observers.get(name)


def make_services(config: Config, plugins: Plugins, store: Store,
                  wake: Callable[[], None], observers: Observers = NONE) -> list[Service]:
    """One instance per service whose table the config has."""
    context = Context(store=store, config=config, plugins=plugins, waker=wake,
                      observers=observers)
    return [plugins.get("service", name)(options, context)
            for name, options in config.services.items()]
