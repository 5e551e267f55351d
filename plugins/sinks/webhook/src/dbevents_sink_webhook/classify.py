"""Turning an HTTP exchange into the words the invocation log uses.

Every failure gets a short, stable error string a user can search for:
"HTTP 503", "timeout after 5000 ms", "connection refused: host:port",
"connection reset", "invalid response: ...", "dns lookup failed: host",
"tls error: ...", "connection failed: ...".
"""

from __future__ import annotations

import codecs
import errno
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp

RETRY_AFTER_STATUSES = frozenset({429, 503})


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After value: delta-seconds or an HTTP-date.

    None when absent or unreadable (the dispatcher then uses its own backoff);
    a date in the past gives 0. The dispatcher caps the result at backoff_max.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    delta = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, delta)


def decode_body(raw: bytes, charset: str | None) -> str:
    """Text of a (possibly truncated) response body; a multi-byte character cut
    by the truncation is dropped rather than shown as garbage."""
    try:
        text = codecs.getincrementaldecoder(charset or "utf-8")(errors="replace").decode(
            raw, final=False)
        if isinstance(text, str):
            return text
    except Exception:  # an unknown or non-text codec named by the receiver
        pass
    # The body is only logged: a charset the receiver made up ("rot13", "hex")
    # must never turn a delivered request into a failed attempt.
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(raw, final=False)


def _where(exc: aiohttp.ClientConnectorError) -> str:
    return f"{exc.host}:{exc.port}"


def _is_reset(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE)


def _one_line(text: str, limit: int = 200) -> str:
    # Parser errors come as several lines with a caret under the bad byte.
    words = " ".join(ln.strip() for ln in text.splitlines() if ln.strip() not in ("", "^"))
    return words if len(words) <= limit else words[: limit - 3] + "..."


def describe(exc: BaseException, timeout_ms: int) -> str:
    """The error string for an exception raised by one attempt."""
    if isinstance(exc, TimeoutError):  # includes aiohttp's Server/ConnectionTimeoutError
        return f"timeout after {timeout_ms} ms"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"dns lookup failed: {exc.host}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return f"tls error: {_where(exc)}: {exc.os_error if hasattr(exc, 'os_error') else exc}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, ConnectionRefusedError) or os_error.errno == errno.ECONNREFUSED:
            return f"connection refused: {_where(exc)}"
        return f"connection failed: {_where(exc)}: {os_error.strerror or os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection reset: closed before the response"
    if isinstance(exc, aiohttp.ClientPayloadError):
        # The status line arrived but the body was cut off: the exchange did not
        # complete, so even a 2xx counts as failed (at-least-once errs on retrying).
        return "connection reset: response cut off"
    if isinstance(exc, aiohttp.ClientResponseError):
        # Raised for a response aiohttp cannot parse (bad status line, headers...).
        return f"invalid response: {_one_line(str(exc.message or exc))}"
    if _is_reset(exc):
        return "connection reset"
    if isinstance(exc, aiohttp.ClientOSError):
        return f"connection failed: {exc.strerror or exc}"
    if isinstance(exc, aiohttp.ClientError):
        return f"request failed: {type(exc).__name__}: {exc}"
    return f"sink error: {type(exc).__name__}: {exc}"
