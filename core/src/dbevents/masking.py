"""Keeping secrets out of logs and the invocation log."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from itertools import pairwise
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import attrs

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
    userinfo, rest = _userinfo(rest)
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0),
              default=len(rest))
    hosts, tail = rest[:cut], rest[cut:]
    if userinfo is not None:
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":" + MASK
        hosts = f"{userinfo}@{hosts}"
    return f"{scheme}://{hosts}" + _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, tail)


def _userinfo(rest: str) -> tuple[str | None, str]:
    """Split what follows "scheme://" into userinfo (None if absent) and the rest.

    A password may hold unescaped "@", ":", "/", "?" or "#", so the userinfo runs
    to the last "@" of the whole URL. A query value with an "@" then hides more of
    the URL than needed, never less.
    """
    at = rest.rfind("@")
    if at < 0:
        return None, rest
    return rest[:at], rest[at + 1:]


# -- secrets known to this process, scrubbed from every line it prints ----------

# Fragments shorter than this are not scrubbed on their own: "ab" would garble
# every line while hiding little.
_MIN_FRAGMENT = 4
_SEPARATOR = re.compile(r"[@:/?#]")
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None


def secret_fragments(secret: str) -> set[str]:
    """The secret and the pieces of it a driver could echo back.

    A driver that parses a URL differently (libpq splits the userinfo at the
    first "@", not the last) shows part of the password as a host name or a
    port: every piece between, before and after an "@", ":", "/", "?" or "#"
    is covered, both as written and percent-decoded.
    """
    out: set[str] = set()
    for text in {secret, unquote(secret)}:
        if len(text) >= 3:
            out.add(text)
        cuts = [m.start() for m in _SEPARATOR.finditer(text)]
        bounds = [-1, *cuts, len(text)]
        for i in cuts:
            out.update((text[:i], text[i + 1:]))
        out.update(text[a + 1:b] for a, b in pairwise(bounds))
    whole = {secret, unquote(secret)}
    return {f for f in out if len(f) >= _MIN_FRAGMENT or (f in whole and len(f) >= 3)}


def url_secrets(url: str) -> set[str]:
    """The secrets in a connection string or URL: the password (and its
    fragments), query values named like secrets, libpq key/value passwords."""
    out: set[str] = set()
    if "://" in url:
        userinfo, _ = _userinfo(url.split("://", 1)[1])
        if userinfo is not None and ":" in userinfo:
            out |= secret_fragments(userinfo.split(":", 1)[1])
        values = [m.group(0)[len(m.group(1)):] for m in _QUERY_SECRET.finditer(url)]
    else:
        values = [m.group(2).strip("'") for m in _KV_SECRET.finditer(url)]
    for value in values:
        out |= secret_fragments(value)
    return out


def secrets_in(value: object, key: str = "") -> set[str]:
    """Every secret in a loaded config (or any part of it): URL passwords and
    tokens, and the values of options named like secrets (password, token,
    Authorization...), found in attrs classes, mappings and sequences."""
    out: set[str] = set()
    if isinstance(value, str):
        if key and is_secret_header(key):
            out |= secret_fragments(value)
            out |= secret_fragments(value.split()[-1]) if value.split() else set()
        if "://" in value or "=" in value:
            out |= url_secrets(value)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            out |= secrets_in(v, str(k))
    elif attrs.has(type(value)):
        for field in attrs.fields(cast(Any, type(value))):
            out |= secrets_in(getattr(value, field.name), field.name)
    elif isinstance(value, list | tuple | set | frozenset):
        for v in value:
            out |= secrets_in(v, key)
    return out


def add_secrets(secrets: Iterable[str]) -> None:
    """Scrub these strings from every log line and every message the launcher prints."""
    global _pattern
    _secrets.update(s for s in secrets if s)
    ordered = sorted(_secrets, key=len, reverse=True)  # longest first: no partial hits
    _pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None


def forget_secrets() -> None:
    global _pattern
    _secrets.clear()
    _pattern = None


def has_secrets() -> bool:
    return _pattern is not None


def scrub(text: str) -> str:
    """The text with every known secret replaced by the mask."""
    if _pattern is None:
        return text
    return _pattern.sub(MASK, text)


def scrub_value(value: object) -> object:
    """Strings scrubbed, inside lists, tuples and dicts too; other values unchanged."""
    if _pattern is None:
        return value
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(scrub_value(v) for v in value)
    return value


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
