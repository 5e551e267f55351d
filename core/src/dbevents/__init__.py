"""dbevents: capture database changes, deliver them as CloudEvents webhooks.

The public API for plugins is what this module and ``dbevents.testing`` export.
"""

from dbevents.envelope import batch_body, request_body
from dbevents.errors import (
    ConfigError,
    DbeventsError,
    PluginError,
    SetupError,
    SourceUnavailable,
    StoreUnavailable,
)
from dbevents.hookspecs import hookimpl
from dbevents.observers import commit_time
from dbevents.protocols import (
    EventFilter,
    Matcher,
    Observer,
    Preflight,
    Problem,
    Sink,
    Source,
    SourceSettings,
    Store,
    StoreSettings,
    TriggerStats,
)
from dbevents.values import (
    DEFAULT_OPERATIONS,
    Attempt,
    Change,
    ChangeBatch,
    Event,
    Finish,
    Operation,
    Outcome,
    Position,
    RawJSON,
    Status,
    Trigger,
)

__all__ = [
    "DEFAULT_OPERATIONS",
    "Attempt",
    "Change",
    "ChangeBatch",
    "ConfigError",
    "DbeventsError",
    "Event",
    "EventFilter",
    "Finish",
    "Matcher",
    "Observer",
    "Operation",
    "Outcome",
    "PluginError",
    "Position",
    "Preflight",
    "Problem",
    "RawJSON",
    "SetupError",
    "Sink",
    "Source",
    "SourceSettings",
    "SourceUnavailable",
    "Status",
    "Store",
    "StoreSettings",
    "StoreUnavailable",
    "Trigger",
    "TriggerStats",
    "batch_body",
    "commit_time",
    "hookimpl",
    "request_body",
]
