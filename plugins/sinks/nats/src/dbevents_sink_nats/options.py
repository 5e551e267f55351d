"""The trigger keys the NATS sink adds, validated when the config is loaded."""

from __future__ import annotations

import re
import string
from typing import Any
from urllib.parse import urlsplit

import attrs

MAX_BATCH_SIZE = 1000
DEFAULT_SUBJECT = "dbevents.{trigger}.{table}.{type}"
# What a subject template may name: the trigger, the event's database (the
# config's name for it), its table or collection, and its type (DB_INSERT, ...).
PLACEHOLDERS = ("trigger", "database", "table", "type")
SCHEMES = ("nats", "tls")

# A subject token may not hold these: "." splits tokens, "*" and ">" are
# wildcards, whitespace ends the subject in the protocol.
_NOT_IN_TOKEN = re.compile(r"[.*>\s\x00-\x1f\x7f]")
_STREAM_NAME = re.compile(r"^[^.*>\s/\\\x00-\x1f\x7f]+$")


def template_fields(template: str) -> list[str]:
    """The placeholders a subject template names; ValueError for anything but
    plain ``{name}`` fields (no format specs, conversions or indexing)."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"subject: {exc} in {template!r}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion or name not in PLACEHOLDERS:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + \
                (f":{spec}" if spec else "") + "}"
            raise ValueError(f"subject: unknown placeholder {shown} in {template!r} "
                             f"(known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
        names.append(name)
    return names


def _check_subject(_: Any, __: attrs.Attribute[Any], value: str) -> None:
    template_fields(value)
    # Check the literal parts with every placeholder standing for one token.
    sample = value.format(**dict.fromkeys(PLACEHOLDERS, "x"))
    tokens = sample.split(".")
    if any(not t for t in tokens):
        raise ValueError(f"subject: {value!r} has an empty token (a leading, trailing "
                         "or doubled '.')")
    for t in tokens:
        if t in ("*", ">") or _NOT_IN_TOKEN.search(t):
            raise ValueError(f"subject: {value!r} is not a subject to publish to "
                             "(no wildcards, spaces or control characters)")


def _check_stream(_: Any, __: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not _STREAM_NAME.match(value):
        raise ValueError(f"stream: {value!r} is not a JetStream stream name")


def _check_batch_size(_: Any, __: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) \
            or not 1 <= value <= MAX_BATCH_SIZE:
        raise ValueError(
            f"batch_size must be an integer from 1 to {MAX_BATCH_SIZE}, got {value!r}")


@attrs.frozen
class NatsOptions:
    """Trigger keys for ``sink = "nats"``.

    ``subject``: where each event is published, a template over
    ``{trigger}``, ``{database}``, ``{table}`` and ``{type}``.
    ``stream``: the JetStream stream that must store the messages; a subject it
    does not capture is a failed attempt instead of a message in another stream.
    ``batch_size``: events published together, their acks awaited together.
    """

    subject: str = attrs.field(default=DEFAULT_SUBJECT, validator=_check_subject)
    stream: str | None = attrs.field(default=None, validator=_check_stream)
    batch_size: int = attrs.field(default=1, validator=_check_batch_size)


def subject_token(value: str) -> str:
    """A value as one subject token: characters NATS gives a meaning to become
    "_", so a table named "public.orders" stays one token."""
    return _NOT_IN_TOKEN.sub("_", value) or "_"


def servers_of(url: str) -> list[str]:
    """The server URLs of a trigger's ``url`` (several, comma-separated, for a
    cluster); ValueError naming what is wrong."""
    servers = [s.strip() for s in url.split(",")]
    for s in servers:
        try:
            parts = urlsplit(s)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ValueError(f"not a NATS server URL: {exc}") from None
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ValueError("expected a nats:// or tls:// URL with a host, "
                             "e.g. nats://127.0.0.1:4222")
        if parts.path.strip("/") or parts.query or parts.fragment:
            raise ValueError("a NATS server URL has no path or query: "
                             "put the subject in the trigger's subject key")
    return servers
