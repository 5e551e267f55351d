"""dbevents source for PostgreSQL: row changes from logical replication (pgoutput)."""

from dbevents_source_postgres.options import PostgresOptions
from dbevents_source_postgres.source import PostgresSource

__all__ = ["PostgresOptions", "PostgresSource"]
