"""structlog setup: pretty on a terminal, JSON lines otherwise, to stderr."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any, TextIO

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
        _timestamp,
    ]
    renderer: structlog.typing.Processor
    if fmt == "json":
        processors.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer(_json_line)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    # Known secrets (masking.add_secrets) out of every value before rendering
    # (JSON escaping could hide one from a scrub of the line), then out of the
    # rendered line too (the console renderer formats tracebacks itself).
    processors += [_drop_none_scrubbed, _scrubbed(renderer)]
    flush()  # lines of an earlier setup go out first, where they were headed
    writer = LineWriter(sys.stderr)
    _writers.append(writer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: writer,
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


def _timestamp(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """The time in ISO 8601 UTC with microseconds, e.g. 2026-12-05T20:44:03.123456Z
    (structlog's TimeStamper builds a datetime per line; the date and time of
    day change once a second)."""
    now = time.time()
    second = int(now)
    global _second, _second_text
    if second != _second:
        _second, _second_text = second, datetime.fromtimestamp(second, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S")
    event["timestamp"] = f"{_second_text}.{int((now - second) * 1e6):06d}Z"
    return event


_second, _second_text = -1, ""


def _fallback(value: Any) -> Any:
    # As structlog's JSONRenderer: a value's __structlog__(), else its repr().
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


# One encoder for every line (json.dumps with options builds one per call).
_json_line_encoder = json.JSONEncoder(default=_fallback)


def _json_line(event: EventDict, **_: Any) -> str:
    return _json_line_encoder.encode(event)


def _drop_none_scrubbed(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    # A key with no value says nothing: left out, which keeps lines short. One
    # pass for both (a line per POST goes through here).
    if not masking.has_secrets():
        return {k: v for k, v in event.items() if v is not None}
    return {k: masking.scrub_value(v) for k, v in event.items() if v is not None}


class LineWriter:
    """structlog's output: rendered lines to ``file``.

    A line logged on a thread running an event loop waits for the end of that
    pass of the loop, and the lines of one pass go out in one write (a busy
    dispatcher logs a line per POST; a write and flush each cost more than the
    rest of the line). They are out before the loop runs anything else, so no
    later work waits behind them; anywhere else a line goes out at once, after
    any still waiting, and flush() (at exit too) writes what waits.
    """

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # a flush is scheduled on it

    def msg(self, message: str) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._lines.append(message + "\n")
            if loop is None or self._loop not in (None, loop):
                # Not on a loop, or another thread's loop has lines waiting:
                # everything out now, in order.
                self._write()
                return
            if self._loop is loop:
                return
            self._loop = loop
        loop.call_soon(self.flush)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def flush(self) -> None:
        with self._lock:
            self._write()

    def _write(self) -> None:
        self._loop = None
        if not self._lines:
            return
        text = "".join(self._lines)
        self._lines.clear()
        try:
            self._file.write(text)
            self._file.flush()
        except (OSError, ValueError):  # stderr closed: nowhere to say so
            pass


# Every setup's writer: loggers cached before a later setup keep theirs.
_writers: list[LineWriter] = []


def flush() -> None:
    """Write the log lines still waiting (see LineWriter): before exiting
    without unwinding (os._exit), and at exit."""
    for writer in _writers:
        writer.flush()


atexit.register(flush)


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
