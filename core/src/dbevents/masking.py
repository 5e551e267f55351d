"""Keeping secrets out of logs and the invocation log."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit

MASK = "***"
_SECRET_HEADER_WORDS = ("authorization", "token", "secret", "key", "password", "cookie",
                        "signature", "auth")


_QUERY_SECRET = re.compile(
    r"(?i)([?&;][^=&#]*(?:pass|secret|token|key|credential|auth)[^=&#]*=)[^&#;]*")
_KV_SECRET = re.compile(r"(?i)\b(\w*password)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")


def mask_dsn(url: str) -> str:
    """A connection string with its secrets replaced: postgresql://app:***@host/db.

    Text-based, so multi-host URLs (mongodb://u:p@h1:1,h2:2/db), passwords with
    an unescaped "@", secrets in the query string (?password=..., ?...token=...)
    and libpq key/value strings (host=db password=...) are all covered.
    """
    if "://" not in url:
        return _KV_SECRET.sub(lambda m: f"{m.group(1)}={MASK}", url)
    scheme, rest = url.split("://", 1)
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0),
              default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        userinfo, hosts = authority.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":" + MASK
        authority = f"{userinfo}@{hosts}"
    return f"{scheme}://{authority}" + _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, tail)


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
