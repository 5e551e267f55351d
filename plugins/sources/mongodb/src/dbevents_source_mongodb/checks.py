"""Startup checks and error classification: each failure becomes a SetupError that
says what is wrong and how to fix it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dbevents import SetupError
from dbevents.hints import command
from pymongo.errors import OperationFailure

from dbevents_source_mongodb.options import MongoOptions

# Server error codes (src/mongo/base/error_codes.yml in the MongoDB source).
UNAUTHORIZED = 13
AUTHENTICATION_FAILED = 18
NO_MATCHING_DOCUMENT = 47
INVALID_RESUME_TOKEN = 260
CHANGE_STREAM_FATAL = 280
CHANGE_STREAM_HISTORY_LOST = 286
CHANGE_STREAMS_NEED_REPLICA_SET = 40573
WIRE_VERSION_6_0 = 17  # pre- and post-images arrived with MongoDB 6.0

REPLICA_SET_HOWTO = (
    "change streams need a replica set or a sharded cluster. A single server can be "
    "a one-member replica set: restart it as `mongod --replSet rs0 --dbpath DIR "
    "--bind_ip localhost` (or set replication.replSetName: rs0 in mongod.conf), run "
    "`rs.initiate()` once in mongosh, and add ?replicaSet=rs0 to the URL"
)


def reset_hint(source: str) -> str:
    return (f"to start again from now, stop dbevents and run "
            f"`{command(f'mongodb reset-token {source}')}`, then start it again")


def topology_error(hello: Mapping[str, Any], where: str) -> SetupError | None:
    """None for a replica-set member or a mongos; else the error to raise."""
    if hello.get("setName") or hello.get("msg") == "isdbgrid":
        return None
    return SetupError(f"MongoDB at {where} is a standalone server, not a replica set: "
                      f"{REPLICA_SET_HOWTO}")


def connect_error(exc: Exception, where: str) -> SetupError:
    """An error met while connecting at start, as a SetupError."""
    if isinstance(exc, OperationFailure) and exc.code == AUTHENTICATION_FAILED:
        return SetupError(
            f"authentication to MongoDB at {where} failed: check the user name and "
            f"password in the URL (special characters percent-encoded) and authSource "
            f"(the database that holds the user, usually ?authSource=admin)"
        )
    text = str(exc)
    hint = ""
    if "Standalone" in text:
        hint = f"; the server answers as a standalone server: {REPLICA_SET_HOWTO}"
    elif "ReplicaSetNoPrimary" in text or "replicaSet" in text:
        hint = ("; check that ?replicaSet= in the URL names the set as rs.status().set "
                "shows it, and that the members' host names resolve from here")
    return SetupError(f"cannot use MongoDB at {where}: {text}{hint}")


def stream_error(exc: OperationFailure, source: str, where: str,
                 options: MongoOptions) -> SetupError | None:
    """The SetupError for a change-stream error that retrying cannot cure, or None
    for one worth retrying."""
    code = exc.code
    message = (exc.details or {}).get("errmsg") or str(exc)
    if code in (CHANGE_STREAM_HISTORY_LOST, CHANGE_STREAM_FATAL):
        return SetupError(
            f"MongoDB database {source!r} at {where} can no longer resume its change "
            f"stream: the stored resume token has fallen off the oplog ({message}). The "
            f"changes made between that checkpoint and now cannot be recovered and were "
            f"not delivered; nothing was skipped silently. To keep this from happening "
            f"again, grow the oplog (replSetResizeOplog) or keep dbevents running; "
            f"{reset_hint(source)}"
        )
    if code == INVALID_RESUME_TOKEN:
        return SetupError(
            f"MongoDB rejects the resume token stored for database {source!r} at {where} "
            f"({message}); {reset_hint(source)}"
        )
    if code == AUTHENTICATION_FAILED:
        return connect_error(exc, where)
    if code == UNAUTHORIZED:
        return SetupError(
            f"the MongoDB user in the URL of database {source!r} may not watch changes "
            f"({message}); grant it the find and changeStream actions on the database "
            f"(the built-in role read does), e.g. db.grantRolesToUser(USER, "
            f'[{{role: "read", db: "DB"}}])'
        )
    if code == CHANGE_STREAMS_NEED_REPLICA_SET:
        return SetupError(f"MongoDB at {where}: {REPLICA_SET_HOWTO}")
    image_missing = code == NO_MATCHING_DOCUMENT or "-image" in message
    if image_missing and "required" in (options.full_document,
                                        options.full_document_before_change):
        return SetupError(
            f"MongoDB database {source!r}: a change has no pre- or post-image although "
            f"the config requires one ({message}); enable images on the collection "
            f"({collmod_command('COLLECTION')}) or use \"whenAvailable\""
        )
    return None


def collmod_command(collection: str) -> str:
    return (f'db.runCommand({{collMod: "{collection}", '
            f"changeStreamPreAndPostImages: {{enabled: true}}}})")


def database_error(database: str, existing: Sequence[str], where: str) -> SetupError | None:
    if database in existing:
        return None
    known = ", ".join(sorted(n for n in existing if n not in ("admin", "config", "local")))
    return SetupError(
        f"database {database!r} does not exist on MongoDB at {where} (it has: "
        f"{known or 'no user databases'}). Check the name in the URL path or the "
        f"`database` key; MongoDB creates a database with its first collection, so "
        f"create one first if it is new (db.createCollection(\"NAME\") in mongosh)"
    )


def collections_without_images(infos: Iterable[Mapping[str, Any]],
                                wanted: Sequence[str] | None) -> list[str]:
    """Watched collections lacking ``changeStreamPreAndPostImages: {enabled: true}``."""
    out = []
    for info in infos:
        name = str(info.get("name", ""))
        if info.get("type", "collection") != "collection" or name.startswith("system."):
            continue
        if wanted is not None and name not in wanted:
            continue
        images = (info.get("options") or {}).get("changeStreamPreAndPostImages") or {}
        if not images.get("enabled"):
            out.append(name)
    return sorted(out)


def images_error(hello: Mapping[str, Any], options: MongoOptions, missing: Sequence[str],
                 source: str) -> SetupError | None:
    """Pre-/post-images need MongoDB 6.0+; ``required`` needs them enabled on every
    watched collection."""
    if not options.wants_images:
        return None
    if int(hello.get("maxWireVersion", 0)) < WIRE_VERSION_6_0:
        return SetupError(
            f"database {source!r}: full_document = {options.full_document!r} / "
            f"full_document_before_change = {options.full_document_before_change!r} need "
            f"MongoDB 6.0 or later; use full_document = \"updateLookup\" and "
            f"full_document_before_change = \"off\" on this server"
        )
    required = "required" in (options.full_document, options.full_document_before_change)
    if required and missing:
        commands = "; ".join(collmod_command(c) for c in missing)
        return SetupError(
            f"database {source!r} requires pre-/post-images, but these collections do "
            f"not record them: {', '.join(missing)}. Enable them in mongosh: {commands}"
        )
    return None
