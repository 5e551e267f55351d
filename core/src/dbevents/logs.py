"""structlog setup: pretty on a terminal, JSON lines otherwise, to stderr."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

from dbevents import masking


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
    renderer: structlog.typing.Processor
    if fmt == "json":
        processors.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    # Known secrets (masking.add_secrets) out of every value before rendering
    # (JSON escaping could hide one from a scrub of the line), then out of the
    # rendered line too (the console renderer formats tracebacks itself).
    processors += [_scrub_values, _scrubbed(renderer)]
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
    root = logging.getLogger()
    root.setLevel(max(numeric, logging.WARNING))
    for handler in root.handlers:
        if not any(isinstance(f, _ScrubFilter) for f in handler.filters):
            handler.addFilter(_ScrubFilter())


def _drop_none(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    # Keeps lines short: a key with no value says nothing.
    return {k: v for k, v in event.items() if v is not None}


def _scrub_values(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    return {k: masking.scrub_value(v) for k, v in event.items()}


def _scrubbed(renderer: structlog.typing.Processor) -> structlog.typing.Processor:
    def render(logger: Any, name: str, event: Any) -> Any:
        line = renderer(logger, name, event)
        return masking.scrub(line) if isinstance(line, str) else line
    return render


class _ScrubFilter(logging.Filter):
    """Known secrets out of stdlib log records (drivers and libraries log there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = masking.scrub(record.getMessage()), None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text, record.exc_info = masking.scrub(text), None
        if record.stack_info:
            record.stack_info = masking.scrub(record.stack_info)
        return True
