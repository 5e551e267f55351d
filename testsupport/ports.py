"""Free TCP ports on the loopback interface."""

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port nobody is listening on right now.

    The kernel picks it for a socket bound to port 0; the socket is closed again so the
    caller can bind it. Another process could grab it in between, so servers that use
    this retry with a new port when binding fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
