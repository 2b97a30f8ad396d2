"""What a WebSocket connection served by the node's HTTP server offers besides plain ASGI.

``scope["extensions"][WRITE_NOW]`` (optional; forge-gateway's server provides it, forge-realtime
uses it when present): a callable ``write_now(parts: Sequence[bytes]) -> bool``.

- It writes ONE text message whose payload is the concatenation of ``parts`` (UTF-8) onto
  the connection at once, without awaiting, and returns True;
- or it writes nothing and returns False, when the message cannot be written now: the
  handshake is not complete, the connection is closing or closed, or its transport's write
  buffer is above the high-water mark (the peer does not read fast enough).
- The ``parts`` objects are not copied into a per-connection message first, so one buffer can
  be shared by every connection a message goes to (a live query's result is encoded once for
  all its subscribers).
- Messages written through it and through ASGI ``websocket.send`` arrive in the order of the
  calls, provided the caller writes directly only while no ``websocket.send`` of its own is
  pending; on False it falls back to ``websocket.send``, which waits for the transport.

Why: a fan-out of one result to thousands of sockets through ASGI costs a task switch, an
event dict and a framing object per socket; this costs one ``write``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

WRITE_NOW = "forge.websocket.write_now"

WriteNow = Callable[[Sequence[bytes]], bool]


def write_now(scope: Mapping[str, Any] | None) -> WriteNow | None:
    """The connection's ``write_now`` (see the module docstring), or None when its server has none."""
    if not scope:
        return None
    return (scope.get("extensions") or {}).get(WRITE_NOW)
