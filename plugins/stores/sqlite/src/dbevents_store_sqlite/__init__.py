"""dbevents eventing-DB store on SQLite (the embedded default)."""

from dbevents_store_sqlite.store import SqliteStore

__all__ = ["SqliteStore"]
