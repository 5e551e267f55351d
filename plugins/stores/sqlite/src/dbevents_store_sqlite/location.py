"""Where the eventing DB lives: the store URL turned into a file path and options.

    sqlite:///dbevents.db                 relative to the config file's folder
    sqlite:////var/lib/dbevents/events.db absolute
    sqlite:///events.db?synchronous=full  fsync at every commit (survives power loss)
    sqlite:///:memory:                    a private in-memory DB (nothing survives)
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl

import attrs
from dbevents.errors import ConfigError

PREFIX = "sqlite:///"
MEMORY = ":memory:"
SYNCHRONOUS = ("normal", "full")
_KEYS = ("synchronous",)


@attrs.frozen
class Location:
    path: Path | None  # None: an in-memory DB
    synchronous: str = "normal"

    @property
    def in_memory(self) -> bool:
        return self.path is None

    @property
    def lock_path(self) -> Path | None:
        return None if self.path is None else self.path.with_name(self.path.name + ".lock")

    def __str__(self) -> str:
        return MEMORY if self.path is None else str(self.path)


def parse_url(url: str, config_dir: Path) -> Location:
    """The Location in ``url``; ConfigError (exit 2) names what is wrong."""
    if not url.lower().startswith(PREFIX):
        raise ConfigError(
            f"expected 'sqlite:///relative/path.db' or 'sqlite:////absolute/path.db', "
            f"got {url!r}", path="eventing.store")
    rest, _, query = url[len(PREFIX):].partition("?")
    if not rest:
        raise ConfigError(f"the URL {url!r} names no file; write e.g. 'sqlite:///dbevents.db'",
                          path="eventing.store")
    options = dict(parse_qsl(query, keep_blank_values=True))
    for key in options:
        if key not in _KEYS:
            raise ConfigError(f"unknown option {key!r} in the store URL (known: "
                              f"{', '.join(_KEYS)})", path="eventing.store")
    synchronous = options.get("synchronous", "normal").lower()
    if synchronous not in SYNCHRONOUS:
        raise ConfigError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}, got "
                          f"{options['synchronous']!r}", path="eventing.store")
    if rest == MEMORY:
        return Location(path=None, synchronous=synchronous)
    path = Path(rest)
    # The core resolves relative paths against the config's folder; a store built
    # directly (tests, embedding) gets the same rule from its settings.
    if not path.is_absolute():
        path = config_dir / path
    return Location(path=path.absolute(), synchronous=synchronous)
