"""The node's HTTP/1.1 connection protocol: uvicorn's httptools protocol plus the limits uvicorn
does not enforce with httptools.

uvicorn bounds nothing before a request's headers are complete: not their size (httptools joins
the pieces of a header value by concatenation, so one 100 MB header cost 14-28 s of CPU while
every other call stalled), not the time a client takes to send them (half-sent requests and a
header line every few seconds were held forever), not the number of connections
(``limit_concurrency`` answers 503 only once a request's headers are complete; the connection
is held until then). ``h11_max_incomplete_event_size`` exists for h11 only. So the limits are
kept here, where the bytes arrive:

* ``max_header_bytes`` counts the bytes of a request before its headers end; once exceeded the
  request gets 431 and the connection is closed, so httptools never holds more than that;
* ``max_header_line_bytes`` bounds the request line (414) and each header line (431);
* ``header_timeout`` closes a connection whose request headers are not complete in time (408),
  counted from the connection (or, on a kept-alive connection, from the request's first byte);
* ``max_connections`` answers 503 to connections beyond the cap and closes them at once.

Every refusal is one small JSON error in the documented shape ``{"error": {"code", "message",
"details"}}``. The hot path gains a length check per header and per received chunk.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import attrs
from loguru import logger
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol


@attrs.frozen
class EdgeLimits:
    max_header_line_bytes: int = 16_384
    max_header_bytes: int = 65_536
    header_timeout: float = 10.0
    max_connections: int = 10_000


class ConnectionGate:
    """State shared by a server's connections: how many were refused since the last log line."""

    #: at most one "connection limit reached" line per this many seconds
    LOG_EVERY = 10.0

    def __init__(self, limits: EdgeLimits) -> None:
        self.limits = limits
        self.refused = 0
        self._logged_at = -1e18

    def refuse(self, open_connections: int) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._logged_at >= self.LOG_EVERY:
            self._logged_at = now
            logger.warning(f"gateway: connection limit reached: {open_connections} connections are open, "
                           f"[gateway] max_connections = {self.limits.max_connections}; answering new connections "
                           f"with 503 ({self.refused} refused so far)")


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the protocol answers ``refusal``."""


def error_bytes(status: int, code: str, message: str, details: Any, default_headers: list[tuple[bytes, bytes]],
                extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message, "details": details}}).encode()
    head = [STATUS_LINE[status]]
    for name, value in (*default_headers, *extra):
        head += [name, b": ", value, b"\r\n"]
    head += [b"content-type: application/json\r\n", b"content-length: ", str(len(body)).encode(), b"\r\n",
             b"x-request-id: ", secrets.token_hex(8).encode(), b"\r\n", b"connection: close\r\n\r\n", body]
    return b"".join(head)


class EdgeProtocol(HttpToolsProtocol):
    # The hot path (a request whose headers arrive in one piece) costs one length check per chunk
    # and no timer: the header timer is armed only while a request's headers are incomplete after
    # a chunk (and once per connection, for a client that sends nothing), and lines are measured
    # only for requests whose headers are longer than a line may be (or that were pipelined
    # behind another request in one chunk, where the count may be short by that chunk).

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, gate: ConnectionGate) -> None:
        HttpToolsProtocol.__init__(self, config, server_state, app_state, _loop)
        self.gate = gate
        self.limits = gate.limits
        #: bytes of the current request received while its headers were incomplete
        self._header_bytes = 0
        #: the bytes arriving now may be header bytes (a request has not finished its headers, or
        #: the next one has not begun)
        self._in_headers = True
        #: a request has begun (or the connection opened) and its headers are not complete
        self._awaiting_headers = True
        self._header_since = 0.0
        #: no callback has run yet for the chunk being fed
        self._fresh_chunk = True
        #: the current request began at the start of a chunk, so ``_header_bytes`` counted all of it
        #: (a pipelined request that began inside a chunk is measured line by line instead)
        self._counted_whole = True
        self._header_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str, str, Any] | None = None

    # --- connection ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        HttpToolsProtocol.connection_made(self, transport)
        if len(self.connections) > self.limits.max_connections:
            self.gate.refuse(len(self.connections) - 1)
            self._answer(503, "RATE_LIMITED", f"the node has reached its connection limit ([gateway] "
                                              f"max_connections = {self.limits.max_connections}); retry later",
                         {"limit": self.limits.max_connections}, extra=((b"retry-after", b"1"),))
            return
        self._header_since = self.loop.time()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        HttpToolsProtocol.connection_lost(self, exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_at(self._header_since + self.limits.header_timeout,
                                               self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._awaiting_headers and not self.transport.is_closing():
            self._answer(408, "TIMEOUT", f"request headers not complete within {self.limits.header_timeout:g}s "
                                         "([gateway] header_timeout)", {"timeout": self.limits.header_timeout})

    # --- bytes in --------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            room = self.limits.max_header_bytes - self._header_bytes
            if len(data) > room:
                self._over_the_header_limit(data, room)
                return
            self._header_bytes += len(data)
        self._fresh_chunk = True
        HttpToolsProtocol.data_received(self, data)
        if self._awaiting_headers and self._header_timer is None and not self.transport.is_closing():
            self._arm_header_timer()  # headers still incomplete after this chunk

    def _over_the_header_limit(self, data: bytes, room: int) -> None:
        # feed what the limit allows: if the headers end inside it, the rest is body
        room = max(room, 0)
        head, rest = data[:room], data[room:]
        self._header_bytes += len(head)
        if head:
            self._fresh_chunk = True
            HttpToolsProtocol.data_received(self, head)
        if self.transport.is_closing():
            return
        if self._in_headers:
            limit = self.limits.max_header_line_bytes
            if self._awaiting_headers and len(getattr(self, "url", b"")) > limit:
                self._answer(414, "PAYLOAD_TOO_LARGE", _target_message(limit), {"limit": limit})
            else:
                self._answer(431, "PAYLOAD_TOO_LARGE", f"request headers larger than {self.limits.max_header_bytes} "
                                                       "bytes ([gateway] max_header_bytes)",
                             {"limit": self.limits.max_header_bytes})
            return
        protocol = self.transport.get_protocol()
        if protocol is not self:  # upgraded to WebSocket: the rest belongs to it
            protocol.data_received(rest)
        else:
            self.data_received(rest)

    def send_400_response(self, msg: str) -> None:
        # called by uvicorn when the parser (or one of our callbacks) stops on a request
        if self._refusal is not None:
            status, code, message, details = self._refusal
            self._answer(status, code, message, details)
        else:
            self._answer(400, "INVALID_ARGUMENT", f"malformed HTTP request: {msg}", None)

    def _answer(self, status: int, code: str, message: str, details: Any,
                extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self._disarm_header_timer()
        if self.transport.is_closing():
            return
        self.transport.write(error_bytes(status, code, message, details, self.server_state.default_headers, extra))
        self.transport.close()

    def _refuse(self, status: int, message: str, limit: int) -> None:
        self._refusal = (status, "PAYLOAD_TOO_LARGE", message, {"limit": limit})
        raise _Refused(message)

    def _check_lines(self) -> None:
        limit = self.limits.max_header_line_bytes
        if len(self.url) > limit:
            self._refuse(414, _target_message(limit), limit)
        for name, value in self.headers:
            if len(name) + len(value) > limit:
                self._refuse(431, f"request header {name[:64].decode('latin-1')!r} longer than {limit} bytes "
                                  "([gateway] max_header_line_bytes)", limit)

    # --- parser callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        HttpToolsProtocol.on_message_begin(self)
        self._in_headers = self._awaiting_headers = True
        self._counted_whole = self._fresh_chunk
        self._header_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self._in_headers = self._awaiting_headers = False
        if self._header_timer is not None:
            self._disarm_header_timer()
        if self._header_bytes > self.limits.max_header_line_bytes or not self._counted_whole:
            self._check_lines()  # only then can a line be too long
        HttpToolsProtocol.on_headers_complete(self)

    def on_message_complete(self) -> None:
        HttpToolsProtocol.on_message_complete(self)
        # the next bytes on this connection start a new request
        self._in_headers, self._header_bytes, self._fresh_chunk = True, 0, False


def _target_message(limit: int) -> str:
    return f"request target longer than {limit} bytes ([gateway] max_header_line_bytes)"
