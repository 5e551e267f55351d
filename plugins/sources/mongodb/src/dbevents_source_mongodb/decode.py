"""Change-stream event documents -> dbevents Changes; resume tokens <-> Positions."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from bson import json_util
from bson.timestamp import Timestamp
from dbevents import Change, Operation, Position, SetupError
from dbevents.hints import command

from dbevents_source_mongodb.convert import canonical, doc_id, to_json

DB_TYPE = "mongodb"

OPERATIONS = {
    "insert": Operation.INSERT,
    "update": Operation.UPDATE,
    "replace": Operation.UPDATE,
    "delete": Operation.DELETE,
}
# Change-stream operation types per dbevents operation, for a server-side $match.
SERVER_OPERATIONS = {
    Operation.INSERT.value: ("insert",),
    Operation.UPDATE.value: ("update", "replace"),
    Operation.DELETE.value: ("delete",),
}
# Events about collections and the database: never filtered out, so they are logged
# and the stream can restart after an invalidate.
LIFECYCLE = ("drop", "rename", "dropDatabase", "invalidate")

Token = Mapping[str, Any]


def token_position(token: Token) -> Position:
    """A resume token as the stored checkpoint: compact canonical extended JSON,
    ``{"_data":"8266..."}``, which round-trips any token the server hands out."""
    return Position(canonical(token))


def position_token(position: Position, source: str) -> dict[str, Any]:
    try:
        token = json_util.loads(position.value)
    except (ValueError, TypeError):
        token = None
    if not isinstance(token, dict) or "_data" not in token:
        raise SetupError(
            f"the checkpoint stored for database {source!r} is not a MongoDB resume token "
            f"({position.value[:80]!r}); if it was written by another source type, start "
            f"this database from now with `{command(f'mongodb reset-token {source}')}`"
        )
    return token


def token_key(token: Token) -> str:
    """The change's key: the token's ``_data`` (a hex string on MongoDB 4.2+). The
    server derives it from the event's cluster time, transaction index and
    document key, so a replay gives the same key and the same event ids."""
    data = token.get("_data")
    return data if isinstance(data, str) else canonical(token)


def event_time(event: Mapping[str, Any]) -> datetime:
    """``wallTime`` (MongoDB 6.0+) if present, else the ``clusterTime`` seconds."""
    wall = event.get("wallTime")
    if isinstance(wall, datetime):
        return wall if wall.tzinfo is not None else wall.replace(tzinfo=UTC)
    cluster = event.get("clusterTime")
    if isinstance(cluster, Timestamp):
        return cluster.as_datetime()
    return datetime.now(UTC)


def to_change(event: Mapping[str, Any], database: str) -> Change | None:
    """The Change for an insert, update, replace or delete; None for any other
    event type (drop, rename, dropDatabase, invalidate...)."""
    kind = event.get("operationType")
    operation = OPERATIONS.get(kind) if isinstance(kind, str) else None
    if operation is None:
        return None
    ns = event.get("ns") or {}
    key_doc = event.get("documentKey") or {}
    before = event.get("fullDocumentBeforeChange")
    extra: dict[str, Any] = {}
    if kind == "delete":
        # The pre-image when the collection records them, else the document key
        # ({"_id": ...}, plus the shard key fields on a sharded collection).
        doc = to_json(before if before is not None else key_doc)
    else:
        full = event.get("fullDocument")
        doc = to_json(full) if full is not None else None
        if before is not None:
            extra["old"] = to_json(before)
    if kind == "update":
        desc = event.get("updateDescription") or {}
        extra["updateDescription"] = {
            "updatedFields": to_json(desc.get("updatedFields") or {}),
            "removedFields": to_json(list(desc.get("removedFields") or [])),
            "truncatedArrays": to_json(list(desc.get("truncatedArrays") or [])),
        }
    return Change(
        database=database,
        db_type=DB_TYPE,
        table=str(ns.get("coll", "")),
        operation=operation,
        key=token_key(event["_id"]),
        time=event_time(event),
        doc_id=doc_id(key_doc["_id"]) if "_id" in key_doc else None,
        doc=doc,
        extra=extra,
    )


def describe(event: Mapping[str, Any]) -> dict[str, Any]:
    """Log fields for an event that is not a document change."""
    ns = event.get("ns") or {}
    out: dict[str, Any] = {"operation": event.get("operationType"),
                           "collection": ns.get("coll"), "db": ns.get("db")}
    to = event.get("to")
    if isinstance(to, Mapping):
        out["to"] = f"{to.get('db')}.{to.get('coll')}"
    return {k: v for k, v in out.items() if v is not None}
