"""The keys a ``type = "mongodb"`` database table adds, validated when the config loads."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import attrs

FULL_DOCUMENT = ("updateLookup", "whenAvailable", "required")
FULL_DOCUMENT_BEFORE_CHANGE = ("off", "whenAvailable", "required")
MAX_BATCH_SIZE = 10000


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(_: Any, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {', '.join(choices)}; "
                             f"got {value!r}")

    return check


def parse_start_at(value: str) -> datetime | None:
    """``"now"`` -> None; an ISO 8601 time (UTC when it has no offset) -> that time."""
    if value == "now":
        return None
    when = datetime.fromisoformat(value)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _check_start_at(_: Any, __: attrs.Attribute[Any], value: str) -> None:
    try:
        parse_start_at(value)
    except ValueError:
        raise ValueError(
            f'start_at must be "now" or an ISO 8601 time such as '
            f'"2024-05-01T12:00:00Z"; got {value!r}'
        ) from None


def _check_batch_size(_: Any, __: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not 1 <= value <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be from 1 to {MAX_BATCH_SIZE}; got {value!r}")


def _check_positive(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be a number of seconds above 0; got {value!r}")


def _names(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


def _check_names(_: Any, __: attrs.Attribute[Any], value: tuple[str, ...] | None) -> None:
    if value is not None and not value:
        raise ValueError("collections: list at least one collection, or leave the key out "
                         "to watch every collection of the database")


@attrs.frozen
class MongoOptions:
    """Keys of ``[databases.NAME]`` with ``type = "mongodb"``.

    ``database``: the database to watch; default: the URL's path
    (``mongodb://host/app?replicaSet=rs0`` watches ``app``).
    ``collections``: only these collections (default: every collection).
    ``full_document``: what ``doc`` holds on update: ``updateLookup`` (the current
    version, read when the event is read), or the post-image recorded at the update
    (``whenAvailable``/``required``, MongoDB 6.0+, needs
    ``changeStreamPreAndPostImages`` on the collection).
    ``full_document_before_change``: ``off``, ``whenAvailable`` or ``required``:
    pre-images for updates, replaces and deletes (same requirement).
    ``start_at``: where a database with no checkpoint yet starts: ``now``, or an
    ISO 8601 time still inside the oplog window.
    ``batch_size``: most changes per batch handed to the engine (and read ahead).
    ``idle_checkpoint``: seconds between checkpoints while no watched change
    happens, so an idle stream's resume token never falls off the oplog.
    """

    database: str | None = None
    collections: tuple[str, ...] | None = attrs.field(default=None, converter=_names,
                                                      validator=_check_names)
    full_document: str = attrs.field(default="updateLookup", validator=_one_of(FULL_DOCUMENT))
    full_document_before_change: str = attrs.field(
        default="off", validator=_one_of(FULL_DOCUMENT_BEFORE_CHANGE))
    start_at: str = attrs.field(default="now", validator=_check_start_at)
    batch_size: int = attrs.field(default=500, validator=_check_batch_size)
    idle_checkpoint: float = attrs.field(default=60.0, validator=_check_positive)

    @property
    def start_time(self) -> datetime | None:
        return parse_start_at(self.start_at)

    @property
    def wants_images(self) -> bool:
        return (self.full_document != "updateLookup"
                or self.full_document_before_change != "off")
