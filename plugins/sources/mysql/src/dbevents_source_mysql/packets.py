"""MySQL protocol packets from the binlog dump connection, read in large chunks.

PyMySQL reads each packet with two buffered reads and wraps it in an object; for a
stream of small events that overhead is a large share of the work. Reading chunks
also tells the reader when it has drained what the server sent, which is when it
hands its batch to the event loop: one wake-up per chunk, not per transaction.
"""

from __future__ import annotations

from typing import Any

import pymysql

CHUNK = 256 * 1024
MAX_PAYLOAD = 0xFFFFFF  # a payload this long continues in the next packet
MAX_READ = 4 * 1024 * 1024


class PacketStream:
    def __init__(self, conn: pymysql.connections.Connection[Any], timeout: float) -> None:
        # The connection's own buffered reader: it may already hold bytes.
        self._read1 = conn._rfile.read1
        conn._sock.settimeout(timeout)
        self.buf = b""  # received bytes; packets start at .pos
        self.pos = 0

    def joined(self, pos: int) -> tuple[bytes, int] | None:
        """The payload of 16 MiB or more starting at ``pos``, split over several
        packets, with the position after it; None until all of it is buffered."""
        buf = self.buf
        parts = []
        while True:
            if len(buf) - pos < 4:
                return None
            length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
            if pos + 4 + length > len(buf):
                return None
            parts.append(buf[pos + 4:pos + 4 + length])
            pos += 4 + length
            if length < MAX_PAYLOAD:
                return b"".join(parts), pos

    def fill(self) -> None:
        """Block until more bytes arrive; OperationalError when the server closed
        the connection, OSError (e.g. TimeoutError) from the socket."""
        rest = self.buf[self.pos:]
        # A large event: gather all of it before joining, never re-copying a growing
        # buffer once per chunk.
        need = _missing(rest)
        parts = [rest]
        got = 0
        while got < need:
            chunk = self._read1(min(max(CHUNK, need - got), MAX_READ))
            if not chunk:
                raise pymysql.err.OperationalError(
                    2013, "Lost connection to the server during the binlog dump")
            parts.append(chunk)
            got += len(chunk)
        self.buf = b"".join(parts) if rest or len(parts) > 2 else parts[1]
        self.pos = 0


def _missing(rest: bytes) -> int:
    """How many more bytes the first payload in ``rest`` needs at least (>= 1),
    following its continuation packets as far as their headers are there."""
    p = 0
    while len(rest) - p >= 4:
        length = rest[p] | rest[p + 1] << 8 | rest[p + 2] << 16
        p += 4 + length
        if length < MAX_PAYLOAD:
            return max(1, p - len(rest))
    return max(1, p + 4 - len(rest))
