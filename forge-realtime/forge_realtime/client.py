"""A Python client for FORGE live queries.

.. code-block:: python

    async with ForgeClient("ws://localhost:8000/ws", token=token) as client:
        async for todos in client.subscribe("list_todos"):
            print(todos)

The client reconnects with jittered exponential backoff when the connection drops (a
draining node closes with 1001) and resubscribes with the last hash it saw, so an
unchanged result is not sent again. A consumer slower than the updates sees the latest
result (intermediate ones are skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
from typing import Any, AsyncIterator

import attrs
import websockets
from loguru import logger


class SubscriptionError(Exception):
    """The server ended a subscription (or refused it) with a FORGE error code."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.details = code, message, details


_NOTHING = object()


@attrs.define(eq=False)
class _Sub:
    sub_id: str
    function: str
    args: dict[str, Any]
    last_hash: str | None = None
    position: int | None = None
    latest: Any = _NOTHING
    error: SubscriptionError | None = None
    event: asyncio.Event = attrs.field(factory=asyncio.Event)


class ForgeClient:
    def __init__(self, url: str, *, token: str | None = None, min_backoff: float = 0.1, max_backoff: float = 10.0,
                 open_timeout: float = 10.0, max_size: int = 64 * 1024 * 1024, keepalive: float = 30.0) -> None:
        self.url = url
        self.token = token
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.open_timeout = open_timeout
        self.max_size = max_size
        self.keepalive = keepalive
        self.connects = 0
        self.last_close_code: int | None = None
        self._subs: dict[str, _Sub] = {}
        self._ids = itertools.count(1)
        self._ws: Any = None
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self._first_error: SubscriptionError | None = None
        self._closing = False
        self._pongs: dict[str, asyncio.Future] = {}

    # --- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> "ForgeClient":
        self._task = asyncio.create_task(self._run(), name="forge-client")
        try:
            await asyncio.wait_for(self._ready.wait(), self.open_timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise ConnectionError(f"could not connect to {self.url} within {self.open_timeout:g}s") from None
        if self._first_error is not None:
            await self.close()
            raise self._first_error
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._ready.is_set()

    # --- API ------------------------------------------------------------------------------
    async def subscribe(self, function: str, /, **args: Any) -> AsyncIterator[Any]:
        """Yield the query's result now and again whenever it changes."""
        sub = _Sub(f"s{next(self._ids)}", function, args)
        self._subs[sub.sub_id] = sub
        await self._send_subscribe(sub)
        try:
            while True:
                await sub.event.wait()
                sub.event.clear()
                if sub.error is not None:
                    raise sub.error
                if sub.latest is not _NOTHING:
                    value, sub.latest = sub.latest, _NOTHING
                    yield value
        finally:
            self._subs.pop(sub.sub_id, None)
            if self._ws is not None and sub.error is None:
                with contextlib.suppress(Exception):
                    await self._ws.send(json.dumps({"type": "unsubscribe", "id": sub.sub_id}))

    async def refresh(self, token: str) -> None:
        """Send a new token on the open socket (before the old one expires)."""
        self.token = token
        if self._ws is not None:
            await self._ws.send(json.dumps({"type": "auth", "token": token}))

    async def ping(self, timeout: float = 5.0) -> None:
        key = f"p{next(self._ids)}"
        fut = asyncio.get_running_loop().create_future()
        self._pongs[key] = fut
        try:
            await self._ws.send(json.dumps({"type": "ping", "id": key}))
            await asyncio.wait_for(fut, timeout)
        finally:
            self._pongs.pop(key, None)

    # --- connection ---------------------------------------------------------------------------
    async def _send_subscribe(self, sub: _Sub) -> None:
        if self._ws is None:
            return  # sent on (re)connect
        with contextlib.suppress(Exception):
            await self._ws.send(json.dumps({"type": "subscribe", "id": sub.sub_id, "function": sub.function,
                                            "args": sub.args, "hash": sub.last_hash}))

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                async with websockets.connect(self.url, max_size=self.max_size, open_timeout=self.open_timeout,
                                              ping_interval=20) as ws:
                    self.connects += 1
                    await ws.send(json.dumps({"type": "auth", "token": self.token}))
                    self._ws = ws
                    for sub in list(self._subs.values()):
                        await self._send_subscribe(sub)
                    keepalive = asyncio.create_task(self._keepalive(ws))
                    try:
                        async for raw in ws:
                            attempt = 0
                            self._dispatch(json.loads(raw))
                    finally:
                        keepalive.cancel()
                    self.last_close_code = ws.close_code
            except asyncio.CancelledError:
                raise
            except (OSError, websockets.WebSocketException, asyncio.TimeoutError) as exc:
                code = getattr(getattr(exc, "rcvd", None), "code", None)
                if code is not None:
                    self.last_close_code = code
                logger.debug(f"forge client: connection to {self.url} lost: {exc}")
            finally:
                self._ws = None
            if self._closing:
                return
            # full jitter: many clients of a drained node must not come back in lockstep
            delay = random.uniform(0, min(self.max_backoff, self.min_backoff * 2 ** attempt))
            attempt += 1
            await asyncio.sleep(delay)

    async def _keepalive(self, ws: Any) -> None:
        # protocol-level pings: the server closes sockets that send nothing for idle_timeout
        # (WebSocket ping frames never reach the application)
        while True:
            await asyncio.sleep(self.keepalive)
            with contextlib.suppress(Exception):
                await ws.send('{"type":"ping"}')

    def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        sub = self._subs.get(msg.get("id")) if isinstance(msg.get("id"), str) else None
        if kind == "ready":
            self._ready.set()
        elif kind == "data" and sub is not None:
            sub.last_hash, sub.position, sub.latest = msg.get("hash"), msg.get("position"), msg.get("data")
            sub.event.set()
        elif kind == "error":
            err = SubscriptionError(msg.get("code", "INTERNAL"), msg.get("message", ""), msg.get("details"))
            details = msg.get("details")
            if sub is not None and err.code == "RATE_LIMITED" and isinstance(details, dict) and "rate" in details:
                # the subscribe rate (e.g. many resubscribes after a reconnect): try again shortly
                delay = random.uniform(0.5, 1.5) / max(0.1, float(details["rate"])) * 2
                asyncio.get_running_loop().call_later(
                    delay, lambda: asyncio.ensure_future(self._send_subscribe(sub)) if sub.sub_id in self._subs else None)
                return
            if sub is not None:
                sub.error = err
                self._subs.pop(sub.sub_id, None)
                sub.event.set()
            elif not self._ready.is_set():
                self._first_error = err
                self._ready.set()
            else:
                logger.warning(f"forge client: {err}")
        elif kind == "pong":
            fut = self._pongs.get(msg.get("id"))
            if fut is not None and not fut.done():
                fut.set_result(None)
        # "unchanged" (our last hash still matches) and "unsubscribed" need no action
