"""A minimal WebSocket client as an asyncio Protocol, for thousands of benchmark sockets in
one process: frame parsing only, no per-message tasks or queues, so the client side costs
little next to the servers being measured. Text frames only; no extensions."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
from typing import Callable
from urllib.parse import urlparse


def _mask(payload: bytes) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    k = int.from_bytes((key * (n // 4 + 1))[:n], "big") if n else 0
    masked = (int.from_bytes(payload, "big") ^ k).to_bytes(n, "big") if n else b""
    return key + masked


def frame(text: str, opcode: int = 0x1) -> bytes:
    payload = text.encode()
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + _mask(payload)


class WsProtocol(asyncio.Protocol):
    def __init__(self, host: str, path: str, on_message: Callable[[float, bytes], None]) -> None:
        self.host, self.path, self.on_message = host, path, on_message
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write((f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buf += data
        if not self.upgraded.done():
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buf[:end]).split(b"\r\n", 1)[0]
            del self.buf[:end + 4]
            if b" 101 " not in status:
                self.upgraded.set_exception(ConnectionError(status.decode(errors="replace")))
                return
            self.upgraded.set_result(None)
        buf = self.buf
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n = b1 & 0x7F
            pos = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n = struct.unpack_from("!H", buf, 2)[0]
                pos = 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n = struct.unpack_from("!Q", buf, 2)[0]
                pos = 10
            if len(buf) < pos + n:
                return
            payload = bytes(buf[pos:pos + n])
            del buf[:pos + n]
            opcode = b0 & 0x0F
            if opcode == 0x1:
                self.on_message(now, payload)
            elif opcode == 0x8:
                self.close_code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else None
                self.transport.close()
            elif opcode == 0x9:
                self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + _mask(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(exc or ConnectionError("closed before upgrade"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    def send(self, text: str) -> None:
        self.transport.write(frame(text))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(bytes([0x88, 0x82]) + _mask(struct.pack("!H", 1000)))
            self.transport.close()


async def connect(url: str, on_message: Callable[[float, bytes], None]) -> WsProtocol:
    u = urlparse(url)
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: WsProtocol(f"{u.hostname}:{u.port}", u.path or "/", on_message),
                                            u.hostname, u.port)
    await asyncio.wait_for(proto.upgraded, 30)
    return proto
