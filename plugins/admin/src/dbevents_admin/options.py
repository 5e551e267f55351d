"""The [admin] table."""

from __future__ import annotations

import ipaddress
import os

import attrs
from dbevents.errors import ConfigError

TOKEN_ENV = "DBEVENTS_ADMIN_TOKEN"
DEFAULT_LISTEN = "127.0.0.1:8642"


def split_listen(listen: str) -> tuple[str, int]:
    """"host:port" or "[::1]:port" -> (host, port); ConfigError naming admin.listen."""
    host, sep, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT such as {DEFAULT_LISTEN!r}, got {listen!r}",
                          path="admin.listen")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.frozen
class Options:
    listen: str = DEFAULT_LISTEN
    # Usually "${DBEVENTS_ADMIN_TOKEN}"; when absent, that variable is read directly.
    token: str | None = None
    # /metrics without the token, for a scraper that cannot send one; the counts
    # and names it shows (triggers, databases) are then open to whoever reaches it.
    metrics_public: bool = False

    def __attrs_post_init__(self) -> None:
        host, _ = split_listen(self.listen)
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("the token must be at least 16 characters", path="admin.token")
        if not is_loopback(host) and self.bearer is None:
            raise ConfigError(
                f"{host!r} is not a loopback address: set admin.token (or {TOKEN_ENV}) so "
                "that only holders of the token can use the admin API",
                path="admin.listen")

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]

    @property
    def bearer(self) -> str | None:
        """The token in force: the configured one, else the environment's."""
        return self.token or os.environ.get(TOKEN_ENV) or None
