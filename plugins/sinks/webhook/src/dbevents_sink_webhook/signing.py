"""Standard Webhooks signing (https://www.standardwebhooks.com/).

A secret is ``whsec_`` followed by base64 of the key bytes. The signature of a
request is ``v1,`` + base64(HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}"));
with several secrets (rotation) the header carries one such entry per secret,
separated by spaces, and a receiver accepts the request if any entry verifies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import uuid
from collections.abc import Sequence

PREFIX = "whsec_"
# The Standard Webhooks spec asks for keys of 24 to 64 bytes; shorter ones are weak.
MIN_KEY_BYTES = 24

# Fixed namespace, so the same events give the same batch id on every machine.
BATCH_NAMESPACE = uuid.UUID("2b0f6d8e-4c1a-5e3b-9f7d-8a6c5b4e3d21")


def decode_secret(secret: str) -> bytes:
    """The key bytes of a ``whsec_<base64>`` secret; ValueError saying what is wrong."""
    if not isinstance(secret, str) or not secret.startswith(PREFIX):
        raise ValueError(
            "secret must look like 'whsec_<base64 key>' (a Standard Webhooks secret); "
            "generate one with: python -c \"import base64, os; "
            "print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
        )
    encoded = secret[len(PREFIX):]
    try:
        # Strict alphabet: a lenient decoder would silently drop characters such as
        # '-' or '_', and the receiver's library might not drop the same ones.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "secret: the part after 'whsec_' is not valid standard base64 "
            "(A-Z, a-z, 0-9, '+', '/', optional '=' padding)"
        ) from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"secret: the key is {len(key)} bytes; Standard Webhooks needs at least "
            f"{MIN_KEY_BYTES} (base64 of 24 to 64 random bytes after 'whsec_')"
        )
    return key


class Signer:
    """Signs request bodies with one or more keys."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("secret: give at least one secret")
        # Keyed once: copying a keyed HMAC is cheaper than re-keying per request.
        self._macs = [hmac.new(k, digestmod=hashlib.sha256) for k in keys]

    @classmethod
    def from_secrets(cls, secrets: Sequence[str]) -> Signer:
        return cls([decode_secret(s) for s in secrets])

    def sign(self, msg_id: str, timestamp: int, body: bytes) -> str:
        """The webhook-signature header value: space-separated ``v1,<base64>``."""
        prefix = f"{msg_id}.{timestamp}.".encode()
        out = []
        for keyed in self._macs:
            mac = keyed.copy()
            mac.update(prefix)
            mac.update(body)
            out.append("v1," + base64.b64encode(mac.digest()).decode("ascii"))
        return " ".join(out)


def batch_id(event_ids: Sequence[str]) -> str:
    """The webhook-id of a batch POST: a UUID (v5) of the ordered event ids.

    The same events in the same order always give the same id, so a receiver can
    deduplicate a retried batch; the events inside still carry their own ids.
    """
    return str(uuid.uuid5(BATCH_NAMESPACE, "\n".join(event_ids)))
