"""The keys a ``type = "postgres"`` database section adds, and the names derived
from them."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import attrs

_SLOT = re.compile(r"^[a-z0-9_]{1,63}$")
MAX_NAME = 63  # NAMEDATALEN - 1


def _check_slot(_: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not _SLOT.match(value):
        raise ValueError(f"{attribute.name}: replication slot names may only contain lower-case "
                         f"letters, digits and underscores (at most 63), got {value!r}")


def _check_name(_: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    if not 0 < len(value.encode()) <= MAX_NAME or "\0" in value:
        raise ValueError(f"{attribute.name}: expected a name of 1 to 63 bytes, got {value!r}")


def _positive(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name}: must be above 0, got {value}")


@attrs.frozen
class PostgresOptions:
    # The replication slot (default dbevents_<database key>). Created when missing;
    # dbevents drops only one it has just created and refuses to use (the
    # checkpoint's slot was lost): `dbevents postgres drop-slot NAME` drops others.
    slot: str | None = attrs.field(default=None, validator=_check_slot)
    # The publication (default: the slot's name). Created when missing, FOR the
    # tables the triggers watch, or FOR ALL TABLES when a trigger watches every
    # table or publish_all is set.
    publication: str | None = attrs.field(default=None, validator=_check_name)
    publish_all: bool = False
    batch_size: int = attrs.field(default=1000, validator=_positive)  # changes per batch
    status_interval: float = attrs.field(default=10.0, validator=_positive)  # seconds
    # A stream silent for this long (despite the status updates asking for a
    # reply) is treated as dead and reconnected.
    receive_timeout: float = attrs.field(default=60.0, validator=_positive)
    # How long reconnecting may fail before the source reports itself unavailable
    # (the engine then restarts it from the checkpoint, with its own backoff).
    reconnect_for: float = attrs.field(default=120.0, validator=_positive)
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)


def default_name(database: str) -> str:
    """dbevents_<database key>, made a valid slot name. A key that had to be
    changed for that gets a short hash, so "app-1" and "app_1" stay apart."""
    clean = re.sub(r"[^a-z0-9_]", "_", database.lower())
    name = f"dbevents_{clean}"
    if clean != database or len(name) > MAX_NAME:
        digest = hashlib.sha1(database.encode()).hexdigest()[:6]
        name = f"{name[:MAX_NAME - 7]}_{digest}"
    return name


def slot_name(database: str, options: PostgresOptions | None) -> str:
    if options is not None and options.slot:
        return options.slot
    return default_name(database)


def publication_name(database: str, options: PostgresOptions | None) -> str:
    if options is not None and options.publication:
        return options.publication
    return slot_name(database, options)
