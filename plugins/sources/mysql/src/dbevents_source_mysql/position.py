"""Binlog coordinates: what a checkpoint holds and where a reader resumes."""

from __future__ import annotations

import attrs
from dbevents import Position


@attrs.frozen
class BinlogPosition:
    """A point between two transactions: ``file`` and the offset of the next event.

    ``gtid`` is the GTID of the transaction that ends here when the server has one
    (MariaDB always, MySQL with gtid_mode=ON). It is informational: resuming uses
    file and offset, which every server has.
    """

    file: str
    pos: int
    gtid: str | None = attrs.field(default=None, eq=False)

    def __str__(self) -> str:
        base = f"{self.file}:{self.pos}"
        return f"{base} gtid={self.gtid}" if self.gtid else base

    def to_position(self) -> Position:
        return Position(str(self))

    @classmethod
    def parse(cls, value: str) -> BinlogPosition:
        """``"binlog.000003:1234"`` or ``"binlog.000003:1234 gtid=0-1-9"``."""
        coords, _, rest = value.strip().partition(" ")
        file, sep, pos = coords.rpartition(":")
        if not sep or not file or not pos.isdigit():
            raise ValueError(f"not a binlog position (FILE:OFFSET): {value!r}")
        gtid = rest.removeprefix("gtid=").strip() or None if rest else None
        return cls(file, int(pos), gtid)

    @classmethod
    def from_position(cls, position: Position) -> BinlogPosition:
        return cls.parse(position.value)
