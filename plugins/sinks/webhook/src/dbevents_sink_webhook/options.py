"""The trigger keys the webhook sink adds, validated when the config is loaded."""

from __future__ import annotations

import re
from typing import Any

import attrs
from dbevents.masking import MASK, mask_headers

from dbevents_sink_webhook.signing import decode_secret

MAX_BATCH_SIZE = 1000

# The HTTP clients a trigger's requests can go through (docs/sink-webhook.md).
TRANSPORTS = ("aiohttp", "pyreqwest", "pycurl")
# pycurl passes every webhook test and costs the event loop the least per request
# (docs/sink-webhook.md#why-pycurl-is-the-default).
DEFAULT_TRANSPORT = "pycurl"

# Headers the sink sets itself; letting a user set them would break the body
# framing or the signature.
RESERVED_HEADERS = frozenset({
    "content-type", "content-length", "transfer-encoding", "host", "connection",
    "webhook-id", "webhook-timestamp", "webhook-signature",
})
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 field-name


def _check_headers(_: Any, __: attrs.Attribute[Any], value: dict[str, str]) -> None:
    for name, val in value.items():
        if not _TOKEN.match(name):
            raise ValueError(f"headers: {name!r} is not a valid HTTP header name")
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(
                f"headers: {name!r} is set by the webhook sink and cannot be overridden "
                f"(reserved: {', '.join(sorted(RESERVED_HEADERS))})"
            )
        if not isinstance(val, str) or any(c in val for c in "\r\n\0"):
            # Never echo the value: it may be a token.
            raise ValueError(f"headers: the value of {name!r} must be one line of text")


def _check_secret(_: Any, __: attrs.Attribute[Any], value: str | list[str] | None) -> None:
    if value is None:
        return
    secrets = [value] if isinstance(value, str) else list(value)
    if not secrets:
        raise ValueError("secret: give a secret or a list of secrets, not an empty list")
    for i, s in enumerate(secrets):
        try:
            decode_secret(s)
        except ValueError as exc:
            where = "" if isinstance(value, str) else f" (entry {i})"
            raise ValueError(f"{exc}{where}") from None


def _check_batch_size(_: Any, __: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) \
            or not 1 <= value <= MAX_BATCH_SIZE:
        raise ValueError(
            f"batch_size must be an integer from 1 to {MAX_BATCH_SIZE}, got {value!r}"
        )


def _check_transport(_: Any, __: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and value not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {value!r}")


def _repr_secret(value: str | list[str] | None) -> str:
    return "None" if value is None else repr(MASK)


def _repr_headers(value: dict[str, str]) -> str:
    return repr(mask_headers(value))


@attrs.frozen
class WebhookOptions:
    """Trigger keys for ``sink = "webhook"`` (the default sink).

    ``headers``: static request headers (``${ENV}`` is interpolated by the core).
    ``secret``: one ``whsec_`` secret, or a list of them while rotating.
    ``batch_size``: events per POST; above 1 the body is a JSON array.
    ``transport``: the HTTP client that sends the requests (``aiohttp``,
    ``pyreqwest`` or ``pycurl``); unset means the sink's default.
    """

    headers: dict[str, str] = attrs.field(factory=dict, validator=_check_headers,
                                          repr=_repr_headers)
    secret: str | list[str] | None = attrs.field(default=None, validator=_check_secret,
                                                 repr=_repr_secret)
    batch_size: int = attrs.field(default=1, validator=_check_batch_size)
    transport: str | None = attrs.field(default=None, validator=_check_transport)

    @property
    def secrets(self) -> list[str]:
        if self.secret is None:
            return []
        return [self.secret] if isinstance(self.secret, str) else list(self.secret)
