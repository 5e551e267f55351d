"""dbevents eventing-DB store on PostgreSQL (shared by many workers)."""

from dbevents_store_postgres.store import PostgresStore

__all__ = ["PostgresStore"]
