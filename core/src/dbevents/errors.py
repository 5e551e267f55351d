"""Errors the core and plugins raise. Each carries a message fit for a user."""

from __future__ import annotations


class DbeventsError(Exception):
    """Base class; ``exit_code`` is what the launcher exits with."""

    exit_code = 1


class ConfigError(DbeventsError):
    """The configuration is wrong. ``path`` names the key, e.g. ``triggers[0].timeout``."""

    exit_code = 2

    def __init__(self, message: str, path: str | None = None, source: str | None = None):
        self.message = message
        self.path = path
        self.source = source
        where = ""
        if source:
            where += source
        if path:
            where += (": " if where else "") + path
        super().__init__(f"{where}: {message}" if where else message)


class PluginError(DbeventsError):
    """Plugins could not be loaded or clash (two claim one name)."""

    exit_code = 2


class SetupError(DbeventsError):
    """A database or store is not set up the way dbevents needs; says how to fix it.

    Raised at start (startup checks); the launcher exits 2 and starts nothing.
    """

    exit_code = 2


class StoreUnavailable(DbeventsError):
    """The eventing DB cannot be reached right now; the engine retries."""


class SourceUnavailable(DbeventsError):
    """The database went away; the source may be restarted after a backoff."""


class CaptureLost(DbeventsError):
    """A store refused a write because another process took over the capture of
    its source (the capture lease's token moved on): this process stops
    capturing that source and confirms nothing more to it."""
