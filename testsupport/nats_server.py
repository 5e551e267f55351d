"""A private nats-server with JetStream for tests and benchmarks.

Like the database servers in ``servers.py``: its own temp folder (JetStream store,
log), 127.0.0.1 on a free port, removed again on stop(). The machine's own
nats-server on 4222 is never touched.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import uuid
from pathlib import Path

from testsupport.servers import ServerError, _find_binary, _Server


def find_nats_server() -> str:
    found = _find_binary(["nats-server"], ["/usr/sbin", "/usr/bin", "/usr/local/bin"])
    if found is None:
        raise ServerError("nats-server not found: install the nats-server package")
    return found


class NatsServer(_Server):
    """nats-server with JetStream on, its store in the temp folder."""

    kind = "nats"
    run_as = "root"  # nats-server runs as any user; see _account
    stop_signal = signal.SIGTERM

    def __init__(self, *, ready_timeout: float = 30.0) -> None:
        super().__init__(None, ready_timeout)
        self.binary = find_nats_server()
        # Told back in INFO: proves the server on the port is this one.
        self.name = f"dbevents-test-{uuid.uuid4().hex[:12]}"

    def start(self) -> NatsServer:
        super().start()
        return self

    def __enter__(self) -> NatsServer:
        return self.start()

    def _account(self) -> pwd.struct_passwd | None:
        return None  # unlike the databases, nats-server does not refuse root

    def _initialise(self, tmpdir: Path) -> None:
        (tmpdir / "jetstream").mkdir()

    def _server_argv(self) -> list[str]:
        assert self.tmpdir is not None
        return [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js",
                "-sd", str(self.tmpdir / "jetstream"), "-n", self.name]

    def _ping(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            line = sock.makefile("rb").readline()
        if not line.startswith(b"INFO "):
            raise ServerError(f"not a NATS greeting: {line[:80]!r}")
        info = json.loads(line[5:])
        if info.get("server_name") != self.name:
            raise ServerError(f"another server answers on port {self.port}: "
                              f"{info.get('server_name')!r}")
        if not info.get("jetstream"):
            raise ServerError("JetStream is not enabled yet")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


def nats_server_missing_is_fatal() -> bool:
    """In CI a missing nats-server fails the run; elsewhere its tests are skipped."""
    return bool(os.environ.get("CI"))
