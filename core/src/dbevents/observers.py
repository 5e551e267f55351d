"""Observers: plugins that watch the engine's lifecycle moments (changes captured
and stored, attempts made, events finished, sources streaming or not), e.g. to
export metrics.

The engine and the dispatcher call one ``Observers`` fan-out at a handful of
points, per batch or per request, never per event. Each moment is bound once to
the observers that define it, so a moment nobody watches costs one empty-list
test. An observer that raises is logged once per moment and never breaks
capture or delivery.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import attrs
import structlog

from dbevents.config import Config
from dbevents.plugins import Plugins
from dbevents.protocols import OBSERVER_MOMENTS, Observer, observer_active
from dbevents.values import Change, Event, Finish, Outcome, Position, Trigger

log = structlog.get_logger("dbevents.observers")

_TIME = b'"time":"'


def commit_time(event: Event) -> datetime | None:
    """The commit time of the change behind ``event``: its CloudEvents ``time``,
    read from the stored payload (so it holds for events claimed after a restart
    too). The envelope writes ``time`` before ``data``, so the first match is it."""
    start = event.payload.find(_TIME)
    if start < 0:
        return None
    start += len(_TIME)
    end = event.payload.find(b'"', start)
    try:
        return datetime.fromisoformat(event.payload[start:end].decode())
    except ValueError:
        return None


@attrs.frozen
class ObserverContext:
    """The engine's side of dbevents.protocols.ObserverContext."""

    config: Config
    plugins: Plugins


class Observers:
    """The fan-out to every active observer of this process."""

    def __init__(self, observers: dict[str, Observer] | None = None) -> None:
        self.by_name: dict[str, Observer] = dict(observers or {})
        self._calls: dict[str, list[tuple[str, Callable[..., None]]]] = {
            moment: [(name, getattr(obs, moment)) for name, obs in self.by_name.items()
                     if callable(getattr(obs, moment, None))]
            for moment in OBSERVER_MOMENTS}
        self._broken: set[tuple[str, str]] = set()  # (observer, moment) already logged

    def get(self, name: str) -> Observer | None:
        return self.by_name.get(name)

    def _call(self, moment: str, *args: Any) -> None:
        for name, call in self._calls[moment]:
            try:
                call(*args)
            except Exception as exc:
                if (name, moment) not in self._broken:
                    self._broken.add((name, moment))
                    log.error("observer failed; its later failures here are not logged",
                              observer=name, moment=moment,
                              error=f"{type(exc).__name__}: {exc}")

    # -- the engine's moments -------------------------------------------------
    def batch(self, database: str, changes: Sequence[Change], events: Sequence[Event],
              new: int, checkpoint: Position | None) -> None:
        """A batch was read, matched and stored (its checkpoint with it)."""
        if changes and self._calls["captured"]:
            lag = (datetime.now(changes[-1].time.tzinfo) - changes[-1].time).total_seconds()
            self._call("captured", database, changes, events, max(0.0, lag))
        if self._calls["stored"]:
            self._call("stored", database, new, checkpoint)

    def delivered(self, trigger: Trigger, events: Sequence[Event], outcomes: Sequence[Outcome],
                  finishes: Sequence[Finish]) -> None:
        """One request (or batch) was attempted and each event's verdict decided."""
        if self._calls["attempted"]:
            self._call("attempted", trigger, events, outcomes)
        if self._calls["finished"]:
            self._call("finished", trigger, finishes)

    def source_state(self, database: str, streaming: bool, error: str | None = None) -> None:
        if self._calls["source_state"]:
            self._call("source_state", database, streaming, error)


NONE = Observers()


def make_observers(config: Config, plugins: Plugins) -> Observers:
    """One instance of each registered observer class that wants this run."""
    context = ObserverContext(config=config, plugins=plugins)
    made: dict[str, Observer] = {}
    for name in plugins.names("observer"):
        obs = plugins.get("observer", name)(context)
        if observer_active(obs):
            made[name] = obs
    return Observers(made)
