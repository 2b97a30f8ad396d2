"""One WebSocket connection speaking the live-query protocol (see README.md).

Transport-agnostic: ``transport`` has ``async receive() -> str | bytes | None`` (None when
the peer went away), ``async send_text(str)`` and ``async close(code, reason)``.

A transport may also have ``write_now(parts) -> bool`` (the server's ``forge_kernel.websocket``
extension): a message is then written at once when nothing is queued before it, with no task
switch, and the buffers of a live query's result are shared by all its subscribers.

Otherwise (and whenever ``write_now`` refuses: the peer is not reading) writes go through a
bounded outbox drained by one writer task, so a slow client never holds up the engine or other
clients: results replace the unsent result of the same subscription (latest wins), control
messages queue up to ``outbox_limit``, and a send that blocks longer than ``send_timeout`` (or
an overflowing outbox) closes the socket with 4008.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections import OrderedDict, deque
from typing import Any, Protocol

import msgspec
from loguru import logger

from forge_kernel.errors import Conflict, ForgeError, InvalidArgument, NotFound, RateLimited, Unauthenticated
from forge_kernel.executor import ANONYMOUS, Auth

from .config import RealtimeConfig
from .engine import LiveQueryEngine, Message, Subscription, encode

# close codes (documented in README.md)
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the node is draining: reconnect to another node
CLOSE_UNSUPPORTED = 1003  # binary frames
CLOSE_TOO_BIG = 1009  # a message above [realtime] max_message_bytes
CLOSE_IDLE = 4000  # nothing received for [realtime] idle_timeout seconds
CLOSE_TOO_SLOW = 4008  # the client does not read fast enough

MAX_ID_LENGTH = 128


# strict JSON (RFC 8259): no NaN/Infinity, no number beyond a double, no lone surrogate escape,
# so whatever a client sends can be echoed back as valid JSON
_decode = msgspec.json.Decoder().decode


def parse_message(raw: str) -> Any:
    """The message in ``raw``, or ``InvalidArgument`` saying why it is not one."""
    try:
        return _decode(raw)
    except msgspec.DecodeError as exc:  # ValidationError ("Number out of range") is a DecodeError
        raise InvalidArgument(f"malformed message: not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidArgument("malformed message: nested too deeply") from None


def _valid_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH


class Transport(Protocol):
    async def receive(self) -> str | bytes | None: ...
    async def send_text(self, text: str) -> None: ...
    async def close(self, code: int, reason: str) -> None: ...
    # optional: write_now(parts: Sequence[bytes]) -> bool (see forge_kernel.websocket)


def error_message(error: ForgeError, sub_id: str | None) -> Message:
    return (encode({"type": "error", "id": sub_id, "code": error.code, "message": error.message,
                    "details": error.details}),)


class Session:
    def __init__(self, engine: LiveQueryEngine, verifier: Any, config: RealtimeConfig, transport: Transport, *,
                 limits: Any = None, client: str = "unknown") -> None:
        self.engine = engine
        self.verifier = verifier
        self.config = config
        self.transport = transport
        #: the functions' rate limits (``forge_rate_limiter``), the same ones /rpc spends; None: unlimited
        self.limits = limits
        #: the caller's address, for ``key="ip"`` limits
        self.client = client
        self.auth: Auth = ANONYMOUS
        self.subscriptions: dict[str, Subscription] = {}
        self.closed = False
        self.close_code: int | None = None
        self._control: deque[Message] = deque()
        self._data: OrderedDict[str, Message] = OrderedDict()
        #: the transport's direct write, if it has one
        self._write_now = getattr(transport, "write_now", None)
        #: ``_write_now`` while a message may be written straight away (nothing queued or being
        #: sent that it would overtake, the session open), else None (``Subscriber.direct``: the
        #: engine's fan-out writes through it): one attribute to test per subscriber instead of the
        #: queues themselves (objects of their own, which a fan-out to thousands of sessions finds
        #: out of the CPU's caches)
        self.direct = self._write_now
        #: the writer task and what wakes it, started with the first message that has to queue (most
        #: connections never need one: their messages are written at once), so an idle connection
        #: holds fewer objects for the cyclic GC to scan
        self._wake: asyncio.Event | None = None
        self._tokens = float(max(1.0, config.subscribe_rate))
        self._refilled = time.monotonic()
        self._auth_generation = 0
        self._expiry: asyncio.Task | None = None
        self._writer_task: asyncio.Task | None = None
        self._timed_out = False
        #: the node's telemetry and the trace each message's span continues (set by Realtime.serve)
        self.telemetry: Any = None
        self.traceparent: str | None = None

    # --- the engine's side (Subscriber protocol) ---------------------------------------
    def push(self, sub_id: str, message: Message, kind: str) -> None:
        if self.closed or sub_id not in self.subscriptions:
            return
        if kind == "data":
            # (a fan-out writes through ``direct`` itself and pushes only what it refused)
            if self._written_now(message):
                return
            self._data[sub_id] = message  # latest wins: an unsent older result is replaced
            self._data.move_to_end(sub_id)
            self._kick()
        else:
            self._send(message)

    def end(self, sub_id: str, error: ForgeError) -> None:
        if self.subscriptions.pop(sub_id, None) is not None:
            self._data.pop(sub_id, None)
            self._send(error_message(error, sub_id))

    def notify(self, message: Message) -> None:
        """Queue a message that concerns no subscription (a ``dev`` notice)."""
        self._send(message)

    # --- outbox ---------------------------------------------------------------------------
    def _written_now(self, message: Message) -> bool:
        """Written straight to the transport: possible only when nothing queued or being sent
        would be overtaken, and when the transport takes it (the peer is reading)."""
        direct = self.direct
        return direct is not None and direct(message)

    def _send(self, message: Message) -> None:
        if self.closed or self._written_now(message):
            return
        if len(self._control) >= self.config.outbox_limit:
            asyncio.get_running_loop().create_task(self.close(CLOSE_TOO_SLOW, "client cannot keep up: outbox full"))
            return
        self._control.append(message)
        self._kick()

    def _kick(self) -> None:
        """Something is queued: wake the writer (started here the first time). Until it has sent
        the queue, nothing is written directly (it would overtake what is queued)."""
        self.direct = None
        if self._wake is None:
            self._wake = asyncio.Event()
            self._writer_task = asyncio.get_running_loop().create_task(self._writer(), name="forge:realtime-writer")
        self._wake.set()

    def _send_timed_out(self) -> None:
        if self._writer_task is not None and not self._writer_task.done():
            self._timed_out = True
            self._writer_task.cancel()

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.closed:
            await self._wake.wait()
            self._wake.clear()
            self.direct = None
            while (self._control or self._data) and not self.closed:
                if self._control:
                    message = self._control.popleft()
                else:
                    _, message = self._data.popitem(last=False)
                if self._write_now is not None and self._write_now(message):
                    continue
                # a timer per send, not wait_for: wait_for wraps every send in a new task
                timer = loop.call_later(self.config.send_timeout, self._send_timed_out)
                try:
                    await self.transport.send_text(b"".join(message).decode())
                except asyncio.CancelledError:
                    if self._timed_out:
                        await self.close(CLOSE_TOO_SLOW,
                                         f"client cannot keep up: a send blocked {self.config.send_timeout:g}s")
                        return
                    raise
                except Exception:  # the peer is gone; the reader sees the disconnect
                    self.closed = True
                    return
                finally:
                    timer.cancel()
            if not self.closed and not self._control and not self._data:
                self.direct = self._write_now  # all sent: later messages may go straight out again

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.direct = None
        self.close_code = code
        if self._wake is not None:
            self._wake.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.transport.close(code, reason), 2)

    # --- serving ---------------------------------------------------------------------------
    async def serve(self) -> None:
        try:
            while not self.closed:
                try:
                    # asyncio.timeout, not wait_for: no task (and its coroutine and context) per message
                    async with asyncio.timeout(self.config.idle_timeout):
                        raw = await self.transport.receive()
                except TimeoutError:
                    await self.close(CLOSE_IDLE, f"idle for {self.config.idle_timeout:g}s")
                    break
                if raw is None:
                    break
                if isinstance(raw, bytes):
                    await self.close(CLOSE_UNSUPPORTED, "binary messages are not supported; send JSON text")
                    break
                if len(raw.encode()) > self.config.max_message_bytes:
                    await self.close(CLOSE_TOO_BIG, f"message larger than {self.config.max_message_bytes} bytes")
                    break
                await self.handle(raw)
        finally:
            self.closed = True
            self.direct = None
            for sub in list(self.subscriptions.values()):
                self.engine.unsubscribe(sub)
            self.subscriptions.clear()
            if self._expiry is not None:
                self._expiry.cancel()
            writer = self._writer_task
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(BaseException):
                    await writer

    async def handle(self, raw: str) -> None:
        try:
            msg = parse_message(raw)
        except InvalidArgument as exc:
            self._send(error_message(exc, None))
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            self._send(error_message(InvalidArgument('malformed message: expected a JSON object with a string "type"'), None))
            return
        kind = msg["type"]
        handler = {"auth": self._on_auth, "subscribe": self._on_subscribe, "unsubscribe": self._on_unsubscribe,
                   "ping": self._on_ping}.get(kind)
        if handler is None:
            self._send(error_message(InvalidArgument(
                f"unknown message type {kind!r}; expected auth, subscribe, unsubscribe or ping"), None))
            return
        sub_id = msg.get("id") if kind in ("subscribe", "unsubscribe") and _valid_id(msg.get("id")) else None
        tel = self.telemetry
        span = None
        if kind != "ping" and tel is not None and tel.enabled:
            attrs = {"ws.message": kind}
            if kind == "subscribe" and isinstance(msg.get("function"), str):
                attrs["live.function"] = msg["function"]
            span = tel.start_span(f"WS {kind}", "server", remote=self.traceparent or "", attrs=attrs)
        try:
            await handler(msg)
        except ForgeError as exc:
            self._send(error_message(exc, sub_id))
            if span is not None:
                tel.end_span(span, exc.code)
        except Exception as exc:  # a bug of ours: answer without internals, keep the socket, log it
            logger.opt(exception=exc).error(f"realtime: handling a {kind!r} message failed")
            self._send(error_message(ForgeError("internal error while handling the message"), sub_id))
            if span is not None:
                tel.end_span(span, "INTERNAL")
        finally:
            if span is not None:
                tel.end_span(span)

    # --- messages ---------------------------------------------------------------------------
    async def _on_ping(self, msg: dict[str, Any]) -> None:
        self._send((encode({"type": "pong", "id": msg.get("id")}),))

    async def _on_auth(self, msg: dict[str, Any]) -> None:
        token = msg.get("token")
        if token is None:
            auth = ANONYMOUS
        elif not isinstance(token, str) or not token:
            raise Unauthenticated("auth: token must be a non-empty string or null")
        elif self.verifier is None:
            raise Unauthenticated("this node cannot verify tokens: no auth verifier is installed (install forge-gateway)")
        else:
            auth = await self.verifier.verify(token)
        if auth.expires_at is not None and auth.expires_at <= dt.datetime.now(dt.timezone.utc):
            raise Unauthenticated("auth: the token has expired")
        previous = self.auth
        self.auth = auth
        self._auth_generation += 1
        if previous.scope_key() != auth.scope_key():
            # results were computed as the previous caller: they must not continue as the new one
            for sub_id, sub in list(self.subscriptions.items()):
                self.engine.unsubscribe(sub)
                self.end(sub_id, Unauthenticated("the token belongs to a different caller; subscribe again"))
        else:
            for sub_id, sub in list(self.subscriptions.items()):
                try:  # same caller, but its roles may have changed with the new token
                    self.engine.executor.authorize(self.engine.executor.lookup(sub.function, kinds=("query",)), auth)
                except ForgeError as exc:
                    self.engine.unsubscribe(sub)
                    self.end(sub_id, exc)
                    continue
                sub.auth = auth  # refreshed token: the query keeps running as the same caller
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if auth.expires_at is not None:
            self._expiry = asyncio.get_running_loop().create_task(self._expire(self._auth_generation, auth.expires_at))
        self._send((encode({"type": "ready", "user_id": auth.user_id, "kind": auth.kind,
                            "expires_at": auth.expires_at.isoformat() if auth.expires_at else None}),))

    async def _expire(self, generation: int, at: dt.datetime) -> None:
        await asyncio.sleep(max(0.0, (at - dt.datetime.now(dt.timezone.utc)).total_seconds()))
        if generation != self._auth_generation or self.closed:
            return
        self.auth = ANONYMOUS
        for sub_id, sub in list(self.subscriptions.items()):
            self.engine.unsubscribe(sub)
            self.end(sub_id, Unauthenticated(f"the token expired at {at.isoformat()}; send a new auth message "
                                             "before expiry to keep subscriptions"))

    def _take_token(self) -> bool:
        now = time.monotonic()
        burst = max(1.0, self.config.subscribe_rate)
        self._tokens = min(burst, self._tokens + (now - self._refilled) * self.config.subscribe_rate)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    async def _on_subscribe(self, msg: dict[str, Any]) -> None:
        sub_id = msg.get("id")
        if not _valid_id(sub_id):
            raise InvalidArgument(f"subscribe: id must be a string of 1 to {MAX_ID_LENGTH} characters")
        unknown = set(msg) - {"type", "id", "function", "args", "hash"}
        if unknown:
            raise InvalidArgument(f"subscribe: unknown field(s) {', '.join(sorted(unknown))}")
        if sub_id in self.subscriptions:
            raise Conflict(f"subscribe: id {sub_id!r} is already subscribed on this connection; "
                           "unsubscribe it first or pick another id")
        if len(self.subscriptions) >= self.config.max_subscriptions:
            raise RateLimited(f"subscribe: at most {self.config.max_subscriptions} subscriptions per connection",
                              details={"limit": self.config.max_subscriptions})
        if not self._take_token():
            raise RateLimited(f"subscribe: more than {self.config.subscribe_rate:g} subscriptions per second",
                              details={"rate": self.config.subscribe_rate})
        last_hash = msg.get("hash")
        if last_hash is not None and not isinstance(last_hash, str):
            raise InvalidArgument("subscribe: hash must be a string or null")
        function = msg.get("function")
        args = self.engine.validate(function, msg.get("args"), self.auth)
        if self.limits is not None:  # a subscribe is a call: it spends the function's rate limit like /rpc
            await self.limits.admit(self.engine.executor.lookup(function, kinds=("query",)), self.auth, self.client)
        sub = Subscription(self, sub_id, function, args, self.auth, last_hash=last_hash)
        self.subscriptions[sub_id] = sub
        self.engine.subscribe(sub)

    async def _on_unsubscribe(self, msg: dict[str, Any]) -> None:
        sub_id = msg.get("id")
        if not isinstance(sub_id, str):
            raise InvalidArgument("unsubscribe: id must be a string")
        sub = self.subscriptions.pop(sub_id, None)
        if sub is None:
            raise NotFound(f"unsubscribe: no subscription with id {sub_id!r}")
        self._data.pop(sub_id, None)
        self.engine.unsubscribe(sub)
        self._send((encode({"type": "unsubscribed", "id": sub_id}),))
