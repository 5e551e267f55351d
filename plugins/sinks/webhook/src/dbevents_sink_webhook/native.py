"""The ``pyreqwest`` transport: requests sent by Rust (reqwest on hyper and tokio).

Connecting, writing the request and parsing the response happen in pyreqwest's
own runtime, outside the interpreter, so the event loop's thread only builds
each request and reads its outcome. Its errors are turned into the same short
strings the aiohttp transport gives (see classify.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta

from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import (
    ConnectError,
    DecodeError,
    PyreqwestError,
    ReadError,
    WriteError,
)

_OS_ERROR = re.compile(r"\s*\(os error \d+\)$")


def client(*, limit: int, keepalive_timeout: float) -> Client:
    """One client (one connection pool) per sink."""
    return (ClientBuilder()
            # A 3xx is a failed attempt: following it would send the payload
            # to a URL nobody configured.
            .follow_redirects(False)
            .referer(False)
            .max_connections(limit)
            .pool_idle_timeout(timedelta(seconds=keepalive_timeout))
            # The environment's proxy settings are ignored, as with aiohttp's
            # trust_env=False; no cookie store is kept (the builder's default).
            .no_proxy()
            # hyper would send "Webhook-Id"; lower case keeps the Standard Webhooks
            # names exactly as specified (and as HTTP/2 sends every name).
            .http1_lower_case_headers()
            .build())


def _causes(exc: PyreqwestError) -> list[str]:
    details = getattr(exc, "details", None) or {}
    causes = details.get("causes") if isinstance(details, Mapping) else None
    # The first cause quotes the full URL (tokens included): never use it.
    return [_OS_ERROR.sub("", c.get("message", "")) for c in (causes or [])
            if not c.get("message", "").startswith("error sending request for url")]


def describe(exc: BaseException, timeout_ms: int, where: str, status: int | None) -> str:
    """The error string for an exception raised by one attempt; ``where`` is
    host:port, ``status`` the response status if its line had arrived."""
    if isinstance(exc, TimeoutError):  # pyreqwest's timeouts subclass it
        return f"timeout after {timeout_ms} ms"
    if not isinstance(exc, PyreqwestError):
        return f"sink error: {type(exc).__name__}: {exc}"
    causes = _causes(exc)
    text = " ".join(causes).lower()
    last = causes[-1] if causes else exc.message
    if isinstance(exc, ReadError) and status is not None:
        # The status line arrived but the body was cut off: the exchange did not
        # complete, so even a 2xx counts as failed (at-least-once errs on retrying).
        return "connection reset: response cut off"
    if isinstance(exc, DecodeError):
        return f"invalid response: {last}"
    if "dns error" in text:
        return f"dns lookup failed: {where.rsplit(':', 1)[0]}"
    if "certificate" in text or "tls" in text or "ssl" in text:
        # The same searchable word as the aiohttp transport's verification error.
        tag = "CERTIFICATE_VERIFY_FAILED: " if "certificate" in text else ""
        return f"tls error: {where}: {tag}{last}"
    if "connection refused" in text:
        return f"connection refused: {where}"
    if "reset by peer" in text or "broken pipe" in text or "closed before" in text:
        return "connection reset: closed before the response"
    if isinstance(exc, ConnectError | ReadError | WriteError):
        return f"connection failed: {where}: {last}"
    return f"request failed: {type(exc).__name__}: {last}"
