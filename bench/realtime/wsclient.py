"""A minimal WebSocket client as an asyncio Protocol, for thousands of benchmark sockets in
one process: frame parsing only, no per-message tasks or queues, so the client side costs
little next to the servers being measured. Text frames only; no extensions."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
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
        self.read_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write((f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.data_received_at(data, now, now)

    def data_received_at(self, data: bytes, now: float, read_at: float) -> None:
        """``data`` arrived at ``now`` and this process read it at ``read_at`` (``time.perf_counter()``):
        ``now`` is when the kernel received it for a socket read by ``connect_stamped``."""
        self.read_at = read_at
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


# --- kernel receive times -------------------------------------------------------------------------
# A client process that waits for a core reads its sockets late, and a receive time taken when it
# reads them counts that wait as the server's latency (with CPU burners on a 2-core machine, waits of
# 100-250 ms). ``connect_stamped`` reads the socket with recvmsg and SO_TIMESTAMPNS: each read carries
# the time the kernel received its last segment, which the client's own scheduling cannot delay.
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_CMSG_SPACE = socket.CMSG_SPACE(16)
_TIMESPEC = struct.Struct("qq")
# one read buffer for every socket of the process (reads are synchronous): recvmsg(n) would allocate
# (and, at 256 KB, mmap and unmap) a buffer of n bytes for every read
_READ_BUF = bytearray(262_144)
_READ_INTO = [_READ_BUF]
_READ_VIEW = memoryview(_READ_BUF)


class _StampedTransport:
    """The few transport calls ``WsProtocol`` makes, on a non-blocking socket read with recvmsg."""

    def __init__(self, sock: socket.socket, proto: WsProtocol) -> None:
        self.sock, self.proto, self.loop = sock, proto, asyncio.get_running_loop()
        self.fd = sock.fileno()
        self.out = bytearray()
        self.closing = False
        self.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        try:
            n, anc, _, _ = self.sock.recvmsg_into(_READ_INTO, _CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        if not n:
            self._lost(None)
            return
        read_at = now = time.perf_counter()
        if anc and anc[0][1] == _SO_TIMESTAMPNS:
            sec, nsec = _TIMESPEC.unpack_from(anc[0][2])
            # the kernel stamps CLOCK_REALTIME: how long ago, on this process's monotonic clock
            now -= max(0.0, time.time() - (sec + nsec * 1e-9))
        self.proto.data_received_at(_READ_VIEW[:n].tobytes(), now, read_at)

    def write(self, data: bytes) -> None:
        if self.closing:
            return
        if not self.out:
            try:
                n = self.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._lost(exc)
                return
            data = data[n:]
            if not data:
                return
            self.loop.add_writer(self.fd, self._writable)
        self.out += data

    def _writable(self) -> None:
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(exc)
            return
        del self.out[:n]
        if not self.out:
            self.loop.remove_writer(self.fd)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self._lost(None)

    def _lost(self, exc: Exception | None) -> None:
        if self.closing:
            return
        self.closing = True
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        self.sock.close()
        self.proto.connection_lost(exc)


async def connect_stamped(url: str, on_message: Callable[[float, bytes], None]) -> WsProtocol:
    """``connect``, with each message's receive time taken by the kernel (see above)."""
    u = urlparse(url)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        await loop.sock_connect(sock, (u.hostname, u.port))
    except BaseException:
        sock.close()
        raise
    proto = WsProtocol(f"{u.hostname}:{u.port}", u.path or "/", on_message)
    proto.connection_made(_StampedTransport(sock, proto))
    await asyncio.wait_for(proto.upgraded, 30)
    return proto
