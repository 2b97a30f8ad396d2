"""A listening TCP socket for a plugin's server (the gateway's HTTP, the mesh's gRPC)."""

from __future__ import annotations

import socket

from .errors import StartupError


def tcp_listener(host: str, port: int, *, section: str, backlog: int) -> socket.socket:
    """Bind and listen on ``host:port``; a port that cannot be had is a start-up error naming
    ``[section] port``. ``port`` 0 picks a free one (``getsockname()`` tells which)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so, and without
    # it Nagle + delayed ACK stall every response that is written in two parts by ~40 ms
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"[{section}] cannot listen on {host}:{port}: {exc.strerror or exc}; "
                           f"choose another [{section}] port (0 picks a free one)") from None
    sock.listen(backlog)
    return sock
