"""The dbevents source for MongoDB change streams (``type = "mongodb"``)."""

from dbevents_source_mongodb.convert import doc_id, to_json
from dbevents_source_mongodb.options import MongoOptions
from dbevents_source_mongodb.source import MongoSource

__all__ = ["MongoOptions", "MongoSource", "doc_id", "to_json"]
