"""dbevents source plugin for MySQL 8 and MariaDB 10.5+: the row binlog."""

from dbevents_source_mysql.options import MysqlOptions
from dbevents_source_mysql.position import BinlogPosition
from dbevents_source_mysql.source import MysqlSource

__all__ = ["BinlogPosition", "MysqlOptions", "MysqlSource"]
