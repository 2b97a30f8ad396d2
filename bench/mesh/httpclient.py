"""A lean HTTP/1.1 keep-alive client (asyncio streams + httptools): the bench's load generator and
the HTTP forwarder it compares gRPC forwarding with. Lean on purpose: a heavier client (httpx)
would make HTTP forwarding look slower than it has to be."""

from __future__ import annotations

import asyncio
from typing import Any

import httptools


class _Response:
    def __init__(self) -> None:
        self.status = 0
        self.body = bytearray()
        self.done = False

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.done = True


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        fresh = self.writer is None or self.writer.is_closing()
        if fresh:
            await self.open()
        try:
            return await self._post(path, body, headers)
        except (ConnectionError, OSError):
            if fresh:
                raise
            # the server closed an idle keep-alive connection (uvicorn: after 5 s): once more on a new one
            await self.open()
            return await self._post(path, body, headers)

    async def _post(self, path: str, body: bytes, headers: dict[str, str] | None) -> tuple[int, bytes]:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n{extra}\r\n".encode() + body)
        resp = _Response()
        parser = httptools.HttpResponseParser(resp)
        while not resp.done:
            data = await self.reader.read(65536)
            if not data:
                self.writer.close()
                raise ConnectionError("connection closed mid-response")
            parser.feed_data(data)
        resp.status = parser.get_status_code()
        return resp.status, bytes(resp.body)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Pool:
    """At most ``size`` keep-alive connections; a request waits for a free one."""

    def __init__(self, host: str, port: int, size: int = 16) -> None:
        self.host, self.port = host, port
        self._free: asyncio.Queue[Connection] = asyncio.Queue()
        for _ in range(size):
            self._free.put_nowait(Connection(host, port))

    async def post(self, path: str, body: bytes, headers: dict[str, Any] | None = None) -> tuple[int, bytes]:
        conn = await self._free.get()
        try:
            return await conn.post(path, body, headers)
        except BaseException:
            conn.close()
            conn.writer = None
            raise
        finally:
            self._free.put_nowait(conn)
