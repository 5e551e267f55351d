"""One worker per SQLite file: an exclusive flock on ``<file>.lock``.

Claims in a SQLite store are only safe with one worker (its start hands every
lease back at once), so a second worker must be refused. The kernel drops the
lock when the holder exits, however it exits, so a killed worker never leaves a
stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from dbevents.errors import SetupError


class WorkerLock:
    def __init__(self, lock_path: Path, db_path: Path) -> None:
        self.lock_path = lock_path
        self.db_path = db_path
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SetupError(
                f"cannot create the lock file {self.lock_path} for the eventing DB "
                f"{self.db_path}: {exc.strerror}; the folder {self.lock_path.parent} must be "
                "writable by the user running dbevents") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise SetupError(
                f"another dbevents process{who} is using this eventing DB: {self.db_path} "
                f"(lock {self.lock_path} is held); a SQLite store serves one `dbevents run` "
                "at a time: stop the other process, or give this one its own store "
                "([eventing] store), or share a PostgreSQL store between them") from None
        except OSError as exc:
            os.close(fd)
            raise SetupError(f"cannot lock {self.lock_path}: {exc.strerror}") from None
        # The holder's pid, for the message above; advisory only.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing drops the flock


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
