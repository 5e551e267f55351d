"""The entry point (``sink-nats``): registers the ``nats`` sink."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dbevents import hookimpl

from dbevents_sink_nats.sink import NatsSink


@hookimpl
def register_sinks(register: Callable[[str, Any], None]) -> None:
    register("nats", NatsSink)
