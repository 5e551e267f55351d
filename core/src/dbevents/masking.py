"""Keeping secrets out of logs and the invocation log."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit

MASK = "***"
_SECRET_HEADER_WORDS = ("authorization", "token", "secret", "key", "password", "cookie",
                        "signature", "auth")


_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/]*):[^@/]*@")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|passwd|pwd|secret|token|sslpassword)=)[^&#]*")


def mask_dsn(url: str) -> str:
    """The URL with any password replaced: postgresql://app:***@host/db.

    Text-based, so multi-host URLs (mongodb://u:p@h1:1,h2:2/db) work too; a
    password in the query string (?password=...) is masked as well.
    """
    masked = _USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@", url, count=1)
    return _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, masked)


def mask_url(url: str) -> str:
    """A webhook URL for logs: scheme and host only; path and query may carry tokens."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    tail = "/" + MASK if (parts.path.strip("/") or parts.query) else parts.path
    return f"{parts.scheme}://{host}{tail}"


def is_secret_header(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_HEADER_WORDS)


def mask_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: (MASK if is_secret_header(k) else v) for k, v in headers.items()}
