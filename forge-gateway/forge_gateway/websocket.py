"""The node's WebSocket protocol: uvicorn's websockets (sans-I/O) protocol plus ``write_now``
(the kernel's ASGI extension ``forge_kernel.websocket.WRITE_NOW``): a text message written
straight onto the transport, with no task, ASGI event or framing object per message, for
fan-out to thousands of sockets. Everything else (handshake, limits, close, keepalive) is
uvicorn's.

Server frames are not masked and need no per-connection state, so the frame is a header
plus the caller's payload buffers, joined into one buffer and written with one ``write`` (the
transport's fastest path: one ``write`` system call, no vector of buffers to build). A fan-out
hands the same parts tuple to thousands of connections in a row: the last frame built is
kept, so they all get the very same bytes and the frame is built once. With permessage-deflate
negotiated, these messages go out uncompressed (RSV1 clear), which RFC 7692 allows for any
message.
"""

from __future__ import annotations

import functools
import struct
from typing import Any, Sequence

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from forge_kernel.websocket import WRITE_NOW

_TEXT_FIN = 0x81
_H16 = struct.Struct("!BBH")
_H64 = struct.Struct("!BBQ")


@functools.lru_cache(maxsize=1024)  # a fan-out sends one size thousands of times
def text_frame_header(n: int) -> bytes:
    """The header of an unmasked, final text frame with an ``n``-byte payload (RFC 6455 5.2)."""
    if n < 126:
        return bytes((_TEXT_FIN, n))
    if n < 65536:
        return _H16.pack(_TEXT_FIN, 126, n)
    return _H64.pack(_TEXT_FIN, 127, n)


#: (parts, frame) of the last tuple framed: a fan-out writes one tuple to thousands of sockets.
#: Compared by identity: the tuple is held here, so no other object can have its id meanwhile,
#: and a tuple of bytes cannot change.
_last_framed: list[Any] = [None, b""]


def text_frame(parts: Sequence[bytes]) -> bytes:
    """The whole unmasked text frame whose payload is the concatenation of ``parts``."""
    if parts is _last_framed[0]:
        return _last_framed[1]
    payload = b"".join(parts)
    frame = text_frame_header(len(payload)) + payload
    if type(parts) is tuple:
        _last_framed[0], _last_framed[1] = parts, frame
    return frame


class WebSocketProtocol(WebSocketsSansIOProtocol):
    #: the transport's buffer is above its high-water mark: ``writable`` cleared, kept as a plain
    #: flag too so that ``write_now`` (once per subscriber of every fan-out) makes no method call for it
    write_paused = False

    def pause_writing(self) -> None:
        self.write_paused = True
        super().pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        super().resume_writing()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # absent when the handshake was refused
        if scope is not None:
            scope["extensions"][WRITE_NOW] = self.write_now

    def write_now(self, parts: Sequence[bytes]) -> bool:
        transport = self.transport
        if (not self.handshake_complete or self.close_sent or self.disconnected or self.initial_response is not None
                or self.write_paused or transport.is_closing()):
            return False
        # text_frame's cache, inlined: a fan-out hands every connection the same parts
        transport.write(_last_framed[1] if parts is _last_framed[0] else text_frame(parts))
        return True
