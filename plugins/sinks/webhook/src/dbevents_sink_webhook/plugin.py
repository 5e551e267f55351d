"""The entry point (``sink-webhook``): registers the ``webhook`` sink."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dbevents import hookimpl

from dbevents_sink_webhook.sink import WebhookSink


@hookimpl
def register_sinks(register: Callable[[str, Any], None]) -> None:
    register("webhook", WebhookSink)
