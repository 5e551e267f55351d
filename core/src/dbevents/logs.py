"""structlog setup: pretty on a terminal, JSON lines otherwise, to stderr."""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import EventDict, WrappedLogger


def setup(fmt: str | None = None, level: str = "info") -> None:
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_none,
    ]
    if fmt == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # WriteLogger: one write and flush per line, cheaper than print().
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries that use the stdlib logger (asyncio, aiohttp...) at warning and up.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    # basicConfig does nothing once an earlier setup gave the root a handler.
    logging.getLogger().setLevel(max(numeric, logging.WARNING))


def _drop_none(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    # Keeps lines short: a key with no value says nothing.
    return {k: v for k, v in event.items() if v is not None}
