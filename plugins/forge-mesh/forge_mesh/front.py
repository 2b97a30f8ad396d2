"""The mesh port when it needs TLS: mutual TLS terminated here, refusals counted, bytes relayed
to the node's gRPC server on a private Unix socket.

gRPC's own TLS would refuse plaintext and wrong-CA peers too, but inside its C core where
Python never hears of it; terminating here lets the node count each refusal by kind
(``plaintext``, ``wrong_ca``, ``no_cert``, ``tls_error``) and swap certificates for new
connections without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any

from loguru import logger

_TLS_HANDSHAKE = 0x16  # first byte of a TLS record carrying a ClientHello
_RELAY_CHUNK = 256 * 1024


class TlsFront:
    def __init__(self, listen_sock: socket.socket, backend_path: str, context: ssl.SSLContext) -> None:
        self.sock = listen_sock
        self.backend_path = backend_path
        self.context = context
        self.refused: dict[str, int] = {"plaintext": 0, "wrong_ca": 0, "no_cert": 0, "tls_error": 0}
        self.accepted = 0
        self._accepting: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.sock.setblocking(False)
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(), name="forge:mesh-tls-front")

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(BaseException):
                await self._accepting
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(self.sock)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                logger.warning(f"mesh: accept failed: {exc}")
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._serve(conn, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _refuse(self, kind: str, peer: Any, why: str) -> None:
        self.refused[kind] += 1
        logger.warning(f"mesh: refused a connection from {peer}: {why} ({kind}, {self.refused[kind]} so far)")

    async def _serve(self, conn: socket.socket, peer: Any) -> None:
        loop = asyncio.get_running_loop()
        writer = None
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                first = await asyncio.wait_for(_peek(conn), 10)
            except (asyncio.TimeoutError, OSError):
                conn.close()
                return
            if not first or first[0] != _TLS_HANDSHAKE:
                if first:
                    self._refuse("plaintext", peer, "not TLS; the mesh requires mutual TLS from cluster members")
                conn.close()
                return
            reader = asyncio.StreamReader(limit=_RELAY_CHUNK)
            protocol = asyncio.StreamReaderProtocol(reader)
            try:
                # uvloop returns its TLS protocol here, not ours: keep ours for the writer
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol, conn, ssl=self.context, ssl_handshake_timeout=10)
            except (ssl.SSLError, ConnectionError, asyncio.TimeoutError, OSError) as exc:
                from .tls import classify_handshake_error

                kind = classify_handshake_error(exc)
                self._refuse(kind, peer, f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}")
                conn.close()
                return
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            self.accepted += 1
            b_reader, b_writer = await asyncio.open_unix_connection(self.backend_path, limit=_RELAY_CHUNK)
            await _relay(reader, writer, b_reader, b_writer)
        except asyncio.CancelledError:
            if writer is not None:
                writer.close()
            else:
                conn.close()
            raise
        except Exception as exc:  # one connection's trouble never reaches the node
            logger.debug(f"mesh: connection from {peer} ended: {type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                (writer or conn).close()


async def _peek(sock: socket.socket) -> bytes:
    """Wait until the socket is readable and look at its first byte without consuming it."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)
    return sock.recv(1, socket.MSG_PEEK)


async def _relay(a_reader: asyncio.StreamReader, a_writer: asyncio.StreamWriter,
                 b_reader: asyncio.StreamReader, b_writer: asyncio.StreamWriter) -> None:
    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await src.read(_RELAY_CHUNK)
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        finally:
            with contextlib.suppress(Exception):
                dst.close()

    tasks = [asyncio.ensure_future(pump(a_reader, b_writer)), asyncio.ensure_future(pump(b_reader, a_writer))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
